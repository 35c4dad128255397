"""Score the architectures of a search space on one canonical batch, through the score store.

Every architecture of a run is built with ``torch.manual_seed(seed)`` and scored on the same images:
the canonical batch of (dataset, batch size, seed), no augmentation (FIELD-NOTES section 6).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
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
        if self.data_dir is not None:
            kept["data_dir"] = str(Path(self.data_dir).resolve())
        return ScoreKey(self.space.name, self.dataset, self.batch_size, self.seed,
                        ScoreKey.options_text(kept), gradsign.__version__)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return canonical_batch(self.dataset, self.batch_size, self.seed, data_dir=self.data_dir)


def score_arch(setup: ScoringSetup, arch: str, inputs: torch.Tensor, targets: torch.Tensor
               ) -> list[StoredScore]:
    """Build ``arch`` (initialised with ``torch.manual_seed(setup.seed)``) and score it with each proxy.

    A proxy that raises is recorded with its error and a NaN value; the others still run.
    """
    with torch.random.fork_rng():
        torch.manual_seed(setup.seed)
        model = setup.space.build(arch, num_classes=setup.space.num_classes(setup.dataset))
    results = []
    for proxy in setup.proxies:
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
                executor=None, progress: Callable[[Iterable], Iterable] | None = None
                ) -> tuple[dict[str, dict[str, StoredScore]], int]:
    """Scores of ``archs`` for every proxy of ``setup``: taken from ``store`` where present, computed by
    ``executor`` (default: in this process) and written to the store as each arch finishes otherwise.
    Returns (scores by arch and proxy, number of archs computed)."""
    from gradsign.executors import SerialExecutor

    archs = list(dict.fromkeys(archs))
    found = known_scores(setup, archs, store)
    result: dict[str, dict[str, StoredScore]] = {a: {} for a in archs}
    for (arch, proxy), stored in found.items():
        result[arch][proxy] = stored
    missing = [a for a in archs if len(result[a]) < len(setup.proxies)]
    if missing:
        inputs, targets = setup.batch()
        todo = setup if not found else replace(setup, proxies=_missing_proxies(setup, result, missing))
        finished = (executor or SerialExecutor()).imap(todo, inputs, targets, missing)
        for arch, computed in (progress(finished, len(missing)) if progress else finished):
            computed = [r for r in computed if r.proxy not in result[arch]]
            if store:
                store.put(setup.key, computed)
            result[arch].update({r.proxy: r for r in computed})
    return result, len(missing)


def known_scores(setup: ScoringSetup, archs: list[str], store: ScoreStore | None
                 ) -> dict[tuple[str, str], StoredScore]:
    """Scores already known for ``archs``: the bundled ones, overridden by the store's."""
    from gradsign.bundled import bundled_scores

    wanted = set(archs)
    found = {(arch, proxy): stored for proxy in setup.proxies
             for arch, stored in bundled_scores(setup.key, proxy, setup.space).items() if arch in wanted}
    if store is not None:
        found.update(store.get(setup.key, archs, setup.proxies))
    return found


def _missing_proxies(setup: ScoringSetup, result: dict, missing: list[str]) -> tuple[str, ...]:
    return tuple(p for p in setup.proxies if any(p not in result[a] for a in missing))


def score_arrays(space: SearchSpace, found: dict[tuple[str, str], StoredScore]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One proxy's scores keyed by (arch, proxy) as arrays by benchmark index: (values, measured
    seconds, known), NaN where not known."""
    values, seconds = np.full(len(space), np.nan), np.full(len(space), np.nan)
    known = np.zeros(len(space), dtype=bool)
    for (arch, _), stored in found.items():
        _put_score(values, seconds, known, space.index(arch), stored)
    return values, seconds, known


def _put_score(values: np.ndarray, seconds: np.ndarray, known: np.ndarray, index: int,
               stored: StoredScore) -> None:
    values[index], known[index] = stored.value, True
    seconds[index] = np.nan if stored.seconds is None else stored.seconds


class ProxyScores:
    """Scores of one proxy for the archs of a space, by benchmark index, fetched through the store and
    computed on demand (in this process) for archs that have none yet. For search algorithms, which
    ask for a few archs at a time and need array access to the ones already known."""

    def __init__(self, setup: ScoringSetup, store: ScoreStore | None = None):
        if len(setup.proxies) != 1:
            raise ValueError("ProxyScores holds exactly one proxy")
        self.setup, self.store, self.proxy = setup, store, setup.proxies[0]
        self.values, self.seconds, self.known = score_arrays(
            setup.space, known_scores(setup, list(setup.space), store))

    def __call__(self, indices) -> np.ndarray:
        """Scores of ``indices`` (an int or an array of ints), computing the missing ones."""
        indices = np.asarray(indices, dtype=np.int64)
        missing = np.unique(indices[~self.known[indices]])
        if len(missing):
            space = self.setup.space
            found, _ = score_archs(self.setup, [space.arch(int(i)) for i in missing], self.store)
            for i in missing:
                _put_score(self.values, self.seconds, self.known, int(i), found[space.arch(int(i))][self.proxy])
        return self.values[indices]
