"""Check the NAS-Bench-101 builder against the benchmark's ``trainable_parameters`` of the bundled models.

Two checks, compared with the benchmark's ``trainable_parameters`` bundled for each model:
- every one of the 30,001 models: ``nb101_param_count``, the count from the builder's channel rule
  (``vertex_channels``) and layer list, written out as a formula;
- every ``--stride``-th model (all with ``--stride 1``): the network built by ``NasBench101.build`` (10
  classes) on PyTorch's meta device (modules and shapes without memory or initialisation), its parameter
  sizes summed. (A meta build costs about 20 ms of CPU; all 30,001 were too slow for the shared machine.)
Writes a JSON summary.

Usage: python experiments/nb101_params.py [--stride 10] [--out docs/nb101/params.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import gradsign
from gradsign.spaces import get_space
from gradsign.spaces.nb101_model import nb101_param_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stride", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/nb101/params.json")
    args = parser.parse_args()
    space = get_space("nb101")
    start = time.perf_counter()
    formula_mismatches = []
    for i in range(len(space)):
        spec = space.spec(i)
        if nb101_param_count(spec.matrix, spec.ops) != space.param_count(i):
            formula_mismatches.append(space.arch(i))
    built = range(0, len(space), args.stride)
    mismatches = []
    for i in built:
        with torch.device("meta"):
            model = space.build(i, num_classes=10)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if count != space.param_count(i):
            mismatches.append({"arch": space.arch(i), "builder": count, "benchmark": space.param_count(i)})
    summary = {"models": len(space), "formula_equal": len(space) - len(formula_mismatches),
               "built": len(built), "built_equal": len(built) - len(mismatches), "stride": args.stride,
               "mismatches": mismatches[:20], "formula_mismatches": formula_mismatches[:20],
               "seconds": round(time.perf_counter() - start, 1), "gradsign_version": gradsign.__version__,
               "command": f"python experiments/nb101_params.py --stride {args.stride}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"formula: {summary['formula_equal']} of {summary['models']} equal; built networks: "
          f"{summary['built_equal']} of {summary['built']} equal ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
