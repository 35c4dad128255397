"""Zero-cost ensembles on NAS-Bench-201: choose the default on CIFAR-100, report on all three datasets.

Protocol (docs/ensemble.md):

1. Scores: the 1,000-arch sample of docs/results.md (``gradsign correlate --sample 1000 --seed 0``), batch
   64, seed 0, every candidate component, read from the bundled files and the score store ``--cache``;
   an arch enters a dataset's evaluation when every candidate component is known for it there.
2. Selection, on CIFAR-100 only: every subset (two or more) of CANDIDATES x both aggregations
   (``rank_sum``, ``log_rank_product``), ranked within the CIFAR-100 archs; the default is the one with the
   highest signed Spearman rho against CIFAR-100 200-epoch test accuracy (seed mean), over all its archs.
3. Report, on CIFAR-10 and ImageNet16-120 (held out) and CIFAR-100 (where it was chosen, marked so):
   signed Spearman with 95% bootstrap CIs of the default ensemble and of each single proxy, on all archs
   and on the archs without unreachable ops (``clean_cells``), the paired-bootstrap CI of the ensemble's
   margin over each single proxy, the cost per arch, and every one of the eleven proxies beside the
   ensemble on the archs where all eleven are known.
4. Table 5 selection on the scored archs (``gradsign select --scored-only``) for the ensemble and for
   GradSign over the same archs and draws; random search assisted by the ensemble and by GradSign on
   the scored archs (``--search-runs``), and ``search --assist ensemble`` on the full space
   (``--space-runs``, computing the component scores it lacks).

    python experiments/ensemble.py --cache runs/nb201-scores.sqlite
    python experiments/ensemble.py --cache runs/nb201-scores.sqlite --export-tables   # the bundled scores
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

import gradsign
from gradsign.correlate import signed_correlations
from gradsign.ensemble import DEFAULT_COMPONENTS, DEFAULT_METHOD, METHODS, TABLE_PROXIES, Ensemble, rank_aggregate
from gradsign.evaluate import ScoringSetup, known_scores
from gradsign.proxies import get_proxy
from gradsign.spaces import get_space
from gradsign.spaces.nb201 import EDGES
from gradsign.store import ScoreStore

DATASETS = ("cifar10", "cifar100", "imagenet16-120")
TUNING_DATASET = "cifar100"
#: candidate components: GradSign (bundled for every arch) and the proxies scored on the whole sample
CANDIDATES = ("gradsign", "naswot", "synflow", "jacob_cov", "params", "flops")
#: the proxies the candidate components come from plus the rest of Table 3's: every one is bundled
ALL_PROXIES = TABLE_PROXIES
#: AZ-NAS (Lee & Ham, CVPR 2024), NAS-Bench-201 Spearman rho, as quoted in FIELD-NOTES section 3
AZ_NAS = {"cifar10": .913, "cifar100": .900, "imagenet16-120": .886}


def cell_paths(ops) -> tuple[bool, int]:
    """(connected, unreachable ops) of an NB201 cell given its six op indices (edge order of ``EDGES``,
    op 0 = none). Connected: some path of non-none edges leads from the input node 0 to the output node 3.
    An op is unreachable when its edge lies on no such input-to-output path: no input reaches its source
    node, or its target node reaches no output."""
    live = [(i, j) for (j, i), op in zip(EDGES, ops) if int(op) != 0]
    from_input, to_output = {0}, {3}
    for i, j in sorted(live, key=lambda e: e[1]):
        if i in from_input:
            from_input.add(j)
    for i, j in sorted(live, key=lambda e: -e[0]):
        if j in to_output:
            to_output.add(i)
    unreachable = sum(1 for i, j in live if not (i in from_input and j in to_output))
    return 3 in from_input, unreachable


def clean_cells(space) -> np.ndarray:
    """Mask by benchmark index of the cells that are connected and have no unreachable op."""
    return np.array([c and u == 0 for c, u in (cell_paths(o) for o in space.ops_table())])


def sample(space, n: int, seed: int) -> list[int]:
    """The archs `gradsign correlate --sample n --seed seed` scores, as benchmark indices."""
    return [int(i) for i in np.random.default_rng(seed).choice(len(space), n, replace=False)]


def load_scores(space, dataset: str, indices: list[int], proxies, store) -> tuple[dict, dict]:
    """(values, seconds): per proxy, arrays over ``indices`` (NaN where not known)."""
    archs = [space.arch(i) for i in indices]
    values = {p: np.full(len(indices), np.nan) for p in proxies}
    seconds = {p: np.full(len(indices), np.nan) for p in proxies}
    position = {a: k for k, a in enumerate(archs)}
    for p in proxies:
        setup = ScoringSetup(space, dataset, (p,), 64, 0)
        for (arch, _), stored in known_scores(setup, archs, store).items():
            values[p][position[arch]] = stored.value
            seconds[p][position[arch]] = np.nan if stored.seconds is None else stored.seconds
    return values, seconds


def known_mask(space, dataset: str, indices: list[int], proxies, store) -> np.ndarray:
    """Which of ``indices`` have every proxy's score (a NaN value from a failed scoring counts as known)."""
    archs = [space.arch(i) for i in indices]
    mask = np.ones(len(indices), bool)
    for p in proxies:
        found = known_scores(ScoringSetup(space, dataset, (p,), 64, 0), archs, store)
        mask &= np.array([(a, p) in found for a in archs])
    return mask


