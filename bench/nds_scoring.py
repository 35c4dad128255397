"""Scoring random models of the five NDS design spaces: seconds per model, the default engine against the
loop, and how many weights have a gradient that is zero in exact arithmetic.

For each space, ``--models`` models drawn with ``space.sample(numpy.random.default_rng(seed))`` (seed 0; the
space's own width and depth), built under ``torch.manual_seed(0)``, scored on the bundled CIFAR-10 batch of
``--batch-size`` images (seed 0):
- seconds of one ``gradsign.score(model, x, y)`` (default engine, as a user calls it)
  and of one plain batched forward+backward in scoring mode (mean cross-entropy), after one warm-up call;
- GradSign of the default engine and of ``engine="loop"`` (float32) on the first ``--loop-batch`` images
  and their relative difference, and the default engine's fallback warning (on the full batch) if it gave
  one;
- whether the default engine warned that float32 rounding decides many signs (``RoundingNoiseWarning``,
  the share of one sample's signs it names);
- dead weights: the share of counted (Conv2d/Linear) weights whose float64 single-sample gradient is below
  1e-10 in magnitude for each of the first 4 samples. With single-sample BatchNorm a branch that ends in
  BatchNorm has the BatchNorm bias as its spatial mean, so where such branches reach the logits only through
  global average pooling, their weights (and everything feeding only them) get no gradient: float32 turns
  those exact zeros into noise whose signs GradSign counts.

Rows go to ``--results`` (JSON) as each model finishes; a rerun with the same settings (the engine's last
commit among them) skips finished rows.
``--write`` puts the table into docs/performance.md between the nds markers.

    python bench/nds_scoring.py [--models 2] [--batch-size 64] [--loop-batch 8] [--threads 1] [--write]
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gradsign
from gradsign.datasets import canonical_batch
from gradsign.engine import RoundingNoiseWarning, counted_layers, engine_warnings, scoring_mode
from gradsign.spaces import get_space
from gradsign.spaces.darts_model import param_count
from gradsign.spaces.nds import SPACES

from doc_sections import engine_version, write_section

ROOT = Path(__file__).resolve().parents[1]
INTRO = ("## NDS design spaces: seconds per model, default engine against the loop\n\n"
         "Random models of the five NDS spaces (`gradsign.spaces.nds`, built by\n"
         "`spaces/darts_model.py`); see `bench/nds_scoring.py` for the protocol and `docs/nds.md` for\n"
         "why many of their weights get float-noise gradients under single-sample BatchNorm.\n\n")
BEGIN, END = "<!-- nds:begin (written by bench/nds_scoring.py) -->", "<!-- nds:end -->"


def dead_share(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, samples: int = 4) -> float:
    """Share of counted weights whose float64 single-sample gradient is below 1e-10 for every sample."""
    ref = scoring_mode(copy.deepcopy(model).double())
    layers = counted_layers(ref)
    dead = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in layers}
    for i in range(min(samples, len(x))):
        ref.zero_grad()
        F.cross_entropy(ref(x[i:i + 1].double()), y[i:i + 1]).backward()
        for name, m in layers:
            dead[name] &= m.weight.grad.abs() < 1e-10
    return sum(int(d.sum()) for d in dead.values()) / sum(d.numel() for d in dead.values())


def measure(name: str, arch: str, x: torch.Tensor, y: torch.Tensor, loop_batch: int) -> dict:
    space = get_space(name)
    torch.manual_seed(0)
    model = space.build(arch, num_classes=10)
    gradsign.score(model, x[:2], y[:2])  # warm-up
    with engine_warnings() as messages, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RoundingNoiseWarning)
        start = time.perf_counter()
        default = gradsign.score(model, x, y)
        seconds = time.perf_counter() - start
    fallback = messages[0] if messages else ""
    noise = [w.message.share for w in caught if issubclass(w.category, RoundingNoiseWarning)]
    plain = scoring_mode(copy.deepcopy(model))
    F.cross_entropy(plain(x[:2]), y[:2]).backward()
    start = time.perf_counter()
    F.cross_entropy(plain(x), y).backward()
    fwd_bwd = time.perf_counter() - start
    small = gradsign.score(model, x[:loop_batch], y[:loop_batch])
    start = time.perf_counter()
    loop = gradsign.score(model, x[:loop_batch], y[:loop_batch], engine="loop")
    loop_seconds = time.perf_counter() - start
    m = space.model(arch)
    return {"space": name, "arch": arch, "width": m.width, "depth": m.depth, "params": param_count(model),
            "seconds": seconds, "fwd_bwd": fwd_bwd, "loop_seconds": loop_seconds, "gradsign": default,
            "gradsign_small": small, "gradsign_loop": loop,
            "relative_difference": (small - loop) / loop if loop else float("nan"),
            "fallback": fallback, "dead_share": dead_share(model, x, y),
            "rounding_noise": noise[0] if noise else None}


def noise_cell(row: dict) -> str:
    """The share of signs the default engine's ``RoundingNoiseWarning`` named ("-": no warning)."""
    share = row.get("rounding_noise")
    return "-" if share is None else f"{100 * share:.0f}% of signs"


