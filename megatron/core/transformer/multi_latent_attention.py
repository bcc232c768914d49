"""Multi-latent attention (MLA, DeepSeek-V2/V3) in plain PyTorch, with Megatron-core's module names.

Queries come from a q_lora_rank latent (or straight from the hidden states), keys and values from one shared
kv_lora_rank latent; each query/key head is qk_head_dim channels without position followed by
qk_pos_emb_head_dim rotated ones, and the rotated key part (k_pos_emb) is one vector shared by all heads.
Values have v_head_dim channels, so core attention runs with different q/k and v head sizes.

Tensor parallelism follows Megatron's local spec: the down-projections are column-parallel and their outputs
are gathered (the latents are replicated; re-scattered along the sequence under sequence parallelism), the
up-projections are column-parallel by heads and linear_proj is row-parallel. The generation cache holds the
latents (kv_layernorm(kv latent) and the rotated k_pos_emb: kv_lora_rank + qk_pos_emb_head_dim numbers per
token and layer), as HF does; every step up-projects the cached latents again.
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from megatron.core import parallel_state
from megatron.core.inference_params import InferenceParams
from megatron.core.models.common.embeddings.rotary_pos_embedding import (
    RotaryEmbedding,
    apply_rotary_pos_emb,
    rotary_angles_on_this_cp_rank,
)
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding, yarn_softmax_scale
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import checkpoint
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.core.utils import divide


# Megatron parameter name in MLASelfAttention -> HF DeepSeek-V2/V3 name under `model.layers.N.self_attn.`. The
# tensors copy unchanged at TP = 1: kv_b_proj rows are per head [k_nope; v] like linear_kv_up_proj, and the
# rotated channels stay in DeepSeek's interleaved order (de-interleaved by the rotary code, as in HF).
MLA_HF_NAMES = {
    "linear_q_proj.weight": "q_proj.weight",
    "linear_q_down_proj.weight": "q_a_proj.weight",
    "q_layernorm.weight": "q_a_layernorm.weight",
    "linear_q_up_proj.weight": "q_b_proj.weight",
    "linear_kv_down_proj.weight": "kv_a_proj_with_mqa.weight",
    "kv_layernorm.weight": "kv_a_layernorm.weight",
    "linear_kv_up_proj.weight": "kv_b_proj.weight",
    "linear_proj.weight": "o_proj.weight",
}


@dataclass
class MLASelfAttentionSubmodules:
    linear_q_proj: Union[ModuleSpec, type] = None
    linear_q_down_proj: Union[ModuleSpec, type] = None
    linear_q_up_proj: Union[ModuleSpec, type] = None
    linear_kv_down_proj: Union[ModuleSpec, type] = None
    linear_kv_up_proj: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type, None] = None
    kv_layernorm: Union[ModuleSpec, type, None] = None


def build_mla_rotary_embedding(config: MLATransformerConfig) -> RotaryEmbedding:
    """MLA's own rotary embedding of the qk_pos_emb_head_dim rotated channels (YaRN or plain RoPE)."""
    if config.rope_type == "yarn":
        return YarnRotaryEmbedding(
            config.qk_pos_emb_head_dim,
            rotary_base=config.rotary_base,
            use_cpu_initialization=config.use_cpu_initialization,
            scaling_factor=config.rotary_scaling_factor,
            original_max_position_embeddings=config.original_max_position_embeddings,
            beta_fast=config.beta_fast,
            beta_slow=config.beta_slow,
            mscale=config.mscale,
            mscale_all_dim=config.mscale_all_dim,
        )
    return RotaryEmbedding(
        config.qk_pos_emb_head_dim,
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
        use_cpu_initialization=config.use_cpu_initialization,
    )


def mla_softmax_scale(config: MLATransformerConfig) -> float:
    """1 / sqrt(q/k head dim), times YaRN's mscale(f, mscale_all_dim)^2 under YaRN (as HF DeepSeek-V3)."""
    head_dim = config.qk_head_dim + config.qk_pos_emb_head_dim
    if config.rope_type != "yarn":
        return head_dim**-0.5
    return yarn_softmax_scale(head_dim, config.rotary_scaling_factor, config.mscale_all_dim)


