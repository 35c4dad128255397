"""Cross-check: HpBandSter 0.7.4 itself, driven on the bundled NAS-Bench-201 tables under the benchmark's
protocol, against ``gradsign search --algo hb|bohb`` (writes docs/search/hpbandster.md).

The optimiser parts are HpBandSter's own: its BOHB and random-sampling config generators, its
``SuccessiveHalving`` iterations and its ``BOHB.get_next_iteration`` bracket sizes. This script replaces
only what needs a network (the Pyro master/worker pair) by the loop a single sequential worker amounts to:
ask the active iteration for its next run, evaluate it, register the result with the iteration and then with
the config generator (HpBandSter's ``Master.job_callback`` order). The worker is the benchmark scripts'
one: it ignores the budget, returns loss = 100 − 12-epoch cifar10-valid x-valid accuracy (seed mean, from
gradsign's tables) and is charged 12 epochs + one validation pass; the run ends at the first evaluation that
would pass the 12,000 s budget. Incumbent: lowest loss among configurations evaluated at the 200 budget,
ties to the smaller config id (HpBandSter's ``Result.get_incumbent_id``); reported: its 200-epoch CIFAR-10
test accuracy. Run r seeds numpy's global generator (HpBandSter's) with ``[seed, r]`` and the
configuration space with ``seed * 100000 + r``.

HpBandSter is not a dependency of gradsign; install it beside it for this check only, e.g.
``pip install --no-deps --target /tmp/hpb hpbandster==0.7.4 ConfigSpace Pyro4 serpent more_itertools``
and run with ``PYTHONPATH=/tmp/hpb``.

Usage: ``python experiments/hpbandster_check.py --runs 500 --seed 0``
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import gradsign
from gradsign.search import run_search
from gradsign.search.simulator import BenchmarkArrays
from gradsign.spaces import get_space

EDGES = ("1<-0", "2<-0", "2<-1", "3<-0", "3<-1", "3<-2")
#: NAS-Bench-201's op list, in its order (the configuration space of the scripts)
OPS = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]


def config_to_arch(config: dict) -> str:
    e = [str(config[k]) for k in EDGES]
    return f"|{e[0]}~0|+|{e[1]}~0|{e[2]}~1|+|{e[3]}~0|{e[4]}~1|{e[5]}~2|"


def hpbandster_run(algo: str, space, tables: BenchmarkArrays, seed: int, r: int, budget: float) -> dict:
    """One HpBandSter run (HB: random sampling, BOHB: its KDE generator) under the benchmark's protocol."""
    import ConfigSpace
    from hpbandster.core.dispatcher import Job
    from hpbandster.optimizers.bohb import BOHB as BOHBMaster
    from hpbandster.optimizers.config_generators.bohb import BOHB as BOHBGenerator
    from hpbandster.optimizers.config_generators.random_sampling import RandomSampling

    np.random.seed([seed, r])
    cs = ConfigSpace.ConfigurationSpace(seed=seed * 100_000 + r)
    for name in EDGES:
        hyperparameter = ConfigSpace.CategoricalHyperparameter(name, OPS)
        cs.add(hyperparameter) if hasattr(cs, "add") else cs.add_hyperparameter(hyperparameter)
    if algo == "bohb":
        generator = BOHBGenerator(cs, num_samples=4, random_fraction=0.0, bandwidth_factor=3, min_bandwidth=0.3)
    else:
        generator = RandomSampling(cs)
    eta, min_budget, max_budget = 3, 12, 200
    master = argparse.Namespace(eta=eta, config_generator=generator)  # what get_next_iteration reads
    master.max_SH_iter = -int(np.log(min_budget / max_budget) / np.log(eta)) + 1
    master.budgets = max_budget * np.power(eta, -np.linspace(master.max_SH_iter - 1, 0, master.max_SH_iter))
    iterations, elapsed, evaluations, picks, seen = [], 0.0, 0, {True: 0, False: 0}, []
    while True:
        next_run = None
        for it in iterations:
            if not it.is_finished:
                next_run = it.get_next_run()
                if next_run is not None:
                    break
        if next_run is None:
            iterations.append(BOHBMaster.get_next_iteration(master, len(iterations)))
            continue
        config_id, config, run_budget = next_run
        index = space.index(config_to_arch(config))
        cost = float(tables.cost[12][index])
        if elapsed + cost > budget:
            break
        elapsed += cost
        evaluations += 1
        job = Job(config_id, config=config, budget=run_budget)
        job.result = {"loss": 100.0 - float(tables.accuracy[12][index]), "info": None}
        iterations[config_id[0]].register_result(job)
        generator.new_result(job)
        seen.append((space.arch(index), float(run_budget), float(tables.accuracy[12][index]),
                     _snapshot(getattr(generator, "kde_models", {}))))
    top = []
    for it in iterations:
        for cid, datum in it.data.items():
            result = datum.results.get(master.budgets[-1])
            if result is not None:
                top.append((result["loss"], cid, datum.config))
    for it in iterations:
        for datum in it.data.values():
            if "model_based_pick" in datum.config_info:
                picks[bool(datum.config_info["model_based_pick"])] += 1
    best = min(top, key=lambda t: t[:2]) if top else None
    best_index = None if best is None else space.index(config_to_arch(best[2]))
    return {"best_index": best_index, "evaluations": evaluations, "seconds": elapsed, "seen": seen,
            "model_picks": picks[True], "random_picks": picks[False]}


