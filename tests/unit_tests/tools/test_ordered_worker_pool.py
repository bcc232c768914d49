import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tools.ordered_worker_pool import OrderedWorkerPool, WorkerDied

REPO = Path(__file__).resolve().parents[3]


def _nothing():
    pass


def _square(value):
    return value * value


def _die_on_seven(value):
    if value == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def _raise_on_seven(value):
    if value == 7:
        raise ValueError("seven is not allowed")
    return value


def _echo_megabyte(text):
    return text + "!"


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("processes,chunk_size,in_flight", [(1, 1, 1), (3, 4, 2), (4, 64, 3)])
def test_results_come_in_input_order(processes, chunk_size, in_flight):
    with OrderedWorkerPool(processes, _nothing, _square, chunk_size=chunk_size, in_flight=in_flight) as pool:
        assert list(pool.map(range(1000))) == [value * value for value in range(1000)]


def test_empty_input():
    with OrderedWorkerPool(2, _nothing, _square) as pool:
        assert list(pool.map([])) == []


def test_chunks_larger_than_a_pipe_do_not_deadlock():
    """Each chunk and each result is ~4 MB, far over a pipe's 64 KiB, with two chunks in flight per worker."""
    items = [str(index) * (1 << 20) for index in range(1, 9)]
    with OrderedWorkerPool(2, _nothing, _echo_megabyte, chunk_size=4, in_flight=2) as pool:
        assert list(pool.map(items)) == [item + "!" for item in items]


def test_a_worker_that_dies_is_an_error_not_a_hang():
    with pytest.raises(WorkerDied, match=r"ended \(exit code -9\)"):
        with OrderedWorkerPool(3, _nothing, _die_on_seven, chunk_size=2) as pool:
            list(pool.map(range(100)))


def _die_at_start():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_dead_before_its_chunk_is_sent_is_an_error_too():
    """Chunks larger than a pipe's buffer: the parent is still writing when the reader dies (a broken pipe, not
    end-of-file); either way it is the same error."""
    with pytest.raises(WorkerDied, match=r"ended \(exit code -9\)"):
        with OrderedWorkerPool(2, _die_at_start, len, chunk_size=4) as pool:
            list(pool.map([b"x" * 2**20] * 16))


def test_an_exception_in_a_worker_carries_its_traceback():
    with pytest.raises(WorkerDied, match="ValueError: seven is not allowed"):
        with OrderedWorkerPool(2, _nothing, _raise_on_seven, chunk_size=2) as pool:
            list(pool.map(range(100)))


def test_leaving_early_kills_the_workers():
    pool = OrderedWorkerPool(3, _nothing, _square, chunk_size=1)
    pids = [process.pid for process, _, _ in pool._workers]
    with pytest.raises(KeyboardInterrupt):
        with pool:
            for value in pool.map(range(10**9)):
                if value > 100:
                    raise KeyboardInterrupt
    assert not any(map(_alive, pids))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_workers_end_when_their_parent_is_killed(tmp_path):
    """SIGKILL leaves the parent no chance to clean up: the workers see end-of-file on their task pipes."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from tests.unit_tests.tools.test_ordered_worker_pool import _nothing, _square
        from tools.ordered_worker_pool import OrderedWorkerPool
        with OrderedWorkerPool(3, _nothing, _square, chunk_size=1) as pool:
            print(*[process.pid for process, _, _ in pool._workers], flush=True)
            for value in pool.map(range(10**9)):
                time.sleep(0.001)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    try:
        assert len(workers) == 3 and all(map(_alive, workers))
        parent.kill()
        parent.wait()
        deadline = time.time() + 10
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers)), "workers outlived their parent"
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
