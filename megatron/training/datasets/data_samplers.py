"""Batch samplers and the data loader of pretraining.

Both samplers hand each data-parallel rank its slice of every global batch and start at `consumed_samples`,
so a resumed run reads exactly the batches an uninterrupted run would have read next.
"""

import atexit
import ctypes
import multiprocessing
import os
import signal
from typing import Iterator, List, Optional

import torch

from megatron.core import parallel_state


class MegatronPretrainingSampler:
    """One pass over the dataset in its own (already shuffled) order.

    Global batch g holds samples [g * B, (g + 1) * B) with B = micro_batch_size * data_parallel_size; rank r
    reads the micro batch [r * micro_batch_size, (r + 1) * micro_batch_size) of each.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ):
        _check_sampler_arguments(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if consumed_samples >= total_samples:
            raise ValueError(f"no samples left: {consumed_samples} consumed of {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def _slice_of_this_rank(self, batch: List[int]) -> List[int]:
        start = self.data_parallel_rank * self.micro_batch_size
        return batch[start : start + self.micro_batch_size]

    def __iter__(self) -> Iterator[List[int]]:
        batch = []
        for index in range(self.consumed_samples, self.total_samples):
            batch.append(index)
            if len(batch) == self.micro_batch_times_data_parallel_size:
                yield self._slice_of_this_rank(batch)
                batch = []
        if batch and not self.drop_last:
            tail = self._slice_of_this_rank(batch)
            if tail:
                yield tail


class MegatronPretrainingRandomSampler:
    """Endless passes, each a fresh permutation of this rank's share of the dataset.

    The dataset is cut into data_parallel_size contiguous buckets of whole micro batches; in every epoch each
    rank reads its bucket in a new random order, seeded by the epoch number as Megatron-LM seeds it, so a run
    resumed from a Megatron-LM checkpoint reads the same batches. The position inside an epoch follows from
    consumed_samples.
    """

    def __init__(
        self,
        dataset_size: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ):
        _check_sampler_arguments(dataset_size, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.bucket_size = (dataset_size // (micro_batch_size * data_parallel_size)) * micro_batch_size
        if self.bucket_size == 0:
            raise ValueError(
                f"the dataset's {dataset_size} samples do not fill one micro batch of {micro_batch_size} on each of "
                f"{data_parallel_size} data-parallel ranks"
            )
        self.samples_per_epoch = self.bucket_size * data_parallel_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> Iterator[List[int]]:
        epoch, consumed_in_epoch = divmod(self.consumed_samples, self.samples_per_epoch)
        offset_in_bucket = consumed_in_epoch // self.data_parallel_size
        bucket_start = self.data_parallel_rank * self.bucket_size
        while True:
            generator = torch.Generator()
            generator.manual_seed(epoch)
            order = torch.randperm(self.bucket_size, generator=generator).tolist()
            for start in range(offset_in_bucket, self.bucket_size - self.micro_batch_size + 1, self.micro_batch_size):
                yield [bucket_start + index for index in order[start : start + self.micro_batch_size]]
            epoch, offset_in_bucket = epoch + 1, 0


def _check_sampler_arguments(total, consumed, micro_batch_size, data_parallel_rank, data_parallel_size):
    if total <= 0:
        raise ValueError(f"the dataset is empty ({total} samples)")
    if consumed < 0:
        raise ValueError(f"consumed samples must not be negative, got {consumed}")
    if micro_batch_size <= 0 or data_parallel_size <= 0:
        raise ValueError("the micro batch size and the data-parallel size must be positive")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data-parallel rank {data_parallel_rank} is not in [0, {data_parallel_size})")


def build_pretraining_data_loader(dataset, consumed_samples: int, args) -> Optional[torch.utils.data.DataLoader]:
    """A DataLoader over `dataset` for this data-parallel rank, starting after `consumed_samples` (None without data)."""
    if dataset is None or len(dataset) == 0:
        return None
    data_parallel_rank = parallel_state.get_data_parallel_rank()
    data_parallel_size = parallel_state.get_data_parallel_world_size()
    if args.dataloader_type == "single":
        if consumed_samples >= len(dataset):
            return None
        sampler = MegatronPretrainingSampler(
            len(dataset), consumed_samples, args.micro_batch_size, data_parallel_rank, data_parallel_size
        )
    else:
        sampler = MegatronPretrainingRandomSampler(
            len(dataset), consumed_samples, args.micro_batch_size, data_parallel_rank, data_parallel_size
        )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=args.device == "cuda",
        persistent_workers=args.num_workers > 0,
        worker_init_fn=worker_exit_signals(),
    )


class WorkerExitSignals:
    """DataLoader workers ignore SIGTERM and SIGINT while the training process runs: schedulers signal the whole
    process group, and a worker dying first would fail the training process before it can save. Once the training
    process is exiting, the same signals end them: Python's exit stops daemonic children with SIGTERM and then
    waits for them, so a worker that ignored it would hang the exit forever."""

    def __init__(self):
        self.parent_exiting = multiprocessing.RawValue(ctypes.c_bool, False)
        atexit.register(self._mark_parent_exiting)  # runs before multiprocessing's own exit handler (LIFO)

    def _mark_parent_exiting(self) -> None:
        self.parent_exiting.value = True

    def __call__(self, worker_id: int) -> None:
        """The DataLoader's `worker_init_fn`."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_exit_signal)

    def _on_exit_signal(self, signum, frame) -> None:
        if self.parent_exiting.value:
            os._exit(0)  # a worker only reads samples: nothing to flush


_WORKER_EXIT_SIGNALS: Optional[WorkerExitSignals] = None


def worker_exit_signals() -> WorkerExitSignals:
    """The process's one `WorkerExitSignals` (one exit hook however many loaders are built)."""
    global _WORKER_EXIT_SIGNALS
    if _WORKER_EXIT_SIGNALS is None:
        _WORKER_EXIT_SIGNALS = WorkerExitSignals()
    return _WORKER_EXIT_SIGNALS
