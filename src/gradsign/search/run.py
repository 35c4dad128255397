"""Repeated simulated searches: ``run_search`` runs one algorithm many times and aggregates the results.

Run ``r`` of a call with seed ``s`` draws every random number from ``np.random.default_rng([s, r])``, so a
result depends only on (space, algorithm, options, assist scores, budget, seed) and any subset of runs can
be reproduced alone. Hyperband and BOHB run under a named protocol (``gradsign.search.hyperband``):
``benchmark`` (default; the benchmark's own scripts: every rung a 12-epoch look-up) or ``two-fidelity``
(this project's variant with real 200-epoch evaluations). The reported accuracies are the 200-epoch
validation and test accuracies (benchmark seed means) of each run's incumbent on cifar10 (valid =
cifar10-valid x-valid, test = cifar10 ori-test), cifar100 and imagenet16-120 (x-valid / x-test); mean and
std (ddof 1) over runs.
"""
from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from gradsign.search.bohb import bohb
from gradsign.search.evolution import regularized_evolution
from gradsign.search.hyperband import PROTOCOLS, hyperband
from gradsign.search.random_search import random_search
from gradsign.search.reinforce import reinforce
from gradsign.search.simulator import (BenchmarkArrays, BudgetExhausted, SearchContext, Simulator,
                                       benchmark_values, resolve_assist)
from gradsign.spaces.base import SearchSpace

#: algorithm name -> (function, display name)
ALGORITHMS: dict[str, tuple[Callable[..., None], str]] = {
    "rs": (random_search, "RS"),
    "rea": (regularized_evolution, "REA"),
    "reinforce": (reinforce, "REINFORCE"),
    "hb": (hyperband, "HB"),
    "bohb": (bohb, "BOHB"),
}


#: options of an algorithm that only tests and callers inside Python pass (objects to observe or replace)
_INTERNAL_OPTIONS = ("population", "policy", "sampler", "observe", "protocol")
_BOHB_SAMPLER_OPTIONS = ("random_fraction", "top_n_percent", "n_samples", "bandwidth_factor", "min_bandwidth",
                         "min_points")
#: algorithms that take a ``protocol`` (Hyperband's rungs); the others follow the benchmark's protocol only
MULTI_FIDELITY = ("hb", "bohb")


def algorithm_options(algo: str) -> tuple[str, ...]:
    """Names of the options ``run_search`` accepts for ``algo`` (keyword-only parameters of its function)."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown search algorithm {algo!r}; known: {', '.join(ALGORITHMS)}")
    params = inspect.signature(ALGORITHMS[algo][0]).parameters.values()
    names = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _INTERNAL_OPTIONS]
    return tuple(names) + (_BOHB_SAMPLER_OPTIONS if algo == "bohb" else ())


def resolve_protocol(algo: str, protocol: str | None) -> str:
    """The protocol ``algo`` runs under: ``protocol``, or ``benchmark`` when None. Only Hyperband and BOHB
    have an alternative (``two-fidelity``); the others accept ``benchmark`` alone."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown search algorithm {algo!r}; known: {', '.join(ALGORITHMS)}")
    protocol = "benchmark" if protocol is None else protocol
    known = PROTOCOLS if algo in MULTI_FIDELITY else ("benchmark",)
    if protocol not in known:
        raise ValueError(f"protocol {protocol!r} is not available for {algo}; known: {', '.join(known)}")
    return protocol


def display_name(algo: str, assisted: bool) -> str:
    """'REA' or 'G-REA' (any assisting proxy gets the paper's 'G-' prefix)."""
    return ("G-" if assisted else "") + ALGORITHMS[algo][1]


def run_once(space: SearchSpace, algo: str, tables: BenchmarkArrays, rng: np.random.Generator, *,
             assist=None, pool: int = 10, budget: float = 12_000.0, charge_proxy_time: bool = False,
             protocol: str | None = None, **options) -> Simulator:
    """One simulated search; returns its finished simulator (history, trace, incumbent, counters)."""
    protocol = resolve_protocol(algo, protocol)
    if algo in MULTI_FIDELITY:
        options = {**options, "protocol": protocol}
    sim = Simulator(space, tables, float(budget), resolve_assist(assist), charge_proxy_time)
    try:
        ALGORITHMS[algo][0](SearchContext(space, sim, rng, pool), **options)
    except BudgetExhausted:
        pass
    return sim