def ensemble_values(ensemble: Ensemble, values: dict, rows: np.ndarray) -> np.ndarray:
    """The ensemble ranked within ``rows`` only (the candidate set of that evaluation)."""
    return ensemble.aggregate({c: values[c][rows] for c in ensemble.components})


def rho(x: np.ndarray, y: np.ndarray) -> float:
    keep = np.isfinite(x) & np.isfinite(y)
    return float(stats.spearmanr(x[keep], y[keep]).statistic)


def margin_ci(a: np.ndarray, b: np.ndarray, acc: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """95% paired-bootstrap interval of rho(a) - rho(b) over the archs where both are finite."""
    keep = np.isfinite(a) & np.isfinite(b)
    a, b, acc = a[keep], b[keep], acc[keep]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(a), len(a))
        diffs.append(stats.spearmanr(a[pick], acc[pick]).statistic - stats.spearmanr(b[pick], acc[pick]).statistic)
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return [float(lo), float(hi)]


def choose(values: dict, acc: np.ndarray) -> list[dict]:
    """Every ensemble over CANDIDATES (2+ components) x METHODS, best signed Spearman first."""
    tried = []
    rows = np.arange(len(acc))
    for k in range(2, len(CANDIDATES) + 1):
        for comps in itertools.combinations(CANDIDATES, k):
            for method in METHODS:
                e = Ensemble(comps, method)
                tried.append({"components": list(comps), "method": method,
                              "spearman": rho(ensemble_values(e, values, rows), acc)})
    return sorted(tried, key=lambda t: -t["spearman"])


def report_dataset(space, dataset: str, ensemble: Ensemble, values: dict, seconds: dict, indices: np.ndarray,
                   clean: np.ndarray, n_boot: int) -> dict:
    acc = space.benchmark_table(dataset, "test", 200)[indices]
    out = {"n": int(len(indices)), "n_clean": int(clean.sum()), "proxies": {}, "margin": {}}
    for subset, rows in (("all", np.arange(len(indices))), ("clean", np.flatnonzero(clean))):
        ens = ensemble_values(ensemble, values, rows)
        out["proxies"].setdefault("ensemble", {})[subset] = signed_correlations(ens, acc[rows], n_boot=n_boot, seed=0)
        for p in CANDIDATES:
            out["proxies"].setdefault(p, {})[subset] = signed_correlations(values[p][rows], acc[rows],
                                                                           n_boot=n_boot, seed=0)
            oriented = values[p][rows] if get_proxy(p).higher_is_better else -values[p][rows]
            out["margin"].setdefault(p, {})[subset] = margin_ci(ens, oriented, acc[rows], n_boot, seed=0)
    cost = {p: float(np.nanmean(seconds[p])) for p in CANDIDATES}
    cost["ensemble"] = float(np.nanmean(ensemble.cost(seconds)))
    out["seconds_per_arch"] = cost
    return out


