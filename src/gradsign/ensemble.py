"""Zero-cost ensembles: rank aggregation of several proxies over a set of candidate architectures.

An ensemble score is not a property of one architecture: it ranks each component proxy's scores
*within a candidate set* and aggregates the ranks, so the same arch can get another ensemble score in
another set. Where the package uses an ensemble, the candidate set is:

* ``gradsign correlate --proxies ensemble``: the archs being correlated (those with every component known);
* ``gradsign select --proxy ensemble``: each run's draw of N candidates (GradSign paper, Table 5);
* ``gradsign search --assist ensemble``: each pool of candidates a proposal is chosen from.

Ranks: for each component, r = 1 for the worst and r = n for the best of the n candidates (the proxy's
registered direction decides which is best; +-inf are ordinary extreme values; ties get their average
rank). Aggregations over the components m:

* ``rank_sum``: s = sum_m r_m (Borda count);
* ``log_rank_product``: s = sum_m log(r_m / n), the non-linear ranking aggregation of AZ-NAS (Lee & Ham,
  CVPR 2024), i.e. the log of the product of normalised ranks: one bad rank costs more than in a plain sum.

A candidate with a NaN (unknown or failed) component score gets a NaN ensemble score and is left out
of the ranking of the others. An ensemble's cost per arch is the sum of its components' measured seconds.

Names: ``ensemble`` is the default below; ``ensemble:P+Q+R`` another composition (default method),
``ensemble:log_rank_product:P+Q+R`` or ``ensemble:rank_sum`` (default components) set the method too.

The default (``DEFAULT_COMPONENTS``, ``DEFAULT_METHOD``) was chosen by ``experiments/ensemble.py`` on
CIFAR-100 only (first 500 archs of the 1,000-arch NAS-Bench-201 sample of docs/results.md), among the
proxies scored there; see docs/ensemble.md.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METHODS = ("rank_sum", "log_rank_product")
#: the name of the default ensemble, usable wherever a proxy name is
NAME = "ensemble"
#: chosen on CIFAR-100 by experiments/ensemble.py (docs/ensemble.md): the best signed Spearman rho with
#: CIFAR-100 test accuracy (+0.928 over 500 archs) among 114 ensembles of gradsign, naswot, synflow,
#: jacob_cov, params and flops
DEFAULT_COMPONENTS: tuple[str, ...] = ("gradsign", "jacob_cov")
DEFAULT_METHOD = "log_rank_product"


class MissingScoresError(LookupError):
    """Component scores an ensemble needs are not known for some candidates."""


def is_ensemble_name(name: str) -> bool:
    """True for ``ensemble`` and ``ensemble:...`` names."""
    return name == NAME or name.startswith(NAME + ":")


@dataclass(frozen=True)
class Ensemble:
    """Rank aggregation of ``components`` (registered proxy names) by ``method`` within a candidate set."""

    components: tuple[str, ...] = DEFAULT_COMPONENTS
    method: str = DEFAULT_METHOD

    def __post_init__(self) -> None:
        from gradsign.proxies import get_proxy

        if self.method not in METHODS:
            raise ValueError(f"unknown ensemble method {self.method!r}; known: {', '.join(METHODS)}")
        if len(self.components) < 2 or len(set(self.components)) != len(self.components):
            raise ValueError(f"an ensemble needs two or more distinct components, got {list(self.components)}")
        for name in self.components:
            if is_ensemble_name(name):
                raise ValueError("an ensemble cannot contain an ensemble")
            get_proxy(name)

    @property
    def name(self) -> str:
        """``ensemble`` for the default, else ``ensemble:METHOD:P+Q+...``."""
        if self.components == DEFAULT_COMPONENTS and self.method == DEFAULT_METHOD:
            return NAME
        return f"{NAME}:{self.method}:{'+'.join(self.components)}"

    @property
    def directions(self) -> tuple[bool, ...]:
        """Each component's registered ``higher_is_better``."""
        from gradsign.proxies import get_proxy
        return tuple(get_proxy(c).higher_is_better for c in self.components)

    def describe(self) -> str:
        """One line: method, components and the candidate-set dependence."""
        return (f"{self.name} = {self.method} of the ranks of {', '.join(self.components)} within the "
                "candidate set")

    def aggregate(self, values: Mapping[str, Sequence[float]]) -> np.ndarray:
        """Ensemble scores of n candidates from each component's n scores (``values[component]``),
        ranked within these n candidates; NaN where a component score is NaN."""
        matrix = np.column_stack([np.asarray(values[c], dtype=np.float64) for c in self.components])
        return rank_aggregate(matrix, self.directions, self.method)

    def cost(self, seconds: Mapping[str, Sequence[float]]) -> np.ndarray:
        """Per-candidate cost: the sum of the components' measured seconds (NaN where one is unknown)."""
        return np.sum([np.asarray(seconds[c], dtype=np.float64) for c in self.components], axis=0)


