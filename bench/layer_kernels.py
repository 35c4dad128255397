"""Time the engine's ways of forming a Conv2d's per-sample weight gradients, per layer shape.

For each shape (batch 64): the batched weight gradient (what one backward computes for the layer), the
grouped weight-gradient convolution, the unfold + batched matrix product (per sample and group, written
into a reused buffer as the engine does) and the forward convolution of inputs with output gradients
(depthwise layers and those on at most 16 input channels), each followed by the sign reduction the engine
does, in the engine's cache-sized slices. Prints ratios to the batched weight gradient and which way the
engine's rules (``gradsign.engine._use_matmul``, ``gradsign.engine._use_forward_convolution``) pick, so
the rules can be checked on a new machine; for float32 stems on few channels with kernels above 3x3, also
each sample's weight-gradient convolution alone (``gradsign.engine._use_sample_by_sample``).

``--products``: per-sample gradients that are products a_n b_n over ``depth`` positions or rows per sample
(a Linear on tokens, an unfolded convolution), (out x depth) (depth x in): formed sample slice by sample
slice (batched product, signs, sum, added to the chunk's counts) against the engine's
``_add_product_signs`` done by torch (slices of the larger of out and in for all samples at once) and by
the fused loop of ``gradsign.sign_kernels`` (where numba is installed; one torch thread), each as a ratio
to the batched weight gradient; ``SHALLOW_PRODUCT_DEPTH`` says which the engine uses. The fused loop's
counts are checked against torch's in float64 (in float32 they differ by rounding).

``--unfold``: torch's ``F.unfold`` against the engine's ``_unfolded`` (one strided copy), which the matrix
products take their inputs from.

``--norms``: a BatchNorm applied to each sample alone, forward and backward, on the zoo's, NB201's and the
narrow residual CNN's map shapes: ``F.instance_norm`` against group normalisation with a group per channel
(the two ways ``engine._PerSampleNorm`` has; ``FEW_NORM_POSITIONS`` says where it takes which), whose
float64 outputs and input gradients must agree to 1e-12 of their largest; and group normalisation on the
same maps laid out channels-last against NCHW (the engine normalises channels-last maps from an NCHW copy).

``--small-maps``: convolutions on 2x2 and 4x4 maps (ResNet's, RegNetX's grouped ones), one call's sign
counts as the engine forms them (``_add_shallow_conv_signs``: channels-last windows into the fused loop,
grouped layers a compiled call for all groups) against the way before it (ungrouped: ``F.unfold``'s
columns copied transposed into the loop; grouped: per-sample-and-group products, signs and sums), whose
float64 counts must be equal; batch 32 is the zoo's.

``--depthwise``: the zoo's depthwise layers, their maps laid out as torch leaves them (NCHW) and
channels-last (as ConvNeXt's are): the engine's torch way (the one its rules pick, then signs and sum)
against the depthwise loop of ``gradsign.sign_kernels`` (numba; copying both maps channels-last where
they are not), whose float64 counts must equal the torch way's; ``depthwise_available`` says which the
engine uses.

    python bench/layer_kernels.py [--threads N] [--repeats 7] [--batch-size 64] [--stems | --products |
                                   --unfold | --depthwise | --norms | --small-maps]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gradsign import engine, sign_kernels

#: (in channels, out channels, kernel, input size, stride, groups): layers of NB201, the narrow residual
#: CNN, NB101 (128-512 channels), the zoo's stems (and at 224x224; patch embeddings padded here), its wide
#: layers on small maps and its depthwise layers, and convolutions on 1-8 input channels
SHAPES = [
    (3, 16, 3, 32, 1, 1), (16, 16, 3, 32, 1, 1), (16, 16, 1, 32, 1, 1), (32, 32, 3, 16, 1, 1),
    (32, 32, 1, 16, 1, 1), (64, 64, 3, 8, 1, 1), (64, 64, 1, 8, 1, 1), (16, 32, 3, 32, 2, 1),
    (32, 64, 3, 16, 2, 1), (128, 128, 3, 32, 1, 1), (128, 128, 1, 32, 1, 1), (256, 256, 3, 16, 1, 1),
    (512, 512, 3, 8, 1, 1), (512, 512, 1, 8, 1, 1), (64, 128, 3, 16, 1, 1), (128, 256, 3, 8, 1, 1),
    (128, 128, 3, 4, 1, 1), (256, 256, 3, 4, 1, 1), (256, 256, 3, 2, 1, 1), (128, 256, 3, 4, 2, 1),
    (32, 32, 3, 16, 1, 32), (96, 96, 3, 16, 2, 96), (480, 480, 3, 4, 1, 480), (32, 32, 7, 16, 1, 32),
    (128, 128, 7, 4, 1, 128), (144, 144, 5, 8, 1, 144), (384, 384, 3, 2, 1, 24), (192, 192, 3, 4, 1, 12),
    (96, 96, 3, 8, 1, 6), (384, 384, 3, 2, 1, 384), (256, 256, 3, 8, 1, 1), (3, 32, 7, 64, 2, 1),
    (3, 32, 3, 64, 2, 1), (1, 16, 3, 32, 1, 1), (4, 16, 3, 32, 1, 1), (6, 16, 3, 32, 1, 1), (8, 16, 3, 32, 1, 1),
    (3, 24, 3, 224, 2, 1), (3, 64, 7, 224, 2, 1), (3, 96, 4, 64, 4, 1), (3, 128, 8, 64, 8, 1),
    (3, 32, 7, 32, 2, 1), (3, 32, 5, 64, 2, 1), (1, 32, 7, 32, 1, 1), (1, 32, 5, 64, 1, 1), (3, 64, 7, 128, 2, 1),
]
#: the engine's rules, each forced in turn: (name, rule the way replaces, layers it applies to)
WAYS = [("grouped", None, lambda conv: True),
        ("matmul", "_use_matmul", lambda conv: True),
        ("forward", "_use_forward_convolution",
         lambda conv: conv.groups == conv.in_channels == conv.out_channels
         or (conv.groups == 1 and conv.in_channels <= 16)),
        ("sample by sample", "_use_sample_by_sample",
         lambda conv: conv.groups == 1 and conv.in_channels <= 16 and conv.kernel_size[0] * conv.kernel_size[1] > 9)]
RULES = ("_use_matmul", "_use_forward_convolution", "_use_sample_by_sample")
#: (out, in, depth): the zoo's Linear layers on 4 and 16 tokens (ConvNeXt's last stages), 3x3
#: convolutions on 2x2 and 4x4 maps (ResNet's), a Linear on 65 tokens (ViT) and on 256 (ConvNeXt's first
#: stage); RegNetX's 1x1 layers on 2x2 maps; convolutions on 3x3 and 2x3 maps (depth 9 and 6)
PRODUCTS = [(256, 1024, 4), (1024, 256, 4), (256, 2304, 4), (384, 384, 4), (128, 1152, 16), (512, 128, 16),
            (128, 512, 16), (64, 576, 9), (64, 576, 6), (64, 576, 64), (512, 512, 65), (128, 32, 256),
            (384, 96, 256)]


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
    if engine._use_sample_by_sample(conv, x, grad_out):
        return "sample by sample"
    if engine._use_forward_convolution(conv, x, grad_out):
        return "forward"
    return "matmul" if engine._use_matmul(conv, x, grad_out) else "grouped"


def product_signs_by_samples(hooks: engine._SignCountHooks, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sign counts of the products a_n b_n formed a slice of samples at a time, each slice's signs summed
    and added to the chunk's counts (``_SignCountHooks._add_signs``)."""
    hooks.totals["w"] = a.new_zeros(a.shape[1], b.shape[2])
    step = max(1, engine.SLICE_ELEMENTS // (a.shape[1] * b.shape[2]))
    scratch = a.new_empty(step * a.shape[1] * b.shape[2])
    for part in engine._chunks(len(a), step):
        out = scratch[:(part.stop - part.start) * a.shape[1] * b.shape[2]].view(-1, a.shape[1], b.shape[2])
        hooks._add_signs("w", torch.bmm(a[part], b[part], out=out), part.start)
    return hooks.totals.pop("w")


def product_signs_shallow(hooks: engine._SignCountHooks, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``_add_product_signs`` as torch does it (the fused loop switched off)."""
    hooks.totals["w"] = a.new_zeros(a.shape[1], b.shape[2])
    original, engine.fused_available = engine.fused_available, lambda a: False
    try:
        hooks._add_product_signs("w", a, b, torch.Size((a.shape[1], b.shape[2])))
    finally:
        engine.fused_available = original
    return hooks.totals.pop("w")


def product_signs_fused(hooks: engine._SignCountHooks, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The fused loop, into a buffer reused from call to call as the engine's hooks reuse theirs."""
    totals = a.new_zeros(a.shape[1], b.shape[2])
    sign_kernels.add_product_signs(a, b, totals, hooks._scratch(sign_kernels.scratch_elements(a, b, totals), a,
                                                                "fused"))
    return totals


def products(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    fused = sign_kernels.loops_available()
    if fused:  # compiled on first use, or read from numba's cache
        hooks = engine._SignCountHooks([], {}, None, engine._CallShapes())
        product_signs_fused(hooks, torch.ones(1, 1, 1), torch.ones(1, 1, 1))
        print(f"fused loop: yes (its first call in this process: {time.perf_counter() - start:.2f} s)")
    else:
        print("fused loop: no (numba is not installed)")
    print("| out | in | depth | batched dW (ms) | by samples / dW | shallow / dW | fused / dW | engine uses |")
    print("|---|---|---|---|---|---|---|---|")
    for out, inp, depth in PRODUCTS:
        torch.manual_seed(0)
        grad_out, x = torch.randn(args.batch_size, depth, out), torch.randn(args.batch_size, depth, inp)
        a = grad_out.transpose(1, 2)
        hooks = engine._SignCountHooks([], {}, None, engine._CallShapes())
        batched = median_seconds(lambda: grad_out.reshape(-1, out).t() @ x.reshape(-1, inp), args.repeats)
        if not torch.equal(product_signs_by_samples(hooks, a, x), product_signs_shallow(hooks, a, x)):
            raise SystemExit(f"the two ways disagree on {out}x{inp}, depth {depth}")
        ways = [product_signs_by_samples, product_signs_shallow]
        if fused:
            if not torch.equal(product_signs_fused(hooks, a.double(), x.double()),
                               product_signs_shallow(hooks, a.double(), x.double())):
                raise SystemExit(f"the fused loop disagrees in float64 on {out}x{inp}, depth {depth}")
            ways.append(product_signs_fused)
        cells = [median_seconds(lambda: way(hooks, a, x), args.repeats) / batched for way in ways]
        cells += [float("nan")] * (3 - len(cells))
        shallow = depth <= engine.SHALLOW_PRODUCT_DEPTH
        uses = ("fused" if engine.fused_available(a) else "shallow") if shallow else "by samples"
        print(f"| {out} | {inp} | {depth} | {batched * 1e3:.2f} | {cells[0]:.2f} | {cells[1]:.2f} | {cells[2]:.2f} "
              f"| {uses} |")


#: (in channels, kernel, map size, stride) of convolutions whose inputs the engine unfolds (matrix products
#: and shallow products): NB201's and the zoo's layers from 32x32 down to 2x2 maps
UNFOLDS = [(16, 3, 32, 1), (32, 3, 16, 1), (64, 3, 8, 1), (16, 3, 32, 2), (32, 3, 16, 2), (128, 3, 4, 1),
           (256, 3, 2, 1), (64, 5, 8, 1), (64, 3, 8, 2)]


def unfolds(args: argparse.Namespace) -> None:
    """``F.unfold`` (torch's im2col) against ``engine._unfolded`` (the engine's), which must agree exactly."""
    print("| in | kernel | size | stride | F.unfold (ms) | engine's (ms) | engine's / F.unfold |")
    print("|---|---|---|---|---|---|---|")
    for cin, k, size, stride in UNFOLDS:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cin, k, stride, k // 2, bias=False)
        x = torch.randn(args.batch_size, cin, size, size)
        out_size = conv(x[:1]).shape[2:]
        plain = median_seconds(lambda: torch.nn.functional.unfold(x, k, padding=k // 2, stride=stride), args.repeats)
        ours = median_seconds(lambda: engine._unfolded(x, conv, conv.padding, out_size), args.repeats)
        if not torch.equal(engine._unfolded(x, conv, conv.padding, out_size),
                           torch.nn.functional.unfold(x, k, padding=k // 2, stride=stride)):
            raise SystemExit(f"the engine's unfolding differs from F.unfold on {cin} channels, {size}x{size}")
        print(f"| {cin} | {k} | {size} | {stride} | {plain * 1e3:.3f} | {ours * 1e3:.3f} | {ours / plain:.2f} |")


#: (in, out, input size, stride, groups): ResNet's 3x3 layers on 4x4 and 2x2 maps, RegNetX's grouped ones
SMALL_MAPS = [(128, 128, 4, 1, 1), (256, 256, 2, 1, 1), (64, 128, 8, 2, 1), (128, 256, 4, 2, 1),
              (384, 384, 2, 1, 24), (384, 384, 4, 2, 24)]


def small_map_counts(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, way: str) -> torch.Tensor:
    """One call's sign counts by the engine's hooks (``way`` "engine") or by the way before this engine's
    channels-last windows and grouped loop ("before")."""
    totals = {"w": torch.zeros_like(conv.weight)}
    hooks = engine._SignCountHooks([], totals, None, engine._CallShapes())
    hooks.samples = len(x)
    if way == "engine":
        if not hooks._add_shallow_conv_signs("w", conv, x, grad_out):
            raise SystemExit(f"the engine does not take {tuple(conv.weight.shape)} on {tuple(x.shape)} as a small map")
    elif conv.groups == 1:
        padded, padding = engine._padded_input(conv, x)
        rows, columns = engine._conv2d_factors(conv, padded, grad_out, padding)
        hooks._add_product_signs("w", rows, columns.transpose(1, 2), conv.weight.shape)
    else:
        hooks._add_signs("w", engine._sample_grads(conv, x, grad_out, len(x)), 0)
    return totals["w"]


def small_maps(args: argparse.Namespace) -> None:
    if not sign_kernels.loops_available():
        raise SystemExit("--small-maps times the fused loop, which needs numba (pip install gradsign[fast])")
    print("| in | out | size | stride | groups | before (ms) | engine (ms) | engine / before |")
    print("|---|---|---|---|---|---|---|---|")
    for cin, cout, size, stride, groups in SMALL_MAPS:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)
        x = torch.randn(args.batch_size, cin, size, size)
        grad_out = torch.randn_like(conv(x))
        exact = [small_map_counts(conv.double(), x.double(), grad_out.double(), way) for way in ("before", "engine")]
        if not torch.equal(*exact):
            raise SystemExit(f"the two ways' float64 counts differ on {cin} -> {cout} channels, {size}x{size}")
        conv.float()
        before, ours = (median_seconds(lambda way=way: small_map_counts(conv, x, grad_out, way), args.repeats)
                        for way in ("before", "engine"))
        print(f"| {cin} | {cout} | {size} | {stride} | {groups} | {before * 1e3:.3f} | {ours * 1e3:.3f} | "
              f"{ours / before:.2f} |")


#: (channels, kernel, input size, stride): ConvNeXt's 7x7 layers, MobileNetV2's, EfficientNet's and
#: MobileViT's 3x3 and 5x5 ones
DEPTHWISE = [(32, 7, 16, 1), (64, 7, 8, 1), (128, 7, 4, 1), (256, 7, 2, 1), (16, 3, 32, 1), (32, 3, 32, 1),
             (96, 3, 16, 2), (144, 3, 16, 1), (144, 5, 8, 1), (192, 3, 8, 2), (480, 3, 4, 1), (384, 3, 2, 1)]


def depthwise(args: argparse.Namespace) -> None:
    """The depthwise loop against the engine's torch way (see the module docstring)."""
    if not sign_kernels.loops_available():
        raise SystemExit("the depthwise loop needs numba (pip install gradsign[fast])")
    print("| channels | kernel | size | stride | layout | torch way (ms) | loop (ms) | loop / torch | engine uses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for channels, k, size, stride in DEPTHWISE:
        for layout in (torch.contiguous_format, torch.channels_last):
            torch.manual_seed(0)
            conv = nn.Conv2d(channels, channels, k, stride, k // 2, groups=channels, bias=False)
            x = torch.randn(args.batch_size, channels, size, size).contiguous(memory_format=layout)
            grad_out = torch.randn(args.batch_size, channels, *conv(x[:1]).shape[2:]).contiguous(memory_format=layout)
            way = picked_way(conv, x, grad_out)

            def loop(conv=conv, x=x, grad_out=grad_out):
                counts = torch.zeros_like(conv.weight)
                sign_kernels.add_depthwise_signs(conv, x, grad_out, counts, conv.padding)
                return counts.to(torch.int32)

            ours = median_seconds(loop, args.repeats)
            theirs = median_seconds(lambda: per_sample_signs(conv, x, grad_out, way), args.repeats)
            conv.double()
            if not torch.equal(loop(conv, x.double(), grad_out.double()),
                               per_sample_signs(conv, x.double(), grad_out.double(), way)):
                raise SystemExit(f"the depthwise loop's counts differ from torch's: {channels} channels, {size}x{size}")
            uses = "loop" if sign_kernels.depthwise_available(conv, x, grad_out) else way
            name = "channels-last" if layout == torch.channels_last else "NCHW"
            print(f"| {channels} | {k} | {size} | {stride} | {name} | {theirs * 1e3:.3f} | {ours * 1e3:.3f} | "
                  f"{ours / theirs:.2f} | {uses} |")


#: (channels, map size): BatchNorm inputs of the zoo's CNNs at 64x64 (32x32 down to 2x2 maps), NB201's
#: and the narrow residual CNN's (16-64 channels, 32x32 to 8x8)
NORMS = [(16, 32), (32, 32), (48, 32), (32, 16), (96, 16), (64, 8), (144, 8), (128, 4), (288, 4), (256, 2),
         (480, 2), (1024, 2)]


def per_sample_norm(way: str, bn: nn.BatchNorm2d, x: torch.Tensor, grad_out: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input gradient of ``bn`` applied to each sample of ``x`` alone, by instance or group
    normalisation (``x`` and ``grad_out`` as laid out by the caller)."""
    x = x.detach().requires_grad_(True)
    if way == "instance":
        out = nn.functional.instance_norm(x, weight=bn.weight, bias=bn.bias, use_input_stats=True, eps=bn.eps)
    else:
        out = nn.functional.group_norm(x, x.shape[1], bn.weight, bn.bias, bn.eps)
    out.backward(grad_out)
    return out.detach(), x.grad


def norms(args: argparse.Namespace) -> None:
    """Per-sample BatchNorm by instance against group normalisation (see the module docstring)."""
    print("| channels | size | instance norm (ms) | group norm (ms) | group / instance | group norm on channels-last "
          "maps / on NCHW | engine uses |")
    print("|---|---|---|---|---|---|---|")
    for channels, size in NORMS:
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(channels)
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
        x = torch.randn(args.batch_size, channels, size, size)
        grad_out = torch.randn_like(x)
        instance = median_seconds(lambda: per_sample_norm("instance", bn, x, grad_out), args.repeats)
        group = median_seconds(lambda: per_sample_norm("group", bn, x, grad_out), args.repeats)
        last = [t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out)]
        group_last = median_seconds(lambda: per_sample_norm("group", bn, *last), args.repeats)
        bn.double()
        wide = [per_sample_norm(way, bn, x.double(), grad_out.double()) for way in ("instance", "group")]
        if not all(torch.allclose(a, b, rtol=0, atol=1e-12 * float(a.abs().max())) for a, b in zip(*wide)):
            raise SystemExit(f"group and instance normalisation differ on {channels} channels, {size}x{size}")
        uses = "group" if size * size > engine.FEW_NORM_POSITIONS else "instance"
        print(f"| {channels} | {size}x{size} | {instance * 1e3:.3f} | {group * 1e3:.3f} | {group / instance:.2f} | "
              f"{group_last / group:.2f} | {uses} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--products", action="store_true", help="time the two ways of forming product signs")
    parser.add_argument("--unfold", action="store_true", help="time torch's unfolding against the engine's")
    parser.add_argument("--depthwise", action="store_true", help="time the depthwise loop against the torch way")
    parser.add_argument("--norms", action="store_true", help="time per-sample BatchNorm's two ways")
    parser.add_argument("--stems", action="store_true", help=f"only the layers on fewer than {engine.FEW_INPUT_CHANNELS} input channels")
    parser.add_argument("--small-maps", action="store_true",
                        help="time the engine's counts on 2x2 and 4x4 maps against the way before")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch_size}, {torch.get_num_threads()} threads; seconds are medians of {args.repeats}")
    if args.products:
        products(args)
        return
    if args.unfold:
        unfolds(args)
        return
    if args.depthwise:
        depthwise(args)
        return
    if args.norms:
        norms(args)
        return
    if args.small_maps:
        small_maps(args)
        return
    print("| in | out | kernel | size | stride | groups | batched dW (ms) | grouped / dW | matmul / dW | "
          "forward / dW | sample by sample / dW | rule picks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cin, cout, k, size, stride, groups in SHAPES:
        if args.stems and cin >= engine.FEW_INPUT_CHANNELS:
            continue
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
