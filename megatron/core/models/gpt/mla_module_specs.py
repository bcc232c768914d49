"""Multi-latent attention specs for a GPT decoder layer (what Megatron's get_gpt_layer_local_spec builds with
multi_latent_attention=True), on this project's parallel linear layers and torch's attention kernels."""

import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm


def get_mla_self_attention_local_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """The self_attention slot: MLASelfAttention; `qk_layernorm` adds the norms on the query and kv latents
    (DeepSeek-V2/V3 have them, so their models need --qk-layernorm)."""
    norm = WrappedTorchNorm if qk_layernorm else None
    return ModuleSpec(
        module=MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=DotProductAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=norm,
            kv_layernorm=norm,
        ),
    )


def get_gpt_mla_layer_local_spec(qk_layernorm: bool = False, mlp: Optional[ModuleSpec] = None) -> ModuleSpec:
    """The local decoder layer with MLA in the attention slot; `mlp` replaces the dense MLP (e.g. the MoE spec)."""
    layer = get_gpt_layer_local_spec()
    submodules = dataclasses.replace(
        layer.submodules,
        self_attention=get_mla_self_attention_local_spec(qk_layernorm),
        mlp=mlp or layer.submodules.mlp,
    )
    return dataclasses.replace(layer, submodules=submodules)
