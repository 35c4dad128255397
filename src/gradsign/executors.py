"""Executors: where the architectures of a run are scored. All share one interface, ``imap``.

``imap(setup, inputs, targets, archs)`` yields ``(arch, [StoredScore, ...])`` as each arch finishes, in
any order. The caller (``evaluate.score_archs``) is the only writer of the score store. Results do not
depend on scheduling: every arch is built and scored from ``setup.seed`` alone. A proxy that raises is
recorded by ``score_arch``; a worker process that dies (a crash, the out-of-memory killer) is recorded
as an error of the arch it was scoring, and the run goes on.
"""
from __future__ import annotations

import math
import multiprocessing
import signal
import sys
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import torch

from gradsign.store import StoredScore

EXECUTORS = ("local", "ray")
WORKER_DIED = "WorkerDied: the worker process scoring this arch died"


def worker_died(setup, arch: str, detail: str = "") -> list[StoredScore]:
    """The record of an arch whose worker process died: every proxy NaN with the error."""
    error = WORKER_DIED + (f" ({detail})" if detail else "")
    return [StoredScore(arch, proxy, math.nan, error, None) for proxy in setup.proxies]


class SerialExecutor:
    """Score archs one after another in this process, with ``threads`` torch threads (default: leave
    torch's setting). Scores are bit-identical across executors run with the same thread count."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def imap(self, setup, inputs: torch.Tensor, targets: torch.Tensor,
             archs: Iterable[str]) -> Iterator[tuple[str, list[StoredScore]]]:
        from gradsign.evaluate import score_arch

        before = torch.get_num_threads()
        try:
            for arch in archs:
                torch.set_num_threads(self.threads or before)
                result = score_arch(setup, arch, inputs, targets)
                torch.set_num_threads(before)
                yield arch, result
        finally:
            torch.set_num_threads(before)


# State of a worker process, set once by the pool initialiser so that each task ships only an arch.
_worker_state: dict = {}


def _init_worker(setup, inputs: torch.Tensor, targets: torch.Tensor, threads: int) -> None:
    from gradsign.proxies.registry import load_plugins

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides how a run stops
    _die_with_parent()
    warnings.showwarning = show_warning_line  # this process is ours alone: warnings as the CLI prints them
    load_plugins()
    torch.set_num_threads(threads)
    _worker_state.update(setup=setup, inputs=inputs, targets=targets)


def show_warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Show a warning as one line on stderr, "gradsign: warning: ...", without its source location (a
    replacement for ``warnings.showwarning``)."""
    print(f"gradsign: warning: {str(message).splitlines()[0]}", file=sys.stderr)


def _die_with_parent() -> None:
    """On Linux, ask the kernel to end this worker when its parent dies (e.g. on SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _score_in_worker(arch: str) -> list[StoredScore]:
    from gradsign.evaluate import score_arch

    return score_arch(_worker_state["setup"], arch, _worker_state["inputs"], _worker_state["targets"])


class LocalExecutor:
    """A pool of ``workers`` spawned processes with ``threads`` torch threads each (default 1).

    When a worker dies, the archs that were in flight are rerun one at a time in a fresh process, so
    the one that kills its worker is found and recorded, and the others are scored normally.
    """

    def __init__(self, workers: int, threads: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.threads = workers, threads

    def _pool(self, setup, inputs, targets, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(setup, inputs, targets, self.threads))

    def imap(self, setup, inputs: torch.Tensor, targets: torch.Tensor,
             archs: Iterable[str]) -> Iterator[tuple[str, list[StoredScore]]]:
        queue = iter(list(archs))
        while True:
            suspects = yield from self._run_pool(setup, inputs, targets, queue)
            if not suspects:
                return
            for arch in suspects:
                yield arch, self._run_alone(setup, inputs, targets, arch)

    def _run_pool(self, setup, inputs, targets, queue: Iterator[str]):
        """Score from ``queue`` until it is empty (returns []) or a worker dies (returns the archs
        that were in flight or could not be submitted)."""
        pool = self._pool(setup, inputs, targets, self.workers)
        pending: dict = {}
        lost: list[str] = []

        def submit(count: int) -> None:
            for arch in _take(queue, count):
                try:
                    pending[pool.submit(_score_in_worker, arch)] = arch
                except BrokenProcessPool:
                    lost.append(arch)

        try:
            # a bounded window of submitted tasks, so an interrupted run has few archs in flight
            submit(2 * self.workers)
            while pending and not lost:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    arch = pending.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        lost.append(arch)
                        continue
                    yield arch, result
                    submit(1)
            return lost + list(pending.values())
        finally:
            if lost:
                _kill_workers(pool)
            pool.shutdown(wait=False, cancel_futures=True)

    def _run_alone(self, setup, inputs, targets, arch: str) -> list[StoredScore]:
        pool = self._pool(setup, inputs, targets, 1)
        try:
            return pool.submit(_score_in_worker, arch).result()
        except BrokenProcessPool:
            _kill_workers(pool)
            return worker_died(setup, arch)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """End every worker of a broken pool: the standard library can miss one that started while the
    pool was breaking, and then waits for it forever at interpreter exit."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.kill()


def _take(iterator: Iterator[str], n: int) -> list[str]:
    return [item for _, item in zip(range(n), iterator)]


def make_executor(name: str = "local", workers: int = 1, *, address: str | None = None,
                  threads: int | None = None):
    """The executor ``name`` ("local" or "ray"); local with one worker runs in this process. Worker
    processes use ``threads`` torch threads (default 1); in this process the default is torch's."""
    if name == "local":
        return SerialExecutor(threads) if workers == 1 else LocalExecutor(workers, threads or 1)
    if name == "ray":
        from gradsign.ray_executor import RayExecutor

        return RayExecutor(workers, address=address, threads=threads or 1)
    raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
