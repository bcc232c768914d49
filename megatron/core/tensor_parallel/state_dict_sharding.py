"""Whole tensors <-> tensor-parallel shards, by the split each parameter records about itself.

Every parallel layer marks its parameters with `tensor_model_parallel`, `partition_dim` and `partition_stride`
(set_tensor_model_parallel_attributes); these functions read the split from there, never from names, so a new
layer's tensors re-shard correctly without a second table.
"""

import re
from typing import Dict, List, Tuple

import torch

from megatron.core.errors import UserError

StateDict = Dict[str, torch.Tensor]
SplitRule = Tuple[int, int]  # (dimension split over ranks or -1 if replicated, stride)
_LAYER_NUMBER = re.compile(r"(^|\.)layers\.\d+\.")


class ShardingError(UserError, ValueError):
    """Tensors that cannot be split or merged over the requested tensor-parallel ranks."""


def split_rule(parameter: torch.Tensor) -> SplitRule:
    """The split a parameter recorded: its partition dimension and stride, or (-1, 1) when replicated."""
    if getattr(parameter, "tensor_model_parallel", False):
        return parameter.partition_dim, getattr(parameter, "partition_stride", 1)
    return -1, 1


def rule_key(name: str) -> str:
    """A parameter's name without its layer number: every layer of one kind splits alike."""
    return _LAYER_NUMBER.sub(r"\1layers.*.", name)


def split_rules(model: torch.nn.Module) -> Dict[str, SplitRule]:
    """The split of each of a model's parameters and buffers (replicated, e.g. a router's expert bias), keyed by
    rule_key (build the model on the meta device)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {rule_key(name): split_rule(tensor) for name, tensor in tensors}


def shard_of(tensor: torch.Tensor, rank: int, parts: int, dim: int, stride: int = 1) -> torch.Tensor:
    """Rank `rank`'s slice: the rank-th of `parts` pieces of each of the `stride` consecutive blocks along
    `dim` (stride 2 splits [gate; up] so that each rank holds matching halves of both)."""
    if tensor.size(dim) % (parts * stride):
        raise ShardingError(
            f"a dimension of size {tensor.size(dim)} cannot be split into {parts} tensor-parallel shards"
            + (f" of {stride} blocks" if stride > 1 else "")
        )
    pieces = torch.split(tensor, tensor.size(dim) // (parts * stride), dim=dim)
    return torch.cat(pieces[rank::parts], dim=dim)


def merge_shards(shards: List[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of shard_of over all ranks."""
    blocks = [torch.chunk(shard, stride, dim=dim) for shard in shards]
    return torch.cat([blocks[rank][block] for block in range(stride) for rank in range(len(shards))], dim=dim)


def _rule(rules: Dict[str, SplitRule], name: str) -> SplitRule:
    key = rule_key(name)
    if key not in rules:
        raise ShardingError(f"{name!r} is not a tensor of this model, so its tensor-parallel split is unknown")
    return rules[key]


def split_state_dict(state: StateDict, parts: int, rules: Dict[str, SplitRule]) -> List[StateDict]:
    """One state dict per tensor-parallel rank; replicated tensors are shared, not copied."""
    shards = [{} for _ in range(parts)]
    for name, tensor in state.items():
        dim, stride = _rule(rules, name)
        for rank, shard in enumerate(shards):
            shard[name] = tensor if dim < 0 else shard_of(tensor, rank, parts, dim, stride).clone()
    return shards


def merge_state_dicts(shards: List[StateDict], rules: Dict[str, SplitRule]) -> StateDict:
    """Inverse of split_state_dict; every rank must hold the same names."""
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if list(shard) != names:
            raise ShardingError(f"tensor-parallel rank {rank} holds different tensors than rank 0")
    merged = {}
    for name in names:
        dim, stride = _rule(rules, name)
        pieces = [shard[name] for shard in shards]
        merged[name] = pieces[0] if dim < 0 else merge_shards(pieces, dim, stride)
    return merged
