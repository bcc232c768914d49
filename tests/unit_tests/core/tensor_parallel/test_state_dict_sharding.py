"""Re-sharding reads each tensor's split from its parameter's own attributes, never from its name."""

import pytest
import torch

from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.state_dict_sharding import (
    ShardingError,
    merge_shards,
    merge_state_dicts,
    rule_key,
    shard_of,
    split_rule,
    split_rules,
    split_state_dict,
)


def test_stride_two_gives_each_rank_matching_halves_of_both_blocks():
    gate_up = torch.arange(8.0)  # [gate 0..3; up 4..7]
    assert shard_of(gate_up, 0, 2, dim=0, stride=2).tolist() == [0, 1, 4, 5]
    assert shard_of(gate_up, 1, 2, dim=0, stride=2).tolist() == [2, 3, 6, 7]
    assert torch.equal(merge_shards([shard_of(gate_up, r, 2, 0, 2) for r in range(2)], 0, 2), gate_up)


def test_an_indivisible_dimension_is_one_clear_error():
    with pytest.raises(ShardingError, match="size 6 cannot be split into 4 tensor-parallel shards"):
        shard_of(torch.zeros(6), 0, 4, dim=0)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 8) for _ in range(2))
        self.norm = torch.nn.LayerNorm(4)
        for layer in self.layers:
            set_tensor_model_parallel_attributes(layer.weight, True, 1, 1)
            set_tensor_model_parallel_attributes(layer.bias, True, 0, 2)


def test_rules_come_from_the_parameters_and_round_trip():
    model = _Tiny()
    rules = split_rules(model)
    assert rules == {
        "layers.*.weight": (1, 1),
        "layers.*.bias": (0, 2),
        "norm.weight": (-1, 1),
        "norm.bias": (-1, 1),
    }
    assert split_rule(model.norm.weight) == (-1, 1) and rule_key("decoder.layers.17.x") == "decoder.layers.*.x"
    state = {name: torch.randn_like(tensor) for name, tensor in model.state_dict().items()}
    shards = split_state_dict(state, 2, rules)
    assert shards[1]["layers.0.weight"].shape == (8, 2) and shards[1]["norm.weight"] is state["norm.weight"]
    merged = merge_state_dicts(shards, rules)
    assert all(torch.equal(merged[name], state[name]) for name in state)
    with pytest.raises(ShardingError, match="'extra.weight' is not a tensor of this model"):
        split_state_dict({"extra.weight": torch.zeros(2)}, 2, rules)
