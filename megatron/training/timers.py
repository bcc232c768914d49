"""Megatron-LM's named wall-clock timers (`get_timers()`), as scripts use them: `timers(name, log_level=2).start()`
... `.stop()`, then `timers.log(names)`. Times are this rank's; GPU work is synchronised before reading the clock."""

import time
from typing import Dict, List, Optional

import torch


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


_MAX_LOG_LEVEL = 2


class Timer:
    """Accumulates the time between start() and stop() calls."""

    def __init__(self, name: str):
        self.name = name
        self._elapsed = 0.0
        self._started_at: Optional[float] = None

    def start(self, barrier: bool = False) -> None:
        if self._started_at is not None:
            raise RuntimeError(f"timer {self.name!r} has already been started")
        if barrier and torch.distributed.is_initialized():
            torch.distributed.barrier()
        _synchronize()
        self._started_at = time.perf_counter()

    def stop(self, barrier: bool = False) -> None:
        if self._started_at is None:
            raise RuntimeError(f"timer {self.name!r} is not started")
        if barrier and torch.distributed.is_initialized():
            torch.distributed.barrier()
        _synchronize()
        self._elapsed += time.perf_counter() - self._started_at
        self._started_at = None

    def reset(self) -> None:
        self._elapsed = 0.0
        self._started_at = None

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        """Seconds accumulated so far (a running timer counts up to now)."""
        running = self._started_at is not None
        if running:
            self.stop(barrier=barrier)
        elapsed = self._elapsed
        if reset:
            self.reset()
        if running:
            self.start(barrier=barrier)
        return elapsed


class _NullTimer:
    """A timer above the configured --timing-log-level: every call does nothing."""

    def start(self, barrier: bool = False) -> None:
        pass

    def stop(self, barrier: bool = False) -> None:
        pass

    def reset(self) -> None:
        pass

    def elapsed(self, reset: bool = True, barrier: bool = False) -> float:
        return 0.0


class Timers:
    """Named timers; those with a log_level above `log_level` are no-ops (Megatron's --timing-log-level)."""

    def __init__(self, log_level: int = 0, log_option: str = "minmax"):
        self._log_level = log_level
        self._log_option = log_option
        self._timers: Dict[str, Timer] = {}
        self._null_timer = _NullTimer()

    def __call__(self, name: str, log_level: Optional[int] = None):
        if name in self._timers:
            return self._timers[name]
        # A name asked for without a level takes the highest (Megatron-LM), so its stop() after a
        # null start() stays null.
        if (log_level if log_level is not None else _MAX_LOG_LEVEL) > self._log_level:
            return self._null_timer
        self._timers[name] = Timer(name)
        return self._timers[name]

    def _times(self, names: List[str], normalizer: float, reset: bool) -> Dict[str, float]:
        return {name: self._timers[name].elapsed(reset=reset) * 1000.0 / normalizer for name in names if name in self._timers}

    def log(self, names: List[str], rank: Optional[int] = None, normalizer: float = 1.0, reset: bool = True, barrier: bool = False) -> None:
        """Print `names`' times in ms (divided by `normalizer`) from the last rank."""
        from megatron.training.utils import print_rank_last  # utils reads the global args, which own the timers

        if barrier and torch.distributed.is_initialized():
            torch.distributed.barrier()
        times = self._times(names, normalizer, reset)
        if times:
            print_rank_last("(ms): " + " | ".join(f"{name}: {value:.2f}" for name, value in times.items()))

    def write(self, names: List[str], writer, iteration: int, normalizer: float = 1.0, reset: bool = True, barrier: bool = False) -> None:
        """Send `names`' times to a TensorBoard writer as '<name>-time'."""
        if barrier and torch.distributed.is_initialized():
            torch.distributed.barrier()
        for name, value in self._times(names, normalizer, reset).items():
            if writer is not None:
                writer.add_scalar(f"{name}-time", value, iteration)
