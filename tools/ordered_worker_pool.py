"""An ordered map over worker processes that stops cleanly, for preprocess_data.py.

Why not multiprocessing.Pool: its terminate() can block forever when its task thread is part-way through
writing a large task into the shared pipe (the drain that should unblock it gives up as soon as the pipe is
momentarily empty), so a SIGTERM during preprocessing could hang instead of cleaning up; and a worker that
dies (OOM killer) loses its task and leaves imap waiting forever. Here every worker has its own pair of
pipes and at most `in_flight` chunks: a dead worker is an error naming it, the parent's death is end-of-file
for its workers, and stopping early is a kill.
"""

import contextlib
import itertools
import multiprocessing
import queue
import signal
import threading
import traceback
from collections import deque
from typing import Callable, Iterable, Iterator, List


class WorkerDied(RuntimeError):
    """A worker process ended (or raised) before returning the results of a chunk it was given."""


class OrderedWorkerPool:
    """`function` mapped over `items` in `processes` worker processes, results in input order.

    Items travel in chunks of `chunk_size`; chunk i goes to worker i % processes, which holds at most
    `in_flight` chunks, so memory stays bounded however long the input is. Use as a context manager: a clean
    exit lets the workers finish, an exception (SIGTERM's SystemExit, KeyboardInterrupt) kills them.
    """

    def __init__(self, processes: int, initializer: Callable[[], None], function: Callable, chunk_size: int = 64, in_flight: int = 2):
        self.chunk_size, self.in_flight = chunk_size, in_flight
        self._workers = []  # (process, task_writer, result_reader)
        parent_ends = []
        for _ in range(processes):
            task_reader, task_writer = multiprocessing.Pipe(duplex=False)
            result_reader, result_writer = multiprocessing.Pipe(duplex=False)
            process = multiprocessing.Process(
                target=_serve,
                args=(initializer, function, task_reader, result_writer, parent_ends + [task_writer, result_reader]),
                daemon=True,
            )
            process.start()
            task_reader.close()  # the worker's ends live in the worker only: its death is end-of-file here
            result_writer.close()
            parent_ends += [task_writer, result_reader]
            self._workers.append((process, task_writer, result_reader))

    def __enter__(self) -> "OrderedWorkerPool":
        return self

    def __exit__(self, error_type, error, trace) -> None:
        self._stop(kill=error_type is not None)

    def map(self, items: Iterable) -> Iterator:
        chunks = _chunks(items, self.chunk_size)
        next_worker = itertools.cycle(range(len(self._workers)))
        pending = deque()  # the worker of each chunk in flight, oldest first

        def submit() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                worker = next(next_worker)
                try:
                    self._workers[worker][1].send(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    raise self._died(worker) from None
                pending.append(worker)

        for _ in range(len(self._workers) * self.in_flight):
            submit()
        while pending:
            results = self._receive(pending.popleft())
            submit()
            yield from results

    def _receive(self, worker: int) -> List:
        process, _, result_reader = self._workers[worker]
        try:
            ok, payload = result_reader.recv()
        except EOFError:
            raise self._died(worker) from None
        if not ok:
            raise WorkerDied(f"worker process {process.pid} failed:\n{payload}")
        return payload

    def _died(self, worker: int) -> WorkerDied:
        """The error for a worker whose pipe closed: it ended (killed, or the OOM killer) with chunks in hand."""
        process = self._workers[worker][0]
        process.join(timeout=5)
        return WorkerDied(f"worker process {process.pid} ended (exit code {process.exitcode}) before returning its results")

    def _stop(self, kill: bool) -> None:
        """After a clean run each worker is told to finish; after an error every worker is killed."""
        for process, task_writer, _ in self._workers:
            if kill:
                process.kill()
            else:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # already ended: join says how
                    task_writer.send(None)
        for process, task_writer, result_reader in self._workers:
            process.join()
            task_writer.close()
            result_reader.close()


def _chunks(items: Iterable, size: int) -> Iterator[List]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _serve(initializer, function, task_reader, result_writer, parent_ends) -> None:
    """A worker: chunks in, lists of results out, until the parent sends None or goes away. Ctrl-C reaches
    the whole process group; the parent handles it, so the worker ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for connection in parent_ends:  # a fork copies the parent's ends; holding them would hide its death
        connection.close()
    initializer()
    tasks = queue.SimpleQueue()
    # A thread keeps the task pipe drained, so the parent never blocks sending a chunk while this worker
    # blocks sending results the parent has not read yet.
    threading.Thread(target=_read_tasks, args=(task_reader, tasks), daemon=True).start()
    while (chunk := tasks.get()) is not None:
        try:
            reply = (True, [function(item) for item in chunk])
        except Exception:
            reply = (False, traceback.format_exc())
        result_writer.send(reply)


def _read_tasks(task_reader, tasks: queue.SimpleQueue) -> None:
    try:
        while True:
            chunk = task_reader.recv()
            tasks.put(chunk)
            if chunk is None:
                return
    except (EOFError, OSError):  # the parent died
        tasks.put(None)
