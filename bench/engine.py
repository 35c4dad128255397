"""Time the per-sample gradient engines against one batched forward+backward, in one process.

Prints, per model: seconds per call (median of --repeats) of the engines (``auto`` is the default one:
``batched`` plus its verification against single-sample gradients) and of one plain batched
forward+backward of the same model and batch, their ratios, each engine's score relative to the loop's, and memory: on CUDA the peak
allocated by each engine's call beyond what the model and batch hold; on CPU the largest per-sample
gradient array the default engine forms at once.

    python bench/engine.py [--batch-size 64] [--repeats 5] [--threads 1] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import gradsign
from gradsign.engine import SLICE_ELEMENTS, counted_layers
from gradsign.zoo import narrow_residual_cnn


def residual_cnn(blocks: int = 16) -> nn.Module:
    """The narrow residual CNN of the model zoo (16/32/64 channels, BatchNorm)."""
    return narrow_residual_cnn(blocks)


def nb201_models() -> dict[str, nn.Module]:
    try:
        from gradsign.spaces import get_space
        space = get_space("nb201")
    except Exception:  # the space is optional for this benchmark
        return {}
    archs = {"nb201-small": "|avg_pool_3x3~0|+|skip_connect~0|none~1|+|none~0|skip_connect~1|nor_conv_1x1~2|",
             "nb201-best": "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|",
             "nb201-largest": "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"}
    return {name: space.build(arch, num_classes=10) for name, arch in archs.items()}


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def median_time(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call, and what the last call returned."""
    result = None

    def timed() -> float:
        nonlocal result
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()  # warm-up
    return statistics.median(timed() for _ in range(repeats)), result


def peak_extra_mib(fn, device: torch.device) -> float:
    """CUDA memory allocated at the peak of ``fn()`` beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def slice_sweep(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, exponents: list[int], args,
                device: torch.device) -> None:
    """Seconds per default-engine score for each slice size, the sizes interleaved over two rounds (median
    of the rounds' medians) so that drifting machine load touches them alike."""
    import gradsign.engine as engine_module

    print(f"default engine, batch {args.batch_size}, {args.threads} torch threads, seconds per score for "
          "SLICE_ELEMENTS = 2^e")
    print("| model | " + " | ".join(f"2^{e}" for e in exponents) + " |")
    print("|---|" + "---|" * len(exponents))
    default = engine_module.SLICE_ELEMENTS
    try:
        for name, model in models.items():
            model.to(device).train()
            rounds: dict[int, list[float]] = {e: [] for e in exponents}
            for _ in range(2):
                for e in exponents:
                    engine_module.SLICE_ELEMENTS = 1 << e
                    rounds[e].append(median_time(lambda: gradsign.score(model, x, y), args.repeats, device)[0])
            print(f"| {name} | " + " | ".join(f"{statistics.median(rounds[e]):.3f}" for e in exponents) + " |")
    finally:
        engine_module.SLICE_ELEMENTS = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--engines", default="auto,batched,vmap,loop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slice-sweep", metavar="EXPONENTS",
                        help="instead: time the default engine with SLICE_ELEMENTS = 2^e for each e (e.g. 17,19,21)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    models = {"resnet16 (16 blocks, BN)": residual_cnn(16), "resnet8 (8 blocks, BN)": residual_cnn(8),
              **nb201_models()}
    if args.slice_sweep:
        return slice_sweep(models, x, y, [int(e) for e in args.slice_sweep.split(",")], args, device)
    engines = args.engines.split(",")
    versus_loop = [e for e in engines if e != "loop"] if "loop" in engines else []
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} torch threads"
    print(f"batch {args.batch_size}, 32x32 inputs, {where}, torch {torch.__version__}, median of {args.repeats}")
    columns = (["model", "params", "fwd+bwd s"] + [f"{e} s" for e in engines] + [f"{e}/fwd+bwd" for e in engines]
               + [f"{e}/loop" for e in versus_loop])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, model in models.items():
        model.to(device).train()
        base, _ = median_time(lambda: forward_backward(model, x, y), args.repeats, device)
        model.zero_grad(set_to_none=True)
        timed = {e: median_time(lambda e=e: gradsign.score(model, x, y, engine=e), args.repeats, device)
                 for e in engines}
        times, scores = {e: t for e, (t, _) in timed.items()}, {e: v for e, (_, v) in timed.items()}
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params:,} | {base:.4f} | " + " | ".join(f"{times[e]:.4f}" for e in engines)
              + " | " + " | ".join(f"{times[e] / base:.2f}x" for e in engines)
              + "".join(f" | {times[e] / times['loop']:.2f}" for e in versus_loop) + " |")
        if "loop" in scores:
            print("|   GradSign relative to the loop's: " + ", ".join(
                f"{e} {(scores[e] - scores['loop']) / abs(scores['loop']):+.1e}" for e in versus_loop) + " |")
        if device.type == "cuda":
            memory = {"fwd+bwd": peak_extra_mib(lambda: forward_backward(model, x, y), device)}
            model.zero_grad(set_to_none=True)
            memory.update({e: peak_extra_mib(lambda e=e: gradsign.score(model, x, y, engine=e), device)
                           for e in engines})
            print("|   peak CUDA memory beyond model and batch: "
                  + ", ".join(f"{k} {v:.0f} MiB" for k, v in memory.items()) + " |")
        else:
            # layers called once form their per-sample gradients in slices of SLICE_ELEMENTS floats
            slices = [(min(args.batch_size, max(1, SLICE_ELEMENTS // m.weight.numel())), m.weight.numel())
                      for _, m in counted_layers(model)]
            samples, numel = max(slices, key=lambda s: s[0] * s[1])
            print(f"|   largest per-sample gradient array formed at once: {samples} x {numel:,} floats "
                  f"= {samples * numel * 4 / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
