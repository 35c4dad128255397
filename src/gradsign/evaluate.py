"""Score the architectures of a search space on one canonical batch, through the score store.

Every architecture of a run is built with ``torch.manual_seed(seed)`` and scored on the same images:
the canonical batch of (dataset, batch size, seed), no augmentation (FIELD-NOTES section 6).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

import gradsign
from gradsign.api import API_OPTIONS, scores
from gradsign.datasets import canonical_batch
from gradsign.proxies import get_proxy
from gradsign.spaces import SearchSpace
from gradsign.store import ScoreKey, ScoreStore, StoredScore

#: scoring options that select an algorithm, not a value: left out of the store key
VALUE_NEUTRAL_OPTIONS = ("engine", "chunk_size")


@dataclass(frozen=True)
class ScoringSetup:
    """What a batch of architecture scores depends on."""

    space: SearchSpace
    dataset: str
    proxies: tuple[str, ...]
    batch_size: int = 64
    seed: int = 0
    options: dict = field(default_factory=dict)
    data_dir: str | None = None

    def __post_init__(self) -> None:
        for proxy in self.proxies:
            get_proxy(proxy)
        accepted = {o for p in self.proxies for o in get_proxy(p).options} | set(API_OPTIONS)
        unknown = sorted(set(self.options) - accepted)
        if unknown:
            raise ValueError(f"option {unknown[0]!r} is not accepted by proxies {', '.join(self.proxies)}")
        self.space.num_classes(self.dataset)

    @property
    def key(self) -> ScoreKey:
        kept = {k: v for k, v in self.options.items() if k not in VALUE_NEUTRAL_OPTIONS}
        return ScoreKey(self.space.name, self.dataset, self.batch_size, self.seed,
                        ScoreKey.options_text(kept), gradsign.__version__)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return canonical_batch(self.dataset, self.batch_size, self.seed, data_dir=self.data_dir)


def score_arch(setup: ScoringSetup, arch: str, inputs: torch.Tensor, targets: torch.Tensor,
               proxies: Sequence[str] | None = None) -> list[StoredScore]:
    """Build ``arch`` (initialised with ``torch.manual_seed(setup.seed)``) and score it with each proxy.

    A proxy that raises is recorded with its error and a NaN value; the others still run.
    """
    with torch.random.fork_rng():
        torch.manual_seed(setup.seed)
        model = setup.space.build(arch, num_classes=setup.space.num_classes(setup.dataset))
    results = []
    for proxy in proxies or setup.proxies:
        accepted = set(get_proxy(proxy).options) | set(API_OPTIONS)
        options = {k: v for k, v in setup.options.items() if k in accepted}
        options.setdefault("seed", setup.seed)
        start = time.perf_counter()
        try:
            value, error = scores(model, inputs, targets, [proxy], **options)[proxy], None
        except Exception as exc:  # recorded, so that one failing arch does not stop a run
            value, error = math.nan, f"{type(exc).__name__}: {exc}".splitlines()[0]
        results.append(StoredScore(arch, proxy, value, error, time.perf_counter() - start))
    return results


def score_archs(setup: ScoringSetup, archs: Iterable[str], store: ScoreStore | None = None, *,
                progress: Callable[[Iterable], Iterable] | None = None
                ) -> tuple[dict[str, dict[str, StoredScore]], int]:
    """Scores of ``archs`` for every proxy of ``setup``: taken from ``store`` where present, computed and
    written to it (one transaction per arch) otherwise. Returns (scores by arch and proxy, number
    of archs computed)."""
    archs = list(dict.fromkeys(archs))
    found = store.get(setup.key, archs, setup.proxies) if store else {}
    result: dict[str, dict[str, StoredScore]] = {a: {} for a in archs}
    for (arch, proxy), stored in found.items():
        result[arch][proxy] = stored
    missing = [a for a in archs if len(result[a]) < len(setup.proxies)]
    if missing:
        inputs, targets = setup.batch()
        for arch in (progress(missing) if progress else missing):
            todo = [p for p in setup.proxies if p not in result[arch]]
            computed = score_arch(setup, arch, inputs, targets, todo)
            if store:
                store.put(setup.key, computed)
            result[arch].update({r.proxy: r for r in computed})
    return result, len(missing)
