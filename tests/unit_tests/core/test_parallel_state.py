"""Process-group layout and rank queries."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron.core import parallel_state
from megatron.core.parallel_state import ParallelLayoutError, RankGenerator, default_embedding_ranks
from tests.conftest import free_port


def test_rank_order_is_tensor_then_data_then_pipeline():
    # 16 ranks, TP=2, PP=4 -> DP=2; Megatron-LM's documented example.
    generator = RankGenerator(tp=2, ep=1, dp=2, pp=4, cp=1, order="tp-cp-ep-dp-pp")
    tensor, data, pipeline, model = (generator.get_ranks(token) for token in ("tp", "dp", "pp", "tp-pp"))
    assert tensor == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert data == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert pipeline == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert model == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert default_embedding_ranks([0, 4, 8, 12]) == [0, 12]
    assert default_embedding_ranks([3]) == [3]


def test_every_rank_in_exactly_one_group_of_each_kind():
    generator = RankGenerator(tp=2, ep=1, dp=4, pp=3, cp=1, order="tp-cp-ep-dp-pp")
    for groups in (generator.get_ranks(token) for token in ("tp", "dp", "pp", "tp-pp")):
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


# Computes every group of every 8-rank layout in every order; run here against ours and, in a subprocess,
# against the published megatron-core (whose RankGenerator takes EP as its own dimension, with DP already
# divided by it, where Megatron-LM core_v0.9.0 splits DP with independent_ep=True: the same layout).
_LAYOUT_TABLE = """
import itertools, json
from megatron.core.parallel_state import RankGenerator

def layout_table(ours):
    orders = ["-".join(p) for p in itertools.permutations(["tp", "cp", "ep", "dp", "pp"])
              if abs(p.index("ep") - p.index("dp")) == 1]
    sizes = [s for s in itertools.product([1, 2, 4, 8], repeat=4) if s[0] * s[1] * s[2] * s[3] == 8]
    table = {}
    for order in orders:
        for tp, cp, dp, pp in sizes:  # no expert parallelism
            generator = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order=order)
            for n in range(1, 5):
                for token in itertools.combinations(["tp", "cp", "dp", "pp"], n):
                    table[f"{order} tp{tp} cp{cp} dp{dp} pp{pp} {'-'.join(token)}"] = generator.get_ranks("-".join(token))
        for tp, ep, dp, pp in sizes:  # expert parallelism: dp here is the data-modulo-expert size
            if ep == 1:
                continue
            if ours:
                generator = RankGenerator(tp=tp, ep=ep, dp=dp * ep, pp=pp, cp=1, order=order)
            else:
                generator = RankGenerator(tp=tp, ep=ep, dp=dp, pp=pp, cp=1, order=order)
            for n in range(1, 5):
                for token in itertools.combinations(["tp", "ep", "dp", "pp"], n):
                    key = f"{order} tp{tp} ep{ep} dp/ep{dp} pp{pp} {'-'.join(token)}"
                    kwargs = {"independent_ep": True} if ours else {}
                    table[key] = generator.get_ranks("-".join(token), **kwargs)
    return table
"""


def test_rank_generator_matches_published_megatron_core_for_8_ranks_in_every_order(run_reference_megatron):
    namespace = {}
    exec(_LAYOUT_TABLE, namespace)
    ours = namespace["layout_table"](ours=True)
    reference = json.loads(run_reference_megatron(_LAYOUT_TABLE + "\nprint(json.dumps(layout_table(ours=False)))"))
    assert len(ours) == len(reference) > 10000
    mismatches = [key for key in reference if ours[key] != reference[key]]
    assert not mismatches, mismatches[:5]


def test_rank_generator_rejects_what_megatron_rejects():
    with pytest.raises(RuntimeError, match="adjacent"):
        RankGenerator(tp=1, ep=2, dp=2, pp=2, cp=1, order="tp-ep-pp-dp")
    with pytest.raises(RuntimeError, match="cp"):
        RankGenerator(tp=1, ep=1, dp=2, pp=2, cp=2, order="tp-dp-pp")


def _check_context_and_expert_groups(rank):
    # 2 ranks, CP=2 (default order tp-cp-ep-dp-pp): both ranks split one sequence, one data-parallel replica.
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    assert parallel_state.get_context_parallel_world_size() == 2
    assert parallel_state.get_context_parallel_global_ranks() == [0, 1]
    assert parallel_state.get_context_parallel_rank() == rank
    assert parallel_state.get_data_parallel_world_size() == 1
    assert parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 2
    assert torch.distributed.get_world_size(parallel_state.get_tensor_and_context_parallel_group()) == 2
    assert torch.distributed.get_world_size(parallel_state.get_amax_reduction_group(with_context_parallel=True)) == 2
    total = torch.ones(1)
    torch.distributed.all_reduce(total, group=parallel_state.get_context_parallel_group())
    assert total.item() == 2
    parallel_state.destroy_model_parallel()

    # EP=2: the two data-parallel ranks hold different experts; each expert has one data-parallel copy.
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    assert parallel_state.get_context_parallel_world_size() == 1
    assert parallel_state.get_data_parallel_world_size() == 2
    assert parallel_state.get_expert_model_parallel_world_size() == 2
    assert parallel_state.get_expert_model_parallel_rank() == rank
    assert torch.distributed.get_world_size(parallel_state.get_data_modulo_expert_parallel_group()) == 1
    assert torch.distributed.get_world_size(parallel_state.get_tensor_and_expert_parallel_group()) == 2
    assert parallel_state.get_all_ranks() == f"0_{rank}_0_0_{rank}"
    parallel_state.set_tensor_model_parallel_world_size(4)
    assert parallel_state.get_tensor_model_parallel_world_size() == 4
    parallel_state.set_tensor_model_parallel_world_size(None)
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    parallel_state.destroy_model_parallel()

    # TP=2 with whole experts (ETP=1): MoE layers fold EP over the tensor-parallel ranks, or (EP=1) hold every
    # expert on both ranks and sum expert gradients over them.
    for ep, expert_dp in ((2, 1), (1, 2)):
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=2, expert_model_parallel_size=ep, expert_tensor_parallel_size=1
        )
        assert parallel_state.get_data_parallel_world_size() == 1
        assert parallel_state.get_expert_tensor_parallel_world_size() == 1
        assert parallel_state.get_expert_model_parallel_world_size() == ep
        assert parallel_state.get_expert_model_parallel_rank() == (rank if ep == 2 else 0)
        assert parallel_state.get_expert_data_parallel_world_size() == expert_dp
        assert parallel_state.get_expert_tensor_and_model_parallel_world_size() == ep
        group = parallel_state.get_expert_tensor_model_pipeline_parallel_group()
        assert torch.distributed.get_world_size(group) == ep
        parallel_state.destroy_model_parallel()


def _worker(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        _check_context_and_expert_groups(rank)
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def test_context_and_expert_parallel_groups_on_gloo():
    mp.spawn(_worker, args=(free_port(),), nprocs=2, join=True)
