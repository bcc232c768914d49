"""Exact resume: a run killed with SIGKILL after a save, or stopped by SIGTERM with --exit-signal-handler,
continues with the same per-iteration log lines and ends with bit-identical weights (CPU, dropout on)."""

import os
import signal

import pytest
import torch

from megatron.training.checkpointing import get_checkpoint_name, get_checkpoint_tracker_filename
from tests.functional_tests.training_runs import (
    gpt2_dataset,
    iteration_records,
    require_data_pipeline,
    run_pretrain,
    run_until,
    training_flags,
)

require_data_pipeline()

TRAIN_ITERS = 40


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return gpt2_dataset(tmp_path_factory.mktemp("data"))


def _final_weights(save_dir):
    state = torch.load(get_checkpoint_name(str(save_dir), TRAIN_ITERS), map_location="cpu", weights_only=False)
    return state["model"]


def _assert_same_run(reference_stdout, reference_dir, resumed_stdout, resumed_dir, first_resumed):
    expected, resumed = iteration_records(reference_stdout), iteration_records(resumed_stdout)
    assert sorted(resumed) == list(range(first_resumed, TRAIN_ITERS + 1)), resumed_stdout
    for iteration in resumed:
        assert resumed[iteration] == expected[iteration]
    reference_weights, resumed_weights = _final_weights(reference_dir), _final_weights(resumed_dir)
    assert reference_weights.keys() == resumed_weights.keys()
    for name, value in reference_weights.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed_weights[name]), name


@pytest.mark.parametrize("stack, nproc", [("mcore", 2), ("legacy", 1)])
def test_resume_after_sigkill_is_exact(data_path, tmp_path, stack, nproc):
    flags = training_flags(data_path, stack, "--train-iters", TRAIN_ITERS)
    reference = run_pretrain([*flags, "--save", tmp_path / "reference"], nproc=nproc)
    assert reference.returncode == 0, reference.stderr

    save_dir = tmp_path / "killed"
    checkpointed = [*flags, "--save", save_dir, "--load", save_dir, "--save-interval", 4]
    returncode, killed_output = run_until(checkpointed, r"^ iteration\s+6/", signal.SIGKILL, nproc=nproc)
    assert returncode == -signal.SIGKILL, killed_output
    saved = int(open(get_checkpoint_tracker_filename(str(save_dir))).read())
    assert saved % 4 == 0 and 4 <= saved < TRAIN_ITERS, "killed after a save and before the end"

    resumed = run_pretrain(checkpointed, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr
    assert f"successfully loaded checkpoint from {save_dir} at iteration {saved}" in resumed.stdout
    _assert_same_run(reference.stdout, tmp_path / "reference", resumed.stdout, save_dir, first_resumed=saved + 1)


def test_sigterm_finishes_the_step_saves_and_resumes_identically(data_path, tmp_path):
    flags = training_flags(data_path, "mcore", "--train-iters", TRAIN_ITERS)
    reference = run_pretrain([*flags, "--save", tmp_path / "reference"])
    assert reference.returncode == 0, reference.stderr

    save_dir = tmp_path / "terminated"
    handled = [*flags, "--save", save_dir, "--load", save_dir, "--exit-signal-handler"]
    returncode, output = run_until(handled, r"^ iteration\s+3/", signal.SIGTERM)
    assert returncode == 0, output
    assert "exiting program after receiving a termination signal" in output
    stopped_at = int(open(get_checkpoint_tracker_filename(str(save_dir))).read())
    assert 3 <= stopped_at < TRAIN_ITERS and max(iteration_records(output)) == stopped_at
    assert os.path.isfile(get_checkpoint_name(str(save_dir), stopped_at))

    resumed = run_pretrain(handled)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference.stdout, tmp_path / "reference", resumed.stdout, save_dir, first_resumed=stopped_at + 1)
