"""Context parallelism end to end from pretrain_gpt.py flags (CPU, gloo): a CP=2 run trains like the CP=1 run,
and its checkpoints resume exactly at CP=2 and with the same losses at CP=1.

One CP=2 run covers the three attention algorithms (one per layer, --cp-comm-type p2p all_gather a2a p2p); the
distributed optimizer (sharded over data x context parallel ranks) and --eod-mask-loss (a different token count
on each CP rank) are on in every run so that the loss and gradient reductions are exercised too, and the MLPs
are routed experts with a large aux-loss coefficient (whose gradient scale must undo the averaging over CP).
CP=2 x PP=2 on four ranks checks the pipeline messages (a CP rank's share of the sequence).
"""

import re

import pytest

from tests.functional_tests.training_runs import (
    gpt2_dataset,
    iteration_records,
    lm_losses,
    require_data_pipeline,
    run_pretrain,
    training_flags,
)

require_data_pipeline()

TRAIN_ITERS = 6
SAVE_INTERVAL = 3
COMM_TYPE_PER_LAYER = ["--cp-comm-type", "p2p", "all_gather", "a2a", "p2p"]
# Losses are logged with 7 significant digits (~1e-5 at a loss of 10): allow that rounding on top of 1e-5.
LOSS_TOLERANCE = 1.5e-5


def _flags(data_path, *extra):
    return training_flags(
        data_path, "mcore", "--num-layers", 4, "--train-iters", TRAIN_ITERS, "--use-cpu-initialization",
        "--attention-dropout", 0, "--hidden-dropout", 0, "--eod-mask-loss", "--use-distributed-optimizer",
        "--num-experts", 4, "--moe-router-topk", 2, "--moe-aux-loss-coeff", 1.0, *extra,
    )


def _assert_losses_close(actual, expected):
    assert actual and set(actual) <= set(expected)
    for iteration, loss in actual.items():
        assert loss == pytest.approx(expected[iteration], abs=LOSS_TOLERANCE), iteration


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return gpt2_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single_rank_run(data_path):
    result = run_pretrain(_flags(data_path))
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def context_parallel_save(data_path, tmp_path_factory):
    """(stdout, save directory) of a CP=2 run, one attention algorithm per layer, saved every 3 iterations."""
    save_dir = tmp_path_factory.mktemp("cp2")
    flags = _flags(
        data_path, "--context-parallel-size", 2, *COMM_TYPE_PER_LAYER,
        "--save", save_dir, "--save-interval", SAVE_INTERVAL,
    )
    result = run_pretrain(flags, nproc=2)
    assert result.returncode == 0, result.stderr
    return result.stdout, save_dir


def _grad_norms(stdout):
    records = iteration_records(stdout).items()
    return {iteration: float(re.search(r"grad norm: (\S+) \|", line).group(1)) for iteration, line in records}


def test_context_parallel_losses_equal_single_rank(single_rank_run, context_parallel_save):
    losses = lm_losses(context_parallel_save[0])
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    _assert_losses_close(losses, lm_losses(single_rank_run))
    expected_norms = _grad_norms(single_rank_run)
    for iteration, norm in _grad_norms(context_parallel_save[0]).items():  # logged with 3 decimals
        assert norm == pytest.approx(expected_norms[iteration], abs=1e-3), iteration


def test_context_parallel_with_pipeline_parallel_equals_single_rank(data_path, single_rank_run):
    flags = _flags(data_path, "--context-parallel-size", 2, "--pipeline-model-parallel-size", 2, *COMM_TYPE_PER_LAYER)
    result = run_pretrain(flags, nproc=4)
    assert result.returncode == 0, result.stderr
    losses = lm_losses(result.stdout)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    _assert_losses_close(losses, lm_losses(single_rank_run))


def test_context_parallel_resume_is_exact(data_path, context_parallel_save):
    stdout, save_dir = context_parallel_save
    resumed = run_pretrain(
        _flags(
            data_path, "--context-parallel-size", 2, *COMM_TYPE_PER_LAYER,
            "--load", save_dir, "--ckpt-step", SAVE_INTERVAL,
        ),
        nproc=2,
    )
    assert resumed.returncode == 0, resumed.stderr
    expected, records = iteration_records(stdout), iteration_records(resumed.stdout)
    assert sorted(records) == list(range(SAVE_INTERVAL + 1, TRAIN_ITERS + 1))
    for iteration, record in records.items():
        assert record == expected[iteration]


def test_context_parallel_checkpoint_resumes_on_one_rank(data_path, single_rank_run, context_parallel_save):
    _, save_dir = context_parallel_save
    resumed = run_pretrain(_flags(data_path, "--load", save_dir, "--ckpt-step", SAVE_INTERVAL))
    assert resumed.returncode == 0, resumed.stderr
    losses = lm_losses(resumed.stdout)
    assert sorted(losses) == list(range(SAVE_INTERVAL + 1, TRAIN_ITERS + 1))
    _assert_losses_close(losses, lm_losses(single_rank_run))