def parse_ensemble(name: str) -> Ensemble:
    """The ensemble a name stands for: ``ensemble``, ``ensemble:P+Q``, ``ensemble:METHOD`` or
    ``ensemble:METHOD:P+Q``; ValueError for anything else."""
    if not is_ensemble_name(name):
        raise ValueError(f"not an ensemble name: {name!r}")
    parts = name.split(":")[1:]
    method, components = DEFAULT_METHOD, DEFAULT_COMPONENTS
    if len(parts) > 2 or any(not p.strip() for p in parts):
        raise ValueError(f"bad ensemble name {name!r}; use ensemble, ensemble:P+Q, ensemble:METHOD or "
                         "ensemble:METHOD:P+Q")
    if len(parts) == 2 and parts[0] not in METHODS:
        raise ValueError(f"bad ensemble name {name!r}: unknown method {parts[0]!r}; known: {', '.join(METHODS)}")
    if len(parts) == 2 or (len(parts) == 1 and parts[0] in METHODS):
        method = parts[0]
    if len(parts) == 2 or (len(parts) == 1 and parts[0] not in METHODS):
        components = tuple(c.strip() for c in parts[-1].split("+"))
    return Ensemble(components, method)


def split_proxy_names(names: Sequence[str]) -> tuple[tuple[str, ...], tuple[Ensemble, ...]]:
    """(proxies to score, ensembles) for a list of proxy and ensemble names: the plain proxies in the
    order given, then the ensembles' components not listed yet."""
    ensembles = tuple(dict.fromkeys(parse_ensemble(n) for n in names if is_ensemble_name(n)))
    proxies = [n for n in names if not is_ensemble_name(n)]
    for ensemble in ensembles:
        proxies += [c for c in ensemble.components if c not in proxies]
    return tuple(dict.fromkeys(proxies)), ensembles


def component_ranks(values: Sequence[float], higher_is_better: bool = True) -> np.ndarray:
    """Ranks 1 (worst) .. n (best) of the non-NaN ``values``, ties averaged; NaN stays NaN."""
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=np.float64)
    ranks = np.full(values.shape, np.nan)
    keep = ~np.isnan(values)
    if keep.any():
        ranks[keep] = rankdata(values[keep] if higher_is_better else -values[keep], method="average")
    return ranks


