"""Pretraining samplers: resuming at consumed_samples continues with the next batch; DP ranks split each batch."""

import itertools

import pytest

from megatron.training.datasets.data_samplers import MegatronPretrainingRandomSampler, MegatronPretrainingSampler

MICRO, DP = 3, 2
GLOBAL = MICRO * DP


def single(consumed, rank, total=50):
    return list(MegatronPretrainingSampler(total, consumed, MICRO, rank, DP))


def cyclic(consumed, rank, batches, size=50):
    sampler = MegatronPretrainingRandomSampler(size, consumed, MICRO, rank, DP)
    return list(itertools.islice(iter(sampler), batches))


@pytest.mark.parametrize("rank", range(DP))
@pytest.mark.parametrize("consumed_batches", [1, 3, 7])
def test_single_resumed_equals_uninterrupted(rank, consumed_batches):
    assert single(consumed_batches * GLOBAL, rank) == single(0, rank)[consumed_batches:]


def test_single_ranks_partition_each_global_batch():
    per_rank = [single(0, rank) for rank in range(DP)]
    assert len(per_rank[0]) == 50 // GLOBAL
    for step, batches in enumerate(zip(*per_rank)):
        assert [index for batch in batches for index in batch] == list(range(step * GLOBAL, (step + 1) * GLOBAL))


@pytest.mark.parametrize("rank", range(DP))
@pytest.mark.parametrize("consumed_batches", [1, 8, 11, 20])  # 8 batches make an epoch of 48 samples
def test_cyclic_resumed_equals_uninterrupted_across_epochs(rank, consumed_batches):
    uninterrupted = cyclic(0, rank, 30)
    assert cyclic(consumed_batches * GLOBAL, rank, 30 - consumed_batches) == uninterrupted[consumed_batches:]


def test_cyclic_epochs_cover_every_sample_once_in_new_orders():
    epochs = []
    for epoch in range(2):
        batches = [cyclic(0, rank, 16)[epoch * 8 : (epoch + 1) * 8] for rank in range(DP)]
        samples = [index for rank_batches in batches for batch in rank_batches for index in batch]
        assert sorted(samples) == list(range(48))  # the 2 samples past the last global batch are left out
        assert all(len(batch) == MICRO for rank_batches in batches for batch in rank_batches)
        assert all(index < 24 for batch in batches[0] for index in batch)  # rank 0 reads its own bucket
        epochs.append(samples)
    assert epochs[0] != epochs[1]


def test_cyclic_epoch_order_is_seeded_by_the_epoch_like_megatron():
    import torch

    generator = torch.Generator()
    generator.manual_seed(1)
    expected = torch.randperm(24, generator=generator).tolist()
    second_epoch = cyclic(48, 1, 8)
    assert [index for batch in second_epoch for index in batch] == [24 + index for index in expected]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: MegatronPretrainingSampler(10, 10, 2, 0, 1), "no samples left"),
        (lambda: MegatronPretrainingSampler(10, 0, 2, 2, 2), r"rank 2 is not in \[0, 2\)"),
        (lambda: MegatronPretrainingSampler(0, 0, 2, 0, 1), "empty"),
        (lambda: MegatronPretrainingRandomSampler(3, 0, 2, 0, 2), "do not fill one micro batch"),
    ],
)
def test_bad_sampler_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_single_keeps_the_last_partial_batch_when_asked():
    sampler = MegatronPretrainingSampler(8, 0, 3, 0, 2, drop_last=False)
    assert list(sampler) == [[0, 1, 2], [6, 7]]


@pytest.mark.parametrize("dataloader_type", ["single", "cyclic"])
def test_loader_of_each_rank_reads_its_slice_and_resumes(dataloader_type, monkeypatch):
    import types

    import torch

    from megatron.training.datasets import data_samplers

    dataset = [torch.tensor([index]) for index in range(50)]
    args = types.SimpleNamespace(dataloader_type=dataloader_type, micro_batch_size=MICRO, num_workers=0, device="cpu")

    def batches(rank, consumed, count):
        monkeypatch.setattr(data_samplers.parallel_state, "get_data_parallel_rank", lambda: rank)
        monkeypatch.setattr(data_samplers.parallel_state, "get_data_parallel_world_size", lambda: DP)
        loader = data_samplers.build_pretraining_data_loader(dataset, consumed, args)
        return [batch.flatten().tolist() for batch in itertools.islice(iter(loader), count)]

    sampler_batches = single if dataloader_type == "single" else lambda consumed, rank: cyclic(consumed, rank, 8)
    for rank in range(DP):
        assert batches(rank, 0, 8) == sampler_batches(0, rank)[:8]
        assert batches(rank, 2 * GLOBAL, 6) == batches(rank, 0, 8)[2:]


_WORKERS_SCRIPT = """
import os, signal, sys, time
import torch
from megatron.training.datasets.data_samplers import worker_exit_signals

loader = torch.utils.data.DataLoader(list(range(64)), batch_size=4, num_workers=2, persistent_workers=True,
                                     worker_init_fn=worker_exit_signals())
batches = iter(loader)
next(batches)
for worker in batches._workers:
    os.kill(worker.pid, signal.SIGTERM)  # as a scheduler signals the whole process group
time.sleep(0.5)
assert all(worker.is_alive() for worker in batches._workers), "a worker died of SIGTERM while training ran"
assert sum(len(batch) for batch in batches) == 60
sys.modules["__main__"].KEEP_ALIVE = batches  # the iterator is still alive when the interpreter exits
print("done", flush=True)
"""


def test_loader_workers_survive_sigterm_and_never_hang_the_exit():
    """Workers outlive a process-group SIGTERM, yet Python's exit (SIGTERM to daemonic children, then join)
    still ends them: the exit used to wait forever on workers that ignored SIGTERM."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    run = subprocess.run(
        [sys.executable, "-c", _WORKERS_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "done"
