"""How often the default engine's float32 verification doubts on the model zoo, and what a doubt costs.

The verification compares the batched per-sample gradients of one sample with its single-sample gradients;
where some weight's largest difference exceeds ``FLOAT32_TOLERANCE`` of its scale (its largest gradient,
at least ``NOISE_FLOOR`` of the sample's largest), the engine computes the single-sample gradients again
with the convolutions on oneDNN, as the batched pass ran them (``engine._ConvolutionsOnOneDNN``), and
compares again; where that still differs, it settles the doubt in float64 (about one more
forward+backward on the models that doubt). Which models doubt depends on the batch: for each zoo model
("bench" size, batch 32, weights seed 0) and each batch seed 1..``--seeds``, one ``gradsign.score`` call
(after a warm-up on seed 1) records the float32 difference ratio of the first comparison and of the
second (largest over the counted weights of difference / scale, so that above 1 is a doubt), whether
the float64 check ran, and the call's seconds as a ratio to one plain batched forward+backward (median of
``--repeats``, seed 1).

    python bench/doubts.py [--seeds 8] [--models a,b] [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

import gradsign
from gradsign import engine, zoo

from zoo import forward_backward  # bench/zoo.py: the plain forward+backward it times


def difference_ratio(batched: dict[str, torch.Tensor], reference: list[dict[str, torch.Tensor | None]]) -> float:
    """The float32 verification's measure (``engine._first_mismatch``) as a ratio to its tolerance:
    largest over the counted weights of max |batched - single| / (tolerance * scale)."""
    worst = 0.0
    for i, single in enumerate(reference):
        grads = {name: g for name, g in single.items() if g is not None}
        largest = max(map(engine._largest_magnitude, grads.values()), default=0.0)
        for name, grad in grads.items():
            row = batched[name][i] if name in batched else None
            error, scale = engine._largest_difference(row, grad, engine.NOISE_FLOOR * largest)
            if scale:
                worst = max(worst, error / (engine.FLOAT32_TOLERANCE * scale))
    return worst


def one_score(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
              ) -> tuple[float, float | None, bool, float]:
    """(float32 difference ratio, that of the comparison with the oneDNN reference (None where there was
    none), whether the float64 check ran, seconds) of one ``gradsign.score``."""
    ratios, checks = [], []
    first_mismatch, float64_mismatch = engine._first_mismatch, engine._float64_mismatch

    def measured(batched, reference, tolerance):
        if tolerance == engine.FLOAT32_TOLERANCE:
            ratios.append(difference_ratio(batched, reference))
        return first_mismatch(batched, reference, tolerance)

    def counted(*args, **kwargs):
        checks.append(True)
        return float64_mismatch(*args, **kwargs)

    engine._first_mismatch, engine._float64_mismatch = measured, counted
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            gradsign.score(model, x, y)
            seconds = time.perf_counter() - start
    finally:
        engine._first_mismatch, engine._float64_mismatch = first_mismatch, float64_mismatch
    return (ratios[0] if ratios else float("nan")), (ratios[1] if len(ratios) > 1 else None), bool(checks), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8, help="batch seeds 1..SEEDS")
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="plain forward+backward calls timed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else zoo.names()
    print(f"batch 32, {args.threads} torch threads, batch seeds 1-{args.seeds}; ratio: float32 difference / "
          f"tolerance ({engine.FLOAT32_TOLERANCE:g}); above 1 the reference is computed again on oneDNN, and where "
          "that ratio is above 1 too, the float64 check runs")
    print("| model | fwd+bwd ms | doubting seeds | largest ratio (seed) | median ratio | on oneDNN: largest ratio "
          "| float64 checks | default/fwd+bwd without float64 | with float64 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        model = zoo.build(name, "bench", 0)
        batches = [zoo.example_batch(name, 32, "bench", seed) for seed in range(1, args.seeds + 1)]
        plain_model = engine.scoring_mode(copy.deepcopy(model)).requires_grad_(True)
        plain = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            forward_backward(plain_model, *batches[0])
            plain.append(time.perf_counter() - start)
        fwd_bwd = statistics.median(plain[1:])
        one_score(model, *batches[0])
        rows = [one_score(model, x, y) for x, y in batches]
        checked = [seconds for _, _, float64, seconds in rows if float64]
        clear = [seconds for _, _, float64, seconds in rows if not float64]
        ratios = [ratio for ratio, _, _, _ in rows]
        again = [ratio for _, ratio, _, _ in rows if ratio is not None]
        worst = max(range(len(rows)), key=lambda i: ratios[i])

        def cell(seconds: list[float]) -> str:
            return f"{statistics.median(seconds) / fwd_bwd:.2f}x" if seconds else "-"

        print(f"| {name} | {fwd_bwd * 1e3:.1f} | {sum(r > 1 for r in ratios)} of {len(rows)} "
              f"| {ratios[worst]:.2g} ({worst + 1}) | {statistics.median(ratios):.2g} "
              f"| {f'{max(again):.2g}' if again else '-'} | {len(checked)} of {len(rows)} | {cell(clear)} "
              f"| {cell(checked)} |", flush=True)


if __name__ == "__main__":
    main()
