"""Process-group layout and rank queries."""

import pytest
import torch

from megatron.core import parallel_state
from megatron.core.parallel_state import ParallelLayoutError, _rank_groups, embedding_ranks


def test_rank_order_is_tensor_then_data_then_pipeline():
    # 16 ranks, TP=2, PP=4 -> DP=2; Megatron-LM's documented example.
    tensor, data, pipeline, model = _rank_groups(16, 2, 4)
    assert tensor == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert data == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert pipeline == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert model == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert embedding_ranks([0, 4, 8, 12]) == [0, 12]
    assert embedding_ranks([3]) == [3]


def test_every_rank_in_exactly_one_group_of_each_kind():
    for groups in _rank_groups(24, 2, 3):
        flat = sorted(rank for group in groups for rank in group)
        assert flat == list(range(24))


def test_queries_before_initialisation_describe_a_single_process():
    assert not parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    assert parallel_state.get_tensor_model_parallel_rank() == 0
    assert parallel_state.get_pipeline_model_parallel_world_size() == 1
    assert parallel_state.get_data_parallel_world_size() == 1
    assert parallel_state.is_pipeline_first_stage() and parallel_state.is_pipeline_last_stage()
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        parallel_state.get_tensor_model_parallel_group()


@pytest.fixture
def single_process_gloo():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def test_gloo_group_of_one(single_process_gloo):
    with pytest.raises(ParallelLayoutError, match="not divisible"):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    parallel_state.initialize_model_parallel()
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    assert parallel_state.get_data_parallel_world_size() == 1
    assert parallel_state.get_pipeline_model_parallel_next_rank() == 0
    assert parallel_state.is_rank_in_embedding_group()
