"""Token dispatchers: bring each token to the rank holding its experts and the weighted outputs back.

Each runs in six steps (Megatron's names) so callers can time or overlap them: dispatch_preprocess,
token_dispatch, dispatch_postprocess -> experts -> combine_preprocess, token_combine, combine_postprocess.
EP rank j owns experts [j * E / EP, (j + 1) * E / EP); with expert tensor parallelism (ETP > 1) each of the ETP
ranks holds a slice of those experts, sees every token routed to them and returns a partial output that the
combine sums.
"""

from typing import List, Optional

import torch

from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_utils import (
    MoEProcessGroups,
    all_gather_rows,
    all_to_all,
    gather_rows_uneven,
    group_rank,
    group_size,
    permute,
    reduce_scatter_rows_uneven,
    sort_chunks_by_idxs,
    unpermute,
)
from megatron.core.transformer.transformer_config import TransformerConfig


class MoETokenDispatcher:
    """What both dispatchers share: the config, the process groups and this rank's experts."""

    def __init__(
        self,
        num_local_experts: int,
        local_expert_indices: List[int],
        config: TransformerConfig,
        pg_collection: Optional[MoEProcessGroups] = None,
    ):
        self.config = config
        self.pg_collection = pg_collection or MoEProcessGroups()
        self.num_experts = config.num_moe_experts
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices
        self.ep_group = self.pg_collection.ep
        self.ep_size = group_size(self.ep_group)
        self.ep_rank = group_rank(self.ep_group)
        self.etp_group = self.pg_collection.etp
        self.etp_size = group_size(self.etp_group)
        self.local_experts = slice(local_expert_indices[0], local_expert_indices[-1] + 1)

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """[s, b, H] -> [s*b, H]; remembers the shape and routing map."""
        self.hidden_shape = hidden_states.shape
        self.routing_map = routing_map
        return hidden_states.reshape(-1, self.hidden_shape[-1]), probs

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.view(self.hidden_shape)


class MoEAllGatherTokenDispatcher(MoETokenDispatcher):
    """All-gather every token, probability and routing row over the expert tensor x expert parallel group, run the
    local experts (or their slices) on the tokens routed to them, reduce-scatter the outputs back (which also sums
    the slices' partial outputs). Needs equal token counts per rank."""

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        group = self.pg_collection.tp_ep
        if group_size(group) == 1:
            return hidden_states, probs
        self.routing_map = all_gather_rows(self.routing_map, group)
        probs = gather_from_sequence_parallel_region(probs, group=group)
        return gather_from_sequence_parallel_region(hidden_states, group=group), probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """-> (tokens grouped by local expert, tokens per local expert, their probabilities)."""
        self.hidden_shape_before_permute = hidden_states.shape
        local_map = self.routing_map[:, self.local_experts]
        tokens, local_probs, self.reversed_local_input_permutation_mapping = permute(
            hidden_states, local_map, probs[:, self.local_experts]
        )
        self.routing_map = None
        return tokens, local_map.sum(dim=0).tolist(), local_probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return unpermute(hidden_states, self.reversed_local_input_permutation_mapping, self.hidden_shape_before_permute)

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        group = self.pg_collection.tp_ep
        if group_size(group) == 1:
            return hidden_states
        return reduce_scatter_to_sequence_parallel_region(hidden_states, group=group)


class MoEAlltoAllTokenDispatcher(MoETokenDispatcher):
    """Permute token copies expert-major, all-to-all them over the expert-parallel group with uneven splits (then,
    with ETP > 1, gather them over the expert-tensor-parallel ranks) and regroup the received blocks by local
    expert; the combine runs the same steps backwards."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_sources = self.etp_size * self.ep_size
        chunks = torch.arange(self.num_sources * self.num_local_experts, device="cpu")  # host indices (meta-safe)
        # Received blocks arrive as (source rank, local expert); the experts want (local expert, source rank).
        self.sort_input_by_local_experts = chunks.reshape(-1, self.num_local_experts).T.ravel().tolist()
        self.restore_output_by_local_experts = chunks.reshape(self.num_local_experts, -1).T.ravel().tolist()

    def preprocess(self, routing_map: torch.Tensor) -> List[int]:
        """Split sizes of the collectives (host integers: one device sync) and the tokens per local expert."""
        num_local_tokens_per_expert = routing_map.sum(dim=0).long()
        if self.num_sources == 1:
            return num_local_tokens_per_expert.tolist()
        self.input_splits = num_local_tokens_per_expert.reshape(self.ep_size, -1).sum(dim=1).tolist()
        every_rank = all_gather_rows(num_local_tokens_per_expert.unsqueeze(0), self.ep_group)
        # [source rank, local expert]: how many copies each expert-parallel rank sends to this rank's experts.
        received = every_rank[:, self.local_experts]
        self.output_splits = received.sum(dim=1).tolist()
        # [expert-tensor-parallel rank x source rank, local expert]: what every slice of these experts sees.
        per_slice = all_gather_rows(received, self.etp_group)
        self.num_global_tokens_per_local_expert = per_slice
        self.etp_splits = per_slice.reshape(self.etp_size, -1).sum(dim=1).tolist()
        return per_slice.sum(dim=0).tolist()

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        hidden_states, probs = super().dispatch_preprocess(hidden_states, routing_map, probs)
        self.hidden_shape_before_permute = hidden_states.shape
        self.tokens_per_expert = self.preprocess(routing_map)
        tokens, permuted_probs, self.reversed_local_input_permutation_mapping = permute(
            hidden_states, routing_map, probs
        )
        return tokens, permuted_probs

    def token_dispatch(self, tokens: torch.Tensor, probs: torch.Tensor):
        if self.num_sources == 1:
            return tokens, probs
        tokens = all_to_all(self.ep_group, tokens, self.output_splits, self.input_splits)
        probs = all_to_all(self.ep_group, probs, self.output_splits, self.input_splits)
        tokens = gather_rows_uneven(self.etp_group, tokens, self.etp_splits)
        return tokens, gather_rows_uneven(self.etp_group, probs, self.etp_splits)

    def dispatch_postprocess(self, tokens: torch.Tensor, probs: torch.Tensor):
        """-> (tokens grouped by local expert, tokens per local expert, their probabilities)."""
        if self.num_sources > 1 and self.num_local_experts > 1:
            tokens, probs = sort_chunks_by_idxs(
                tokens,
                self.num_global_tokens_per_local_expert.ravel().tolist(),
                self.sort_input_by_local_experts,
                probs,
            )
        return tokens, self.tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.num_sources > 1 and self.num_local_experts > 1:
            hidden_states, _ = sort_chunks_by_idxs(
                hidden_states,
                self.num_global_tokens_per_local_expert.T.ravel().tolist(),
                self.restore_output_by_local_experts,
            )
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.num_sources == 1:
            return hidden_states
        hidden_states = reduce_scatter_rows_uneven(self.etp_group, hidden_states, self.etp_splits)
        return all_to_all(self.ep_group, hidden_states, self.input_splits, self.output_splits)

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        restored = unpermute(
            hidden_states, self.reversed_local_input_permutation_mapping, self.hidden_shape_before_permute
        )
        return super().combine_postprocess(restored)
