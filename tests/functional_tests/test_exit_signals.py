"""--exit-signal-handler under torchrun with DataLoader workers: SIGTERM delivered to every process (as Slurm
and Kubernetes deliver it) or to the torchrun agent alone ends in a complete checkpoint on every rank."""

import os
import signal

import pytest

from megatron.training.checkpointing import get_checkpoint_name, get_checkpoint_tracker_filename
from tests.functional_tests.training_runs import (
    gpt2_dataset,
    iteration_records,
    require_data_pipeline,
    run_until,
    signal_launcher,
    signal_process_groups,
    training_flags,
)

require_data_pipeline()

TRAIN_ITERS = 1000


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return gpt2_dataset(tmp_path_factory.mktemp("data"))


def _assert_saved_where_it_stopped(save_dir, output):
    assert "exiting program after receiving a termination signal" in output, output
    assert "DataLoader worker" not in output, output
    stopped_at = int(open(get_checkpoint_tracker_filename(str(save_dir))).read())
    assert 3 <= stopped_at < TRAIN_ITERS and max(iteration_records(output)) == stopped_at, output
    assert os.path.getsize(get_checkpoint_name(str(save_dir), stopped_at)) > 0


def _flags(data_path, save_dir):
    return training_flags(
        data_path, "mcore", "--train-iters", TRAIN_ITERS, "--num-workers", 2, "--save", save_dir, "--exit-signal-handler"
    )


def test_sigterm_to_every_process_group_saves_and_every_rank_exits_0(data_path, tmp_path):
    returncode, output = run_until(
        _flags(data_path, tmp_path), r"^ iteration\s+3/", signal.SIGTERM, nproc=2, send=signal_process_groups
    )
    assert returncode == 0, output  # torchrun exits 0 only when every rank did
    _assert_saved_where_it_stopped(tmp_path, output)


def test_sigterm_to_torchrun_alone_is_forwarded_and_every_rank_saves(data_path, tmp_path):
    returncode, output = run_until(
        _flags(data_path, tmp_path), r"^ iteration\s+3/", signal.SIGTERM, nproc=2, send=signal_launcher
    )
    _assert_saved_where_it_stopped(tmp_path, output)
    assert "forcefully exiting" not in output, "every rank must stop by itself, before torchrun's SIGKILL"
    assert returncode != 0, "torchrun re-raises the signal it got after its workers stopped (its design)"
