"""Small helpers shared across megatron.core."""

import math

import torch
import torch.distributed

# torch 2.10 renamed the collectives whose output is one tensor and deprecated the old names; use whichever
# this torch has, so older releases (torch.nn.RMSNorm needs 2.4) work and newer ones give no warnings.
all_gather_single = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
reduce_scatter_single = (
    getattr(torch.distributed, "reduce_scatter_single", None) or torch.distributed.reduce_scatter_tensor
)


def divide(numerator: int, denominator: int) -> int:
    """numerator / denominator for sizes that must split evenly (heads over ranks, rows over shards)."""
    if denominator == 0 or numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def init_method_normal(sigma: float):
    """Weight initialiser drawing from N(0, sigma^2)."""

    def init_(tensor):
        return torch.nn.init.normal_(tensor, mean=0.0, std=sigma)

    return init_


def scaled_init_method_normal(sigma: float, num_layers: int):
    """N(0, (sigma / sqrt(2 * num_layers))^2): the output projections feeding each residual add, so the
    residual stream's variance does not grow with depth (GPT-2 / Megatron-LM)."""
    return init_method_normal(sigma / math.sqrt(2.0 * num_layers))


def ensure_divisibility(numerator: int, denominator: int) -> None:
    """Megatron's name for the check `divide` makes."""
    divide(numerator, denominator)


def get_attr_wrapped_model(model, attr: str, allow_none: bool = True, return_model_obj: bool = False):
    """`attr` of the model under any wrappers (DDP, Float16Module: each holds the next as `.module`);
    `return_model_obj`: the innermost module that has it instead."""
    if isinstance(model, list):
        if len(model) != 1:
            raise RuntimeError("get_attr_wrapped_model takes one model chunk")
        model = model[0]
    while not hasattr(model, attr) or (not allow_none and getattr(model, attr) is None):
        if not hasattr(model, "module"):
            raise RuntimeError(f"couldn't find attribute {attr} in {type(model).__name__} or its wrapped modules")
        model = model.module
    return model if return_model_obj else getattr(model, attr)


def get_model_config(model):
    """The config of a model, looking through wrappers; the schedules read their hooks from it."""
    return get_attr_wrapped_model(model, "config", allow_none=False)


class GlobalMemoryBuffer:
    """Reusable scratch tensors by (name, dtype), grown on demand; callers must not share a name at once."""

    def __init__(self):
        self.buffer = {}

    def get_tensor(self, tensor_shape, dtype: torch.dtype, name: str) -> torch.Tensor:
        required = math.prod(tensor_shape)
        existing = self.buffer.get((name, dtype))
        if existing is None or existing.numel() < required:
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            self.buffer[(name, dtype)] = torch.empty(required, dtype=dtype, device=device, requires_grad=False)
        return self.buffer[(name, dtype)][:required].view(*tensor_shape)


class StragglerDetector:
    """Megatron's straggler detector, as an honest no-op: the timing contexts measure nothing and `report`
    logs nothing, so scripts that wrap their batch loading and forward pass in it (`with stimer:`,
    `with stimer(bdata=True):`) run unchanged. Cross-rank straggler detection (--log-straggler) is not
    implemented; `enabled` always reads False."""

    def __call__(self, bdata: bool = False) -> "StragglerDetector":
        return self

    def __enter__(self) -> "StragglerDetector":
        return self

    def __exit__(self, *exc_info) -> bool:
        return False

    @property
    def enabled(self) -> bool:
        return False

    def configure(self, world: int, rank: int, mmcnt: int = 1, amp: float = 3.0, port: int = 65535,
                  prefill: int = 1024, enabled: bool = False) -> None:
        """Accepted and ignored (see the class docstring)."""

    def reset(self) -> None:
        """Nothing is collected, so nothing to reset."""

    def report(self, total_flops: float = 0.0, log_interval: int = 0) -> bool:
        """Nothing was collected: reports nothing and returns False."""
        return False
