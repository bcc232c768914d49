"""Two-node training on loopback: two `torchrun --nnodes 2 --node-rank 0/1` launches of 2 processes each
train a tiny model (TP2 x DP2) to completion with the same losses as one node running 4 processes; with
--no-shared-storage each node builds its own dataset index cache."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.functional_tests.training_runs import (
    PRETRAIN,
    free_port,
    gpt2_dataset,
    iteration_records,
    lm_losses,
    require_data_pipeline,
    run_pretrain,
    training_flags,
)

require_data_pipeline()

TRAIN_ITERS = 3


def _flags(data_path, *extra):
    return training_flags(
        data_path, "mcore", "--train-iters", TRAIN_ITERS, "--tensor-model-parallel-size", 2,
        "--use-cpu-initialization", "--distributed-backend", "gloo", "--distributed-timeout-minutes", 1, *extra,
    )


def _launch_node(node_rank, port, flags):
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
        "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
    ]
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [*launcher, PRETRAIN, *map(str, flags)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=python_path),
    )


def _run_two_nodes(flags_of_node):
    """Start both nodes, wait for both; returns [(returncode, stdout, stderr)] in node order."""
    port = free_port()
    nodes = [_launch_node(rank, port, flags_of_node(rank)) for rank in (0, 1)]
    results = []
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=300)
            results.append((node.returncode, stdout, stderr))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    return results


def test_two_nodes_train_like_one_node_of_four(tmp_path):
    data_path = gpt2_dataset(tmp_path)
    single = run_pretrain(_flags(data_path, "--data-cache-path", tmp_path / "cache_single"), nproc=4)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = lm_losses(single.stdout)
    assert sorted(expected) == list(range(1, TRAIN_ITERS + 1))

    shared = _run_two_nodes(lambda node: _flags(data_path, "--data-cache-path", tmp_path / "cache_shared"))
    for returncode, _, stderr in shared:
        assert returncode == 0, stderr[-3000:]
    # The last rank (on node 1) logs the iterations.
    assert lm_losses(shared[1][1]) == expected
    assert iteration_records(shared[0][1]) == {}

    separate = _run_two_nodes(
        lambda node: _flags(data_path, "--no-shared-storage", "--data-cache-path", tmp_path / f"cache_node{node}")
    )
    for returncode, _, stderr in separate:
        assert returncode == 0, stderr[-3000:]
    assert lm_losses(separate[1][1]) == expected
    for node in (0, 1):
        assert list((tmp_path / f"cache_node{node}").glob("**/*.npy")), f"node {node} built no index cache"
