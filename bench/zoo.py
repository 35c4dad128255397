"""GradSign's default engine on the model zoo (gradsign.zoo, "bench" size): exactness, fallbacks and speed.

For each zoo model, on one random batch (seed 1; weights from seed 0):
- the default engine's GradSign relative to the per-sample loop's (``engine="loop"``) in float32, and
  whether the two are equal in float64 (model and floating inputs in double precision);
- whether the default engine fell back (a warning of the "gradsign" logger) and the cause it names, and
  whether it warned that float32 rounding decides many signs (``RoundingNoiseWarning``; the share it names);
- seconds per ``gradsign.score(model, x, y)`` (default engine, including the model copy the API makes) and
  per plain batched forward+backward of the same model and batch (the model in the mode GradSign scores
  it in: eval mode except normalisation layers, every weight requiring grad, mean cross-entropy,
  ``loss.backward()``), each the median of ``--repeats`` interleaved calls after one warm-up, their
  ratio, and the loop's seconds (median of ``--loop-repeats`` calls).

Results go to a JSON file as each model finishes (``--results``); a rerun with the same settings skips the
models already there (``--fresh`` starts over). ``--write`` puts the table into docs/performance.md
between the zoo markers.

    python bench/zoo.py [--batch-size 32] [--repeats 5] [--threads N] [--models a,b] [--write]
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradsign
from gradsign import zoo
from gradsign.api import default_output
from gradsign.engine import RoundingNoiseWarning, engine_warnings, scoring_mode, sign_counts

from doc_sections import engine_version, write_section

ROOT = Path(__file__).resolve().parents[1]
INTRO = ("## Model zoo: default engine against the loop and one forward+backward\n\n"
         "Models written outside this project (`gradsign.zoo`, size \"bench\": `transformers` families\n"
         "built from their configs with random weights, and plain-torch models that break naive\n"
         "per-sample engines); the protocol is in the docstring of `bench/zoo.py`. Run with one torch\n"
         "thread on the 2-core development machine.\n\n")
BEGIN, END = "<!-- zoo:begin (written by bench/zoo.py) -->", "<!-- zoo:end -->"
SIZE_INTRO = ("### The zoo's CNN families at {size}x{size} inputs\n\n"
              "The same protocol on the image families whose configs accept any input size, at a size closer\n"
              "to how they are used: more compute per weight, so forming per-sample gradients costs less in\n"
              "proportion, and their last maps are larger than 2x2.\n\n")


def score_with_warnings(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options) -> tuple[float, list[str]]:
    """``gradsign.score`` and the warnings the "gradsign" logger gave during the call."""
    with engine_warnings() as messages:
        return gradsign.score(model, x, y, **options), messages


def rounding_noise_share(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """The share of signs that the default engine's ``RoundingNoiseWarning`` names for this model and
    batch (None: it did not warn)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RoundingNoiseWarning)
        gradsign.score(model, x, y)
    for warning in caught:
        if issubclass(warning.category, RoundingNoiseWarning):
            return warning.message.share
    return None


def forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One batched forward and backward of the mean cross-entropy."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(default_output(model(x)), y).backward()


