"""Plain and GradSign-assisted NAS searching on CIFAR-100 (the protocol of the GradSign paper's Table 9).

Protocol (``gradsign.search``, ``--search-dataset cifar100``): as ``experiments/nas_table6.py`` but every
evaluation returns the arch's 12-epoch CIFAR-100 x-valid accuracy (Hyperband/BOHB: HpBandSter's rungs with
every rung a 12-epoch look-up, as the benchmark's scripts ran them; the "two-fidelity" rows are this
project's variant with 200-epoch evaluations) and is charged the benchmark's CIFAR-100 training time plus
one pass over the 5,000 x-valid images (``(e + 0.032) t``, derived from the split sizes); 12,000 s simulated
budget; every run reports the 200-epoch accuracy of its best arch on all three datasets; mean +- std over
500 runs (run r uses ``default_rng([seed, r])``). G-variants take each random proposal as the best of 10 by
GradSign on CIFAR-100 (batch 64, seed 0, sum aggregation). Each G-variant minus its twin is given with a
Welch 95% interval.

Usage: ``python experiments/nas_table9.py --cache runs/nb201-scores.sqlite`` (writes docs/search_cifar100.md
and figures under docs/search_cifar100/).
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np

import gradsign
from gradsign.evaluate import ProxyScores, ScoringSetup
from gradsign.search import run_search
from gradsign.search.run import plot_best_so_far
from gradsign.search.simulator import BenchmarkArrays, validation_pass_epochs
from gradsign.spaces import get_space
from gradsign.store import ScoreStore

sys.path.insert(0, str(Path(__file__).parent))
from nas_table6 import (all_datasets_section, cell, difference_section,  # noqa: E402
                        search_experiment_parser)

SEARCH_DATASET = "cifar100"
#: (label, algo, assisted, options)
CONFIGS = [
    ("RS", "rs", False, {}), ("G-RS", "rs", True, {}),
    ("REA", "rea", False, {}), ("G-REA", "rea", True, {}),
    ("REINFORCE", "reinforce", False, {}), ("G-REINFORCE", "reinforce", True, {}),
    ("REINFORCE (lr 0.001)", "reinforce", False, {"learning_rate": 0.001}),
    ("G-REINFORCE (lr 0.001)", "reinforce", True, {"learning_rate": 0.001}),
    ("HB", "hb", False, {}), ("G-HB", "hb", True, {}),
    ("BOHB", "bohb", False, {}), ("G-BOHB", "bohb", True, {}),
    ("HB (two-fidelity)", "hb", False, {"protocol": "two-fidelity"}),
    ("G-HB (two-fidelity)", "hb", True, {"protocol": "two-fidelity"}),
]
PAIRS = [("G-RS", "RS"), ("G-REA", "REA"), ("G-REINFORCE", "REINFORCE"),
         ("G-REINFORCE (lr 0.001)", "REINFORCE (lr 0.001)"), ("G-HB", "HB"), ("G-HB", "BOHB"), ("G-BOHB", "BOHB"),
         ("G-HB (two-fidelity)", "HB (two-fidelity)")]


def main(argv: list[str] | None = None) -> int:
    parser = search_experiment_parser(__doc__.splitlines()[0], "docs/search_cifar100.md", "docs/search_cifar100")
    args = parser.parse_args(argv)

    space = get_space("nb201")
    tables = BenchmarkArrays.from_space(space, SEARCH_DATASET)
    setup = ScoringSetup(space, SEARCH_DATASET, (args.proxy,), 64, 0, {})
    if Path(args.cache).is_file():
        with ScoreStore(args.cache) as store:
            scores = ProxyScores(setup, store)
    else:
        scores = ProxyScores(setup, None)
    known = int(scores.known.sum())
    if known < len(space):
        print(f"only {known} of {len(space)} archs have {args.proxy} scores on {SEARCH_DATASET} (bundled or in "
              f"{args.cache}); compute the rest first (see docs/search_cifar100.md)", file=sys.stderr)
        return 2

    results: dict[str, dict] = {}
    for label, algo, assisted, options in CONFIGS:
        start = time.perf_counter()
        result = run_search(space, algo, scores if assisted else None, pool=args.pool, runs=args.runs,
                            budget=args.budget, seed=args.seed, search_dataset=SEARCH_DATASET, tables=tables,
                            **options)
        result["label"] = label
        results[label] = result
        c100 = result["results"][SEARCH_DATASET]["test"]
        print(f"{label:28s} {time.perf_counter() - start:6.1f} s  evaluations {result['evaluations_mean']:6.1f}  "
              f"{SEARCH_DATASET} test {c100['mean']:.2f} ± {c100['std']:.2f}", flush=True)

    figures = []
    for assisted, twin in PAIRS:
        path = Path(args.figures) / f"best_so_far_{assisted}_vs_{twin}.png".replace(" ", "_").replace(
            "(", "").replace(")", "")
        plot_best_so_far([results[twin], results[assisted]], space, path, dataset=SEARCH_DATASET, metric="test")
        figures.append(path)
    write_docs(Path(args.docs), results, args, known, int(np.isfinite(scores.values).sum()), figures)
    print(f"wrote {args.docs} and {len(figures)} figures under {args.figures}")
    return 0


def write_docs(path: Path, results: dict, args, known: int, finite: int, figures: list[Path]) -> None:
    first = next(iter(results.values()))
    valid_pass = validation_pass_epochs(SEARCH_DATASET)
    lines = [
        "# GradSign-assisted NAS on NAS-Bench-201, searching on CIFAR-100 (GradSign paper, Table 9 protocol)",
        "",
        "Generated by `experiments/nas_table9.py`; do not edit by hand. Command:",
        "",
        "```",
        f"python experiments/nas_table9.py --cache {args.cache} --runs {args.runs} --budget {args.budget:g} "
        f"--seed {args.seed} --pool {args.pool}",
        "```",
        "",
        f"gradsign {gradsign.__version__}, numpy {np.__version__}, Python {platform.python_version()}. "
        f"Proxy scores: `{args.proxy}` on CIFAR-100 for {known} of 15,625 archs ({finite} finite), the "
        "canonical CIFAR-100 batch of 64 images, seed 0, sum aggregation (bundled with the package).",
        "",
        "## Protocol",
        "",
        f"* Search on CIFAR-100: an evaluation returns the arch's 12-epoch CIFAR-100 x-valid accuracy "
        f"(benchmark seed mean) and is charged `(12 + {valid_pass:.3f}) × t` simulated seconds, `t` being its "
        "CIFAR-100 per-epoch training time; the validation pass over the 5,000 x-valid images is scaled from "
        "the cifar10-valid one by the split sizes (not a published figure). Hyperband and BOHB run HpBandSter's "
        "schedule as the benchmark's scripts did (eta 3, rungs 22.2/66.7/200, brackets [9, 3, 1], [3, 1], [3]; "
        "every rung is the 12-epoch look-up, charged again when a configuration is promoted; incumbent = "
        "lowest loss at the 200 rung); the rows marked *two-fidelity* are this project's variant with real "
        "200-epoch evaluations (`200.032 × t`). See [the CIFAR-10 page](search.md) for both.",
        f"* Budget {args.budget:g} s, never exceeded; the incumbent is the best validation accuracy seen (at the "
        "highest rung, for Hyperband/BOHB). Reported: 200-epoch accuracy (seed mean) of that arch on the three "
        f"datasets, mean ± std (ddof 1) over {first['runs']} runs; run r uses "
        f"`numpy.random.default_rng([{args.seed}, r])`.",
        f"* G-variants replace every random proposal by the best-scoring of {args.pool} (GradSign paper, "
        "Appendix A.5; in G-HB and G-BOHB every configuration the generator returns, as in the GradSign code); "
        "proxy time not charged. Algorithm settings as on [the CIFAR-10 page](search.md).",
        "* The GradSign paper's Table 9 numbers are not reproduced beside these: they are not in this "
        "project's reference material.",
        "",
        "## CIFAR-100 test accuracy",
        "",
        "| algorithm | cifar100 test | evaluations per run | wall time of the runs |",
        "|---|---|---|---|",
    ]
    for label, res in results.items():
        lines.append(f"| {label} | {cell(res, SEARCH_DATASET, 'test')} | {res['evaluations_mean']:.1f} | "
                     f"{res['wall_seconds']:.1f} s |")
    lines += ["", *all_datasets_section(results)]
    lines += ["", *difference_section(results, PAIRS, SEARCH_DATASET)]
    lines += [
        "",
        "## Best-so-far CIFAR-100 test accuracy against simulated time",
        "",
        "Line: mean over runs of the 200-epoch CIFAR-100 test accuracy of each run's incumbent; band: "
        "25th–75th percentile.",
        "",
    ]
    lines += [f"![{fig.stem}]({fig.relative_to(path.parent).as_posix()})" for fig in figures]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
