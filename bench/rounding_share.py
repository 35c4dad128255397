"""The default engine's rounding-noise share (``gradsign.engine._sign_disagreement``): measured on a sample
of the counted weights, as every score does, against the same share over every weight, and its cost.

For each model of the zoo ("bench" size, batch 32) and ``--nds`` models per NDS space (bundled CIFAR-10,
batch 64, drawn with seed 0), ``gradsign.score`` runs once with the share recorded both ways on the same
batched and single-sample gradients; then the sampled share's seconds on those gradients (median of 20).

    python bench/rounding_share.py [--nds 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

import gradsign
from gradsign import engine, zoo
from gradsign.datasets import canonical_batch
from gradsign.spaces import get_space
from gradsign.spaces.nds import SPACES


def measured(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(sampled share, full share, seconds of the sampled share) for one score of ``model``."""
    seen = []
    original = engine._sign_disagreement

    def both(batched, reference, sample=engine.SIGN_SAMPLE):
        seen.append((batched, reference))
        return original(batched, reference, sample)

    engine._sign_disagreement = both
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gradsign.score(model, x, y)
    finally:
        engine._sign_disagreement = original
    if not seen:  # a fallback: the engine measured nothing
        return float("nan"), float("nan"), float("nan")
    batched, reference = seen[-1]
    times = []
    for _ in range(20):
        start = time.perf_counter()
        sampled = original(batched, reference)
        times.append(time.perf_counter() - start)
    return sampled, original(batched, reference, None), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nds", type=int, default=3, help="models per NDS space")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in zoo.names():
        x, y = zoo.example_batch(name, 32, "bench", seed=1)
        rows.append((name, *measured(zoo.build(name, "bench", seed=0), x, y)))
    x, y = canonical_batch("cifar10", 64, 0)
    for space_name in SPACES:
        space = get_space(space_name)
        rng = np.random.default_rng(0)
        for i in range(args.nds):
            arch = space.sample(rng)
            torch.manual_seed(0)
            rows.append((f"{space_name} #{i}", *measured(space.build(arch, num_classes=10), x, y)))
    print(f"sample of {engine.SIGN_SAMPLE} weights in tiles of {engine.SIGN_TILE}x{engine.SIGN_TILE}, "
          f"{args.threads} torch thread(s)")
    print("| model | sampled share | full share | difference (points) | sampled share ms |")
    print("|---|---|---|---|---|")
    for name, sampled, full, seconds in rows:
        print(f"| {name} | {100 * sampled:.2f}% | {100 * full:.2f}% | {100 * (sampled - full):+.2f} "
              f"| {1e3 * seconds:.2f} |")
    gaps = [abs(sampled - full) for _, sampled, full, _ in rows]
    print(f"largest difference {100 * max(gaps):.2f} points; sampled share {1e3 * min(r[3] for r in rows):.2f}-"
          f"{1e3 * max(r[3] for r in rows):.2f} ms; warned (above {100 * engine.NOISY_SIGN_SHARE:g}%): "
          f"{sum(r[1] > engine.NOISY_SIGN_SHARE for r in rows)} of {len(rows)}")


if __name__ == "__main__":
    main()
