"""BOHB (Falkner et al. 2018): Hyperband whose configurations come from a TPE-style KDE model, with the
model of HpBandSter 0.7.4 (``hpbandster.optimizers.config_generators.bohb``), which the benchmark's scripts ran.

Every evaluation is recorded as ``(choice indices, loss = 100 - accuracy)`` under its rung budget, except
that a result at a budget below the largest budget that already has a model is not recorded. Once a
budget has ``N >= min_points`` results (``min_points = d + 1``, ``d`` decisions; 7 on NAS-Bench-201) the
model of that budget is refitted after each new result: results sorted by loss with numpy's default
``argsort``, the call HpBandSter makes (so tied losses, e.g. disconnected archs at 10%, split the same way;
numpy's SIMD sorts may order ties differently on another CPU, for HpBandSter as for us),
``good`` = the best ``max(min_points, floor(top_n_percent N / 100))``, ``bad`` = the next
``max(min_points, floor((100 - top_n_percent) N / 100))``; the model is kept only if both sets have more
than ``d`` rows (so ``N >= 14`` on NAS-Bench-201). Each set is a statsmodels ``KDEMultivariate`` over
unordered categorical variables (Aitchison-Aitken kernels, the number of levels taken from the set's own
data, as statsmodels does) with ``normal_reference`` bandwidths ``1.06 std n^(-1/(4+d))`` of the choice
indices, clipped below at ``min_bandwidth``.

A configuration is random (``random_fraction`` of the time, or while no budget has a model), else from the
model of the largest budget that has one: ``n_samples`` candidates, each a random good datum whose every
decision keeps its value with probability ``1 - bw`` (good set's bandwidth) and otherwise is drawn uniformly
from all options (categorical bandwidths are not widened by ``bandwidth_factor``, which only applies to
continuous parameters); the candidate minimising ``max(1e-32, g(x)) / max(l(x), 1e-32)`` is returned. As
in HpBandSter, a candidate with a non-finite ratio (a value one set never saw where that set has a single
level) is returned at once if ``l(x)`` is finite; if no candidate qualifies, the configuration is random.

Defaults are the benchmark scripts' settings: ``n_samples=4``, ``random_fraction=0``,
``bandwidth_factor=3``, ``min_bandwidth=0.3``, ``top_n_percent=15``. G-BOHB (GradSign code): the generator
runs as usual and the configuration it returns is replaced by the best-scoring of ``pool`` random archs, so
G-BOHB is G-HB with other random streams.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np

from gradsign.search.hyperband import hyperband
from gradsign.search.simulator import SearchContext


def kde_split(losses: np.ndarray, min_points: int, top_n_percent: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of HpBandSter's good and bad sets for ``losses`` (lower is better; ordered by numpy's default
    ``argsort``, as HpBandSter orders them): good = best ``max(min_points, top_n_percent N // 100)``, bad = the
    next ``max(min_points, (100 - top_n_percent) N // 100)`` (fewer when fewer remain)."""
    n = len(losses)
    n_good = max(min_points, (top_n_percent * n) // 100)
    n_bad = max(min_points, ((100 - top_n_percent) * n) // 100)
    order = np.argsort(np.asarray(losses, dtype=np.float64))
    return order[:n_good], order[n_good:n_good + n_bad]


def fit_kde(data: np.ndarray, min_bandwidth: float):
    """statsmodels' ``KDEMultivariate`` of unordered categorical columns with ``normal_reference``
    bandwidths clipped below at ``min_bandwidth`` (HpBandSter's model of one set)."""
    from statsmodels.nonparametric.kernel_density import KDEMultivariate

    data = np.asarray(data, dtype=np.float64)
    # statsmodels >= 0.15 takes a generator (used only by its cross-validated bandwidths, not by
    # normal_reference); a fixed one keeps it from warning about its future default
    extra = {"rng": 0} if "rng" in inspect.signature(KDEMultivariate).parameters else {}
    kde = KDEMultivariate(data=data, var_type="u" * data.shape[1], bw="normal_reference", **extra)
    kde.bw = np.clip(kde.bw, min_bandwidth, None)
    return kde


def _ratio(good, bad, x: np.ndarray) -> tuple[float, float]:
    """``(max(1e-32, g(x)) / max(l(x), 1e-32), l(x))`` with Python's ``max`` (a NaN density on the right
    stays NaN, on the left gives way), as HpBandSter computes it."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lx, gx = float(good.pdf(x)), float(bad.pdf(x))
        return max(1e-32, gx) / max(lx, 1e-32), lx


@dataclass
class BOHBSampler:
    """BOHB's configuration generator (module docstring); ``observe`` records results, calling it draws one
    configuration. ``models`` maps a budget to its (good, bad) KDE pair."""

    ctx: SearchContext
    random_fraction: float = 0.0
    top_n_percent: int = 15
    n_samples: int = 4
    bandwidth_factor: float = 3.0
    min_bandwidth: float = 0.3
    min_points: int | None = None
    configs: dict[float, list[tuple[int, ...]]] = field(default_factory=dict)
    losses: dict[float, list[float]] = field(default_factory=dict)
    models: dict[float, tuple[object, object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sizes = np.array([len(c) for c in self.ctx.space.choices], dtype=np.int64)
        d = len(self.sizes)
        if self.min_points is None:
            self.min_points = d + 1
        checks = {"random_fraction": 0 <= self.random_fraction <= 1,
                  "top_n_percent": 1 <= self.top_n_percent <= 99 and int(self.top_n_percent) == self.top_n_percent,
                  "n_samples": self.n_samples >= 1 and int(self.n_samples) == self.n_samples,
                  "bandwidth_factor": self.bandwidth_factor > 0, "min_bandwidth": self.min_bandwidth >= 0,
                  "min_points": self.min_points >= d + 1 and int(self.min_points) == self.min_points}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            hint = f" (at least d + 1 = {d + 1})" if bad[0] == "min_points" else ""
            raise ValueError(f"BOHB option {bad[0]} out of range{hint}: {getattr(self, bad[0])!r}")
        self.n_samples, self.min_points = int(self.n_samples), int(self.min_points)
        self.top_n_percent = int(self.top_n_percent)

    def _count(self, key: str) -> None:
        counters = self.ctx.sim.counters
        counters[key] = counters.get(key, 0) + 1

    def observe(self, arch: str, budget: float, accuracy: float) -> None:
        """Record one result and refit the model of its budget when it has enough points."""
        budget = float(budget)
        if self.models and max(self.models) > budget:
            return  # a larger budget already has a model: results below it are not recorded
        configs = self.configs.setdefault(budget, [])
        losses = self.losses.setdefault(budget, [])
        configs.append(self.ctx.space.encode(arch))
        losses.append(100.0 - accuracy if np.isfinite(accuracy) else np.inf)
        if len(configs) < self.min_points:
            return
        good, bad = kde_split(np.array(losses), self.min_points, self.top_n_percent)
        d = len(self.sizes)
        if len(good) <= d or len(bad) <= d:
            return
        data = np.array(configs, dtype=np.float64)
        self.models[budget] = (fit_kde(data[good], self.min_bandwidth), fit_kde(data[bad], self.min_bandwidth))
        self._count("model_fits")

    def model_pick(self) -> tuple[int, ...] | None:
        """Choice indices from the model of the largest budget that has one; None when no candidate
        qualifies (HpBandSter then samples at random)."""
        rng = self.ctx.rng
        good, bad = self.models[max(self.models)]
        data = np.asarray(good.data)
        bandwidths = np.maximum(np.asarray(good.bw, dtype=np.float64), self.min_bandwidth)
        best, best_vector = np.inf, None
        for _ in range(self.n_samples):
            datum = data[int(rng.integers(len(data)))]
            vector = [int(m) if rng.random() < 1 - bw else int(rng.integers(t))
                      for m, bw, t in zip(datum, bandwidths, self.sizes)]
            value, lx = _ratio(good, bad, np.array(vector, dtype=np.float64))
            if not np.isfinite(value):
                if np.isfinite(lx):
                    return tuple(vector)
                continue
            if value < best:
                best, best_vector = value, vector
        return None if best_vector is None else tuple(best_vector)

    def __call__(self) -> str:
        ctx = self.ctx
        space, rng = ctx.space, ctx.rng
        pick = None
        if self.models and not rng.random() < self.random_fraction:
            pick = self.model_pick()
        self._count("random_picks" if pick is None else "model_picks")
        if ctx.assisted or pick is None:
            return ctx.propose(lambda: space.sample(rng))  # G-BOHB replaces the generator's every pick
        return space.decode(list(pick))


def bohb(ctx: SearchContext, *, eta: int = 3, protocol: str = "benchmark", min_budget: float | None = None,
         max_budget: float | None = None, sampler: BOHBSampler | None = None, **options) -> None:
    """Run BOHB until ``BudgetExhausted``: Hyperband under ``protocol`` (see ``hyperband``) with configurations
    from ``BOHBSampler`` (``options`` go to it)."""
    sampler = sampler or BOHBSampler(ctx, **options)
    hyperband(ctx, eta=eta, protocol=protocol, min_budget=min_budget, max_budget=max_budget, sampler=sampler,
              observe=sampler.observe)
