"""MegatronModule: the base of every model module, which checks checkpoints against its own shapes."""

from typing import List

import torch

from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.errors import UserError


class StateDictMismatchError(UserError, ValueError):
    """A checkpoint's tensors do not fit the model built from the flags."""


def describe_state_dict_mismatch(expected: dict, given: dict, strict: bool = True) -> List[str]:
    """Human-readable differences between the model's state dict and a checkpoint's (empty if they fit)."""
    problems = []
    missing = [name for name in expected if name not in given]
    if missing:
        problems.append(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}")
    unexpected = [name for name in given if name not in expected]
    if unexpected and strict:
        problems.append(f"the checkpoint holds {len(unexpected)} tensor(s) the model lacks, e.g. {unexpected[0]}")
    for name, tensor in given.items():
        if name in expected and hasattr(tensor, "shape") and tuple(tensor.shape) != tuple(expected[name].shape):
            problems.append(
                f"{name} has shape {tuple(tensor.shape)} in the checkpoint but {tuple(expected[name].shape)} "
                "in the model"
            )
    return problems


def check_state_dict_fits(expected: dict, given: dict, strict: bool = True) -> None:
    """Raise one message naming the first differences and the flags that usually cause them."""
    problems = describe_state_dict_mismatch(expected, given, strict)
    if not problems:
        return
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    raise StateDictMismatchError(
        f"the checkpoint does not fit the model built from the flags: {shown}. Check --num-layers, "
        "--hidden-size, --ffn-hidden-size, --num-attention-heads, --num-query-groups, --kv-channels, --swiglu, "
        "--untie-embeddings-and-output-weights, --disable-bias-linear, --position-embedding-type, the padded "
        "vocabulary (--make-vocab-size-divisible-by), the tensor/pipeline sizes and the model stack "
        "(--use-legacy-models) against the checkpoint's saved args, or convert it with tools/checkpoint/convert.py"
    )


class MegatronModule(torch.nn.Module):
    """A module that carries its TransformerConfig and checks checkpoints against its own shapes."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        """The state dict written to checkpoints (a subclass may reshape it, as the legacy stack does)."""
        return self.state_dict(prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True):
        check_state_dict_fits(self.state_dict(), state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict)


def _cast_floating(value, dtype: torch.dtype):
    """Floating-point tensors (also inside tuples and lists) cast to `dtype`; everything else unchanged."""
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floating(item, dtype) for item in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


class Float16Module(MegatronModule):
    """Megatron-core's half-precision wrapper: the module's weights in fp16 (config.fp16) or bf16, the first
    pipeline stage's floating inputs cast to that dtype, the last stage's outputs returned in fp32."""

    def __init__(self, config: TransformerConfig, module: torch.nn.Module):
        super().__init__(config)
        if not (config.fp16 or config.bf16):
            raise ValueError("Float16Module needs config.fp16 or config.bf16")
        self.dtype = torch.float16 if config.fp16 else torch.bfloat16
        self.add_module("module", module.to(self.dtype))

    def set_input_tensor(self, input_tensor):
        return self.module.set_input_tensor(input_tensor)

    def forward(self, *inputs, **kwargs):
        if parallel_state.is_pipeline_first_stage():
            inputs = _cast_floating(inputs, self.dtype)
        outputs = self.module(*inputs, **kwargs)
        if parallel_state.is_pipeline_last_stage():
            outputs = _cast_floating(outputs, torch.float32)
        return outputs

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict_for_save_checkpoint(prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)
