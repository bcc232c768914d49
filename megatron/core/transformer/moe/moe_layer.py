"""MoELayer: the MLP slot of a transformer layer as a mixture of experts (route, dispatch, experts, combine, plus
the shared experts)."""

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron.core.model_parallel_config import ConfigError
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEProcessGroups, group_rank, group_size
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher, MoEAlltoAllTokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

DISPATCHERS = {"allgather": MoEAllGatherTokenDispatcher, "alltoall": MoEAlltoAllTokenDispatcher}


@dataclass
class MoESubmodules:
    experts: Union[ModuleSpec, type] = None
    shared_experts: Union[ModuleSpec, type] = None


class MoELayer(MegatronModule):
    """hidden [s, b, H] -> (output [s, b, H], None), the dense MLP's contract.

    This rank holds experts [ep_rank * E / EP, (ep_rank + 1) * E / EP) of `pg_collection.ep` (all of them when no
    group is given). Keys: `router.weight` (+ `router.expert_bias`), `experts.local_experts.{i}.linear_fc1/2`,
    `shared_experts.linear_fc1/2` (+ `shared_experts.gate_weight`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MoESubmodules,
        layer_number: Optional[int] = None,
        pg_collection: Optional[MoEProcessGroups] = None,
    ):
        super().__init__(config)
        self.pg_collection = pg_collection or MoEProcessGroups()
        ep_size = group_size(self.pg_collection.ep)
        if ep_size != config.expert_model_parallel_size:
            raise ConfigError(
                f"the expert-parallel group size {ep_size} differs from --expert-model-parallel-size "
                f"{config.expert_model_parallel_size}"
            )
        self.layer_number = layer_number
        self.num_local_experts = config.num_moe_experts // ep_size
        first = group_rank(self.pg_collection.ep) * self.num_local_experts
        self.local_expert_indices = list(range(first, first + self.num_local_experts))
        self.router = TopKRouter(config, self.pg_collection)
        self.router.set_layer_number(layer_number)
        self.experts = build_module(
            submodules.experts, self.num_local_experts, config, pg_collection=self.pg_collection
        )
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size is not None:
            self.shared_experts = build_module(
                submodules.shared_experts, config=config, gate=config.moe_shared_expert_gate
            )
        self.token_dispatcher = DISPATCHERS[config.moe_token_dispatcher_type](
            self.num_local_experts, self.local_expert_indices, config, self.pg_collection
        )

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number
        self.router.set_layer_number(layer_number)

    def forward(self, hidden_states: torch.Tensor):
        probs, routing_map = self.router(hidden_states)
        shared_output = None if self.shared_experts is None else self.shared_experts(hidden_states)
        dispatcher = self.token_dispatcher
        tokens, probs = dispatcher.dispatch_preprocess(hidden_states, routing_map, probs)
        tokens, probs = dispatcher.token_dispatch(tokens, probs)
        tokens, tokens_per_expert, probs = dispatcher.dispatch_postprocess(tokens, probs)
        expert_output, _ = self.experts(tokens, tokens_per_expert, probs)
        output = dispatcher.combine_preprocess(expert_output)
        output = dispatcher.token_combine(output)
        output = dispatcher.combine_postprocess(output)
        if shared_output is not None:
            output = output + shared_output
        return output, None
