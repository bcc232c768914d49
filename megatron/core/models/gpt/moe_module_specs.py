"""The MoE layer's spec (Megatron's get_moe_module_spec), for the MLP slot of a GPT decoder layer, and the
per-layer choice between it and the dense MLP that --moe-layer-freq makes."""

from dataclasses import dataclass
from typing import List, Optional, Union

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import GroupedGemmMLP, SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import MoEProcessGroups
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig


def get_moe_module_spec(use_te: bool = False, num_experts: int = None, moe_grouped_gemm: bool = False) -> ModuleSpec:
    """Routed experts on this project's parallel linear layers (grouped GEMM or a loop: the same weights), and a
    shared-expert MLP that MoELayer builds when the config asks for one. Transformer Engine is not available."""
    if use_te:
        raise ValueError("MoE layers are built from local layers here; Transformer Engine is not supported")
    if num_experts is None:
        raise ValueError("get_moe_module_spec needs num_experts")
    linears = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return ModuleSpec(
        module=MoELayer,
        submodules=MoESubmodules(
            experts=ModuleSpec(module=GroupedGemmMLP if moe_grouped_gemm else SequentialMLP, submodules=linears),
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=linears),
        ),
    )


def moe_layer_pattern(moe_layer_freq: Union[int, List[int]], num_layers: int) -> List[bool]:
    """Which layers are MoE under --moe-layer-freq: an int N means layers 0, N, 2N, ... (0-based); a list
    holds one 0/1 per layer."""
    if isinstance(moe_layer_freq, int):
        return [layer % moe_layer_freq == 0 for layer in range(num_layers)]
    return [bool(flag) for flag in moe_layer_freq]


def is_moe_layer(config: TransformerConfig, layer_number: int) -> bool:
    """Whether layer `layer_number` (1-based, whole model) is MoE in this config; the multi-token prediction
    depths (num_layers + k) are built like the last decoder layer, as Megatron builds them."""
    if config.num_moe_experts is None:
        return False
    return moe_layer_pattern(config.moe_layer_freq, config.num_layers)[min(layer_number, config.num_layers) - 1]


@dataclass
class MoEOrDenseSubmodules:
    moe: Union[ModuleSpec, type] = None
    dense: Union[ModuleSpec, type] = None


def build_moe_or_dense_mlp(
    config: TransformerConfig,
    submodules: MoEOrDenseSubmodules,
    layer_number: int = 1,
    pg_collection: Optional[MoEProcessGroups] = None,
):
    """The MLP slot of one layer: the MoE layer where --moe-layer-freq marks it, the dense MLP elsewhere."""
    if is_moe_layer(config, layer_number):
        return build_module(submodules.moe, config=config, layer_number=layer_number, pg_collection=pg_collection)
    return build_module(submodules.dense, config=config)


def get_moe_or_dense_mlp_spec(num_experts: int, moe_grouped_gemm: bool = False) -> ModuleSpec:
    """The MLP-slot spec of a MoE model: MoE or dense per layer (Megatron builds one spec per layer instead)."""
    dense = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    return ModuleSpec(
        module=build_moe_or_dense_mlp,
        submodules=MoEOrDenseSubmodules(
            moe=get_moe_module_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm), dense=dense
        ),
    )