def table(rows: list[dict], setup: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"batch {setup['batch_size']} (bundled CIFAR-10, seed 0), {setup['threads']} torch thread(s), "
             f"torch {setup['torch']}, the engine at {setup.get('engine', 'unknown')}, "
             f"{setup['models']} models per space drawn with seed 0, one call each after a warm-up; seconds of "
             "single calls, so indicative.", "",
             f"| space | width | depth | params | default s | fwd+bwd s | GradSign | loop s ({setup['loop_batch']}) "
             f"| default ({setup['loop_batch']}) | loop ({setup['loop_batch']}) | default vs loop | dead weights "
             "| rounding-noise warning | fallback |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        used = re.search(r"used the (\w+) engine", r["fallback"])
        fallback = ("yes, to " + used.group(1) if used else "yes") if r["fallback"] else "no"
        lines.append(f"| {r['space']} | {r['width']} | {r['depth']} | {r['params']:,} | {r['seconds']:.2f} | "
                     f"{r['fwd_bwd']:.2f} | {r['gradsign']:,.0f} | {r['loop_seconds']:.2f} | {r['gradsign_small']:,.0f} | "
                     f"{r['gradsign_loop']:,.0f} "
                     f"| {r['relative_difference']:+.1e} | {100 * r['dead_share']:.1f}% | {noise_cell(r)} "
                     f"| {fallback} |")
    lines += ["", "Seconds per model (default engine), mean per space: " + ", ".join(
        f"{name} {np.mean([r['seconds'] for r in rows if r['space'] == name]):.1f} s" for name in SPACES
        if any(r["space"] == name for r in rows)) + ".",
              f"Default engine against the loop (same {setup['loop_batch']} images): largest difference "
              f"{max(abs(r['relative_difference']) for r in rows):.1e} relative; weights whose exact gradient is "
              f"zero (dead) get float-noise signs in both, so the two cannot agree there (`docs/nds.md`). Models "
              f"whose every counted weight is dead (logits independent of the input): "
              f"{sum(r['dead_share'] == 1.0 for r in rows)} of {len(rows)}."]
    return "\n".join(lines)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=2, help="models per space")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loop-batch", type=int, default=8, help="images of the loop comparison")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "nds_scoring.json")
    parser.add_argument("--write", action="store_true", help="put the table into docs/performance.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = {"models": args.models, "batch_size": args.batch_size, "threads": args.threads,
             "loop_batch": args.loop_batch,
             "torch": torch.__version__, "gradsign": gradsign.__version__, "engine": engine_version()}
    done: dict[str, dict] = {}
    if args.results.exists():
        saved = json.loads(args.results.read_text())
        if saved.get("settings") == setup:
            done = saved["rows"]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    x, y = canonical_batch("cifar10", args.batch_size, 0)
    keys = []
    for name in SPACES:
        rng = np.random.default_rng(0)
        for k in range(args.models):
            arch = get_space(name).sample(rng)
            key = f"{name} {k}"
            keys.append(key)
            if key in done and done[key]["arch"] == arch:
                continue
            print(f"{key} ...", file=sys.stderr, flush=True)
            done[key] = measure(name, arch, x, y, args.loop_batch)
            args.results.write_text(json.dumps({"settings": setup, "rows": done}, indent=1) + "\n")
    command = "python bench/nds_scoring.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    body = table([done[k] for k in keys], setup, command.strip())
    print(body)
    if args.write:
        write_section(ROOT / "docs" / "performance.md", BEGIN, END, body, INTRO)


if __name__ == "__main__":
    main()