def _run_record(r: int, sim: Simulator, tables: BenchmarkArrays, space: SearchSpace) -> dict:
    best = sim.incumbent
    counts: dict[str, int] = {}
    rungs: dict[str, int] = {}
    for ev in sim.history:
        counts[str(ev.epochs)] = counts.get(str(ev.epochs), 0) + 1
        rungs[f"{ev.rung:g}"] = rungs.get(f"{ev.rung:g}", 0) + 1
    record = {"run": r, "best_index": best, "best_arch": None if best is None else space.arch(best),
              "search_accuracy": None, "search_epochs": None, "search_rung": sim.incumbent_rung,
              "evaluations": counts, "rungs": rungs, "counters": dict(sim.counters),
              "simulated_seconds": sim.elapsed, "proxy_seconds": sim.proxy_seconds,
              "proxy_evaluations": sim.proxy_evaluations,
              "results": {}, "trace": [[t, i] for t, i in sim.trace]}
    if best is not None:
        last = max((ev for ev in sim.history if ev.index == best), key=lambda ev: (ev.rung, ev.accuracy))
        record["search_accuracy"], record["search_epochs"] = last.accuracy, last.epochs
        for (dataset, metric), table in tables.final.items():
            record["results"].setdefault(dataset, {})[metric] = float(table[best])
    return record


def run_search(space: SearchSpace, algo: str, assist=None, pool: int = 10, runs: int = 500,
               budget: float = 12_000.0, seed: int = 0, *, search_dataset: str = "cifar10",
               charge_proxy_time: bool = False, assist_name: str | None = None, protocol: str | None = None,
               tables: BenchmarkArrays | None = None,
               progress: Callable[[Iterable, int], Iterable] | None = None, **options) -> dict:
    """Run ``algo`` (``rs``, ``rea``, ``reinforce``, ``hb``, ``bohb``) ``runs`` times on ``space``.

    ``assist`` (a callable from index arrays to proxy scores, e.g. ``evaluate.ProxyScores``) makes every
    random proposal the best of ``pool`` candidates; ``charge_proxy_time`` also charges the proxy's measured
    seconds (``assist.seconds``) once per arch and run. ``protocol`` (Hyperband/BOHB: ``benchmark``, the
    default, or ``two-fidelity``) names how rungs are evaluated. ``options`` go to the algorithm (e.g. ``eta``,
    ``population_size``, ``learning_rate``). Returns ``{"algo", "name", "assist", "runs", "budget", "seed",
    "results": {dataset: {"valid": {"mean", "std"}, "test": {"mean", "std"}}}, "per_run": [...], ...}``.
    """
    protocol = resolve_protocol(algo, protocol)
    if isinstance(runs, bool) or int(runs) != runs or runs < 1:
        raise ValueError(f"runs must be a positive integer, got {runs!r}")
    if not np.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
    if isinstance(pool, bool) or int(pool) != pool or pool < 1:
        raise ValueError(f"pool must be a positive integer, got {pool!r}")
    unknown = sorted(set(options) - set(algorithm_options(algo)))  # internal objects would be shared by runs
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for {algo}; options: {', '.join(algorithm_options(algo))}")
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"option {key} of {algo} must be a number, got {value!r}")
    resolved = resolve_assist(assist)
    if charge_proxy_time and resolved is None:
        raise ValueError("charge_proxy_time needs an assist proxy")
    if tables is None:
        tables = BenchmarkArrays.from_space(space, search_dataset)
    elif tables.search_dataset != search_dataset:
        raise ValueError(f"tables are for {tables.search_dataset}, not {search_dataset}")
    start = time.perf_counter()
    per_run = []
    iterator: Iterable[int] = range(int(runs))
    if progress is not None:
        iterator = progress(iterator, int(runs))
    for r in iterator:
        sim = run_once(space, algo, tables, np.random.default_rng([int(seed), r]), assist=resolved,
                       pool=int(pool), budget=budget, charge_proxy_time=charge_proxy_time, protocol=protocol,
                       **options)
        per_run.append(_run_record(r, sim, tables, space))
    results: dict[str, dict] = {}
    for dataset, metric in tables.final:
        values = np.array([rec["results"][dataset][metric] for rec in per_run if rec["results"]])
        results.setdefault(dataset, {})[metric] = {
            "mean": float(values.mean()) if len(values) else None,
            "std": float(values.std(ddof=1)) if len(values) > 1 else None}
    n_evals = [sum(rec["evaluations"].values()) for rec in per_run]
    top_rung = max((ev_rung for rec in per_run for ev_rung in map(float, rec["rungs"])), default=None)
    counters: dict[str, int] = {}
    for rec in per_run:
        for key, value in rec["counters"].items():
            counters[key] = counters.get(key, 0) + value
    return {
        "algo": algo, "name": display_name(algo, resolved is not None),
        "assist": None if resolved is None else (assist_name or resolved.name),
        "pool": int(pool) if resolved is not None else None,
        "runs": int(runs), "budget": float(budget), "seed": int(seed),
        "space": space.name, "search_dataset": search_dataset, "charge_proxy_time": bool(charge_proxy_time),
        "options": {k: v for k, v in options.items()},
        "protocol_name": protocol,
        "protocol": _protocol_text(algo, protocol, search_dataset, tables),
        "incumbents_below_top_rung": sum(rec["search_rung"] is not None and rec["search_rung"] < top_rung
                                         for rec in per_run),
        "counters": counters,
        "evaluations_mean": float(np.mean(n_evals)),
        "simulated_seconds_mean": float(np.mean([rec["simulated_seconds"] for rec in per_run])),
        "proxy_seconds_mean": float(np.mean([rec["proxy_seconds"] for rec in per_run])),
        "wall_seconds": time.perf_counter() - start,
        "results": results, "per_run": per_run,
    }