def _snapshot(models: dict) -> dict:
    """Budget -> (good rows sorted, good bandwidths, bad rows sorted, bad bandwidths) of a generator's KDEs."""
    def rows(data) -> list:
        return sorted(map(tuple, np.asarray(data).tolist()))

    return {float(b): (rows(m[0].data), np.asarray(m[0].bw, dtype=float), rows(m[1].data),
                       np.asarray(m[1].bw, dtype=float))
            for b, m in ((b, (m["good"], m["bad"]) if isinstance(m, dict) else m) for b, m in models.items())}


def same_models(space, tables: BenchmarkArrays, run: dict) -> bool:
    """Feed HpBandSter's sequence of results to gradsign's ``BOHBSampler`` one by one: after every result,
    are the fitted KDE pairs (budgets, good and bad rows as multisets, bandwidths) the same as HpBandSter's?"""
    from gradsign.search import BOHBSampler, SearchContext, Simulator

    sampler = BOHBSampler(SearchContext(space, Simulator(space, tables, 1e9), np.random.default_rng(0)))
    for arch, budget, accuracy, theirs in run["seen"]:
        sampler.observe(arch, budget, accuracy)
        ours = _snapshot(sampler.models)
        if set(ours) != set(theirs):
            return False
        for b in ours:
            (og, ogb, ob, obb), (tg, tgb, tb, tbb) = ours[b], theirs[b]
            if og != tg or ob != tb or not (np.allclose(ogb, tgb, rtol=1e-12) and np.allclose(obb, tbb, rtol=1e-12)):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=12_000.0)
    parser.add_argument("--docs", default="docs/search/hpbandster.md")
    args = parser.parse_args(argv)
    try:
        import ConfigSpace  # noqa: F401
        import hpbandster  # noqa: F401
    except ImportError as error:
        print(f"HpBandSter is not installed ({error}); see this script's docstring", file=sys.stderr)
        return 2
    import logging
    logging.getLogger("hpbandster").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    space = get_space("nb201")
    tables = BenchmarkArrays.from_space(space, "cifar10")
    test = space.benchmark_table("cifar10", "test", 200)
    rows = {}
    for algo, label in (("hb", "HB"), ("bohb", "BOHB")):
        start = time.perf_counter()
        runs = [hpbandster_run(algo, space, tables, args.seed, r, args.budget) for r in range(args.runs)]
        acc = np.array([test[run["best_index"]] for run in runs if run["best_index"] is not None])
        ours = run_search(space, algo, runs=args.runs, seed=args.seed, budget=args.budget, tables=tables)
        mine = np.array([rec["results"]["cifar10"]["test"] for rec in ours["per_run"] if rec["results"]])
        rows[label] = (acc, runs, mine, ours, time.perf_counter() - start)
        if algo == "bohb":
            rows["replay"] = sum(same_models(space, tables, run) for run in runs), len(runs)
            print(f"replay: gradsign's BOHB model equals HpBandSter's in {rows['replay'][0]} of {len(runs)} runs")
        print(f"{label}: HpBandSter {acc.mean():.2f} ± {acc.std(ddof=1):.2f} ({len(acc)} runs with an incumbent), "
              f"gradsign {mine.mean():.2f} ± {mine.std(ddof=1):.2f}", flush=True)
    write_docs(Path(args.docs), rows, args)
    print(f"wrote {args.docs}")
    return 0