def every_proxy(space, dataset: str, ensemble: Ensemble, indices: list[int], store, n_boot: int,
                min_archs: int) -> dict | None:
    """Every proxy of Table 3 beside the ensemble, on the archs of the sample where all eleven are known
    (the ensemble ranked within those archs); None if fewer than ``min_archs`` are."""
    mask = known_mask(space, dataset, indices, ALL_PROXIES, store)
    idx = [i for i, m in zip(indices, mask) if m]
    if len(idx) < min_archs:
        print(f"{dataset}: only {len(idx)} archs have all eleven proxies; left out of that table", file=sys.stderr)
        return None
    values, seconds = load_scores(space, dataset, idx, ALL_PROXIES, store)
    acc = space.benchmark_table(dataset, "test", 200)[np.asarray(idx, dtype=np.int64)]
    out = {"n": len(idx), "proxies": {}, "seconds_per_arch": {p: float(np.nanmean(seconds[p])) for p in ALL_PROXIES}}
    out["proxies"]["ensemble"] = signed_correlations(ensemble_values(ensemble, values, np.arange(len(idx))), acc,
                                                     n_boot=n_boot, seed=0)
    for p in ALL_PROXIES:
        out["proxies"][p] = signed_correlations(values[p], acc, n_boot=n_boot, seed=0)
    return out


class SampledSpace:
    """``space`` with ``sample`` restricted to ``indices`` (uniform over them); everything else delegated.
    For random search only: its proposals are all ``sample`` calls (mutation would leave the set)."""

    def __init__(self, space, indices):
        self._space, self._indices = space, np.asarray(indices, dtype=np.int64)

    def __getattr__(self, name):
        return getattr(self._space, name)

    def __len__(self) -> int:
        return len(self._space)

    def __iter__(self):
        return iter(self._space)

    def sample(self, rng: np.random.Generator) -> str:
        return self._space.arch(int(self._indices[rng.integers(len(self._indices))]))


def sample_search(space, ensemble: Ensemble, idx: np.ndarray, values: dict, seconds: dict, runs: int,
                  budget: float) -> str:
    """RS, G-RS by GradSign and G-RS by the ensemble with proposals drawn from the scored archs ``idx``
    (CIFAR-10 scores, search on cifar10-valid), proxy time charged, as a Markdown table."""
    from gradsign.ensemble import EnsembleScores
    from gradsign.search import run_search
    from gradsign.search.run import format_results

    full = {p: np.full(len(space), np.nan) for p in values}
    full_s = {p: np.full(len(space), np.nan) for p in values}
    known = {p: np.zeros(len(space), bool) for p in values}
    for p in values:
        full[p][idx], full_s[p][idx], known[p][idx] = values[p], seconds[p], True

    class GradSignOnSample:
        proxy, higher_is_better = "gradsign", True

        def __init__(self):
            self.seconds = full_s["gradsign"]

        def __call__(self, indices):
            return full["gradsign"][np.asarray(indices)]

    restricted = SampledSpace(space, idx)
    results = [run_search(restricted, "rs", None, runs=runs, budget=budget, seed=0)]
    for name, assist in (("gradsign", GradSignOnSample()), (ensemble.name,
                          EnsembleScores(ensemble, full, full_s, known=known))):
        for charge in (False, True):
            res = run_search(restricted, "rs", assist, pool=10, runs=runs, budget=budget, seed=0,
                             charge_proxy_time=charge)
            res["name"] = f"G-RS ({name}{', proxy time charged' if charge else ''})"
            results.append(res)
    table = format_results(results)
    evals = ", ".join(f"{r['name']}: {r['evaluations_mean']:.1f} evaluations, {r['proxy_seconds_mean']:.0f} s of "
                      "proxy time" for r in results)
    return table + "\n\nPer run (mean): " + evals


def export_tables(store_path: str, out_dir: Path) -> None:
    """Bundle every Table 3 proxy but GradSign (bundled for every arch already) from the score store: one
    ``scores_nb201_<dataset>_<proxy>_b64_s0.npz`` per dataset and proxy, by ``gradsign cache export``."""
    for d in DATASETS:
        for p in ALL_PROXIES:
            if p == "gradsign":
                continue
            out = out_dir / f"scores_nb201_{d}_{p}_b64_s0.npz"
            rc, text = run_cli(["cache", "export", "--cache", store_path, "--space", "nb201", "--dataset", d,
                                "--proxy", p, "--batch-size", "64", "--seed", "0", "--out", str(out), "--force"])
            print(text)
            if rc:
                sys.exit(rc)


def run_cli(args: list[str]) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "gradsign", *args], capture_output=True, text=True)
    return done.returncode, (done.stdout + done.stderr).strip()


