"""How many micro batches make up the current global batch, including a batch-size ramp-up.

One process-wide calculator (`init_num_microbatches_calculator`) is read by the training loop and the
pipeline schedules; `update_num_microbatches(consumed_samples)` moves it along a ramp-up.
"""

import logging
from abc import ABC, abstractmethod
from typing import List, Optional

from megatron.core.errors import UserError

logger = logging.getLogger(__name__)

_GLOBAL_NUM_MICROBATCHES_CALCULATOR = None


class BatchSizeError(UserError, ValueError, AssertionError):
    """Batch sizes that do not split into micro batches (Megatron asserts here)."""


def get_num_microbatches() -> int:
    """Micro batches per global batch on each data-parallel rank."""
    return _calculator().get()


def get_current_global_batch_size() -> int:
    """The global batch size in effect now (below --global-batch-size during a ramp-up)."""
    return _calculator().get_current_global_batch_size()


def get_micro_batch_size() -> int:
    return _calculator().get_micro_batch_size()


def get_current_running_global_batch_size() -> int:
    """The batch actually run: the current global batch, rounded down to a multiple of micro batch x
    data-parallel size when decrease_batch_size_if_needed is set."""
    return _calculator().get_current_running_global_batch_size()


def update_num_microbatches(consumed_samples: int, consistency_check: bool = True, verbose: bool = False) -> None:
    """Advance a ramp-up to the batch size that applies after `consumed_samples` samples."""
    _calculator().update(consumed_samples, consistency_check, verbose)


def init_num_microbatches_calculator(
    rank: int,
    rampup_batch_size: Optional[List[int]],
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_size: int,
    decrease_batch_size_if_needed: bool = False,
) -> None:
    """Create the process-wide calculator; `rampup_batch_size` is [start, increment, ramp samples] or None."""
    if _GLOBAL_NUM_MICROBATCHES_CALCULATOR is not None:
        raise RuntimeError("the num-microbatches calculator is already initialised")
    reconfigure_num_microbatches_calculator(
        rank, rampup_batch_size, global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed
    )


def reconfigure_num_microbatches_calculator(
    rank: int,
    rampup_batch_size: Optional[List[int]],
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_size: int,
    decrease_batch_size_if_needed: bool = False,
) -> None:
    """Replace the process-wide calculator (e.g. evaluation with another batch size), initialised or not."""
    global _GLOBAL_NUM_MICROBATCHES_CALCULATOR
    _GLOBAL_NUM_MICROBATCHES_CALCULATOR = build_num_microbatches_calculator(
        rank, rampup_batch_size, global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed
    )


def destroy_num_microbatches_calculator() -> None:
    global _GLOBAL_NUM_MICROBATCHES_CALCULATOR
    _GLOBAL_NUM_MICROBATCHES_CALCULATOR = None


def _calculator():
    if _GLOBAL_NUM_MICROBATCHES_CALCULATOR is None:
        raise RuntimeError("call init_num_microbatches_calculator first")
    return _GLOBAL_NUM_MICROBATCHES_CALCULATOR


def build_num_microbatches_calculator(
    rank, rampup_batch_size, global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed
):
    """A constant calculator, or a ramp-up calculator when `rampup_batch_size` is given."""
    if rampup_batch_size is None:
        calculator = ConstantNumMicroBatchesCalculator(
            global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed, rank
        )
        if rank == 0:
            logger.info("number of micro batches per global batch: %d", calculator.get())
        return calculator
    if len(rampup_batch_size) != 3:
        raise BatchSizeError("--rampup-batch-size takes three values: <start batch size> <increment> <ramp-up samples>")
    start, increment, ramp_samples = (int(value) for value in rampup_batch_size)
    return RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed, rank,
        start, increment, ramp_samples,
    )


