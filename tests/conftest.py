"""Shared fixtures: the ../shared data and tokenizers, the reference Megatron-core install, and the loopback
launchers of multi-process tests (free_port, gloo_worker, run_on_gloo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron.core import parallel_state

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEGATRON_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE_MEGATRON = Path(
    os.environ.get("MEGATRON_REFERENCE_PATH", REPO_ROOT / ".ci" / "reference" / "megatron_core")
)


def shared_path(relative: str) -> Path:
    """A file under ../shared, or skip the test with the reason when it is not there."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests read real data from ../shared")
    return path


@pytest.fixture
def gpt2_files():
    return shared_path("tokenizers/gpt2/vocab.json"), shared_path("tokenizers/gpt2/merges.txt")


@pytest.fixture
def llama2_model():
    return shared_path("tokenizers/llama2/tokenizer.model")


@pytest.fixture(scope="session")
def run_reference_megatron():
    """Run a Python snippet against the published megatron-core package (an independent reference).

    It lives in its own folder (.ci/run unpacks it there) because it shares the `megatron` package name.
    """
    if not (REFERENCE_MEGATRON / "megatron" / "core").is_dir():
        pytest.skip(f"reference megatron-core not unpacked at {REFERENCE_MEGATRON} (see .ci/run)")

    def run(code: str, cwd=None) -> str:
        env = dict(os.environ, PYTHONPATH=str(REFERENCE_MEGATRON))
        result = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", code],
            cwd=cwd or "/",
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    return run


def free_port() -> int:
    """A free TCP port on loopback, for a process group's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gloo_worker(rank, world_size, port, layout, function, args):
    """One rank of run_on_gloo: join the gloo group, lay out model parallelism (`layout`: keyword arguments of
    initialize_model_parallel), run function(rank, *args)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        parallel_state.initialize_model_parallel(**layout)
        function(rank, *args)
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


@pytest.fixture
def run_on_gloo():
    """run_on_gloo(world_size, function, *args, tensor_parallel_size=1, pipeline_parallel_size=1,
    context_parallel_size=1, expert_parallel_size=1): function(rank, *args) on every rank (a module-level function); a failure on any
    rank fails the test."""

    def run(
        world_size, function, *args, tensor_parallel_size=1, pipeline_parallel_size=1, context_parallel_size=1,
        expert_parallel_size=1,
    ):
        layout = dict(
            tensor_model_parallel_size=tensor_parallel_size,
            pipeline_model_parallel_size=pipeline_parallel_size,
            context_parallel_size=context_parallel_size,
            expert_model_parallel_size=expert_parallel_size,
        )
        mp.spawn(gloo_worker, args=(world_size, free_port(), layout, function, args), nprocs=world_size, join=True)

    return run
