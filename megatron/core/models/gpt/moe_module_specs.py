"""The MoE layer's spec (Megatron's get_moe_module_spec), for the MLP slot of a GPT decoder layer."""

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import GroupedGemmMLP, SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec


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
