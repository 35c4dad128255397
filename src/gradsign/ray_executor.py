"""Score archs on a Ray cluster (``pip install gradsign[ray]``): ``--executor ray [--address ADDR]``.

Without an address a local Ray instance with ``workers`` CPUs is started for the run. Each task needs
one CPU and runs with ``threads`` torch threads; the setup and the batch are put in the object store
once. A task whose worker dies is recorded as that arch's error, like the local executor does.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from gradsign.executors import _take, worker_died
from gradsign.store import StoredScore


def _score_remote(setup, inputs: torch.Tensor, targets: torch.Tensor, arch: str, threads: int):
    from gradsign.evaluate import score_arch
    from gradsign.proxies.registry import load_plugins

    load_plugins()
    torch.set_num_threads(threads)
    return score_arch(setup, arch, inputs, targets)


class RayExecutor:
    def __init__(self, workers: int = 1, *, address: str | None = None, threads: int = 1):
        try:
            import ray
        except ImportError:
            raise ValueError("the Ray executor needs Ray: pip install 'gradsign[ray]'") from None
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.ray, self.workers, self.address, self.threads = ray, workers, address, threads

    def imap(self, setup, inputs: torch.Tensor, targets: torch.Tensor,
             archs: Iterable[str]) -> Iterator[tuple[str, list[StoredScore]]]:
        ray = self.ray
        started_here = not ray.is_initialized()
        if started_here:
            options = {"address": self.address} if self.address else {"num_cpus": self.workers}
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **options)
        try:
            task = ray.remote(num_cpus=1, max_retries=0)(_score_remote)
            refs = [ray.put(v) for v in (setup, inputs, targets)]
            queue = iter(list(archs))
            pending = {task.remote(*refs, arch, self.threads): arch
                       for arch in _take(queue, 2 * self.workers)}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    arch = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError) as error:
                        result = worker_died(setup, arch, type(error).__name__)
                    yield arch, result
                    for following in _take(queue, 1):
                        pending[task.remote(*refs, following, self.threads)] = following
        finally:
            if started_here:
                ray.shutdown()