def rank_aggregate(matrix: np.ndarray, higher_is_better: Sequence[bool], method: str = DEFAULT_METHOD
                   ) -> np.ndarray:
    """Aggregate the ranks of an (n candidates, m components) score matrix within its n rows.

    Rows with a NaN get NaN and are left out of the ranking; ``rank_sum``: sum of ranks 1..n (n best);
    ``log_rank_product``: sum of log(rank / n) (AZ-NAS)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(higher_is_better):
        raise ValueError(f"expected an (n, {len(higher_is_better)}) score matrix, got shape {matrix.shape}")
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; known: {', '.join(METHODS)}")
    result = np.full(matrix.shape[0], np.nan)
    complete = ~np.isnan(matrix).any(axis=1)
    n = int(complete.sum())
    if n == 0:
        return result
    ranks = np.column_stack([component_ranks(matrix[complete, j], hib) for j, hib in enumerate(higher_is_better)])
    result[complete] = ranks.sum(axis=1) if method == "rank_sum" else np.log(ranks / n).sum(axis=1)
    return result


def best_in_draws(ensemble: Ensemble, draws: np.ndarray, values: Mapping[str, np.ndarray]) -> np.ndarray:
    """For each row of ``draws`` (candidate indices), the candidate with the highest ensemble score
    ranked within that row; ``values[component]`` are arrays by index. Candidates with NaN rank last,
    ties go to the earlier candidate."""
    draws = np.asarray(draws, dtype=np.int64)
    chosen = np.empty(len(draws), dtype=np.int64)
    for r, row in enumerate(draws):
        scores = ensemble.aggregate({c: values[c][row] for c in ensemble.components})
        chosen[r] = row[int(np.argmax(np.where(np.isnan(scores), -np.inf, scores)))]
    return chosen


def add_to_correlation(rows: list[dict], table: dict[str, dict], found: Mapping, ensembles: Sequence[Ensemble],
                       accuracy: Sequence[float], *, n_boot: int, seed: int) -> None:
    """Add each ensemble to a correlation: its score in every row (ranked within the rows whose
    components are all known) and its signed correlations in ``table``, with the candidate count, the
    method, the components and the mean cost per arch (sum of the components' measured seconds)."""
    from gradsign.correlate import signed_correlations

    for ensemble in ensembles:
        values = ensemble.aggregate({c: [r["scores"][c] for r in rows] for c in ensemble.components})
        cost = ensemble.cost({c: [_seconds(found[r["arch"]][c]) for r in rows] for c in ensemble.components})
        for row, value in zip(rows, values):
            row["scores"][ensemble.name] = float(value)
        entry = signed_correlations(values, accuracy, n_boot=n_boot, seed=seed)
        timed = cost[np.isfinite(cost)]
        entry.update({"candidates": int(np.isfinite(values).sum()), "method": ensemble.method,
                      "components": list(ensemble.components),
                      "seconds_per_arch": float(timed.mean()) if len(timed) else float("nan"),
                      "timed_archs": int(len(timed))})
        table[ensemble.name] = entry


def _seconds(stored) -> float:
    return float("nan") if stored.seconds is None else float(stored.seconds)


def correlation_note(table: Mapping[str, dict]) -> str:
    """Lines that say, for each ensemble in a correlation table, what its scores were ranked within and
    what it costs."""
    lines = []
    for name, entry in table.items():
        if "components" in entry:
            lines.append(f"{name}: {entry['method']} of the ranks of {', '.join(entry['components'])} within "
                         f"the {entry['candidates']} archs with no NaN component score (scores depend on this "
                         f"set); cost {entry['seconds_per_arch']:.2f} s per arch (sum of the components' "
                         f"measured seconds, {entry['timed_archs']} archs timed)")
    return "\n".join(lines)


def values_by_index(space, found: Mapping, proxies: Sequence[str]) -> dict[str, np.ndarray]:
    """Scores found by ``evaluate.score_archs`` (by arch, then proxy) as arrays by benchmark index, NaN
    where not found."""
    out = {p: np.full(len(space), np.nan) for p in proxies}
    for arch, by_proxy in found.items():
        for p in proxies:
            if p in by_proxy:
                out[p][space.index(arch)] = by_proxy[p].value
    return out


class _FixedScores:
    """One component's scores as fixed arrays by benchmark index; computes nothing."""

    def __init__(self, values: Sequence[float], seconds: Sequence[float], known: Sequence[bool] | None):
        self.values = np.asarray(values, dtype=np.float64)
        self.seconds = np.asarray(seconds, dtype=np.float64)
        self.known = ~np.isnan(self.values) if known is None else np.asarray(known, bool)

    def __call__(self, indices) -> np.ndarray:
        return self.values[indices]


class EnsembleScores:
    """An ensemble as a search assist: ``self(indices)`` ranks the components' scores within ``indices``
    (one pool of candidates) and returns the aggregate; ``seconds`` (an array by benchmark index, updated
    in place) sums the components' measured seconds, the full cost of scoring an arch with the ensemble.

    Built from arrays by benchmark index (``values``/``seconds``/``known`` per component, NaN where
    unknown), a pool with an unknown score raises MissingScoresError; built by ``on_demand`` from each
    component's ``evaluate.ProxyScores``, the missing scores of a pool are computed first."""

    higher_is_better = True

    def __init__(self, ensemble: Ensemble, values: Mapping[str, np.ndarray], seconds: Mapping[str, np.ndarray],
                 known: Mapping[str, np.ndarray] | None = None):
        self._attach(ensemble, {c: _FixedScores(values[c], seconds[c], None if known is None else known[c])
                                for c in ensemble.components})

    @classmethod
    def on_demand(cls, ensemble: Ensemble, components: Mapping) -> EnsembleScores:
        """The ensemble over ``components`` (per component, a ``ProxyScores``-like object: arrays
        ``values``, ``seconds``, ``known`` by benchmark index, updated in place when called on indices)."""
        scores = cls.__new__(cls)
        scores._attach(ensemble, components)
        return scores

    def _attach(self, ensemble: Ensemble, components: Mapping) -> None:
        self.ensemble, self.proxy = ensemble, ensemble.name
        self.components = {c: components[c] for c in ensemble.components}
        self.seconds = self._cost(slice(None))

    @property
    def known(self) -> np.ndarray:
        return np.logical_and.reduce([c.known for c in self.components.values()])

    def _cost(self, indices) -> np.ndarray:
        return self.ensemble.cost({name: c.seconds[indices] for name, c in self.components.items()})

    def missing_summary(self) -> str:
        """'P known for k of N archs, ...' for the components not known for every arch ('' if none)."""
        return ", ".join(f"{name} known for {int(c.known.sum()):,} of {len(c.known):,} archs"
                         for name, c in self.components.items() if not c.known.all())

    def source_counts(self) -> dict[str, int]:
        """Where the components' known scores came from (arch x component), for components that say."""
        counts: dict[str, int] = {}
        for c in self.components.values():
            for source, n in (c.source_counts() if hasattr(c, "source_counts") else {}).items():
                counts[source] = counts.get(source, 0) + n
        return counts

    def __call__(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        values = {name: c(indices) for name, c in self.components.items()}
        self.seconds[indices] = self._cost(indices)  # in place: a search may hold the array
        absent = sorted(name for name, c in self.components.items() if not c.known[indices].all())
        if absent:
            raise MissingScoresError(f"{self.proxy}: no {', '.join(absent)} scores for some of archs "
                                     f"{sorted(set(indices.tolist()))[:5]}")
        return self.ensemble.aggregate(values)


#: the eleven proxies of the paper's Table 3, in its order: the bundled NAS-Bench-201 table's columns
TABLE_PROXIES: tuple[str, ...] = ("gradsign", "grad_norm", "snip", "grasp", "fisher", "synflow", "jacob_cov",
                                  "naswot", "zen", "params", "flops")


def proxy_table(dataset: str, space: str = "nb201", proxies: Sequence[str] = TABLE_PROXIES) -> dict:
    """The bundled per-arch table of ``proxies`` (batch 64, seed 0, default options) on the archs where
    every one of them is bundled (the 1,000-arch sample of docs/results.md; data/PROVENANCE.md):
    ``{"index": benchmark indices, "values": {proxy: scores}, "seconds": {proxy: measured seconds},
    "dataset", "space"}``. The same files answer score look-ups. FileNotFoundError naming the proxies
    that have no bundled scores."""
    from gradsign.bundled import bundled_arrays
    from gradsign.evaluate import ScoringSetup
    from gradsign.spaces import get_space

    setup = ScoringSetup(get_space(space), dataset, tuple(proxies), 64, 0)
    arrays = {p: bundled_arrays(setup.key_for(p), p) for p in proxies}
    missing = [p for p, a in arrays.items() if a is None]
    if missing:
        raise FileNotFoundError(f"no bundled {space} {dataset} scores of {', '.join(missing)}")
    index = np.flatnonzero(np.logical_and.reduce([a[2] for a in arrays.values()]))
    return {"index": index.astype(np.int64), "dataset": dataset, "space": space,
            "values": {p: a[0][index].astype(np.float64) for p, a in arrays.items()},
            "seconds": {p: a[1][index].astype(np.float64) for p, a in arrays.items()}}


def ensemble_assist(name: str, setup_for, store=None, *, compute_missing: bool = False) -> EnsembleScores:
    """The search assist of ensemble ``name`` over every arch of a space, from the bundled scores and
    ``store``. ``setup_for(proxy)`` returns the ``ScoringSetup`` of one component. With
    ``compute_missing``, scores not known are computed (and written to ``store``) when a pool first needs
    them; otherwise MissingScoresError names the components whose scores are not known for every arch
    (an ensemble ranks each pool with all its components; see ``gradsign correlate --all``)."""
    from gradsign.evaluate import ProxyScores

    ensemble = parse_ensemble(name)
    scores = EnsembleScores.on_demand(ensemble, {c: ProxyScores(setup_for(c), store) for c in ensemble.components})
    if not compute_missing and not scores.known.all():
        setup = setup_for(ensemble.components[0])
        raise MissingScoresError(
            f"--assist {name} needs every component's score for every arch of {setup.space.name} on "
            f"{setup.dataset} (batch {setup.batch_size}, seed {setup.seed}): {scores.missing_summary()}; score "
            f"them first with gradsign correlate --all --dataset {setup.dataset} --proxies "
            f"{','.join(ensemble.components)}")
    return scores
