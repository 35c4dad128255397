"""Architecture selection by proxy score (GradSign paper, Table 5).

Protocol: in each of ``runs`` runs draw ``candidates`` distinct archs uniformly, pick the one with the
highest proxy score, and record its 200-epoch validation and test accuracy (seed means) on every
dataset of the space. "random" records a uniformly chosen candidate of the same draw, "optimal" the
candidate with the highest accuracy on that dataset and metric. Reported as mean +- std over runs, the
std with ddof=1 (the sample standard deviation, as the search tables report it; NaN for one run).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import math

import numpy as np

from gradsign.evaluate import ScoringSetup, count_sources, known_scores, score_archs
from gradsign.store import ScoreStore

METRICS = ("valid", "test")


def select(setup: ScoringSetup, candidates: int = 100, runs: int = 500, *, store: ScoreStore | None = None,
           recompute: bool = False, executor=None, progress: Callable[..., Iterable] | None = None,
           scored_only: bool = False, ensemble=None) -> dict:
    """Run the selection protocol with the first proxy of ``setup``; scores are the bundled or stored
    ones where known (unless ``recompute``), the others computed (see ``evaluate.score_archs``).

    With ``scored_only`` the candidates are drawn from the archs whose scores are already known (bundled
    or stored) instead of the whole space, and nothing is computed; the result says how many there were.
    The result's "sources" counts where the candidates' scores came from. With ``ensemble``
    (``ensemble.Ensemble``, components among ``setup.proxies``) each run picks the candidate with the best
    ensemble score ranked within that run's draw.
    """
    space, proxy = setup.space, (setup.proxies[0] if ensemble is None else ensemble.name)
    universe = np.arange(len(space))
    if scored_only and recompute:
        raise ValueError("scored-only draws from the scores already known; it cannot be combined with recompute")
    if scored_only:
        known = known_scores(setup, list(space), store)
        universe = np.array(sorted(space.index(arch) for arch in dict.fromkeys(a for a, _ in known)
                                   if all((arch, p) in known for p in setup.proxies)), dtype=np.int64)
    if not 1 <= candidates <= len(universe):
        raise ValueError(f"candidates must be between 1 and {len(universe)} (archs to draw from), "
                         f"got {candidates}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    rng = np.random.default_rng(setup.seed)
    draws = np.array([universe[rng.choice(len(universe), candidates, replace=False)] for _ in range(runs)])
    random_pick = rng.integers(0, candidates, runs)
    needed = np.unique(draws)
    found, computed = score_archs(setup, [space.arch(int(i)) for i in needed], store, recompute=recompute,
                                  executor=executor, progress=progress)
    if ensemble is not None:
        from gradsign.ensemble import best_in_draws, values_by_index
        chosen = best_in_draws(ensemble, draws, values_by_index(space, found, ensemble.components))
    else:
        direction = 1.0 if _higher_is_better(proxy) else -1.0
        score = np.full(len(space), np.nan)
        for i in needed:
            score[i] = direction * found[space.arch(int(i))][proxy].value
        ranked = np.where(np.isfinite(score[draws]), score[draws], -np.inf)
        chosen = draws[np.arange(runs), np.argmax(ranked, axis=1)]
    randoms = draws[np.arange(runs), random_pick]
    results: dict[str, dict] = {}
    for dataset in space.datasets:
        for metric, epochs in space.final_fields:
            table = space.benchmark_table(dataset, metric, epochs)
            optimal = table[draws].max(axis=1)
            for name, picked in ((proxy, table[chosen]), ("random", table[randoms]), ("optimal", optimal)):
                results.setdefault(name, {}).setdefault(dataset, {})[metric] = {
                    "mean": float(np.mean(picked)),
                    "std": float(np.std(picked, ddof=1)) if runs > 1 else math.nan}
    return {"space": space.name, "proxy": proxy, "score_dataset": setup.dataset,
            "batch_size": setup.batch_size, "seed": setup.seed, "candidates": candidates, "runs": runs,
            "accuracy_field": space.final_fields_name,
            "std": "sample standard deviation over runs (ddof=1)",
            "drawn_from": len(universe), "computed": computed, "sources": count_sources(found),
            "results": results}


def _higher_is_better(proxy: str) -> bool:
    from gradsign.proxies import get_proxy
    return get_proxy(proxy).higher_is_better


def format_selection(result: dict) -> str:
    """A Markdown table: one row per selector, valid and test mean +- std per dataset."""
    datasets = list(next(iter(result["results"].values())))
    metrics = list(next(iter(result["results"].values()))[datasets[0]])
    head = " | ".join(f"{d} {m}" for d in datasets for m in metrics)
    lines = [f"best of {result['candidates']} by {result['proxy']} (scored on {result['score_dataset']}, "
             f"batch {result['batch_size']}), candidates drawn from {result['drawn_from']} archs, "
             f"{result['runs']} runs, seed {result['seed']}; {result['accuracy_field']}; mean +- std over "
             "runs (ddof=1)",
             f"| selector | {head} |", "|---" * (1 + len(datasets) * len(metrics)) + "|"]
    for name, per_dataset in result["results"].items():
        cells = " | ".join(f"{per_dataset[d][m]['mean']:.2f} +- {per_dataset[d][m]['std']:.2f}"
                           for d in datasets for m in metrics)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)