def _cell(c: dict, with_n: bool = False) -> str:
    text = f"{c['spearman']:+.3f} [{c['spearman_ci95'][0]:+.3f}, {c['spearman_ci95'][1]:+.3f}]"
    return text + (f" ({c['n']})" if with_n else "")


def markdown(summary: dict, command: str) -> str:
    chosen = summary["chosen"]
    lines = ["<!-- generated by experiments/ensemble.py; do not edit by hand -->", "# A zero-cost ensemble",
             "", f"Command: `{command}` (gradsign {gradsign.__version__}).", "",
             "An ensemble ranks each component proxy's scores **within a set of candidate archs** and aggregates "
             "the ranks (r = 1 worst .. n best): `rank_sum` = sum_m r_m; `log_rank_product` = sum_m log(r_m / n), "
             "the aggregation of AZ-NAS (Lee & Ham, CVPR 2024). Its scores depend on the candidate set: "
             "`correlate` ranks within the archs correlated, `select` within each run's draw, `search --assist` "
             "within each pool. Below every evaluation ranks within the archs it reports on (all, or the clean "
             "subset).", "",
             "Scores: the 1,000-arch NAS-Bench-201 sample of docs/results.md (`--sample 1000 --seed 0`), batch 64 "
             "of bundled training images, seed 0. Accuracy field: 200-epoch **test** accuracy, seed mean "
             "(CIFAR-10 ori-test; CIFAR-100 and ImageNet16-120 x-test). Signed Spearman rho with 95% percentile "
             f"bootstrap intervals ({summary['n_boot']} resamples of the archs).", "",
             "**Clean cells**: connected (a path of non-`none` edges from the input node to the output node) and "
             "without unreachable ops (every non-`none` edge lies on such a path). Of all 15,625 cells, "
             f"{summary['space_counts']['disconnected']:,} are disconnected and "
             f"{summary['space_counts']['clean']:,} are clean.", "",
             "## Archs scored", "",
             "| dataset | archs with every candidate component | of which clean |", "|---|---|---|"]
    for d, r in summary["datasets"].items():
        lines.append(f"| {d} | {r['n']} | {r['n_clean']} |")
    lines += ["", f"## Choosing the default (on {TUNING_DATASET} only)", "",
              f"Candidates: {', '.join(CANDIDATES)} (the candidates fixed before the other five proxies were scored on "
              "the sample; all eleven are below). Every subset of two or more x both aggregations "
              f"({summary['tried']} ensembles) ranked by signed Spearman rho with {TUNING_DATASET} test accuracy over "
              f"its {summary['datasets'][TUNING_DATASET]['n']} archs. The ten best:", "",
              "| components | method | rho (cifar100) |", "|---|---|---|"]
    for t in summary["ranking"][:10]:
        lines.append(f"| {' + '.join(t['components'])} | {t['method']} | {t['spearman']:+.3f} |")
    lines += ["", f"Chosen: **{' + '.join(chosen['components'])}, {chosen['method']}**: the proxy named `ensemble` "
              "(`gradsign.ensemble.DEFAULT_COMPONENTS`, `DEFAULT_METHOD`). CIFAR-10 and ImageNet16-120 played no "
              "part in the choice; CIFAR-100 numbers below are in-sample for the choice.", "",
              "## The ensemble beside each component", "",
              "Cells: signed Spearman rho [95% CI] (archs with a finite score; NASWOT is -inf and jacob_cov NaN "
              "on some disconnected cells, and an arch with a NaN component gets no ensemble score). Margins: "
              "over the archs where both scores are finite.", ""]
    for subset, title in (("all", "all archs"), ("clean", "clean cells only")):
        lines += [f"### {title}", "",
                  "| proxy | " + " | ".join(f"{d}{' (chosen here)' if d == TUNING_DATASET else ''}"
                                            for d in summary["datasets"]) + " |",
                  "|---" * (1 + len(summary["datasets"])) + "|"]
        for p in ("ensemble", *CANDIDATES):
            lines.append(f"| {p} | " + " | ".join(_cell(r["proxies"][p][subset], True)
                                                  for r in summary["datasets"].values()) + " |")
        lines.append("| AZ-NAS (published: its own four proxies and evaluation set) | " +
                     " | ".join(f"{AZ_NAS[d]:.3f}" for d in summary["datasets"]) + " |")
        lines += ["", f"Margin of the ensemble over each component ({title}): rho(ensemble) - rho(proxy), 95% "
                  "paired-bootstrap interval (the proxy's sign oriented by its registered direction):", "",
                  "| proxy | " + " | ".join(summary["datasets"]) + " |", "|---" * (1 + len(summary["datasets"])) + "|"]
        for p in CANDIDATES:
            lines.append(f"| {p} | " + " | ".join(
                f"[{r['margin'][p][subset][0]:+.3f}, {r['margin'][p][subset][1]:+.3f}]"
                for r in summary["datasets"].values())
                + " |")
        lines.append("")
    lines += ["## Cost per arch", "",
              "Mean measured seconds per arch (one process, one torch thread, on the shared development machine "
              "while other jobs loaded its 2 cores; GradSign's from its bundled timings): the ensemble's cost is the "
              "sum of its components'.", "",
              "| proxy | " + " | ".join(summary["datasets"]) + " |", "|---" * (1 + len(summary["datasets"])) + "|"]
    for p in ("ensemble", *CANDIDATES):
        lines.append(f"| {p} | " + " | ".join(f"{r['seconds_per_arch'][p]:.2f}" for r in summary["datasets"].values())
                     + " |")
    every = summary["every_proxy"]
    lines += ["", "## Every proxy on the sample", "",
              "The eleven proxies of the paper's Table 3 (all bundled with the package: "
              "`gradsign.ensemble.proxy_table(dataset)`) beside the ensemble, on the archs of the sample where all "
              "eleven are known (" + ", ".join(f"{d}: {r['n']}" for d, r in every.items()) + "), the ensemble "
              "ranked within them. Signed Spearman rho [95% CI] with 200-epoch test accuracy (seed mean), then the "
              "mean measured seconds per arch:", "",
              "| proxy | " + " | ".join(every) + " | " + " | ".join(f"s/arch {d}" for d in every) + " |",
              "|---" * (1 + 2 * len(every)) + "|"]
    if not every:
        lines.append(f"(No dataset has all eleven proxies on {summary['min_archs']} archs or more yet.)")
    for p in ("ensemble", *ALL_PROXIES) if every else ():
        cost = [f"{r['seconds_per_arch'][p]:.2f}" if p != "ensemble" else
                f"{sum(r['seconds_per_arch'][c] for c in summary['chosen']['components']):.2f}" for r in every.values()]
        lines.append(f"| {p} | " + " | ".join(_cell(r["proxies"][p]) for r in every.values()) + " | "
                     + " | ".join(cost) + " |")
    lines += ["", "## Table 5: best of N by the ensemble", "", summary["select"]["text"], "",
              "## Search with `--assist ensemble`", "", summary["search"]["text"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="score store with the sample's scores")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--export-tables", action="store_true",
                        help="bundle every proxy but GradSign from --cache into src/gradsign/data and stop")
    parser.add_argument("--choose-only", action="store_true", help="print the protocol's choice and stop")
    parser.add_argument("--min-archs", type=int, default=50, help="leave out datasets with fewer scored archs")
    parser.add_argument("--search-runs", type=int, default=500)
    parser.add_argument("--search-budget", type=float, default=3000.0)
    parser.add_argument("--space-runs", type=int, default=1, help="runs of the whole-space ensemble search")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    space = get_space("nb201")
    indices = sample(space, 1000, 0)
    clean_all = clean_cells(space)
    store = ScoreStore(args.cache) if args.cache else None
    if args.export_tables:
        if store is None:
            sys.exit("error: --export-tables needs --cache")
        export_tables(args.cache, Path(gradsign.__file__).parent / "data")
        return
    summary = {"n_boot": args.bootstrap, "datasets": {}, "every_proxy": {}, "min_archs": args.min_archs,
               "space_counts": {"disconnected": int(sum(not cell_paths(o)[0] for o in space.ops_table())),
                                "clean": int(clean_all.sum())}}
    data = {}
    for d in DATASETS:
        mask = known_mask(space, d, indices, CANDIDATES, store)
        idx = [i for i, m in zip(indices, mask) if m]
        if len(idx) < args.min_archs:
            print(f"{d}: only {len(idx)} archs have every candidate component; left out", file=sys.stderr)
            continue
        values, seconds = load_scores(space, d, idx, CANDIDATES, store)
        data[d] = (np.asarray(idx), values, seconds)
    if TUNING_DATASET not in data or "cifar10" not in data:
        sys.exit(f"error: {TUNING_DATASET} and cifar10 need at least {args.min_archs} archs with every component")
    idx, values, _ = data[TUNING_DATASET]
    ranking = choose(values, space.benchmark_table(TUNING_DATASET, "test", 200)[idx])
    summary["ranking"], summary["tried"] = ranking, len(ranking)
    chosen = ranking[0]
    summary["chosen"] = {"components": chosen["components"], "method": chosen["method"]}
    if args.choose_only:
        print(json.dumps(ranking[:10], indent=1))
        return
    if (tuple(chosen["components"]), chosen["method"]) != (DEFAULT_COMPONENTS, DEFAULT_METHOD):
        print(f"warning: the protocol chooses {chosen}, but the package default is {DEFAULT_COMPONENTS}, "
              f"{DEFAULT_METHOD}: update gradsign/ensemble.py", file=sys.stderr)
    ensemble = Ensemble(tuple(chosen["components"]), chosen["method"])
    for d in data:
        idx, values, seconds = data[d]
        summary["datasets"][d] = report_dataset(space, d, ensemble, values, seconds, idx, clean_all[idx],
                                                args.bootstrap)
        every = every_proxy(space, d, ensemble, indices, store, args.bootstrap, args.min_archs)
        if every:
            summary["every_proxy"][d] = every
    cache = ["--cache", args.cache] if args.cache else []
    name = "ensemble" if (tuple(chosen["components"]), chosen["method"]) == (DEFAULT_COMPONENTS, DEFAULT_METHOD) \
        else f"ensemble:{chosen['method']}:{'+'.join(chosen['components'])}"
    texts = []
    for proxies in (name, ",".join(chosen["components"])):
        command = ["select", "--dataset", "cifar10", "--proxies", proxies, "--scored-only", "--candidates", "100",
                   "--runs", "500", *cache]
        rc, text = run_cli(command)
        texts.append(f"`gradsign {' '.join(command)}` (exit {rc}):\n\n```\n{text}\n```")
    summary["select"] = {"text": "Candidates are drawn only from the archs with every component known (the scored "
                         "sample), for both selectors, with the same draws (same seed); the second command ranks "
                         "by its first proxy, GradSign.\n\n" + "\n\n".join(texts)}
    whole = []
    for assist in (name, "gradsign"):
        command = ["search", "--algo", "rs", "--assist", assist, "--runs", str(args.space_runs),
                   "--charge-proxy-time", *cache]
        rc, text = run_cli(command)
        whole.append(f"`gradsign {' '.join(command)}` (exit {rc}):\n\n```\n{text}\n```")
    idx, values, seconds = data["cifar10"]
    summary["search"] = {"text": (
        f"Over the whole space (15,625 archs, the protocol of docs/search.md): the component scores not bundled "
        f"are computed when a search first proposes an arch (and kept in the store), and their measured seconds "
        f"are charged. {args.space_runs} run{'s' if args.space_runs > 1 else ''} only, to show it working, beside "
        f"GradSign alone with the same seed. A run computes jacob_cov for the few hundred archs it proposes (about "
        f"20 minutes on this CPU the first time); where an earlier run of the command already put them in the "
        f"store, the scores line says \"0 computed\":\n\n" + "\n\n".join(whole) +
        f"\n\nOn the scored sample: random search whose proposals are drawn uniformly from the "
        f"{len(idx)} CIFAR-10 archs with every component known (so the search space is those archs, not the "
        f"benchmark's 15,625; the numbers are not comparable with docs/search.md), search on cifar10-valid, "
        f"a budget of {args.search_budget:,.0f} s (a 12,000 s search would evaluate most of these archs), "
        f"{args.search_runs} runs, pool 10; 200-epoch accuracy of the best arch found, mean +- std. "
        f"\"Proxy time charged\" charges each arch's measured seconds once per run: for the ensemble the sum of "
        f"its components' (python API: `run_search(..., assist=EnsembleScores(...), charge_proxy_time=True)`):"
        f"\n\n" + sample_search(space, ensemble, idx, values, seconds, args.search_runs,
                                       args.search_budget))}
    if store:
        store.close()
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "ensemble.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary, "python experiments/ensemble.py " + " ".join(sys.argv[1:]))
    (out / "ensemble.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
