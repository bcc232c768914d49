"""Two gloo ranks: who builds the index cache and who loads it, with and without shared storage."""

import json
import os

import numpy
import torch
import torch.multiprocessing as mp

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.utils import DatasetError

from .conftest import gpt_config, recognisable_documents, write_dataset
from tests.conftest import free_port


def _build(prefix, cache, shared_storage, local_rank, sequence_length=16):
    """(whether this rank built the indices, its shuffle index) after a builder run on every rank."""
    os.environ["LOCAL_RANK"] = str(local_rank)
    built = []
    original = GPTDataset._build_indices
    GPTDataset._build_indices = lambda self: built.append(1) or original(self)
    try:
        config = gpt_config(
            blend=([prefix], None), split="1,0,0", path_to_cache=cache, shared_storage=shared_storage,
            sequence_length=sequence_length,
        )
        train = BlendedMegatronDatasetBuilder(GPTDataset, [20, None, None], lambda: True, config).build()[0]
    finally:
        GPTDataset._build_indices = original
    return bool(built), train.shuffle_index.tolist()


def _worker(rank, port, prefix, tiny_prefix, directory):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {
        # one node, shared storage: global rank 0 builds
        "shared": _build(prefix, f"{directory}/shared", True, local_rank=rank),
        # two nodes without shared storage (each rank is its node's first): each builds in its own folder
        "two_nodes": _build(prefix, f"{directory}/node{rank}", False, local_rank=0),
        # one node without shared storage: its first rank builds, the other loads
        "one_node": _build(prefix, f"{directory}/one_node", False, local_rank=rank),
    }
    try:
        _build(tiny_prefix, f"{directory}/tiny", True, local_rank=rank, sequence_length=64)
    except DatasetError as error:
        results["failure"] = str(error)
    with open(f"{directory}/rank{rank}.json", "w") as stream:
        json.dump(results, stream)
    torch.distributed.destroy_process_group()


def test_rank_zero_builds_and_the_other_rank_loads(tmp_path):
    prefix = write_dataset(str(tmp_path / "corpus"), recognisable_documents(60))
    tiny_prefix = write_dataset(str(tmp_path / "tiny"), [[1, 2, 0]])
    mp.spawn(_worker, args=(free_port(), prefix, tiny_prefix, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1))
    assert (rank0["shared"][0], rank1["shared"][0]) == (True, False)
    assert (rank0["two_nodes"][0], rank1["two_nodes"][0]) == (True, True)
    assert len(os.listdir(tmp_path / "node0")) == len(os.listdir(tmp_path / "node1")) == 4
    assert (rank0["one_node"][0], rank1["one_node"][0]) == (True, False)
    for scenario in ("shared", "two_nodes", "one_node"):
        assert rank0[scenario][1] == rank1[scenario][1] == rank0["shared"][1]
    # A failed build stops both ranks with the builder's message (no rank waits at a barrier).
    assert "fewer than the 65" in rank0["failure"]
    assert rank1["failure"] == f"rank 0 could not build the datasets: {rank0['failure']}"
    assert not numpy.any([name.endswith(".tmp") for name in os.listdir(tmp_path / "shared")])
