"""run_on_gloo: run a module-level function on N gloo ranks (torch.multiprocessing, loopback)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from megatron.core import parallel_state


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank, world_size, port, layout, function, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(*layout)
        function(rank, *args)
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.fixture
def run_on_gloo():
    """run_on_gloo(world_size, function, *args, tensor_parallel_size=1, pipeline_parallel_size=1):
    function(rank, *args) on every rank; a failure on any rank fails the test."""

    def run(world_size, function, *args, tensor_parallel_size=1, pipeline_parallel_size=1):
        layout = (tensor_parallel_size, pipeline_parallel_size)
        mp.spawn(_worker, args=(world_size, _free_port(), layout, function, args), nprocs=world_size, join=True)

    return run
