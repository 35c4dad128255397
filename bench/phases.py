"""Where the default engine's time goes on the model zoo, as fractions of one batched forward+backward.

For each zoo model ("bench" size, batch 32, weights seed 0, batch seed 1), over ``--repeats`` calls of
``gradsign.score`` after a warm-up, the seconds spent in each phase of the default engine divided by
the median seconds of one plain batched forward+backward (as bench/zoo.py times it):

- ``reference``: the verification's single-sample reference passes (``_reference_grads``, and
  ``_reference_on_onednn`` where float32 left a doubt);
- ``batched``: the batched passes (``_batched_counts``), of which ``hooks`` is forming the per-sample
  gradients and their sign sums inside the gradient hooks;
- ``compare``: comparing the verified sample's gradients (``_first_mismatch``);
- ``probe``: one-sample probes for call shapes (``_single_sample_input_shapes``);
- ``float64``: the float64 check, when float32 rounding left a doubt (its own passes included);
- ``lend``: lending the caller's model (``gradsign.api._lent``: saving and putting back its modules'
  attributes, parameter and buffer values, flags and gradients);
- ``checks``: the warnings' checks after the counts (``_sign_disagreement``, the sampled sign
  comparison of the verified sample, and ``_warn_about_uncounted_weights``);
- ``rest``: everything else (scoring mode, the counted layers, the API, the sum of the counts).

Phases nested in the float64 check are counted in it only. Also printed: one batch-of-one
forward+backward as a fraction of the batch of 32 (1/32 would be free of per-call costs).

With ``--layers``, instead, for each model and counted layer: the milliseconds its gradient hooks took
in the batched pass (forming its per-sample gradients and counting their signs, all its calls; the
verified sample's own pass in the float64 check not included) against the milliseconds torch takes for
the layer's batched weight gradient alone from the same inputs and output gradients (the work the
batched pass leaves out: ``convolution_backward`` for the weight only, the product of a Linear's rows),
medians of ``--repeats`` calls: the ``--top`` layers that cost most above it, and all layers together.

    python bench/phases.py [--models a,b] [--repeats 5] [--threads 1] [--layers [--top 8]]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import statistics
import time

import torch

import gradsign
from gradsign import api, engine, zoo
from gradsign.proxies import gradsign as gradsign_proxy

from zoo import forward_backward  # bench/zoo.py: the plain forward+backward it times

PHASES = {"_reference_grads": "reference", "_reference_on_onednn": "reference", "_batched_counts": "batched",
          "_first_mismatch": "compare",
          "_single_sample_input_shapes": "probe", "_float64_mismatch": "float64",
          "_sign_disagreement": "checks"}


class PhaseClock:
    """Wraps the engine's phase functions and the hooks' ``_accumulate`` and ``_reduce_linear`` to add up
    seconds per phase (a call inside a running call of the same phase, or inside the float64 check, is
    not counted again)."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.running: collections.Counter = collections.Counter()
        self.originals: list[tuple[object, str, object]] = []

    def __enter__(self):
        for function, phase in PHASES.items():
            self._wrap(engine, function, phase)
        for method in ("_accumulate", "_reduce_linear"):
            self._wrap(engine._SignCountHooks, method, "hooks")
        self._wrap(gradsign_proxy, "_warn_about_uncounted_weights", "checks")
        self._wrap_context(api, "_lent", "lend")
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self.originals):
            setattr(owner, name, original)

    def _wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)
        self.originals.append((owner, name, original))

        def timed(*args, **kwargs):
            counted = not self.running[phase] and not self.running["float64"]
            self.running[phase] += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.running[phase] -= 1
                if counted:
                    self.seconds[phase] += time.perf_counter() - start
        setattr(owner, name, timed)

    def _wrap_context(self, owner, name: str, phase: str) -> None:
        """Time a context manager's entering and leaving (not the block it wraps)."""
        original = getattr(owner, name)
        self.originals.append((owner, name, original))

        @contextlib.contextmanager
        def timed(*args, **kwargs):
            start = time.perf_counter()
            manager = original(*args, **kwargs)
            value = manager.__enter__()
            self.seconds[phase] += time.perf_counter() - start
            try:
                yield value
            except BaseException as error:
                if not manager.__exit__(type(error), error, error.__traceback__):
                    raise
            else:
                start = time.perf_counter()
                manager.__exit__(None, None, None)
                self.seconds[phase] += time.perf_counter() - start
        setattr(owner, name, timed)


