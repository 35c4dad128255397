"""Seconds per NAS-Bench-101 model: GradSign with the default engine against one batched forward+backward.

For ``--models`` bundled models drawn with ``default_rng(--seed)``, builds each network (10 classes, under
``torch.manual_seed(seed)``), then times on the canonical CIFAR-10 batch: one plain forward+backward of the
batch (cross-entropy), and ``gradsign.score`` with the default engine (``auto``); each once, in this order,
after one untimed forward+backward. Also reports whether the default engine fell back to the per-sample
loop (its logged warning). Prints a Markdown table.

    python bench/nb101_seconds.py [--models 3] [--batch-size 64] [--threads 1] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import gradsign
from gradsign.datasets import canonical_batch
from gradsign.engine import engine_warnings
from gradsign.spaces import get_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    space = get_space("nb101")
    x, y = canonical_batch("cifar10", args.batch_size, args.seed)
    rng = np.random.default_rng(args.seed)
    print(f"batch {args.batch_size}, {args.threads} torch thread(s), models drawn with default_rng({args.seed})")
    print("| model (hash) | params | forward+backward s | GradSign (default engine) s | ratio | engine |")
    print("|---|---|---|---|---|---|")
    for i in rng.choice(len(space), args.models, replace=False):
        arch = space.arch(int(i))
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            model = space.build(arch, num_classes=10)
        F.cross_entropy(model(x), y).backward()
        model.zero_grad()
        start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        plain = time.perf_counter() - start
        model.zero_grad()
        with engine_warnings() as messages:
            start = time.perf_counter()
            gradsign.score(model, x, y)
            scored = time.perf_counter() - start
        engine = "batched" if not messages else ("vmap" if "vmap engine" in messages[0] else "loop") + " (fallback)"
        print(f"| {arch} | {space.param_count(arch):,} | {plain:.1f} | {scored:.1f} | {scored / plain:.2f} | "
              f"{engine} |", flush=True)


if __name__ == "__main__":
    main()
