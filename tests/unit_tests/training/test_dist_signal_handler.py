"""SIGTERM / SIGINT are recorded instead of killing the process, and the previous handlers come back."""

import os
import signal

from megatron.training.dist_signal_handler import DistributedSignalHandler


def test_signals_are_recorded_and_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    with DistributedSignalHandler() as handler:
        assert handler.signals_received() == [False]
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.signals_received() == [True]
    assert signal.getsignal(signal.SIGTERM) is before

    with DistributedSignalHandler() as handler:
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.signals_received() == [True]