class _Logits(nn.Module):
    """The model with its prediction tensor as output (what the API scores)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return default_output(self.model(x))


def float64_diagnosis(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Where the default engine's float64 counts differ from the loop's: per differing layer, the counts
    that differ, and how many of the first sample's gradients there are non-zero but below 1e-10 of the
    layer's largest (zero up to rounding: their sign is float noise in any implementation)."""
    auto = sign_counts(_Logits(copy.deepcopy(model)), x, y, F.cross_entropy, engine="auto")
    loop = sign_counts(_Logits(copy.deepcopy(model)), x, y, F.cross_entropy, engine="loop")
    differing = [k for k in loop if not torch.equal(auto[k], loop[k])]
    plain = scoring_mode(_Logits(copy.deepcopy(model))).requires_grad_(True)
    weights = [plain.get_submodule(k).weight for k in differing]
    grads = torch.autograd.grad(F.cross_entropy(plain(x[:1]), y[:1]), weights, allow_unused=True)
    rows = []
    for k, g in zip(differing, grads):
        tiny = 0 if g is None else int(((g != 0) & (g.abs() < 1e-10 * g.abs().max())).sum())
        rows.append({"layer": k.removeprefix("model."), "differing_counts": int((auto[k] - loop[k]).abs().sum()),
                     "weights": loop[k].numel(), "near_zero_sample0": tiny})
    return rows


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(name: str, args: argparse.Namespace) -> dict:
    """One model's row (see the module docstring)."""
    model = zoo.build(name, "bench", seed=0)
    x, y = zoo.example_batch(name, args.batch_size, "bench", seed=1)
    if args.image_size:
        if zoo.info(name).inputs != "image":
            raise ValueError(f"--image-size applies to image models, not {name}")
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                        generator=torch.Generator().manual_seed(1))
    plain = scoring_mode(copy.deepcopy(model)).requires_grad_(True)
    fb_times, score_times, warnings = [], [], []
    value = float("nan")
    for r in range(args.repeats + 1):  # the first round warms up and is not timed
        t_fb, _ = timed(lambda: forward_backward(plain, x, y))
        t_score, (value, warned) = timed(lambda: score_with_warnings(model, x, y))
        warnings += warned
        if r:
            fb_times.append(t_fb)
            score_times.append(t_score)
    loop_times = []
    loop_value = float("nan")
    for _ in range(args.loop_repeats):
        t_loop, loop_value = timed(lambda: gradsign.score(model, x, y, engine="loop"))
        loop_times.append(t_loop)
    noise = rounding_noise_share(model, x, y)
    model64 = model.double()
    x64 = x.double() if x.is_floating_point() else x
    value64, warned64 = score_with_warnings(model64, x64, y)
    loop64 = gradsign.score(model64, x64, y, engine="loop")
    diagnosis = float64_diagnosis(model64, x64, y) if value64 != loop64 else []
    causes = sorted({m.removeprefix("gradsign: ") for m in warnings + warned64})
    fb, score, loop = (statistics.median(t) for t in (fb_times, score_times, loop_times))
    entry = zoo.info(name)
    return {"model": name, "description": entry.description, "params": sum(p.numel() for p in model.parameters()),
            "input": "x".join(map(str, x.shape[1:])) + (" ids" if entry.inputs == "tokens" else ""),
            "default_s": score, "fwd_bwd_s": fb, "loop_s": loop, "ratio": score / fb,
            "gradsign": value, "loop_gradsign": loop_value,
            "relative_to_loop": (value - loop_value) / abs(loop_value) if loop_value else float("nan"),
            "float64_equal": value64 == loop64, "gradsign64": value64, "loop_gradsign64": loop64,
            "float64_differences": diagnosis, "rounding_noise": noise,
            "fallback": bool(causes), "causes": causes}


