"""Check the NAS-Bench-101 builder against the benchmark's ``trainable_parameters`` for every bundled model.

Each of the 30,001 bundled models is built by ``NasBench101.build`` (10 classes) on PyTorch's meta device
(modules and shapes without memory or initialisation), and the sizes of its parameters are summed; the sum is
compared with the benchmark's ``trainable_parameters`` bundled for that model. Writes a JSON summary.

Usage: python experiments/nb101_params.py [--out docs/nb101/params.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import gradsign
from gradsign.spaces import get_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/nb101/params.json")
    args = parser.parse_args()
    space = get_space("nb101")
    start = time.perf_counter()
    mismatches = []
    for i in range(len(space)):
        with torch.device("meta"):
            model = space.build(i, num_classes=10)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if count != space.param_count(i):
            mismatches.append({"arch": space.arch(i), "builder": count, "benchmark": space.param_count(i)})
    summary = {"models": len(space), "equal": len(space) - len(mismatches), "mismatches": mismatches[:20],
               "seconds": round(time.perf_counter() - start, 1), "gradsign_version": gradsign.__version__,
               "command": "python experiments/nb101_params.py"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"builder parameter count equals trainable_parameters for {summary['equal']} of {summary['models']} "
          f"models ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
