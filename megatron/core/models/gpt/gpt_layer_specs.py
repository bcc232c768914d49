"""Layer specs for GPTModel: which module fills each slot of a TransformerLayer (Megatron-core's functions)."""

import importlib.util
from typing import Optional

from megatron.core.errors import UserError
from megatron.core.models.gpt.moe_module_specs import get_moe_or_dense_mlp_spec
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


def get_gpt_layer_with_transformer_engine_spec(
    num_experts: Optional[int] = None,
    moe_grouped_gemm: Optional[bool] = False,
    qk_layernorm: Optional[bool] = False,
    fp8: Optional[str] = None,
) -> ModuleSpec:
    """Megatron's Transformer Engine layer spec. This project has no Transformer Engine layers: the call
    fails with one message (naming the missing package when it is not installed); the local spec builds the
    same model on torch kernels."""
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

    With `num_experts` the MLP slot is a mixture of experts in the layers config.moe_layer_freq marks (a dense
    MLP in the others); `moe_grouped_gemm` runs the local experts as one grouped GEMM.
    """
    if num_experts is None:
        mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    else:
        mlp = get_moe_or_dense_mlp_spec(num_experts, moe_grouped_gemm)
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
            mlp=mlp,
        ),
    )
