"""The GradSign paper's Table 4 on the five NDS design spaces (CIFAR-10), for a user with the NDS result files.

Needs DARTS.json, ENAS.json, PNAS.json, NASNet.json and Amoeba.json from the NDS data
(https://dl.fbaipublicfiles.com/nds/data.zip) in one folder (``--nds-dir`` or GRADSIGN_NDS_DIR); without
them it stops with a one-line error naming the missing file. The package ships none of them.

Protocol (as the official GradSign NDS script does it): every model of each file (a file split into top and
mid models is read as top then mid), built as the DARTS CIFAR-10 network from its ``net`` entry (genotype,
width, depth, auxiliary head; ``spaces/darts_model.py``), 10 classes, initialised with ``torch.manual_seed
(seed)``, scored on the canonical CIFAR-10 batch of ``--batch-size`` images; signed Kendall tau (and Spearman
rho) against the final test accuracy, 100 - test_ep_top1[-1] (entries of the same network: their mean).
The paper reports Kendall tau; its official script scores batches of 128 with seed 1, and this script's
defaults are the package's (64, seed 0): pass ``--batch-size 128 --seed 1`` for the official settings.
Scores go through the score store (resumable: an interrupted run keeps every finished model). The builder's
parameter count is checked against each file's ``params`` on ``--check-params`` models per space.

Writes docs/results/table4_nds.md (and .json) with the command that produced it.

    python experiments/table4_nds.py --nds-dir ~/nds_data --workers 2 [--sample 1000] [--spaces nds-darts]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

import gradsign
from gradsign.correlate import correlate
from gradsign.evaluate import ScoringSetup
from gradsign.executors import make_executor
from gradsign.spaces import get_space
from gradsign.spaces.nds import SPACES, NDSFileError, NDSFilesMissingError
from gradsign.store import ScoreStore, default_store_path

ROOT = Path(__file__).resolve().parents[1]
#: GradSign paper, Table 4: Kendall tau on CIFAR-10 (as printed)
PAPER = {"gradsign": {"nds-darts": .54, "nds-enas": .43, "nds-pnas": .40, "nds-nasnet": .31, "nds-amoeba": .24},
         "naswot": {"nds-darts": .48, "nds-enas": .34, "nds-pnas": .31, "nds-nasnet": .31, "nds-amoeba": .20}}


def param_summary(space, n: int, seed: int) -> dict:
    """Builder counts against the file's ``params`` on ``n`` models drawn with ``seed``: how many equal it
    with the auxiliary head counted, without it, or neither (the first few of those listed)."""
    picks = np.random.default_rng(seed).choice(len(space), min(n, len(space)), replace=False)
    summary = {"checked": 0, "with_aux": 0, "without_aux": 0, "no_params_field": 0, "mismatches": []}
    for i in picks:
        check = space.param_check(int(i))
        summary["checked"] += 1
        if check["params_file"] is None:
            summary["no_params_field"] += 1
        elif check["params_file"] == check["params"]:
            summary["with_aux"] += 1
        elif check["params_file"] == check["params_without_aux"]:
            summary["without_aux"] += 1
        elif len(summary["mismatches"]) < 5:
            summary["mismatches"].append({"index": int(i), **check})
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nds-dir", default=None, help="folder with the NDS result files (default: "
                        "$GRADSIGN_NDS_DIR)")
    parser.add_argument("--spaces", default=",".join(SPACES), help="comma-separated nds-* spaces")
    parser.add_argument("--proxies", default="gradsign,naswot")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=None, help="this many models per space (drawn with "
                        "--seed; default: all)")
    parser.add_argument("--check-params", type=int, default=50, help="models per space whose parameter count "
                        "is checked against the file")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=None, help="score store (default: the user's)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "table4_nds.md")
    args = parser.parse_args()
    names = [n.strip() for n in args.spaces.split(",") if n.strip()]
    proxies = tuple(p.strip() for p in args.proxies.split(",") if p.strip())
    try:
        spaces = [get_space(n, nds_dir=args.nds_dir) for n in names]
        for space in spaces:
            len(space)  # every file is read (and checked) before any scoring
    except (NDSFilesMissingError, NDSFileError, ValueError) as error:
        print(f"table4_nds: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    store = ScoreStore(args.cache or default_store_path())
    executor = make_executor("local", args.workers)
    results = {}
    try:
        for space in spaces:
            archs = list(space)
            if args.sample is not None and args.sample < len(archs):
                picks = np.random.default_rng(args.seed).choice(len(archs), args.sample, replace=False)
                archs = [archs[int(i)] for i in sorted(picks)]
            setup = ScoringSetup(space, "cifar10", proxies, args.batch_size, args.seed)
            metric, epochs = space.default_field
            result = correlate(setup, archs, metric=metric, epochs=epochs, store=store, n_boot=args.bootstrap,
                               executor=executor)
            results[space.name] = {"models": len(archs), "file_entries": sum(len(space.results(a)) for a in archs),
                                   "accuracy_field": result.accuracy_field, "proxies": result.proxies,
                                   "params": param_summary(space, args.check_params, args.seed)}
            print(f"{space.name}: {len(archs)} models, " + ", ".join(
                f"{p} tau {c['kendall']:+.3f}" for p, c in result.proxies.items()), file=sys.stderr)
    finally:
        store.close()
    command = "python experiments/table4_nds.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_page(args.out, results, proxies, args, command.strip())
    print(args.out.read_text())
    return 0


def write_page(path: Path, results: dict, proxies: tuple[str, ...], args, command: str) -> None:
    lines = ["# GradSign paper, Table 4: NDS design spaces (CIFAR-10)", "", f"Command: `{command}`", "",
             f"gradsign {gradsign.__version__}; batch {args.batch_size}, seed {args.seed}; accuracy: each file's "
             "final test accuracy (100 - test_ep_top1[-1], one training run; entries of the same network "
             "averaged). Signed Kendall tau and Spearman rho with 95% bootstrap intervals; paper: Kendall tau "
             "as printed in the GradSign paper's Table 4.", "",
             "| space | models (entries) | proxy | Kendall tau | 95% CI | paper tau | Spearman rho | 95% CI |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for p in proxies:
            c = r["proxies"][p]
            paper = PAPER.get(p, {}).get(name)
            lines.append(f"| {name} | {r['models']} ({r['file_entries']}) | {p} | {c['kendall']:+.3f} | "
                         f"[{c['kendall_ci95'][0]:+.3f}, {c['kendall_ci95'][1]:+.3f}] | "
                         f"{'' if paper is None else f'{paper:.2f}'} | {c['spearman']:+.3f} | "
                         f"[{c['spearman_ci95'][0]:+.3f}, {c['spearman_ci95'][1]:+.3f}] |")
    lines += ["", "Builder against the files' `params` (models checked: equal with the auxiliary head / equal "
              "without it / neither):", ""]
    for name, r in results.items():
        s = r["params"]
        lines.append(f"- {name}: {s['checked']} checked: {s['with_aux']} / {s['without_aux']} / "
                     f"{s['checked'] - s['with_aux'] - s['without_aux'] - s['no_params_field']}"
                     + (f" ({s['no_params_field']} without a params field)" if s["no_params_field"] else "")
                     + (f"; first mismatches: {s['mismatches']}" if s["mismatches"] else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps({"command": command, "results": results}, indent=1,
                                                    default=float) + "\n")


if __name__ == "__main__":
    sys.exit(main())