class MLASelfAttention(MegatronModule):
    """Causal multi-latent self-attention: forward(hidden_states [s, b, h], attention_mask, inference_params,
    rotary_pos_emb) -> (output [s, b, h], output_bias), SelfAttention's contract.

    `rotary_pos_emb` is accepted for that contract and ignored: MLA rotates its qk_pos_emb_head_dim channels
    with its own table (`self.rotary_pos_emb`)."""

    def __init__(
        self,
        config: MLATransformerConfig,
        submodules: MLASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
    ):
        super().__init__(config)
        self.layer_number = layer_number
        heads = config.num_attention_heads
        self.heads_per_partition = divide(heads, parallel_state.get_tensor_model_parallel_world_size())
        self.q_head_dim = config.qk_head_dim + config.qk_pos_emb_head_dim
        self.rotary_pos_emb = build_mla_rotary_embedding(config)
        self.softmax_scale = mla_softmax_scale(config)
        self.core_attention = build_module(
            submodules.core_attention,
            config=config,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            softmax_scale=self.softmax_scale,
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            heads * config.v_head_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
        )
        query_size = heads * self.q_head_dim
        if config.q_lora_rank is None:
            self.linear_q_proj = self._projection(submodules.linear_q_proj, config.hidden_size, query_size)
        else:
            q_lora_rank = config.q_lora_rank
            self.linear_q_down_proj = self._projection(submodules.linear_q_down_proj, config.hidden_size, q_lora_rank)
            self.linear_q_up_proj = self._projection(submodules.linear_q_up_proj, q_lora_rank, query_size)
        self.linear_kv_down_proj = self._projection(
            submodules.linear_kv_down_proj, config.hidden_size, config.kv_lora_rank + config.qk_pos_emb_head_dim
        )
        self.linear_kv_up_proj = self._projection(
            submodules.linear_kv_up_proj, config.kv_lora_rank, heads * (config.qk_head_dim + config.v_head_dim)
        )
        self.q_layernorm = None
        if config.q_lora_rank is not None and submodules.q_layernorm is not None:
            self.q_layernorm = self._norm(submodules.q_layernorm, config.q_lora_rank)
        self.kv_layernorm = None
        if submodules.kv_layernorm is not None:
            self.kv_layernorm = self._norm(submodules.kv_layernorm, config.kv_lora_rank)

    def _projection(self, spec, input_size: int, output_size: int):
        """A bias-free column-parallel projection (Megatron's: down and up, with or without a linear bias)."""
        return build_module(
            spec, input_size, output_size, config=self.config, init_method=self.config.init_method, bias=False,
            gather_output=False,
        )

    def _norm(self, spec, hidden_size: int):
        return build_module(spec, config=self.config, hidden_size=hidden_size, eps=self.config.layernorm_epsilon)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        inference_params: Optional[InferenceParams] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
    ):
        if inference_params is not None and self.config.sequence_parallel:
            raise ValueError("generation with a key/value cache runs without sequence parallelism")
        query_input = self._query_input(hidden_states)
        kv_latent, k_pos_emb = self._key_value_latent(hidden_states)
        offset = 0 if inference_params is None else inference_params.sequence_len_offset
        freqs, mscale = self._rotary_angles(k_pos_emb.size(0), offset)
        k_pos_emb = self._rotate(k_pos_emb.unsqueeze(2), freqs, mscale)
        if inference_params is not None:
            kv_latent, k_pos_emb = inference_params.update_key_value(self.layer_number, kv_latent, k_pos_emb)
        if self.config.recompute_granularity == "selective" and self.training and torch.is_grad_enabled():
            # Keep only the latents: the up-projected q, k, v and the attention are recomputed in backward.
            context = checkpoint(self._attend, False, query_input, kv_latent, k_pos_emb, freqs, mscale, attention_mask)
        else:
            context = self._attend(query_input, kv_latent, k_pos_emb, freqs, mscale, attention_mask)
        return self.linear_proj(context)

    def _query_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the query up-projection reads: the normed query latent, or the hidden states without q-LoRA."""
        if self.config.q_lora_rank is None:
            return hidden_states
        q_latent = self._gathered_latent(self.linear_q_down_proj, hidden_states)
        if self.config.sequence_parallel:
            q_latent = scatter_to_sequence_parallel_region(q_latent)
        return q_latent if self.q_layernorm is None else self.q_layernorm(q_latent)

    def _key_value_latent(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(normed kv latent [s(/tp), b, kv_lora_rank], unrotated k_pos_emb [s, b, qk_pos_emb_head_dim])."""
        config = self.config
        latent = self._gathered_latent(self.linear_kv_down_proj, hidden_states)
        kv_latent, k_pos_emb = torch.split(latent, [config.kv_lora_rank, config.qk_pos_emb_head_dim], dim=-1)
        # k_pos_emb serves every head, and this rank holds only some: sum the heads' gradients over the ranks.
        k_pos_emb = copy_to_tensor_model_parallel_region(k_pos_emb)
        if config.sequence_parallel:
            kv_latent = scatter_to_sequence_parallel_region(kv_latent)
        if self.kv_layernorm is not None:
            kv_latent = self.kv_layernorm(kv_latent)
        return kv_latent, k_pos_emb

    @staticmethod
    def _gathered_latent(down_projection, hidden_states: torch.Tensor) -> torch.Tensor:
        """The whole latent [s, b, rank] on every tensor-parallel rank (the projection's shards gathered)."""
        latent, _ = down_projection(hidden_states)
        return gather_from_tensor_model_parallel_region(latent)

    def _rotary_angles(self, length: int, offset: int) -> Tuple[torch.Tensor, float]:
        """(angles of this rank's `length` positions, YaRN's mscale); under context parallelism the table
        covers the whole sequence and keeps the rows of this rank's chunks."""
        length *= parallel_state.get_context_parallel_world_size()
        if isinstance(self.rotary_pos_emb, YarnRotaryEmbedding):
            freqs, mscale = self.rotary_pos_emb(length, offset)
        else:
            freqs, mscale = self.rotary_pos_emb(length, offset), 1.0
        return rotary_angles_on_this_cp_rank(freqs), mscale

    def _rotate(self, tensor: torch.Tensor, freqs: torch.Tensor, mscale: float) -> torch.Tensor:
        return apply_rotary_pos_emb(tensor, freqs, self.config, mscale=mscale, mla_rotary_interleaved=True)

    def _attend(self, query_input, kv_latent, k_pos_emb, freqs, mscale, attention_mask) -> torch.Tensor:
        """Up-project queries (rotating their position part) and the keys/values of every cached position, then
        attend: [sq, b, heads/tp * v_head_dim]."""
        config = self.config
        up_projection = self.linear_q_proj if config.q_lora_rank is None else self.linear_q_up_proj
        query, _ = up_projection(query_input)
        query = query.view(*query.shape[:2], self.heads_per_partition, self.q_head_dim)
        q_no_pe, q_pos_emb = torch.split(query, [config.qk_head_dim, config.qk_pos_emb_head_dim], dim=-1)
        query = torch.cat((q_no_pe, self._rotate(q_pos_emb, freqs, mscale)), dim=-1)

        key_value, _ = self.linear_kv_up_proj(kv_latent)
        key_value = key_value.view(*key_value.shape[:2], self.heads_per_partition, -1)
        k_no_pe, value = torch.split(key_value, [config.qk_head_dim, config.v_head_dim], dim=-1)
        key = torch.cat((k_no_pe, k_pos_emb.expand(-1, -1, self.heads_per_partition, -1)), dim=-1)
        return self.core_attention(query, key, value, attention_mask)
