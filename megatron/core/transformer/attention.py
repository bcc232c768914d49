"""Self-attention: fused QKV projection -> optional q/k norm -> rotary -> core attention -> output
projection. Heads and query groups are split over tensor-parallel ranks."""

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core import parallel_state
from megatron.core.inference_params import InferenceParams
from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.tensor_parallel.random import checkpoint
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type, None] = None
    k_layernorm: Union[ModuleSpec, type, None] = None


def split_query_key_value(mixed_qkv: torch.Tensor, groups: int, heads_per_group: int, head_dim: int):
    """Split the fused projection [s, b, groups * (heads_per_group + 2) * d], laid out group by group as
    [q heads of the group, k, v], into q [s, b, heads, d] and k, v [s, b, groups, d]."""
    sequence, batch = mixed_qkv.shape[:2]
    mixed_qkv = mixed_qkv.view(sequence, batch, groups, (heads_per_group + 2) * head_dim)
    query, key, value = torch.split(mixed_qkv, [heads_per_group * head_dim, head_dim, head_dim], dim=-1)
    return query.reshape(sequence, batch, groups * heads_per_group, head_dim), key, value


class Attention(MegatronModule):
    """What every attention variant shares: head bookkeeping, building the two projections, and the path
    from the fused QKV output to the per-head context. Subclasses own the modules and their names."""

    def __init__(self, config: TransformerConfig, layer_number: int):
        super().__init__(config)
        self.layer_number = layer_number
        world_size = parallel_state.get_tensor_model_parallel_world_size()
        self.head_dim = config.kv_channels
        self.groups_per_partition = divide(config.num_query_groups, world_size)
        self.heads_per_group = divide(config.num_attention_heads, config.num_query_groups)
        self.q_layernorm = None
        self.k_layernorm = None

    def build_projections(self, qkv_spec, proj_spec):
        """(fused QKV projection, output projection) built from their specs."""
        config = self.config
        query_projection_size = config.kv_channels * config.num_attention_heads
        qkv = build_module(
            qkv_spec,
            config.hidden_size,
            query_projection_size + 2 * config.kv_channels * config.num_query_groups,
            config=config,
            init_method=config.init_method,
            bias=config.add_bias_linear or config.add_qkv_bias,
            gather_output=False,
        )
        proj = build_module(
            proj_spec,
            query_projection_size,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
        )
        return qkv, proj

    def attend(
        self,
        mixed_qkv: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        inference_params: Optional[InferenceParams],
        rotary_pos_emb: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Fused QKV projection output [s, b, ...] -> attention context [s, b, heads * head_dim]."""
        query, key, value = split_query_key_value(
            mixed_qkv, self.groups_per_partition, self.heads_per_group, self.head_dim
        )
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        if rotary_pos_emb is not None:
            # rotary_pos_emb covers positions from 0; this call holds positions offset .. offset + sq.
            offset = 0 if inference_params is None else inference_params.sequence_len_offset
            freqs = rotary_pos_emb[offset : offset + query.size(0)]
            query = apply_rotary_pos_emb(query, freqs, self.config)
            key = apply_rotary_pos_emb(key, freqs, self.config)
        if inference_params is not None:
            key, value = inference_params.update_key_value(self.layer_number, key, value)
        if self.config.recompute_granularity == "selective" and self.training and torch.is_grad_enabled():
            return checkpoint(self.core_attention, False, query, key, value, attention_mask)
        return self.core_attention(query, key, value, attention_mask)


class SelfAttention(Attention):
    """Causal self-attention with grouped-query heads; returns (output, output_bias)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
    ):
        super().__init__(config, layer_number)
        self.linear_qkv, self.linear_proj = self.build_projections(submodules.linear_qkv, submodules.linear_proj)
        if submodules.q_layernorm is not None:
            self.q_layernorm = build_module(submodules.q_layernorm, config=config, head_dim=self.head_dim)
        if submodules.k_layernorm is not None:
            self.k_layernorm = build_module(submodules.k_layernorm, config=config, head_dim=self.head_dim)
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number, attn_mask_type=attn_mask_type
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        inference_params: Optional[InferenceParams] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
    ):
        mixed_qkv, _ = self.linear_qkv(hidden_states)
        return self.linear_proj(self.attend(mixed_qkv, attention_mask, inference_params, rotary_pos_emb))
