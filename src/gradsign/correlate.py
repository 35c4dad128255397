"""Correlation of proxy scores with benchmark accuracy (GradSign paper, Table 3 and Figure 2).

Correlations are signed Spearman rho and Kendall tau over the architectures with a finite score, with
95% percentile bootstrap intervals (archs resampled with replacement). The accuracy field is always
named: e.g. "cifar10 test accuracy, 200 epochs, seed mean". A correlation that is undefined (fewer than
3 finite scores, or constant scores or accuracies) is NaN, and so is a bootstrap resample that is
constant; the interval is taken over the defined resamples.
"""
from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from gradsign.evaluate import ScoringSetup, count_sources, score_archs
from gradsign.store import ScoreStore, StoredScore


def accuracy_field(dataset: str, metric: str, epochs: int) -> str:
    """The name of an accuracy column, as reports print it."""
    seeds = "seed mean" if epochs == 200 else "seed mean where several"
    return f"{dataset} {metric} accuracy, {epochs} epochs, {seeds}"


def signed_correlations(values: Sequence[float], accuracy: Sequence[float], *, n_boot: int = 1000,
                        seed: int = 0) -> dict:
    """Signed Spearman and Kendall of ``values`` against ``accuracy`` over the finite values, with 95%
    percentile bootstrap intervals from ``n_boot`` resamples drawn with ``default_rng(seed)``."""
    values, accuracy = np.asarray(values, float), np.asarray(accuracy, float)
    finite = np.isfinite(values) & np.isfinite(accuracy)
    v, a = values[finite], accuracy[finite]
    result = {"n": int(finite.sum()), "excluded": int((~finite).sum()), "spearman": math.nan,
              "kendall": math.nan, "spearman_ci95": [math.nan, math.nan],
              "kendall_ci95": [math.nan, math.nan]}
    if len(v) < 3 or np.ptp(v) == 0 or np.ptp(a) == 0:
        return result
    result["spearman"], result["kendall"] = _rho_tau(v, a)
    if n_boot:
        rng = np.random.default_rng(seed)
        boot = {"spearman": [], "kendall": []}
        for _ in range(n_boot):
            pick = rng.integers(0, len(v), len(v))
            rho, tau = _rho_tau(v[pick], a[pick])
            boot["spearman"].append(rho)
            boot["kendall"].append(tau)
        for name, samples in boot.items():
            samples = np.asarray(samples, float)
            samples = samples[np.isfinite(samples)]
            if len(samples):
                lo, hi = np.percentile(samples, [2.5, 97.5])
                result[f"{name}_ci95"] = [float(lo), float(hi)]
    return result


def _rho_tau(v: np.ndarray, a: np.ndarray) -> tuple[float, float]:
    """Spearman and Kendall of two arrays; NaN (without SciPy's warning) when either is constant."""
    if np.ptp(v) == 0 or np.ptp(a) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(v, a).statistic), float(stats.kendalltau(v, a).statistic)


@dataclass
class CorrelationResult:
    space: str
    dataset: str
    accuracy_field: str
    seed: int
    batch_size: int
    archs: list[dict]
    proxies: dict[str, dict]
    #: how many scores (arch x proxy) were bundled, read from the store, or computed
    sources: dict[str, int]

    def to_json(self) -> dict:
        """A JSON-ready dict; non-finite numbers stay floats (``cli.write_json`` writes them as null,
        and each arch row names its non-finite scores under "nonfinite")."""
        return {"space": self.space, "dataset": self.dataset, "accuracy_field": self.accuracy_field,
                "n": len(self.archs), "seed": self.seed, "batch_size": self.batch_size,
                "sources": self.sources, "proxies": self.proxies, "archs": self.archs}


