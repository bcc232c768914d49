"""One decoder layer: norm -> self-attention -> residual -> norm -> MLP -> residual."""

import inspect
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from megatron.core.fusions.fused_bias_dropout import bias_dropout_add
from megatron.core.inference_params import InferenceParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEProcessGroups
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class TransformerLayerSubmodules:
    input_layernorm: Union[ModuleSpec, type] = None
    self_attention: Union[ModuleSpec, type] = None
    pre_mlp_layernorm: Union[ModuleSpec, type] = None
    mlp: Union[ModuleSpec, type] = None


class TransformerLayer(MegatronModule):
    """A pre-norm residual block; `layer_number` counts from 1 over the whole model (all pipeline stages)."""

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules, layer_number: int = 1):
        super().__init__(config)
        self.layer_number = layer_number
        self.input_layernorm = build_module(
            submodules.input_layernorm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number)
        self.pre_mlp_layernorm = build_module(
            submodules.pre_mlp_layernorm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.mlp = build_module(submodules.mlp, config=config, **_moe_kwargs(submodules.mlp, layer_number))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        inference_params: Optional[InferenceParams] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(hidden_states, context): Megatron-core's return shape; context (cross-attention output) is None
        in a decoder-only layer."""
        hidden_states = pre_norm_residual_block(
            self, self.input_layernorm, self.self_attention, self.pre_mlp_layernorm, self.mlp,
            hidden_states, attention_mask, inference_params, rotary_pos_emb,
        )
        return hidden_states, None


def _moe_kwargs(mlp_spec, layer_number: int) -> dict:
    """An MLP slot that can be a mixture of experts gets the layer number (its aux-loss log entry and place in
    --moe-layer-freq) and the expert process groups; a dense MLP gets neither."""
    module = mlp_spec.module if isinstance(mlp_spec, ModuleSpec) else mlp_spec
    if "pg_collection" not in inspect.signature(module).parameters:
        return {}
    return {"layer_number": layer_number, "pg_collection": MoEProcessGroups.from_parallel_state()}


def pre_norm_residual_block(
    layer: MegatronModule,
    input_norm,
    attention,
    pre_mlp_norm,
    mlp,
    hidden_states: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    inference_params: Optional[InferenceParams],
    rotary_pos_emb: Optional[torch.Tensor],
) -> torch.Tensor:
    """x + attention(norm(x)), then + mlp(norm(.)), with dropout on each branch (shared by both stacks)."""
    config = layer.config
    post_norm_residual = config.apply_residual_connection_post_layernorm
    normed = input_norm(hidden_states)
    attention_output = attention(normed, attention_mask, inference_params, rotary_pos_emb)
    residual = normed if post_norm_residual else hidden_states
    hidden_states = bias_dropout_add(attention_output, residual, config.hidden_dropout, layer.training)
    normed = pre_mlp_norm(hidden_states)
    residual = normed if post_norm_residual else hidden_states
    return bias_dropout_add(mlp(normed), residual, config.hidden_dropout, layer.training)
