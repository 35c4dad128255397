"""How the default engine's verification settles NAS-Bench-201 archs: float32 agreement, agreement with
the reference computed again on oneDNN or in float64 after a float32 doubt, or a fallback, and how far the
batched score lies from the loop's.

For every ``--step``-th arch (CIFAR-10 canonical batch of 64, network built with ``torch.manual_seed(0)``)
it scores GradSign with the default engine and records which way its verification went; for up to
``--compare`` archs that doubted in float32 it also scores the loop and prints the relative
difference of the two scores; and for every arch the verification accepted, the share of the counted
weights whose float32 gradient signs differ between the batched pass and the single-sample reference (the
default engine warns above ``gradsign.engine.NOISY_SIGN_SHARE``). With ``--float64 I,J``, instead: for those arch indices, GradSign of the
default engine and of the loop in float32 and in float64 (the network and batch in float64), and the
layer where the float32 signs of the default engine differ most often from the float64 signs.

    python bench/verification_probe.py [--step 25] [--compare 10] [--float64 3500]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

import gradsign
from gradsign import engine
from gradsign.datasets import canonical_batch
from gradsign.engine import engine_warnings, sign_counts
from gradsign.spaces import get_space
from gradsign.spaces.base import UnknownArchError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=25, help="score every step-th arch index")
    parser.add_argument("--compare", type=int, default=10, help="score this many archs that doubted by the loop")
    parser.add_argument("--float64", metavar="INDICES", type=arch_indices,
                        help="instead: float32 against float64 on these comma-separated arch indices")
    args = parser.parse_args()
    torch.set_num_threads(1)
    space = get_space("nb201")
    x, y = canonical_batch("cifar10", 64, 0)
    if args.float64:
        try:
            archs = {index: space.arch(index) for index in args.float64}
        except UnknownArchError as error:
            sys.exit(str(error))
        return float32_against_float64(space, archs, x, y)
    checks: list[str] = []
    shares: list[float] = []
    original, original_share = engine._float64_mismatch, engine._sign_disagreement
    original_again = engine._reference_on_onednn

    def counted(*call_args, **kwargs):
        checks.append("float64")
        return original(*call_args, **kwargs)

    def counted_again(*call_args, **kwargs):
        checks.append("onednn")
        return original_again(*call_args, **kwargs)

    def recorded_share(*call_args):
        shares.append(original_share(*call_args))
        return shares[-1]

    engine._float64_mismatch, engine._sign_disagreement = counted, recorded_share
    engine._reference_on_onednn = counted_again
    outcomes, doubted, share_of = Counter(), [], {}
    start = time.perf_counter()
    indices = range(0, len(space), args.step)
    for index in indices:
        arch = space.arch(index)
        torch.manual_seed(0)
        model = space.build(arch, num_classes=10)
        checks.clear()
        shares_before = len(shares)
        with engine_warnings() as messages:
            score = gradsign.score(model, x, y)
        share_of[index] = shares[shares_before:]
        if messages:
            outcomes["fallback"] += 1
            print(f"arch {index}: {messages[0]}")
        elif "float64" in checks:
            outcomes["float64 agreement after a float32 doubt"] += 1
            doubted.append((index, model, score))
        elif checks:
            outcomes["agreement with the reference on oneDNN after a float32 doubt"] += 1
            doubted.append((index, model, score))
        else:
            outcomes["float32 agreement"] += 1
    engine._float64_mismatch, engine._sign_disagreement = original, original_share
    engine._reference_on_onednn = original_again
    print(f"{len(indices)} archs (every {args.step}th index), {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{n} {what}" for what, n in outcomes.items()))
    if shares:
        above = sum(share > engine.NOISY_SIGN_SHARE for share in shares)
        noisiest = max((share, index) for index, measured in share_of.items() for share in measured)
        print(f"float32 sign disagreement of the verified sample, batched against alone (every arch the "
              f"verification accepted, after a doubt or not): "
              f"median {100 * statistics.median(shares):.2f}%, largest {100 * noisiest[0]:.2f}% of the counted "
              f"weights (arch {noisiest[1]}); {above} of {len(shares)} above "
              f"{100 * engine.NOISY_SIGN_SHARE:g}% (warned)")
    print("| index | arch | default GradSign | loop GradSign | (default - loop) / loop |")
    print("|---|---|---|---|---|")
    for index, model, score in doubted[:args.compare]:
        loop = gradsign.score(model, x, y, engine="loop")
        print(f"| {index} | {space.arch(index)} | {score:.0f} | {loop:.0f} | {(score - loop) / loop:+.1e} |")


def arch_indices(text: str) -> list[int]:
    """"3500,625" -> [3500, 625] (argparse reports a ValueError as a usage error)."""
    return [int(i) for i in text.split(",")]


def float32_against_float64(space, archs: dict, x: torch.Tensor, y: torch.Tensor) -> None:
    print("| index | default f32 | loop f32 | default f64 | loop f64 | (default f32 - f64) / f64 | (loop f32 - f64) / f64 "
          "| layer with most sign flips: default, loop, of counts |")
    print("|---|---|---|---|---|---|---|---|")
    for index, arch in archs.items():
        torch.manual_seed(0)
        model = space.build(arch, num_classes=10)
        counts = {(engine_name, dtype): sign_counts(copy.deepcopy(model).to(dtype), x.to(dtype), y, F.cross_entropy,
                                                    engine=engine_name)
                  for engine_name in ("auto", "loop") for dtype in (torch.float32, torch.float64)}
        totals = {key: sum(int(c.abs().sum()) for c in value.values()) for key, value in counts.items()}
        exact = counts["auto", torch.float64]
        flips = {name: [int((counts[e, torch.float32][name] != exact[name]).sum()) for e in ("auto", "loop")]
                 for name in exact}
        worst = max(flips, key=lambda name: flips[name][0])
        truth = totals["auto", torch.float64]
        print(f"| {index} | {totals['auto', torch.float32]} | {totals['loop', torch.float32]} | {truth} | "
              f"{totals['loop', torch.float64]} | {(totals['auto', torch.float32] - truth) / truth:+.1e} | "
              f"{(totals['loop', torch.float32] - truth) / truth:+.1e} | {worst}: {flips[worst][0]:,}, "
              f"{flips[worst][1]:,} of {exact[worst].numel():,} |")


if __name__ == "__main__":
    main()