def _protocol_text(algo: str, protocol: str, search_dataset: str, tables: BenchmarkArrays) -> str:
    if algo in MULTI_FIDELITY and protocol == "benchmark":
        evaluations = (f"HpBandSter's rungs (by default eta 3, budgets 22.2/66.7/200), every rung the "
                       f"{search_dataset} validation accuracy after 12 epochs (the budget is ignored, as in the "
                       "benchmark's scripts)")
    elif algo in MULTI_FIDELITY:
        evaluations = (f"two-fidelity Hyperband over {tables.fidelities} epochs, each the {search_dataset} "
                       "validation accuracy after that many epochs")
    else:
        evaluations = f"the {search_dataset} validation accuracy after 12 epochs (or the epochs option)"
    return (f"{protocol} protocol: {evaluations}, each charged training + one validation pass; report "
            "200-epoch accuracies (seed means) of the incumbent (best at the top rung); std with ddof 1")


def best_so_far(per_run: list[dict], table: np.ndarray, times: np.ndarray) -> np.ndarray:
    """(runs, len(times)) accuracy from ``table`` of each run's incumbent at each time; NaN before the
    run's first evaluation."""
    out = np.full((len(per_run), len(times)), np.nan)
    for r, rec in enumerate(per_run):
        for t, index in rec["trace"]:
            out[r, times >= t] = table[index]
    return out


def plot_best_so_far(results: list[dict], space: SearchSpace, path: str | Path, *, dataset: str = "cifar10",
                     metric: str = "test", points: int = 200) -> None:
    """Mean (line) and 25-75 percentile band over runs of the incumbent's 200-epoch ``metric`` accuracy
    against simulated time, one curve per result of ``run_search``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = benchmark_values(space, dataset, metric, 200)
    budget = max(res["budget"] for res in results)
    times = np.linspace(0.0, budget, points)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for res in results:
        curve = best_so_far(res["per_run"], table, times)
        seen = np.isfinite(curve).mean(axis=0) >= 0.5  # plot where most runs have an incumbent
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns before the first evaluation
            mean = np.nanmean(curve, axis=0)
            low, high = np.nanpercentile(curve, 25, axis=0), np.nanpercentile(curve, 75, axis=0)
        line, = ax.plot(times[seen], mean[seen], label=f"{res['name']} ({res['runs']} runs)")
        ax.fill_between(times[seen], low[seen], high[seen], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("simulated search time (s)")
    ax.set_ylabel(f"{dataset} {metric} accuracy of incumbent (%, 200 epochs)")
    ax.set_title(f"best so far on {results[0]['space']}, search on {results[0]['search_dataset']}\n"
                 "line: mean over runs, band: 25th-75th percentile", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_results(results: list[dict]) -> str:
    """A Markdown table: one row per result, valid and test mean +- std per dataset."""
    datasets = list(results[0]["results"])
    head = " | ".join(f"{d} {m}" for d in datasets for m in ("valid", "test"))
    lines = [f"| algorithm | {head} |", "|---" * (1 + 2 * len(datasets)) + "|"]
    for res in results:
        cells = " | ".join(_mean_std(res["results"][d][m]) for d in datasets for m in ("valid", "test"))
        lines.append(f"| {res['name']} | {cells} |")
    return "\n".join(lines)


def _mean_std(stats: dict) -> str:
    if stats["mean"] is None:
        return "-"
    return f"{stats['mean']:.2f}" + ("" if stats["std"] is None else f" +- {stats['std']:.2f}")
