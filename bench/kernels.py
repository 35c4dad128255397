"""Time the engine's ways of forming a Conv2d's per-sample weight gradients, per layer shape.

For each shape (batch 64): the batched weight gradient (what one backward computes for the layer), the
grouped weight-gradient convolution, the unfold + batched matrix product (per sample and group, written
into a reused buffer as the engine does) and the forward convolution of inputs with output gradients
(depthwise layers), each followed by the sign reduction the engine does, in the engine's cache-sized slices. Prints ratios to the batched weight
gradient and which way the engine's rules (``gradsign.engine._use_matmul``,
``gradsign.engine._use_forward_convolution``) pick, so the rules can be checked on a new machine.

    python bench/kernels.py [--threads N] [--repeats 7] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradsign import engine

#: (in channels, out channels, kernel, input size, stride, groups): layers of NB201, the narrow residual
#: CNN, NB101 (128-512 channels), the zoo's stems, its wide layers on small maps and its depthwise layers
SHAPES = [
    (3, 16, 3, 32, 1, 1), (16, 16, 3, 32, 1, 1), (16, 16, 1, 32, 1, 1), (32, 32, 3, 16, 1, 1),
    (32, 32, 1, 16, 1, 1), (64, 64, 3, 8, 1, 1), (64, 64, 1, 8, 1, 1), (16, 32, 3, 32, 2, 1),
    (32, 64, 3, 16, 2, 1), (128, 128, 3, 32, 1, 1), (128, 128, 1, 32, 1, 1), (256, 256, 3, 16, 1, 1),
    (512, 512, 3, 8, 1, 1), (512, 512, 1, 8, 1, 1), (64, 128, 3, 16, 1, 1), (128, 256, 3, 8, 1, 1),
    (128, 128, 3, 4, 1, 1), (256, 256, 3, 4, 1, 1), (256, 256, 3, 2, 1, 1), (128, 256, 3, 4, 2, 1),
    (32, 32, 3, 16, 1, 32), (96, 96, 3, 16, 2, 96), (480, 480, 3, 4, 1, 480), (32, 32, 7, 16, 1, 32),
    (128, 128, 7, 4, 1, 128), (144, 144, 5, 8, 1, 144), (384, 384, 3, 2, 1, 24), (192, 192, 3, 4, 1, 12),
    (96, 96, 3, 8, 1, 6), (384, 384, 3, 2, 1, 384), (256, 256, 3, 8, 1, 1),
]
#: the engine's rules, each forced in turn: (name, rule the way replaces, layers it applies to)
WAYS = [("grouped", None, lambda conv: True),
        ("matmul", "_use_matmul", lambda conv: True),
        ("forward", "_use_forward_convolution", lambda conv: conv.groups == conv.in_channels == conv.out_channels)]
RULES = ("_use_matmul", "_use_forward_convolution")


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_sample_signs(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, way: str) -> torch.Tensor:
    """The engine's per-sample gradient and sign reduction with one of its ways forced."""
    counts = torch.zeros_like(conv.weight)  # float32 sums of signs, as the engine keeps them per chunk
    step = max(1, engine.SLICE_ELEMENTS // conv.weight.numel())
    forced = dict((name, rule) for name, rule, _ in WAYS)[way]
    originals = {rule: getattr(engine, rule) for rule in RULES}
    for rule in RULES:
        setattr(engine, rule, lambda *args, on=rule == forced: on)
    scratch = torch.empty(step * conv.weight.numel())
    try:
        for part in engine._chunks(len(x), step):
            grads = engine._conv2d_sample_grads(conv, x[part], grad_out[part], scratch)
            counts += torch.sign(grads, out=grads).sum(0)
    finally:
        for rule, original in originals.items():
            setattr(engine, rule, original)
    return counts.to(torch.int32)


def picked_way(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> str:
    if engine._use_forward_convolution(conv, x, grad_out):
        return "forward"
    return "matmul" if engine._use_matmul(conv, x, grad_out) else "grouped"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch_size}, {torch.get_num_threads()} threads; seconds are medians of {args.repeats}")
    print("| in | out | kernel | size | stride | groups | batched dW (ms) | grouped / dW | matmul / dW | "
          "forward / dW | rule picks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cin, cout, k, size, stride, groups in SHAPES:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        x = torch.randn(args.batch_size, cin, size, size)
        grad_out = torch.randn(args.batch_size, cout, *conv(x[:1]).shape[2:])
        batched = median_seconds(lambda: torch.nn.grad.conv2d_weight(
            x, conv.weight.shape, grad_out, stride=conv.stride, padding=conv.padding, groups=groups), args.repeats)
        cells, reference = [], None
        for way, _, applies in WAYS:
            if not applies(conv):
                cells.append("-")
                continue
            counts = per_sample_signs(conv, x, grad_out, way)
            reference = counts if reference is None else reference
            differing = int((counts - reference).abs().sum())
            if differing > 1e-4 * int(reference.abs().sum()):
                raise SystemExit(f"{way} disagrees with grouped beyond float noise on {cin}x{cout} k{k}: {differing}")
            seconds = median_seconds(lambda: per_sample_signs(conv, x, grad_out, way), args.repeats)
            cells.append(f"{seconds / batched:.2f}")
        print(f"| {cin} | {cout} | {k} | {size} | {stride} | {groups} | {batched * 1e3:.2f} | {' | '.join(cells)} | "
              f"{picked_way(conv, x, grad_out)} |")


if __name__ == "__main__":
    main()