class LayerClock:
    """Wraps ``_SignCountHooks._accumulate_call`` to add up, per counted layer and score, the seconds its
    gradient hooks take in batched passes, and keeps the last score's calls (module, input, output
    gradient) to time torch's batched weight gradient on."""

    def __init__(self):
        self.scores: list[dict[str, float]] = []
        self.calls: dict[str, list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]] = {}
        self.original = engine._SignCountHooks._accumulate_call

    def __enter__(self):
        clock, original = self, self.original

        def timed(hooks, name, module, x, grad_out):
            start = time.perf_counter()
            original(hooks, name, module, x, grad_out)
            if not hooks.verified_only:
                clock.scores[-1][name] = clock.scores[-1].get(name, 0.0) + time.perf_counter() - start
                clock.calls.setdefault(name, []).append((module, x, grad_out))
        engine._SignCountHooks._accumulate_call = timed
        return self

    def __exit__(self, *exc):
        engine._SignCountHooks._accumulate_call = self.original

    def start_score(self) -> None:
        self.scores.append({})
        self.calls = {}


def batched_weight_gradient(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """torch's batched weight gradient of one call: all samples' gradients summed."""
    if isinstance(module, torch.nn.Conv2d):
        torch.ops.aten.convolution_backward(grad_out, x, module.weight, None, module.stride, module.padding,
                                            module.dilation, False, [0, 0], module.groups, [False, True, False])
    elif isinstance(module, torch.nn.Linear):
        grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def layer_table(names: list[str], repeats: int, top: int) -> None:
    """The ``--layers`` table (module docstring)."""
    print(f"batch 32, {torch.get_num_threads()} torch threads, medians of {repeats} calls; ms per score")
    print("| model | layer | weight | output positions | hooks ms | batched dW ms | hooks / dW |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        model = zoo.build(name, "bench", 0)
        x, y = zoo.example_batch(name, 32, "bench", 1)
        gradsign.score(model, x, y)
        with LayerClock() as clock:
            for _ in range(repeats):
                clock.start_score()
                gradsign.score(model, x, y)
        rows = []
        for layer, calls in clock.calls.items():
            hooks = statistics.median(score.get(layer, 0.0) for score in clock.scores)
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                for module, inputs, grad_out in calls:
                    batched_weight_gradient(module, inputs, grad_out)
                seconds.append(time.perf_counter() - start)
            module, _, grad_out = calls[0]
            if isinstance(module, torch.nn.Conv2d):
                positions = "x".join(map(str, grad_out.shape[2:]))
            else:  # rows per sample of a Linear (tokens, or positions of channels-last maps)
                positions = str(grad_out[0].numel() // grad_out.shape[-1])
            rows.append((hooks, statistics.median(seconds), layer, tuple(module.weight.shape), positions))
        for hooks, plain, layer, shape, positions in sorted(rows, key=lambda r: r[1] - r[0])[:top]:
            print(f"| {name} | {layer} | {'x'.join(map(str, shape))} | {positions} | {hooks * 1e3:.2f} | "
                  f"{plain * 1e3:.2f} | {hooks / plain:.2f} |")
        hooks, plain = sum(r[0] for r in rows), sum(r[1] for r in rows)
        print(f"| {name} | all {len(rows)} counted layers | | | {hooks * 1e3:.1f} | {plain * 1e3:.1f} | "
              f"{hooks / plain:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", action="store_true",
                        help="per counted layer: its hooks' time against its batched weight gradient's")
    parser.add_argument("--top", type=int, default=8, help="with --layers: how many layers to list per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else zoo.names()
    if args.layers:
        layer_table(names, args.repeats, args.top)
        return
    columns = ["reference", "batched", "hooks", "compare", "probe", "float64", "lend", "checks", "rest"]
    print(f"batch 32, {torch.get_num_threads()} torch threads, {args.repeats} calls per model; "
          "fractions of one batched forward+backward")
    print("| model | fwd+bwd ms | score | " + " | ".join(columns) + " | batch of one |")
    print("|---" * (len(columns) + 4) + "|")
    for name in names:
        model = zoo.build(name, "bench", 0)
        x, y = zoo.example_batch(name, 32, "bench", 1)
        plain_model = engine.scoring_mode(copy.deepcopy(model)).requires_grad_(True)
        forward_backward(plain_model, x, y)
        gradsign.score(model, x, y)
        plain, scored = [], 0.0
        with PhaseClock() as clock:
            for _ in range(args.repeats):
                start = time.perf_counter()
                forward_backward(plain_model, x, y)
                middle = time.perf_counter()
                gradsign.score(model, x, y)
                plain.append(middle - start)
                scored += time.perf_counter() - middle
        one = statistics.median(plain)
        single = []
        for i in range(args.repeats):
            start = time.perf_counter()
            forward_backward(plain_model, x[i:i + 1], y[i:i + 1])
            single.append(time.perf_counter() - start)
        total = scored / args.repeats / one
        fractions = {phase: clock.seconds.get(phase, 0.0) / args.repeats / one for phase in columns[:-1]}
        fractions["rest"] = total - sum(v for k, v in fractions.items() if k != "hooks")
        print(f"| {name} | {one * 1e3:.1f} | {total:.2f}x | "
              + " | ".join(f"{fractions[c]:.2f}" for c in columns)
              + f" | {statistics.median(single) / one:.3f} |", flush=True)


if __name__ == "__main__":
    main()
