"""BOHB (Falkner et al. 2018): Hyperband whose configurations come from a TPE-style KDE model.

Model (paper, section 4 and Algorithm 2), over the choice indices of a space's categorical decisions:

* observations ``D_b`` are kept per fidelity ``b``; with probability ``random_fraction``, or while no
  fidelity has ``|D_b| >= N_min + 2`` observations (``N_min = d + 1`` by default), the configuration is a
  random proposal (best-of-pool when assisted);
* otherwise, at the largest such fidelity, ``l(x)`` is a KDE of the best ``max(N_min, q |D_b|)``
  configurations and ``g(x)`` of the worst ``max(N_min, |D_b| - N_l)`` (they overlap while ``|D_b| <
  2 N_min``), ``q = 0.15``; ``n_samples`` configurations are drawn from ``l`` with every bandwidth widened by
  ``bandwidth_factor`` and the one maximising ``l(x) / g(x)`` is returned;
* the KDEs are products of Aitchison-Aitken kernels, ``k(x, x_i) = 1 - lam`` if ``x = x_i`` else
  ``lam / (c - 1)``, ``lam`` in ``[min_bandwidth, (c - 1) / c]`` (``(c - 1) / c`` is uniform).

Defaults are the NAS-Bench-201 scripts' BOHB settings: ``n_samples=4``, ``random_fraction=0``,
``bandwidth_factor=3``, ``min_bandwidth=0.3`` (their script's default). Differences from HpBandSter: each
decision's bandwidth is chosen by leave-one-out likelihood on that decision (HpBandSter uses statsmodels'
normal-reference rule on the category indices, which for 5 unordered options gives bandwidths above
``(c - 1) / c``), categorical bandwidths are widened by the factor too (as the paper states; HpBandSter
widens only continuous ones), and ``g`` takes the worst configurations as the paper's equations say.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gradsign.search.hyperband import hyperband
from gradsign.search.simulator import SearchContext


def loo_bandwidth(column: np.ndarray, n_choices: int, min_bandwidth: float, grid: int = 64) -> float:
    """Aitchison-Aitken bandwidth of one categorical column maximising the leave-one-out likelihood
    (a grid over ``[min_bandwidth, (c - 1) / c]``)."""
    top = (n_choices - 1) / n_choices
    if n_choices < 2 or min_bandwidth >= top:
        return top
    n = len(column)
    if n < 2:
        return top
    same = np.bincount(column, minlength=n_choices)[column] - 1  # other points sharing each value
    lams = np.linspace(min_bandwidth, top, grid)
    density = (same[None, :] * (1 - lams[:, None]) + (n - 1 - same[None, :]) * lams[:, None] / (n_choices - 1))
    loglik = np.log(np.maximum(density / (n - 1), 1e-300)).sum(axis=1)
    return float(lams[int(np.argmax(loglik))])


@dataclass
class CategoricalKDE:
    """Product Aitchison-Aitken KDE over integer choice vectors."""

    data: np.ndarray  # (n, d) ints
    n_choices: np.ndarray  # (d,)
    bandwidth: np.ndarray  # (d,)

    @classmethod
    def fit(cls, data: np.ndarray, n_choices: Sequence[int], min_bandwidth: float) -> "CategoricalKDE":
        data = np.asarray(data, dtype=np.int64)
        sizes = np.asarray(n_choices, dtype=np.int64)
        bw = np.array([loo_bandwidth(data[:, j], int(sizes[j]), min_bandwidth) for j in range(data.shape[1])])
        return cls(data, sizes, bw)

    def _kernel(self, bandwidth: np.ndarray, x: np.ndarray) -> np.ndarray:
        match = x[:, None, :] == self.data[None, :, :]
        other = bandwidth / np.maximum(self.n_choices - 1, 1)
        return np.where(match, 1 - bandwidth, other).prod(axis=2)  # (m, n)

    def pdf(self, x: np.ndarray) -> np.ndarray:
        """Density of each row of ``x`` (m, d)."""
        return self._kernel(self.bandwidth, np.atleast_2d(x)).mean(axis=1)

    def sample(self, rng: np.random.Generator, n: int, factor: float = 1.0) -> np.ndarray:
        """``n`` draws from the KDE with bandwidths ``min(factor * bw, (c - 1) / c)``: a random datum,
        each decision kept with probability ``1 - bw`` and otherwise one of the other values uniformly."""
        bw = np.minimum(factor * self.bandwidth, (self.n_choices - 1) / self.n_choices)
        rows = self.data[rng.integers(len(self.data), size=n)].copy()
        change = rng.random(rows.shape) < bw[None, :]
        shift = 1 + (rng.random(rows.shape) * (self.n_choices - 1)[None, :]).astype(np.int64)
        rows[change] = ((rows + shift) % self.n_choices[None, :])[change]
        return rows


@dataclass
class BOHBSampler:
    """BOHB's configuration sampler: random proposals until a model can be fitted, then KDE-based."""

    ctx: SearchContext
    random_fraction: float = 0.0
    top_fraction: float = 0.15
    n_samples: int = 4
    bandwidth_factor: float = 3.0
    min_bandwidth: float = 0.3
    min_points: int | None = None
    observations: dict[int, list[tuple[tuple[int, ...], float]]] = field(default_factory=dict)
    model_picks: int = 0
    random_picks: int = 0

    def __post_init__(self) -> None:
        self.sizes = np.array([len(c) for c in self.ctx.space.choices], dtype=np.int64)
        if self.min_points is None:
            self.min_points = len(self.sizes) + 1
        checks = {"random_fraction": 0 <= self.random_fraction <= 1, "top_fraction": 0 < self.top_fraction <= 1,
                  "n_samples": self.n_samples >= 1 and int(self.n_samples) == self.n_samples,
                  "bandwidth_factor": self.bandwidth_factor > 0, "min_bandwidth": self.min_bandwidth >= 0,
                  "min_points": self.min_points >= 1 and int(self.min_points) == self.min_points}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"BOHB option {bad[0]} out of range: {getattr(self, bad[0])!r}")
        self.n_samples, self.min_points = int(self.n_samples), int(self.min_points)

    def observe(self, arch: str, epochs: int, accuracy: float) -> None:
        self.observations.setdefault(epochs, []).append((self.ctx.space.encode(arch), accuracy))

    def _model_fidelity(self) -> int | None:
        ready = [b for b, obs in self.observations.items() if len(obs) >= self.min_points + 2]
        return max(ready) if ready else None

    def __call__(self) -> str:
        ctx = self.ctx
        space, rng = ctx.space, ctx.rng
        fidelity = None if rng.random() < self.random_fraction else self._model_fidelity()
        if fidelity is None:
            self.random_picks += 1
            return ctx.propose(lambda: space.sample(rng))
        obs = self.observations[fidelity]
        configs = np.array([c for c, _ in obs], dtype=np.int64)
        order = np.argsort(-np.array([a for _, a in obs]), kind="stable")
        n_good = max(self.min_points, int(self.top_fraction * len(obs)))
        n_bad = max(self.min_points, len(obs) - n_good)
        good = CategoricalKDE.fit(configs[order[:n_good]], self.sizes, self.min_bandwidth)
        bad = CategoricalKDE.fit(configs[order[-n_bad:]], self.sizes, self.min_bandwidth)
        candidates = good.sample(rng, self.n_samples, self.bandwidth_factor)
        ratio = np.maximum(good.pdf(candidates), 1e-32) / np.maximum(bad.pdf(candidates), 1e-32)
        self.model_picks += 1
        return space.decode([int(v) for v in candidates[int(np.argmax(ratio))]])


def bohb(ctx: SearchContext, *, eta: int = 3, sampler: BOHBSampler | None = None, **options) -> None:
    """Run BOHB until ``BudgetExhausted``; ``options`` go to ``BOHBSampler``."""
    sampler = sampler or BOHBSampler(ctx, **options)
    hyperband(ctx, eta=eta, sampler=sampler, observe=sampler.observe)
