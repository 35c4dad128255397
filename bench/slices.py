"""The batched engine's pass (no verification) at several slice sizes, against one forward+backward.

For each zoo model ("bench" size, batch 32, weights seed 0, batch seed 1): the seconds of
``gradsign.engine``'s batched sign counting with ``SLICE_ELEMENTS`` set to each of 2^17..2^23 floats,
divided by one batched forward+backward of the same model, all interleaved over ``--repeats`` rounds
(medians after the first round), so the slice size in ``gradsign.engine.SLICE_ELEMENTS`` can be checked
on a new machine.

    python bench/slices.py [--threads 1] [--repeats 5] [--models resnet,convnext,...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gradsign import engine, zoo
from gradsign.api import _OutputAdapter, default_output

EXPONENTS = (17, 19, 21, 23)
MODELS = ("resnet", "convnext", "regnet", "efficientnet", "resnet16_narrow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch 32, {args.threads} torch threads; batched pass / forward+backward, median of {args.repeats - 1}")
    print("| model | fwd+bwd s | " + " | ".join(f"2^{e}" for e in EXPONENTS) + " |")
    print("|---|---|" + "---|" * len(EXPONENTS))
    for name in args.models.split(","):
        model = engine.scoring_mode(_OutputAdapter(zoo.build(name, "bench", 0), default_output))
        x, y = zoo.example_batch(name, 32, "bench", 1)
        layers = engine.counted_layers(model)

        def forward_backward() -> None:
            model.requires_grad_(True)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        def batched_pass() -> None:
            form = engine.BatchedForm(model)
            engine._batched_counts(model, x, y, F.cross_entropy, layers, None)
            form.undo()

        times: dict[object, list[float]] = {}
        for _ in range(args.repeats):
            for exponent in (None, *EXPONENTS):
                if exponent is not None:
                    engine.SLICE_ELEMENTS = 1 << exponent
                start = time.perf_counter()
                (forward_backward if exponent is None else batched_pass)()
                times.setdefault(exponent, []).append(time.perf_counter() - start)
        medians = {k: statistics.median(v[1:]) for k, v in times.items()}
        base = medians.pop(None)
        print(f"| {name} | {base:.3f} | " + " | ".join(f"{medians[e] / base:.2f}x" for e in EXPONENTS) + " |")


if __name__ == "__main__":
    main()
