"""How often the default engine's sample-independence check sends NAS-Bench-201 archs to the loop, and why.

For every ``--step``-th arch (CIFAR-10 canonical batch of 64, network built with ``torch.manual_seed(0)``)
it runs the check the ``auto`` engine runs; for the archs that fail it, it scores GradSign with the
``batched`` engine (no check) and the ``loop`` engine and prints their relative difference.

    python bench/independence_probe.py [--step 5] [--compare 10]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import gradsign
from gradsign import engine
from gradsign.datasets import canonical_batch
from gradsign.spaces import get_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=5, help="check every step-th arch index")
    parser.add_argument("--compare", type=int, default=10, help="score this many failing archs both ways")
    args = parser.parse_args()
    torch.set_num_threads(1)
    space = get_space("nb201")
    x, y = canonical_batch("cifar10", 64, 0)
    start, failing = time.perf_counter(), []
    indices = range(0, len(space), args.step)
    for index in indices:
        torch.manual_seed(0)
        model = space.build(space.arch(index), num_classes=10).train()
        probe = copy.deepcopy(model)
        engine._swap_batch_norms(probe)
        try:
            engine._assert_samples_independent(probe, x)
        except engine.UnsupportedModelError:
            failing.append((index, model))
    print(f"{len(failing)} of {len(indices)} archs (every {args.step}th index) fail the independence check "
          f"({time.perf_counter() - start:.0f} s)")
    print("| index | arch | batched GradSign | loop GradSign | (batched - loop) / loop |")
    print("|---|---|---|---|---|")
    for index, model in failing[:args.compare]:
        batched = gradsign.score(model, x, y, engine="batched")
        loop = gradsign.score(model, x, y, engine="loop")
        print(f"| {index} | {space.arch(index)} | {batched:.0f} | {loop:.0f} | {(batched - loop) / loop:+.1e} |")


if __name__ == "__main__":
    main()