def write_docs(path: Path, rows: dict, args) -> None:
    from scipy import stats

    import ConfigSpace
    lines = [
        "# HpBandSter itself against gradsign's Hyperband and BOHB (benchmark protocol)",
        "",
        "Generated by `experiments/hpbandster_check.py`; do not edit by hand. Command:",
        "",
        "```",
        "pip install --no-deps --target /tmp/hpb hpbandster==0.7.4 ConfigSpace Pyro4 serpent more_itertools",
        f"PYTHONPATH=/tmp/hpb python experiments/hpbandster_check.py --runs {args.runs} --seed {args.seed}",
        "```",
        "",
        f"gradsign {gradsign.__version__}, HpBandSter 0.7.4, ConfigSpace {ConfigSpace.__version__}, numpy "
        f"{np.__version__}, Python {platform.python_version()}. HpBandSter's config generators, successive "
        "halving and bracket sizes drive a single sequential worker that answers every budget with the "
        "arch's 12-epoch cifar10-valid accuracy and charges 12 epochs + one validation pass "
        f"({args.budget:g} s per run); see the script's docstring. CIFAR-10 test accuracy (200 epochs, seed "
        f"mean) of the incumbent, {args.runs} runs each; both implementations read the same tables, but their "
        "random streams differ, so the comparison is between distributions (Welch 95% interval).",
        "",
        "| algorithm | HpBandSter 0.7.4 | gradsign | gradsign − HpBandSter | evaluations per run (HpBandSter / "
        "gradsign) | model-based picks (HpBandSter / gradsign) |",
        "|---|---|---|---|---|---|",
    ]
    replay = rows.pop("replay")
    for label, (acc, runs, mine, ours, _) in rows.items():
        va, vb = mine.var(ddof=1) / len(mine), acc.var(ddof=1) / len(acc)
        diff, se = mine.mean() - acc.mean(), np.sqrt(va + vb)
        df = (va + vb) ** 2 / (va ** 2 / (len(mine) - 1) + vb ** 2 / (len(acc) - 1))
        half = stats.t.ppf(0.975, df) * se
        hp_model = sum(run["model_picks"] for run in runs)
        hp_picks = hp_model, hp_model + sum(run["random_picks"] for run in runs)
        c = ours["counters"]
        ours_picks = (c.get("model_picks", 0), c.get("model_picks", 0) + c.get("random_picks", 0))
        lines.append(
            f"| {label} | {acc.mean():.2f} ± {acc.std(ddof=1):.2f} | {mine.mean():.2f} ± {mine.std(ddof=1):.2f} | "
            f"{diff:+.2f} [{diff - half:+.2f}, {diff + half:+.2f}] | "
            f"{np.mean([run['evaluations'] for run in runs]):.1f} / {ours['evaluations_mean']:.1f} | "
            + (f"{hp_picks[0]} of {hp_picks[1]} / {ours_picks[0]} of {ours_picks[1]} |" if label == "BOHB"
               else "– |"))
    lines += [
        "",
        f"Model replay: each HpBandSter BOHB run's sequence of results, fed one by one to gradsign's "
        f"`BOHBSampler`, gives the same KDE pairs as HpBandSter's after every result (which budgets have a "
        f"model, the good and bad rows, the bandwidths to 1e-12) in {replay[0]} of {replay[1]} runs.",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
