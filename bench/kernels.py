"""Time the engine's two ways of forming a Conv2d's per-sample weight gradients, per layer shape.

For each shape (batch 64): the batched weight gradient (what one backward computes for the layer), the
grouped weight-gradient convolution and the unfold + batched matrix product, each followed by the sign
reduction the engine does, in the engine's cache-sized slices. Prints ratios to the batched weight
gradient and which way the engine's rule (``gradsign.engine._use_matmul``) picks, so the rule can be
checked on a new machine.

    python bench/kernels.py [--threads N] [--repeats 7] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradsign import engine

#: (in channels, out channels, kernel, input size, stride): layers of NB201, the narrow residual CNN,
#: NB101 (128-512 channels) and the zoo's stems
SHAPES = [
    (3, 16, 3, 32, 1), (16, 16, 3, 32, 1), (16, 16, 1, 32, 1), (32, 32, 3, 16, 1), (32, 32, 1, 16, 1),
    (64, 64, 3, 8, 1), (64, 64, 1, 8, 1), (16, 32, 3, 32, 2), (32, 64, 3, 16, 2),
    (128, 128, 3, 32, 1), (128, 128, 1, 32, 1), (256, 256, 3, 16, 1), (512, 512, 3, 8, 1),
    (512, 512, 1, 8, 1), (64, 128, 3, 16, 1), (128, 256, 3, 8, 1), (256, 256, 3, 4, 1),
]


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_sample_signs(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, matmul: bool) -> torch.Tensor:
    """The engine's per-sample gradient and sign reduction with one of the two kernels forced."""
    counts = torch.zeros_like(conv.weight, dtype=torch.int32)
    step = max(1, engine.SLICE_ELEMENTS // conv.weight.numel())
    original = engine._use_matmul
    engine._use_matmul = lambda *args: matmul
    try:
        for part in engine._chunks(len(x), step):
            grads = engine._conv2d_sample_grads(conv, x[part], grad_out[part])
            counts += torch.sign(grads).sum(0, dtype=torch.int32)
    finally:
        engine._use_matmul = original
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch_size}, {torch.get_num_threads()} threads; seconds are medians of {args.repeats}")
    print("| in | out | kernel | size | stride | batched dW (ms) | grouped / dW | matmul / dW | rule picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cin, cout, k, size, stride in SHAPES:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        x = torch.randn(args.batch_size, cin, size, size)
        grad_out = torch.randn(args.batch_size, cout, *conv(x[:1]).shape[2:])
        batched = median_seconds(lambda: torch.nn.grad.conv2d_weight(
            x, conv.weight.shape, grad_out, stride=conv.stride, padding=conv.padding), args.repeats)
        grouped = median_seconds(lambda: per_sample_signs(conv, x, grad_out, False), args.repeats)
        matmul = median_seconds(lambda: per_sample_signs(conv, x, grad_out, True), args.repeats)
        by_conv, by_matmul = (per_sample_signs(conv, x, grad_out, m) for m in (False, True))
        differing = int((by_conv - by_matmul).abs().sum())
        if differing > 1e-4 * int(by_conv.abs().sum()):
            raise SystemExit(f"kernels disagree beyond float noise on {cin}x{cout} k{k}: {differing}")
        picks = "matmul" if engine._use_matmul(conv, x, grad_out) else "grouped"
        print(f"| {cin} | {cout} | {k} | {size} | {stride} | {batched * 1e3:.2f} | {grouped / batched:.2f} | "
              f"{matmul / batched:.2f} | {picks} |")


if __name__ == "__main__":
    main()
