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
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

import gradsign
from gradsign.datasets import canonical_batch
from gradsign.spaces import get_space


class _Fallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


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
    handler = _Fallbacks()
    logging.getLogger("gradsign").addHandler(handler)
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
        handler.messages.clear()
        start = time.perf_counter()
        gradsign.score(model, x, y)
        scored = time.perf_counter() - start
        engine = "loop (fallback)" if any("loop" in m for m in handler.messages) else "batched"
        print(f"| {arch} | {space.param_count(arch):,} | {plain:.1f} | {scored:.1f} | {scored / plain:.2f} | "
              f"{engine} |", flush=True)


if __name__ == "__main__":
    main()