class NumMicroBatchesCalculator(ABC):
    """Common state: the micro batch, the data-parallel size and the current global batch."""

    def __init__(self, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed, rank=0):
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.decrease_batch_size_if_needed = decrease_batch_size_if_needed
        self.rank = rank
        self.num_micro_batches = None
        self.current_global_batch_size = None
        self.current_running_global_batch_size = None

    def get(self) -> int:
        return self.num_micro_batches

    def get_current_global_batch_size(self) -> int:
        return self.current_global_batch_size

    def get_micro_batch_size(self) -> int:
        return self.micro_batch_size

    def get_current_running_global_batch_size(self) -> int:
        return self.current_running_global_batch_size

    def _set_global_batch_size(self, global_batch_size, consistency_check, verbose=False):
        per_step = self.micro_batch_times_data_parallel_size
        running = global_batch_size
        if global_batch_size % per_step != 0:
            if self.decrease_batch_size_if_needed:
                running = max(per_step, global_batch_size // per_step * per_step)
            elif consistency_check:
                raise BatchSizeError(
                    f"global batch size {global_batch_size} is not divisible by micro batch size "
                    f"{self.micro_batch_size} x data-parallel size {self.data_parallel_size}; change "
                    "--global-batch-size or --micro-batch-size, or pass --decrease-batch-size-if-needed"
                )
        if verbose and self.rank == 0 and global_batch_size != self.current_global_batch_size:
            logger.info("global batch size %s -> %s (running %s)", self.current_global_batch_size, global_batch_size, running)
        self.current_global_batch_size = global_batch_size
        self.current_running_global_batch_size = running
        self.num_micro_batches = max(1, running // per_step)

    @abstractmethod
    def update(self, consumed_samples, consistency_check, verbose=False):
        """Move to the batch size that applies after `consumed_samples` samples."""


class ConstantNumMicroBatchesCalculator(NumMicroBatchesCalculator):
    """A fixed global batch for the whole run."""

    def __init__(
        self, global_batch_size, micro_batch_size, data_parallel_size, decrease_batch_size_if_needed=False, rank=0
    ):
        super().__init__(micro_batch_size, data_parallel_size, decrease_batch_size_if_needed, rank)
        self._set_global_batch_size(global_batch_size, consistency_check=True)

    def update(self, consumed_samples, consistency_check, verbose=False):
        """Nothing moves: the batch size is constant."""


class RampupBatchsizeNumMicroBatchesCalculator(NumMicroBatchesCalculator):
    """Grows the global batch from `start` by `increment`, one step per equal share of `ramup_samples`.

    With g = global batch, steps = (g - start) / increment, the batch after `consumed` samples is
    start + increment * floor(consumed / (ramup_samples / steps)), and g once ramup_samples are consumed.
    """

    def __init__(
        self,
        global_batch_size,
        micro_batch_size,
        data_parallel_size,
        decrease_batch_size_if_needed,
        rank,
        start_global_batch_size,
        batch_size_increment,
        ramup_samples,
    ):
        super().__init__(micro_batch_size, data_parallel_size, decrease_batch_size_if_needed, rank)
        if not 0 < start_global_batch_size <= global_batch_size or batch_size_increment <= 0 or ramup_samples < 0:
            raise BatchSizeError(
                "--rampup-batch-size needs 0 < start <= --global-batch-size, increment > 0 and ramp-up samples >= 0"
            )
        steps = global_batch_size - start_global_batch_size
        if steps % batch_size_increment != 0:
            raise BatchSizeError(
                f"global batch size {global_batch_size} minus the start {start_global_batch_size} is not a "
                f"multiple of the increment {batch_size_increment}"
            )
        self.global_batch_size = global_batch_size
        self.start_global_batch_size = start_global_batch_size
        self.batch_size_increment = batch_size_increment
        self.ramup_samples = ramup_samples
        num_increments = steps // batch_size_increment
        self.rampup_samples_per_increment = ramup_samples / num_increments if num_increments else 0
        self.update(0, consistency_check=False)

    def update(self, consumed_samples, consistency_check, verbose=False):
        if consumed_samples >= self.ramup_samples or self.rampup_samples_per_increment == 0:
            global_batch_size = self.global_batch_size
        else:
            increments = int(consumed_samples / self.rampup_samples_per_increment)
            global_batch_size = self.start_global_batch_size + increments * self.batch_size_increment
            global_batch_size = min(global_batch_size, self.global_batch_size)
        self._set_global_batch_size(global_batch_size, consistency_check, verbose)
