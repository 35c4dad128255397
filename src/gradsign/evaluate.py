"""Score the architectures of a search space on one canonical batch, through the score store.

Every architecture of a run is built with ``torch.manual_seed(seed)`` and scored on the same images:
the canonical batch of (dataset, batch size, seed), no augmentation (FIELD-NOTES section 6).

Where a score comes from: the scores bundled with the package, the score store, or computed now. Each
``StoredScore`` says which (``source``), and ``recompute=True`` ignores the first two. A score is keyed
(``ScoringSetup.key_for``) by everything that changes its value: space, dataset, batch size, seed, the
proxy's options that differ from their defaults (an explicitly chosen engine other than "auto" included:
engines agree only up to float noise, and a user who asks for one must get its value), the data folder
and ``SCORING_VERSION``. Left out: options that only choose how a value is computed (``chunk_size``)
and the thread count (which changes at most float rounding).
"""
from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from gradsign.api import API_OPTIONS, scores
from gradsign.datasets import canonical_batch
from gradsign.proxies import get_proxy
from gradsign.spaces import SearchSpace
from gradsign.store import SOURCES, ScoreKey, ScoreStore, StoredScore

#: The package version in which the value of a stored score last changed (a proxy's definition, the
#: canonical batch, the network initialisation). Store rows and bundled files carry it; rows and files of
#: another scoring version are not used. Bump it with any change that moves a score.
SCORING_VERSION = "0.1.0"

#: scoring options that choose how a value is computed, not the value: never part of a score's key
VALUE_NEUTRAL_OPTIONS = ("chunk_size",)


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

    def key_for(self, proxy: str) -> ScoreKey:
        """The key of ``proxy``'s scores: the options that proxy takes, less the value-neutral ones and
        those equal to their defaults (so ``engine="auto"`` or ``n_inits=1`` key as no option)."""
        defaults = _option_defaults(proxy, self.seed)
        accepted = set(get_proxy(proxy).options) | set(API_OPTIONS)
        kept = {k: v for k, v in self.options.items()
                if k in accepted and k not in VALUE_NEUTRAL_OPTIONS and not (k in defaults and v == defaults[k])}
        if self.data_dir is not None:
            kept["data_dir"] = str(Path(self.data_dir).resolve())
        return ScoreKey(self.space.name, self.dataset, self.batch_size, self.seed,
                        ScoreKey.options_text(kept), SCORING_VERSION)

    @property
    def key(self) -> ScoreKey:
        """The key shared by all proxies of this setup; ValueError when their keys differ (then use
        ``key_for``)."""
        keys = {self.key_for(p) for p in self.proxies}
        if len(keys) != 1:
            raise ValueError(f"proxies {', '.join(self.proxies)} have different score keys; use key_for")
        return keys.pop()

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


def _option_defaults(proxy: str, seed: int) -> dict:
    """Default values of the options ``proxy`` and the API take (the API's seed defaults to the run's)."""
    signatures = (inspect.signature(get_proxy(proxy).fn), inspect.signature(scores))
    defaults = {name: p.default for sig in signatures for name, p in sig.parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}
    return {**defaults, "seed": seed}


def score_archs(setup: ScoringSetup, archs: Iterable[str], store: ScoreStore | None = None, *,
                recompute: bool = False, executor=None, progress: Callable[[Iterable], Iterable] | None = None
                ) -> tuple[dict[str, dict[str, StoredScore]], int]:
    """Scores of ``archs`` for every proxy of ``setup``: the bundled or stored ones where known (unless
    ``recompute``), the others computed by ``executor`` (default: in this process) and written to
    ``store`` (if any) as each arch finishes. Each score's ``source`` says which; ``count_sources``
    counts them. Returns (scores by arch and proxy, number of archs computed)."""
    from gradsign.executors import SerialExecutor

    archs = list(dict.fromkeys(archs))
    found = {} if recompute else known_scores(setup, archs, store)
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
                for proxy in dict.fromkeys(r.proxy for r in computed):
                    store.put(setup.key_for(proxy), [r for r in computed if r.proxy == proxy])
            result[arch].update({r.proxy: r for r in computed})
    return result, len(missing)


def count_sources(found: dict[str, dict[str, StoredScore]]) -> dict[str, int]:
    """How many of the scores (arch x proxy) in ``found`` came from each source: ``{"bundled": n,
    "store": n, "computed": n}``."""
    counts = dict.fromkeys(SOURCES, 0)
    for per_proxy in found.values():
        for stored in per_proxy.values():
            counts[stored.source] += 1
    return counts


def known_scores(setup: ScoringSetup, archs: list[str], store: ScoreStore | None
                 ) -> dict[tuple[str, str], StoredScore]:
    """Scores already known for ``archs``: the bundled ones, overridden by the store's (each proxy
    under its own key)."""
    from gradsign.bundled import bundled_scores

    wanted = set(archs)
    found = {}
    for proxy in setup.proxies:
        key = setup.key_for(proxy)
        found.update({(arch, proxy): stored for arch, stored in bundled_scores(key, proxy, setup.space).items()
                      if arch in wanted})
        if store is not None:
            found.update(store.get(key, archs, [proxy]))
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
    """Scores of one proxy for the archs of a space, by benchmark index: the bundled and stored ones
    (none with ``recompute``), the others computed on demand in this process and written to ``store``.
    For search algorithms, which ask for a few archs at a time and need array access to the known ones.
    ``source_counts()`` says how many known scores came from each source."""

    def __init__(self, setup: ScoringSetup, store: ScoreStore | None = None, *, recompute: bool = False):
        if len(setup.proxies) != 1:
            raise ValueError("ProxyScores holds exactly one proxy")
        self.setup, self.store, self.proxy, self.recompute = setup, store, setup.proxies[0], recompute
        found = {} if recompute else known_scores(setup, list(setup.space), store)
        self.values, self.seconds, self.known = score_arrays(setup.space, found)
        self.sources = np.full(len(setup.space), -1, dtype=np.int8)  # index into SOURCES, -1: unknown
        for (arch, _), stored in found.items():
            self.sources[setup.space.index(arch)] = SOURCES.index(stored.source)

    def __call__(self, indices) -> np.ndarray:
        """Scores of ``indices`` (an int or an array of ints), computing the missing ones."""
        indices = np.asarray(indices, dtype=np.int64)
        missing = np.unique(indices[~self.known[indices]])
        if len(missing):
            space = self.setup.space
            found, _ = score_archs(self.setup, [space.arch(int(i)) for i in missing], self.store,
                                   recompute=self.recompute)
            for i in missing:
                stored = found[space.arch(int(i))][self.proxy]
                _put_score(self.values, self.seconds, self.known, int(i), stored)
                self.sources[int(i)] = SOURCES.index(stored.source)
        return self.values[indices]

    def source_counts(self) -> dict[str, int]:
        """How many of the known scores came from each source: ``{"bundled": n, "store": n,
        "computed": n}``."""
        return {name: int((self.sources == i).sum()) for i, name in enumerate(SOURCES)}
