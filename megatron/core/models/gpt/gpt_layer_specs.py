"""Layer specs for GPTModel: which module fills each slot of a TransformerLayer (Megatron-core's functions)."""

import importlib.util
from typing import Optional

from megatron.core.errors import UserError
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm, build_head_norm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


class LayerSpecError(UserError, ValueError):
    """A layer spec asked for a feature this project does not provide (yet)."""


def _require_dense(num_experts: Optional[int]) -> None:
    if num_experts is not None:
        raise LayerSpecError(
            f"num_experts={num_experts}: MoE layers are not yet supported; build a dense model (num_experts=None, "
            "no --num-experts)"
        )


def get_gpt_layer_with_transformer_engine_spec(
    num_experts: Optional[int] = None,
    moe_grouped_gemm: Optional[bool] = False,
    qk_layernorm: Optional[bool] = False,
    fp8: Optional[str] = None,
) -> ModuleSpec:
    """Megatron's Transformer Engine layer spec. This project has no Transformer Engine layers: the call
    fails with one message (naming the missing package when it is not installed); the local spec builds the
    same model on torch kernels."""
    _require_dense(num_experts)
    if importlib.util.find_spec("transformer_engine") is None:
        raise LayerSpecError(
            "get_gpt_layer_with_transformer_engine_spec needs the transformer_engine package, which is not "
            "importable; install it, or use get_gpt_layer_local_spec (--transformer-impl local)"
        )
    raise LayerSpecError(
        "this project has no Transformer Engine layer spec yet; use get_gpt_layer_local_spec "
        "(--transformer-impl local): the same model on torch kernels"
    )


def get_gpt_layer_local_spec(
    num_experts: Optional[int] = None,
    moe_grouped_gemm: Optional[bool] = False,
    qk_layernorm: Optional[bool] = False,
) -> ModuleSpec:
    """A decoder layer on this project's own tensor-parallel layers and torch's attention kernels.

    `num_experts` must be None (MoE comes later); `moe_grouped_gemm` only applies to MoE layers.
    """
    _require_dense(num_experts)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=build_head_norm if qk_layernorm else None,
                    k_layernorm=build_head_norm if qk_layernorm else None,
                ),
            ),
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
        ),
    )
