"""The feed-forward sub-block: column-parallel up projection, activation (optionally gated), row-parallel
down projection."""

from dataclasses import dataclass
from typing import Optional, Union

import torch.nn.functional as F

from megatron.core.fusions.fused_bias_gelu import bias_gelu, tanh_gelu
from megatron.core.fusions.compiled import compiled
from megatron.core.fusions.fused_bias_swiglu import bias_gated_activation
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class MLPSubmodules:
    linear_fc1: Union[ModuleSpec, type] = None
    linear_fc2: Union[ModuleSpec, type] = None


def activation_of(config: TransformerConfig):
    """The activation the MLP applies: Megatron's fused bias-GeLU computes the tanh approximation."""
    if config.bias_activation_fusion and config.activation_func is F.gelu:
        return tanh_gelu
    return config.activation_func


def apply_mlp_activation(intermediate, bias, config: TransformerConfig):
    """act(x + b), or act(gate) * up for gated units (the projection holds [gate; up] on every rank)."""
    activation = activation_of(config)
    if config.gated_linear_unit:
        fused = config.torch_compile_fusions and config.bias_activation_fusion
        gated_activation = compiled(bias_gated_activation) if fused else bias_gated_activation
        return gated_activation(intermediate, bias, activation)
    if activation is tanh_gelu:
        return bias_gelu(bias, intermediate)
    return activation(intermediate if bias is None else intermediate + bias)


def build_mlp_projections(
    config: TransformerConfig, fc1_spec, fc2_spec, ffn_hidden_size: Optional[int] = None, is_expert: bool = False
):
    """(up projection h -> ffn (x2 when gated), down projection ffn -> h) built from their specs; `ffn_hidden_size`
    overrides the config's width (routed and shared experts have their own); `is_expert` splits a routed expert
    over the expert-tensor-parallel ranks."""
    gated = config.gated_linear_unit
    ffn_hidden_size = config.ffn_hidden_size if ffn_hidden_size is None else ffn_hidden_size
    expert = {"is_expert": True} if is_expert else {}
    fc1 = build_module(
        fc1_spec,
        config.hidden_size,
        ffn_hidden_size * (2 if gated else 1),
        config=config,
        init_method=config.init_method,
        bias=config.add_bias_linear,
        gather_output=False,
        skip_bias_add=True,
        # [gate; up] are split separately, so each rank holds [gate_r; up_r].
        stride=2 if gated else 1,
        **expert,
    )
    fc2 = build_module(
        fc2_spec,
        ffn_hidden_size,
        config.hidden_size,
        config=config,
        init_method=config.output_layer_init_method,
        bias=config.add_bias_linear,
        input_is_parallel=True,
        skip_bias_add=True,
        **expert,
    )
    return fc1, fc2


def mlp_forward(fc1, fc2, hidden_states, config: TransformerConfig):
    """fc2(activation(fc1(x))); returns (output, output_bias)."""
    intermediate, bias = fc1(hidden_states)
    return fc2(apply_mlp_activation(intermediate, bias, config))


class MLP(MegatronModule):
    """h -> ffn (x2 when gated) -> activation -> h; returns (output, output_bias)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        ffn_hidden_size: Optional[int] = None,
        is_expert: bool = False,
    ):
        super().__init__(config)
        self.linear_fc1, self.linear_fc2 = build_mlp_projections(
            config, submodules.linear_fc1, submodules.linear_fc2, ffn_hidden_size, is_expert
        )

    def forward(self, hidden_states):
        return mlp_forward(self.linear_fc1, self.linear_fc2, hidden_states, self.config)