def settings(args: argparse.Namespace) -> dict:
    import transformers

    return {"batch_size": args.batch_size, "repeats": args.repeats, "loop_repeats": args.loop_repeats,
            "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "engine": engine_version(), "image_size": args.image_size}


def rounding_note(share: float | None) -> str:
    """A table cell's note of the ``RoundingNoiseWarning`` (empty where there was none)."""
    if share is None:
        return ""
    return (f" (warns that float32 rounding decides the signs: {100 * share:.0f}% of one sample's differ "
            "between two exact computations)")


def table(rows: list[dict], setup: dict, command: str) -> str:
    """The markdown section: protocol, command, table, median ratio."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"Command: `{command}` (weights seed 0, batch seed 1; batch {setup['batch_size']}, "
             f"{setup['threads']} torch threads, torch {setup['torch']}, transformers {setup['transformers']}, "
             f"the engine at {setup['engine']}; "
             f"seconds are medians of {setup['repeats']} interleaved calls after a warm-up, the loop's of "
             f"{setup['loop_repeats']}).", "",
             "| model | params | input | default s | fwd+bwd s | default/fwd+bwd | loop s | loop/fwd+bwd "
             "| default vs loop, float32 | float64 equal | fallback (cause) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | | | | | | | error: {cell(r['error'])} |")
            continue
        fallback = "yes: " + cell("; ".join(r["causes"])) if r["fallback"] else "no"
        fallback += rounding_note(r.get("rounding_noise"))
        equal64 = "yes" if r["float64_equal"] else "NO (%+.1e)" % (
            (r["gradsign64"] - r["loop_gradsign64"]) / r["loop_gradsign64"])
        lines.append(f"| {r['model']} | {r['params']:,} | {r['input']} | {r['default_s']:.3f} | {r['fwd_bwd_s']:.3f} "
                     f"| {r['ratio']:.2f}x | {r['loop_s']:.3f} | {r['loop_s'] / r['fwd_bwd_s']:.2f}x "
                     f"| {r['relative_to_loop']:+.1e} | {equal64} | {fallback} |")
    errors = sum("error" in r for r in rows)
    rows = [r for r in rows if "error" not in r]
    ratios = [r["ratio"] for r in rows] or [float("nan")]
    lines += ["", f"Median default/fwd+bwd over the {len(rows)} models: {statistics.median(ratios):.2f}x "
              f"(range {min(ratios):.2f}x-{max(ratios):.2f}x; {sum(x <= 1.5 for x in ratios)} of {len(rows)} "
              f"at or below 1.5x). Fallbacks: {sum(r['fallback'] for r in rows)} of {len(rows)}. Equal to the "
              f"loop in float64: {sum(r['float64_equal'] for r in rows)} of {len(rows)}."
              + (f" Models the default engine failed on: {errors}." if errors else "")]
    families = [r["ratio"] for r in rows if zoo.info(r["model"]).library == "transformers"]
    if families:
        lines[-1] += (f" Over the {len(families)} `transformers` families alone: median "
                      f"{statistics.median(families):.2f}x, {sum(x <= 1.5 for x in families)} of {len(families)} "
                      "at or below 1.5x.")
    unequal = [r for r in rows if not r["float64_equal"]]
    if unequal:
        lines += ["", "Where the float64 counts differ from the loop's (sum over the layer's weights of |count difference| "
                  "/ weights of the layer; "
                  "gradients of sample 0 there that are non-zero but below 1e-10 of the layer's largest, i.e. "
                  "zero up to rounding, whose sign is float noise in any implementation):", ""]
        for r in unequal:
            lines.append(f"- {r['model']}: " + "; ".join(
                f"`{d['layer']}` {d['differing_counts']:,} / {d['weights']:,}, {d['near_zero_sample0']:,} near-zero"
                for d in r.get("float64_differences", [])))
    return "\n".join(lines)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", help="comma-separated zoo names (default: all)")
    parser.add_argument("--results", type=Path, help="default: bench/results/zoo.json (zoo_<size>.json with "
                                                     "--image-size)")
    parser.add_argument("--fresh", action="store_true", help="ignore results already in --results")
    parser.add_argument("--write", action="store_true", help="put the table into docs/performance.md")
    parser.add_argument("--image-size", type=int, default=0,
                        help="image models at this size instead of the zoo's (families whose config fixes the "
                             "size, ViT, Swin, MobileViT, cannot); results and doc section of their own")
    args = parser.parse_args()
    suffix = f"_{args.image_size}" if args.image_size else ""
    args.results = args.results or ROOT / "bench" / "results" / f"zoo{suffix}.json"
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else zoo.names()
    for name in names:
        zoo.info(name)  # unknown names fail before any work
    setup = settings(args)
    done: dict[str, dict] = {}
    if args.results.exists() and not args.fresh:
        saved = json.loads(args.results.read_text())
        if saved.get("settings") == setup:
            done = saved["rows"]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in done and "error" not in done[name]:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            done[name] = measure(name, args)
        except Exception as error:  # a model the engine cannot score is a row of the table, not a crash
            message = str(error).splitlines()[0] if str(error) else ""
            done[name] = {"model": name, "error": f"{type(error).__name__}: {message}"}
        args.results.write_text(json.dumps({"settings": setup, "rows": done}, indent=1) + "\n")
    rows = [done[name] for name in names]
    command = "python bench/zoo.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    body = table(rows, setup, command.strip())
    print(body)
    if args.write and args.image_size:
        marker = f"zoo-{args.image_size}"
        write_section(ROOT / "docs" / "performance.md", f"<!-- {marker}:begin (written by bench/zoo.py) -->",
                      f"<!-- {marker}:end -->", body, SIZE_INTRO.format(size=args.image_size))
    elif args.write:
        write_section(ROOT / "docs" / "performance.md", BEGIN, END, body, INTRO)


if __name__ == "__main__":
    main()