def correlate(setup: ScoringSetup, archs: Iterable[str], *, metric: str = "test", epochs: int = 200,
              store: ScoreStore | None = None, recompute: bool = False, n_boot: int = 1000,
              executor=None, progress: Callable[..., Iterable] | None = None,
              ensembles: Sequence = ()) -> CorrelationResult:
    """Score ``archs`` (bundled or stored scores unless ``recompute``; see ``evaluate.score_archs``)
    and correlate each proxy with the benchmark accuracy. Each of ``ensembles`` (``ensemble.Ensemble``,
    components among ``setup.proxies``) is ranked within these archs and correlated too."""
    space = setup.space
    archs = list(dict.fromkeys(space.arch(space.index(a)) for a in archs))
    accuracy = [space.query(a, setup.dataset, metric, epochs) for a in archs]
    found, _ = score_archs(setup, archs, store, recompute=recompute, executor=executor, progress=progress)
    rows = [{"index": space.index(a), "arch": a, "accuracy": acc,
             "scores": {p: found[a][p].value for p in setup.proxies},
             "sources": {p: found[a][p].source for p in setup.proxies},
             **({"errors": errors} if (errors := _errors(found[a])) else {}),
             **({"nonfinite": nonfinite} if (nonfinite := _nonfinite(found[a])) else {})}
            for a, acc in zip(archs, accuracy)]
    table = {p: signed_correlations([r["scores"][p] for r in rows], accuracy, n_boot=n_boot, seed=setup.seed)
             for p in setup.proxies}
    if ensembles:
        from gradsign.ensemble import add_to_correlation
        add_to_correlation(rows, table, found, ensembles, accuracy, n_boot=n_boot, seed=setup.seed)
    return CorrelationResult(space.name, setup.dataset, space.accuracy_field(setup.dataset, metric, epochs),
                             setup.seed, setup.batch_size, rows, table, count_sources(found))


def _errors(scores: dict[str, StoredScore]) -> dict[str, str]:
    return {p: s.error for p, s in scores.items() if s.error}


def _nonfinite(scores: dict[str, StoredScore]) -> dict[str, str]:
    """The non-finite scores by proxy, as text ("nan", "inf", "-inf"): JSON has no such numbers."""
    return {p: repr(s.value) for p, s in scores.items() if not math.isfinite(s.value)}


def format_sources(sources: dict[str, int]) -> str:
    """The summary line of where the scores came from."""
    return (f"scores: {sources['bundled']} bundled with the package, {sources['store']} from the score "
            f"store, {sources['computed']} computed")


def format_table(result: CorrelationResult) -> str:
    """A Markdown table of signed correlations, one row per proxy."""
    lines = [f"{result.space} {result.dataset}: {len(result.archs)} archs, batch {result.batch_size}, "
             f"seed {result.seed}; accuracy field: {result.accuracy_field}",
             "| proxy | n | Spearman rho | 95% CI | Kendall tau | 95% CI |", "|---|---|---|---|---|---|"]
    for proxy, c in result.proxies.items():
        lines.append(f"| {proxy} | {c['n']} | {c['spearman']:+.3f} | [{c['spearman_ci95'][0]:+.3f}, "
                     f"{c['spearman_ci95'][1]:+.3f}] | {c['kendall']:+.3f} | [{c['kendall_ci95'][0]:+.3f}, "
                     f"{c['kendall_ci95'][1]:+.3f}] |")
    return "\n".join(lines)


def write_csv(result: CorrelationResult, path: Path) -> None:
    """One row per arch: index, arch, accuracy and each proxy's score (NaN kept as 'nan')."""
    proxies = list(result.proxies)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "arch", "accuracy", *proxies])
        for row in result.archs:
            writer.writerow([row["index"], row["arch"], row["accuracy"], *(row["scores"][p] for p in proxies)])


def plot_scatter(result: CorrelationResult, path: Path) -> None:
    """Figure-2-style panels: each proxy's score against the accuracy, with its signed Spearman rho."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proxies = list(result.proxies)
    cols = min(4, len(proxies))
    rows = math.ceil(len(proxies) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    accuracy = np.array([r["accuracy"] for r in result.archs], float)
    for ax, proxy in zip(axes.flat, proxies):
        values = np.array([r["scores"][proxy] for r in result.archs], float)
        finite = np.isfinite(values)
        ax.scatter(values[finite], accuracy[finite], s=4, alpha=0.5)
        positive = values[finite & (values > 0)]
        if len(positive) and (values[finite] >= 0).all() and positive.max() / positive.min() > 1e3:
            ax.set_xscale("log")  # scores spanning many decades (synflow); zeros are not drawn
        ax.set_title(f"{proxy}: rho {result.proxies[proxy]['spearman']:+.3f}")
        ax.set_xlabel("score")
        ax.set_ylabel("accuracy (%)")
    for ax in list(axes.flat)[len(proxies):]:
        ax.set_visible(False)
    fig.suptitle(f"{result.space} {result.dataset}, {len(result.archs)} archs; y: {result.accuracy_field}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
