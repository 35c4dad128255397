"""Executors: where the architectures of a run are scored. All share one interface, ``imap``.

``imap(setup, inputs, targets, archs)`` yields ``(arch, [StoredScore, ...])`` as each arch finishes, in
any order. The caller (``evaluate.score_archs``) is the only writer of the score store. Results do not
depend on scheduling: every arch is built and scored from ``setup.seed`` alone.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

from gradsign.store import StoredScore

EXECUTORS = ("local", "ray")


class SerialExecutor:
    """Score archs one after another in this process."""

    def imap(self, setup, inputs: torch.Tensor, targets: torch.Tensor,
             archs: Iterable[str]) -> Iterator[tuple[str, list[StoredScore]]]:
        from gradsign.evaluate import score_arch

        for arch in archs:
            yield arch, score_arch(setup, arch, inputs, targets)


# State of a worker process, set once by the pool initialiser so that each task ships only an arch.
_worker_state: dict = {}


def _init_worker(setup, inputs: torch.Tensor, targets: torch.Tensor, threads: int) -> None:
    torch.set_num_threads(threads)
    _worker_state.update(setup=setup, inputs=inputs, targets=targets)


def _score_in_worker(arch: str) -> list[StoredScore]:
    from gradsign.evaluate import score_arch

    return score_arch(_worker_state["setup"], arch, _worker_state["inputs"], _worker_state["targets"])


class LocalExecutor:
    """A pool of ``workers`` spawned processes with ``threads`` torch threads each (default 1)."""

    def __init__(self, workers: int, threads: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.threads = workers, threads

    def imap(self, setup, inputs: torch.Tensor, targets: torch.Tensor,
             archs: Iterable[str]) -> Iterator[tuple[str, list[StoredScore]]]:
        archs = list(archs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker,
                                 initargs=(setup, inputs, targets, self.threads)) as pool:
            # a bounded window of submitted tasks, so an interrupted run has few archs in flight
            pending, queue = {}, iter(archs)
            try:
                for arch in _take(queue, 2 * self.workers):
                    pending[pool.submit(_score_in_worker, arch)] = arch
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        arch = pending.pop(future)
                        yield arch, future.result()
                        for following in _take(queue, 1):
                            pending[pool.submit(_score_in_worker, following)] = following
            finally:
                for future in pending:
                    future.cancel()


def _take(iterator: Iterator[str], n: int) -> list[str]:
    return [item for _, item in zip(range(n), iterator)]


def make_executor(name: str = "local", workers: int = 1, *, address: str | None = None, threads: int = 1):
    """The executor ``name`` ("local" or "ray"); local with one worker runs in this process."""
    if name == "local":
        return SerialExecutor() if workers == 1 else LocalExecutor(workers, threads)
    if name == "ray":
        from gradsign.ray_executor import RayExecutor

        return RayExecutor(workers, address=address, threads=threads)
    raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
