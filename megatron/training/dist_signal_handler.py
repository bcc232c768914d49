"""Graceful exit on SIGTERM / SIGINT (--exit-signal-handler): note the signal, let the loop finish the
iteration, save and exit; all ranks agree, so every rank saves and leaves at the same iteration."""

import signal

import torch
import torch.distributed as dist

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def all_gather_item(item: bool) -> list:
    """`item` from every rank (just [item] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [item]
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    local = torch.tensor([int(item)], dtype=torch.int32, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [bool(value.item()) for value in gathered]


class DistributedSignalHandler:
    """Records SIGTERM and SIGINT instead of dying; `signals_received()` reports them from every rank."""

    def __init__(self, signals=EXIT_SIGNALS):
        self.signals = tuple(signals)
        self._received = False
        self._previous_handlers = {}

    def signals_received(self) -> list:
        """One flag per rank; a collective, so every rank must call it at the same point."""
        return all_gather_item(self._received)

    def __enter__(self):
        self._received = False
        for sig in self.signals:
            self._previous_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self._received = True

    def __exit__(self, exc_type, exc_value, traceback):
        self.release()

    def release(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}
