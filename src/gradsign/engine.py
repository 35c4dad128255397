"""Per-sample gradient engine: sign counts of per-sample weight gradients.

For every counted weight (the weight of an ``nn.Conv2d`` or ``nn.Linear``; a weight shared by several
modules counts once, with its whole gradient) it returns ``counts[k] = sum_i sign(dL_i/dw_k)`` over the
samples ``i`` of a batch, where ``L_i`` is the loss of sample ``i`` alone on a batch of one (the official
GradSign semantics, Zhang & Jia, ICLR 2022). Counts are reduced layer by layer; no samples x all-weights
array is built.

Scoring mode (``scoring_mode``): every module in eval mode except normalisation layers, which stay in
train mode, so that dropout of every kind (attention dropout included), drop-path / stochastic depth and
other train-only randomness are off while BatchNorm normalises each sample by its own statistics.

Engines:
- ``batched``: one forward/backward per chunk of samples. Train-mode BatchNorm is swapped for instance
  normalisation with the same affine parameters (identical to BatchNorm on one sample), the per-sample
  losses are summed, and each layer's per-sample weight gradients are formed from its input and output
  gradient inside a gradient hook (per layer the faster of a grouped weight-gradient convolution and a
  batched matrix product for Conv2d, a batched matrix product for Linear), then reduced to sign counts.
  A layer whose input folds several rows per sample into the batch dimension (patches, windows) is
  handled when the rows of one sample are consecutive.
- ``vmap``: ``torch.func.vmap(grad(...))`` over single-sample calls of the functional model: exact
  whatever the model does inside.
- ``loop``: the reference; one forward/backward per sample.
- ``auto`` (default): ``batched``, verified on one sample that shares the first batched pass with a
  sample before it and one after it: its batched per-sample gradients must equal its single-sample
  gradients for every counted weight (where float32 noise leaves a doubt, against single-sample
  gradients whose convolutions round as the batch's did, then in float64). When they do not (a weight
  used outside its module's call, a batch dimension that is not the sample index, samples that
  interact), it warns with the cause and uses ``vmap``, then ``loop``.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import math
import types
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from gradsign.sign_kernels import (add_depthwise_signs, add_grouped_product_signs, add_product_signs,
                                   depthwise_available, fused_available, scratch_elements)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ENGINES = ("auto", "batched", "vmap", "loop")
#: per-layer budget, in float elements, for one chunk's per-sample gradients
DEFAULT_ELEMENT_BUDGET = 1 << 25
#: on a CPU, a batched pass takes at most as many samples as keep the counted layers' inputs within this
#: many floats: a batch whose activations overflow the caches costs more per sample (at 224x224, chunks of
#: 8 and 4 images made MobileNetV2 and EfficientNet about 2x faster than 32 at once, `bench/zoo.py
#: --image-size 224`; the zoo's 64x64 batches stay in one pass)
ACTIVATION_BUDGET = 1 << 25
#: the vmap engine's chunks: per-sample gradients of one weight of at most this many floats, and of all
#: weights of at most ``DEFAULT_ELEMENT_BUDGET`` (larger arrays are paged in anew on each use, which tripled
#: the cost on a model with a 512x512 weight; chunk sizes timed on the zoo's fallback models)
VMAP_WEIGHT_BUDGET = 1 << 21
#: float elements of per-sample gradients a layer's hook forms at once on a CPU (2 MiB): slices that stay
#: in cache make the per-sample gradients of wide layers several times faster there (2^17..2^30 measured
#: on NAS-Bench-201 networks by `bench/engine.py --slice-sweep`, 2^17..2^23 on zoo models by
#: bench/slices.py); other devices take the whole chunk in one call
SLICE_ELEMENTS = 1 << 19
#: ungrouped convolutions with at most this many output positions (8x8 maps) form per-sample gradients by a
#: batched matrix product over unfolded inputs on a CPU (faster there than the grouped convolution, whose
#: time also jumps with the number of groups; bench/layer_kernels.py)
MATMUL_POSITIONS = 64
#: the same for grouped convolutions (one product per sample and group): faster only on 2x2 maps
GROUPED_MATMUL_POSITIONS = 4
#: ungrouped convolutions with fewer input channels than this (a stem on an image) and at most
#: ``FEW_CHANNEL_POSITIONS`` output positions (32x32 maps) form per-sample gradients by the batched matrix
#: product (kernels up to 3x3 and non-overlapping patches) or, for larger overlapping kernels, by a forward
#: convolution over input channels (`python bench/layer_kernels.py --threads 1` and `--threads 2`, batch
#: 64, its rows on 1-8 input channels: 2.5-4x faster than the grouped weight-gradient convolution on
#: NB201's stem, 1.3-7.8x on other 3x3 ones, 1.2-2.2x on a 7x7 one; 2-4% slower on a ConvNeXt-like patch
#: embedding, 5-13% faster on a ViT-like one; at 224x224 and from 8 input channels on, the grouped way is
#: faster)
FEW_INPUT_CHANNELS = 8
FEW_CHANNEL_POSITIONS = 1024
#: float32 stems on a CPU with oneDNN (ungrouped, fewer than ``FEW_INPUT_CHANNELS`` input channels,
#: kernels above 3x3) whose input channels x kernel taps x output positions reach this times torch's
#: threads form their per-sample gradients one sample at a time, by the weight-gradient convolution torch
#: runs for a batch of one, which gains little from more threads (``python bench/layer_kernels.py
#: --stems --batch-size 32``, ``--threads 1`` and ``--threads 2``: with one thread 0.66x the best other
#: way's time on a 7x7 RGB stem at 64x64, 0.48-0.57x at 128x128 and 224x224, 0.88x for a 5x5 one at
#: 64x64; with two, 1.07x, 0.40-0.64x, and 1.7x for the 5x5 one, which the threads' factor leaves out;
#: on 16x16 output maps, or one input channel on 32x32, 1.7-3.4x slower)
SAMPLE_BY_SAMPLE_WORK = 1 << 16
#: per-sample gradients that are products over at most this many positions or rows of a sample (an
#: ungrouped convolution on maps of up to 4x4, a Linear on up to 16 tokens) are formed a slice of weight
#: rows (or columns) at a time for all samples of the chunk at once, the larger of the weight's two sides
#: sliced, so that each slice's sign sum is final (sample slices need one more pass to add theirs up):
#: 1.1-2x faster at depth 4, within 10% either way at 16, up to 10% slower deeper (`bench/layer_kernels.py
#: --products --threads 1 --batch-size 32`)
SHALLOW_PRODUCT_DEPTH = 16
#: BatchNorm layers normalise each sample by its own statistics as group normalisation with a group per
#: channel where a channel holds more than this many values of a sample (maps larger than 2x2), by
#: ``F.instance_norm`` on 2x2 maps (forward and backward, group normalisation took 0.2-0.87x instance
#: normalisation's time on 4x4 to 32x32 maps and 1.0-1.3x on 2x2 ones in three runs of `python
#: bench/layer_kernels.py --norms --threads 1 --batch-size 32`)
FEW_NORM_POSITIONS = 4
#: the sample whose batched per-sample gradients ``auto`` compares with its single-sample gradients: the
#: second, so that in the first pass it has a neighbour on each side (a dependence on earlier or on later
#: samples changes it) and a single batch-of-one pass is the reference
VERIFIED_SAMPLE = 1
#: largest relative difference (per weight tensor, against its largest gradient) accepted as float noise
FLOAT32_TOLERANCE = 1e-3
FLOAT64_TOLERANCE = 1e-7
#: smallest gradient scale a weight's differences are measured against, relative to the sample's
#: largest weight gradient (below it, gradients are rounding noise around an exact zero)
NOISE_FLOOR = 1e-4
#: share of the counted weights above which, when two exact float32 computations of the verified sample's
#: gradients (batched, and the sample alone) differ in sign that often, the default engine warns that
#: float32 rounding decides many of the model's signs (RegNetX-400MF at 64x64: 44%, `bench/zoo.py`;
#: NAS-Bench-201 cells: median 0.00%, at most 3.4%, `bench/verification_probe.py`)
NOISY_SIGN_SHARE = 0.1
#: counted weights, taken from each layer in proportion to its size in tiles of ``SIGN_TILE`` squared, on
#: which that share is measured
SIGN_SAMPLE = 1 << 16
SIGN_TILE = 8
#: normalisation layers: kept in train mode while scoring (they normalise by single-sample statistics)
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
               nn.LayerNorm)

log = logging.getLogger("gradsign")


class UnsupportedModelError(RuntimeError):
    """The batched engine cannot compute exact per-sample gradients for this model."""


class RoundingNoiseWarning(UserWarning):
    """Rounding decides the sign of a large share of the model's per-sample gradients in float32, or of
    some in a lower precision; ``share``: the measured share of the counted weights whose signs two
    computations of one sample's gradients disagree on (None where an engine without the verification,
    ``engine="loop"``, ``"vmap"`` or ``"batched"``, warns of a lower precision without measuring it)."""

    def __init__(self, message: str, share: float | None):
        super().__init__(message)
        self.share = share


class NonFiniteGradientError(ValueError):
    """Some per-sample gradient of a counted weight is NaN: its sign, and so GradSign, is undefined."""


class CannotScoreError(ValueError):
    """The model has no per-sample semantics to score (e.g. BatchNorm over one value per channel)."""


class _Messages(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def engine_warnings() -> Iterator[list[str]]:
    """The warnings the engine logs while the block runs (fallbacks and their causes), as a list."""
    messages: list[str] = []
    handler = _Messages(messages)
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)


def scoring_mode(model: nn.Module) -> nn.Module:
    """Put ``model`` in the mode proxies score it in: eval mode, except normalisation layers
    (``NORM_LAYERS``) in train mode. Returns ``model``."""
    model.eval()
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            module.train()
    return model


def counted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers of ``model`` whose weights GradSign counts: one layer per distinct
    weight (the first module that holds it). Not those whose weight is computed from other parameters
    (``parametrized_layers``): no engine can read its gradient."""
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        if (isinstance(module, (nn.Conv2d, nn.Linear)) and not _computed_layer(module)
                and id(module.weight) not in seen):
            seen.add(id(module.weight))
            layers.append((name, module))
    return layers


def parametrized_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d and Linear layers whose weight is computed from other parameters: by a
    parametrization (``weight_norm``, ``spectral_norm``, ... of ``torch.nn.utils.parametrizations``: a new
    tensor at every access) or by a forward pre-hook that sets a plain tensor (the older
    ``torch.nn.utils.weight_norm`` and ``spectral_norm``, ``torch.nn.utils.prune``'s masks), so that no
    engine can read its gradient; they are not among the ``counted_layers``."""
    return [name for name, module in model.named_modules() if _computed_layer(module)]


def _computed_layer(module: nn.Module) -> bool:
    """A Conv2d or Linear whose weight is computed from other parameters (``parametrized_layers``)."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) and (
        parametrize.is_parametrized(module, "weight") or not isinstance(module.weight, nn.Parameter))


def uncounted_weights(model: nn.Module) -> dict[str, int]:
    """Elements of ``model``'s parameters with two or more dimensions that GradSign does not count, by the
    type of the module holding them: any but the counted layers' weights, ``nn.Embedding`` tables and
    the parameters of computed weights (``parametrized_layers``) (e.g. ``transformers``' ``Conv1D``
    in GPT-2, ``nn.Conv1d``, attention input projections)."""
    counted = {id(m.weight) for _, m in counted_layers(model)}
    found: dict[str, int] = {}
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, parametrize.ParametrizationList)) or _computed_layer(module):
            continue
        for p in module._parameters.values():  # parameters(recurse=False), without its generators' cost
            if p is not None and p.dim() >= 2 and id(p) not in counted and id(p) not in seen:
                seen.add(id(p))
                kind = type(module).__name__
                found[kind] = found.get(kind, 0) + p.numel()
    return found


def _embedding_with_own_forward(module: nn.Module) -> bool:
    """An ``nn.Embedding`` subclass computing its output itself (e.g. scaling the rows it looks up)."""
    return isinstance(module, nn.Embedding) and _own_forward(module) is not None


def _weight_users(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """(counted name, module) for every module that uses a counted weight in its call, named by the layer
    that holds the weight: Conv2d and Linear modules, and Embeddings tied to a counted Linear (a language
    model's output layer) unless they renormalise rows (``max_norm``) or scale gradients by frequency."""
    owner = {id(m.weight): name for name, m in layers}

    def uses(m: nn.Module) -> bool:
        if isinstance(m, nn.Embedding):
            return m.max_norm is None and not m.scale_grad_by_freq
        return isinstance(m, (nn.Conv2d, nn.Linear))

    return [(owner[id(m.weight)], m) for _, m in model.named_modules()
            if uses(m) and id(getattr(m, "weight", None)) in owner]


def per_sample_loss_sum(outputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """sum_i loss_fn(outputs[i:i+1], targets[i:i+1]): its gradient w.r.t. output i is dL_i/d output_i.

    One vectorised call (``torch.func.vmap`` over the samples) where ``loss_fn`` allows it, otherwise one
    call per sample; both give the same sum.
    """
    from torch.func import vmap

    if loss_fn is F.cross_entropy and outputs.dim() == 2:  # the default loss: a sample's mean is its loss
        return F.cross_entropy(outputs, targets, reduction="sum")
    try:
        losses = vmap(lambda o, t: loss_fn(o[None], t[None]))(outputs, targets)
    except Exception:  # any loss vmap cannot trace (data-dependent control flow, .item(), randomness)
        losses = None
    if losses is None or losses.shape != (len(outputs),):
        losses = torch.stack([loss_fn(outputs[i:i + 1], targets[i:i + 1]) for i in range(len(outputs))])
    return losses.sum()


def sign_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
                engine: str = "auto", chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per-layer ``sum_i sign(dL_i/dW)`` (int32, the weight's shape) for the counted weights.

    The engines change ``model`` while they run (mode, requires_grad flags, gradients, running
    statistics, norm layers swapped and put back): pass a copy, or a model lent as ``gradsign.score``
    lends it. It is put in ``scoring_mode`` first.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    scoring_mode(model)
    layers = counted_layers(model)
    precisions = {m.weight.dtype for _, m in layers}
    share = None  # the default engine measures how often rounding decides a sign
    try:
        with _output_precisions_recorded(layers, precisions):
            if engine == "loop":
                counts = _loop_counts(model, inputs, targets, loss_fn, layers)
            elif engine == "vmap":
                counts = _vmap_counts(model, inputs, targets, loss_fn, layers, chunk_size)
            else:
                counts, share = _checked_batched_counts(model, inputs, targets, loss_fn, layers, chunk_size,
                                                        verify=engine == "auto")
    except (CannotScoreError, NonFiniteGradientError):
        raise
    except (RuntimeError, ValueError) as error:
        raise _single_sample_error(error) or error
    if precisions:
        _warn_if_rounding_decides_signs(max(precisions, key=lambda dtype: torch.finfo(dtype).eps), share)
    return counts


@contextlib.contextmanager
def _output_precisions_recorded(layers: list[tuple[str, nn.Module]], precisions: set[torch.dtype]
                                ) -> Iterator[None]:
    """Within the block, the dtype of every floating output of a counted layer's call is added to
    ``precisions``: under autocast (around the score, or inside the model's forward) a float32 layer
    computes in bfloat16 or float16, which its weight's dtype does not show."""
    def record(module: nn.Module, args: tuple, output) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            precisions.add(output.dtype)

    handles = [m.register_forward_hook(record) for _, m in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _single_sample_error(error: Exception) -> CannotScoreError | None:
    """A plain explanation for torch's error when a norm layer sees one value per channel."""
    text = str(error)
    if "Expected more than 1" not in text:
        return None
    return CannotScoreError(
        "GradSign cannot score this model: a normalisation layer sees a single value per channel for "
        f"one sample ({text.splitlines()[0].split(', got ')[-1]}), so its single-sample statistics are "
        "undefined (BatchNorm on (N, C) features of one row per sample, or on 1x1 maps); use larger inputs or "
        "another norm")


def _checked_batched_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                            loss_fn: LossFn, layers: list[tuple[str, nn.Module]],
                            chunk_size: int | None, *, verify: bool
                            ) -> tuple[dict[str, torch.Tensor], float | None]:
    """The batched engine's counts and, where verified, the share of the verified sample's signs that its
    batched and single-sample gradients disagree on (``_sign_disagreement``; None: not measured). With
    ``verify``, a mismatch falls back to an exact engine (``_exact_fallback``)."""
    verified = min(VERIFIED_SAMPLE, len(inputs) - 1) if verify else None
    sample = slice(verified, verified + 1) if verified is not None else slice(0, 0)
    with _requires_grad_kept(model):
        # the reference first: its single-sample forward also tells the batched pass each call's input shape
        reference, single_shapes, swap = _reference_then_batched_form(model, inputs[sample], targets[sample],
                                                                      loss_fn, layers)
        try:
            counts, mismatch, prefix = _verified_batched_counts(model, inputs, targets, loss_fn, layers,
                                                                chunk_size, verified, reference, single_shapes,
                                                                FLOAT32_TOLERANCE)
            cause = None
        except (UnsupportedModelError, RuntimeError, ValueError, NotImplementedError) as error:
            if not verify or _single_sample_error(error) or isinstance(error, NonFiniteGradientError):
                raise
            counts, mismatch, prefix = None, None, {}
            cause = _first_line(error)
        finally:
            swap.undo()
    if mismatch and cause is None and _convolutions_on_onednn_differ(model, inputs):
        # torch's batch-of-one convolutions round otherwise than the batch's; chaotic models (normalising
        # 2x2 maps) or a ReLU's kink amplify that: the reference again, rounded as the batched pass was
        try:
            again = _reference_on_onednn(model, inputs[sample], targets[sample], loss_fn, layers, len(inputs))
            mismatch = _first_mismatch(prefix, again, FLOAT32_TOLERANCE)
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # a convolution oneDNN refuses: the float64 check decides, as it would without this one
    if mismatch and cause is None:
        # float32 noise (e.g. normalising near-constant maps) or a real difference: decide in float64, on
        # the verified sample with its neighbours
        cause = _float64_mismatch(model, inputs[:verified + 2], targets[:verified + 2], loss_fn, verified)
    if cause is None:
        return counts, _sign_disagreement(prefix, reference[0]) if verify else None
    return _exact_fallback(model, inputs, targets, loss_fn, layers, chunk_size, cause), None


def _verified_batched_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                             layers: list[tuple[str, nn.Module]], chunk_size: int | None, verified: int | None,
                             reference: list[dict[str, torch.Tensor | None]], single_shapes: _CallShapes | None,
                             tolerance: float, *, verified_only: bool = False
                             ) -> tuple[dict[str, torch.Tensor], tuple[str, str] | None, dict[str, torch.Tensor]]:
    """Batched counts (model in its batched form), the first mismatch of the per-sample gradients they
    formed for sample ``verified`` with its single-sample ``reference`` gradients (None: they agree), and
    those per-sample gradients (one row per counted weight).
    Where the reference's graph used a counted weight outside its modules' calls, a one-sample probe
    looks for ``F.linear`` calls on it first, so that the batched pass counts them too.
    ``verified_only``: form only the verified sample's gradients (and count no signs: no counts)."""
    if single_shapes is not None and single_shapes.used_elsewhere:
        single_shapes = _single_sample_input_shapes(model, inputs[:1], _weight_users(model, layers))
    counts, prefix = _batched_counts(model, inputs, targets, loss_fn, layers, chunk_size, verified=verified,
                                     single_shapes=single_shapes, verified_only=verified_only)
    return counts, _first_mismatch(prefix, reference, tolerance), prefix


def _exact_fallback(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                    layers: list[tuple[str, nn.Module]], chunk_size: int | None, cause: str
                    ) -> dict[str, torch.Tensor]:
    try:
        counts = _vmap_counts(model, inputs, targets, loss_fn, layers, chunk_size)
        log.warning("gradsign: batched engine is not exact for this model (%s); used the vmap engine", cause)
        return counts
    except Exception as error:  # vmap cannot run every model (in-place ops on inputs, .item(), ...)
        vmap_error = _first_line(error)
    log.warning("gradsign: batched engine is not exact for this model (%s) and vmap cannot run it (%s); "
                "used the loop engine", cause, vmap_error)
    return _loop_counts(model, inputs, targets, loss_fn, layers)


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _zero_totals(layers: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """Zero sign sums, float32 or wider (exact integers below 2^24 samples), one per counted weight."""
    return {name: torch.zeros(m.weight.shape, dtype=torch.promote_types(m.weight.dtype, torch.float32),
                              device=m.weight.device) for name, m in layers}


def _integer_counts(totals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: total.to(torch.int32) for name, total in totals.items()}


def _raise_on_nan(tensors: Iterable[torch.Tensor], what: str) -> None:
    """``NonFiniteGradientError`` if any of ``tensors`` holds a NaN: ``torch.sign`` maps NaN to 0, so a NaN
    gradient would count as a zero one, in every engine and in the official code alike."""
    # a NaN makes the sum NaN; the sum is one fast pass, and only a NaN sum (also from inf - inf) is confirmed
    if any(torch.isnan(t.sum()) and torch.isnan(t).any() for t in tensors):
        raise NonFiniteGradientError(
            f"{what} is NaN for some sample (a loss or output that is not finite, or a NaN in the "
            "backward pass): its sign, and GradSign, are undefined")


def _single_sample_grads(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                         layers: list[tuple[str, nn.Module]]) -> Iterator[dict[str, torch.Tensor | None]]:
    """For each sample alone: the gradient of its loss for every counted weight (None: no gradient)."""
    with _counted_weights_only(model, layers):
        for i in range(len(inputs)):
            yield _sample_gradients(model, inputs[i:i + 1], targets[i:i + 1], loss_fn, layers)[0]


@contextlib.contextmanager
def _counted_weights_only(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """Within the block only the counted weights require grad (no work on other parameters' gradients);
    afterwards the flags are as before and the gradients dropped."""
    with _requires_grad_kept(model):
        model.requires_grad_(False)
        for _, m in layers:
            m.weight.requires_grad_(True)
        try:
            yield
        finally:
            model.zero_grad(set_to_none=True)


def _sample_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: LossFn,
                      layers: list[tuple[str, nn.Module]]
                      ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
    """The gradient of the loss of ``x`` (one sample) for every counted weight (None: no gradient), and
    the loss, whose graph still shows where each weight was used (its saved tensors are freed)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), target)
    if loss.requires_grad:
        loss.backward()
    grads = {name: m.weight.grad for name, m in layers}
    _raise_on_nan((g for g in grads.values() if g is not None), "a counted weight's gradient")
    return grads, loss


def _graph_uses(loss: torch.Tensor, layers: list[tuple[str, nn.Module]]) -> collections.Counter:
    """For each counted weight, how many operations in ``loss``'s autograd graph take the weight itself as
    an input (its uses that reach the loss; a module call uses its weight once)."""
    names = {id(m.weight): name for name, m in layers}
    uses: collections.Counter = collections.Counter()
    seen, pending = set(), [loss.grad_fn] if loss.grad_fn is not None else []
    while pending:
        for child, _ in pending.pop().next_functions:
            if child is None:
                continue
            if hasattr(child, "variable"):  # a leaf's gradient accumulator: one edge per use
                uses[names.get(id(child.variable))] += 1
            elif child not in seen:
                seen.add(child)
                pending.append(child)
    del uses[None]
    return uses


@contextlib.contextmanager
def _requires_grad_kept(model: nn.Module) -> Iterator[None]:
    """Within the block the parameters' ``requires_grad`` flags may change; afterwards they are as before."""
    parameters = list(model.parameters())
    flags = [p.requires_grad for p in parameters]
    try:
        yield
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)


def _reference_grads(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                     layers: list[tuple[str, nn.Module]]
                     ) -> tuple[list[dict[str, torch.Tensor | None]], _CallShapes | None]:
    """The single-sample gradients of each of ``inputs`` (may be none) and, from the first sample's
    forward, the input shape of each call of each counted module for one sample (None without inputs),
    marked ``used_elsewhere`` if its graph uses a counted weight more often than its modules' calls."""
    if not len(inputs):
        return [], None
    shapes = _CallShapes()
    attentions = [m for m in model.modules() if _stock_attention(m)]
    with _input_shapes_recorded(_weight_users(model, layers), shapes, attentions=attentions), \
            _counted_weights_only(model, layers):
        first, loss = _sample_gradients(model, inputs[:1], targets[:1], loss_fn, layers)
        uses = _graph_uses(loss, layers)
    calls = collections.Counter(name for name, _ in shapes)
    shapes.used_elsewhere = any(count > calls[name] for name, count in uses.items())
    others = _single_sample_grads(model, inputs[1:], targets[1:], loss_fn, layers) if len(inputs) > 1 else ()
    return [first, *others], shapes


def _reference_then_batched_form(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                                 loss_fn: LossFn, layers: list[tuple[str, nn.Module]]
                                 ) -> tuple[list[dict[str, torch.Tensor | None]],
                                            _CallShapes | None, _Forms]:
    """``_reference_grads`` of ``inputs``, then ``model`` put in its ``BatchedForm``, and the call shapes
    the reference recorded (None without inputs: the batched pass reads them itself). The reference runs
    with torch's own BatchNorm layers already in their single-sample form, which on one sample computes
    what they do (so that the reference normalises as the batched pass does, to the bit); the rest of
    the batched form (other norms, attention) comes after it, so that the reference checks it."""
    norms = BatchedForm(model, attention=False, stock_norms_only=True)
    try:
        reference, single_shapes = _reference_grads(model, inputs, targets, loss_fn, layers)
        return reference, single_shapes, _Forms(norms, BatchedForm(model))
    except BaseException:
        norms.undo()
        raise


class _Forms:
    """Batched forms applied one after the other, undone in reverse order."""

    def __init__(self, *forms: BatchedForm):
        self.forms = forms

    def undo(self) -> None:
        for form in reversed(self.forms):
            form.undo()


def _loop_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                 layers: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    totals = _zero_totals(layers)
    for grads in _single_sample_grads(model, inputs, targets, loss_fn, layers):
        for name, grad in grads.items():
            if grad is not None:
                totals[name] += torch.sign(grad)
    return _integer_counts(totals)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _default_chunk(layers: list[tuple[str, nn.Module]], n: int, budget: int) -> int:
    largest = max((m.weight.numel() for _, m in layers), default=1)
    return max(1, min(n, budget // largest))


def _batched_chunk(layers: list[tuple[str, nn.Module]], single_shapes: _CallShapes, inputs: torch.Tensor
                   ) -> int:
    """Samples per batched pass: per-sample gradients of the largest weight within ``DEFAULT_ELEMENT_BUDGET``
    and, on a CPU, the counted layers' inputs within ``ACTIVATION_BUDGET``; the batch split into equal
    chunks."""
    chunk = _default_chunk(layers, len(inputs), DEFAULT_ELEMENT_BUDGET)
    if inputs.device.type == "cpu":
        per_sample = sum(math.prod(shape) for shape in single_shapes.values()) or 1
        chunk = min(chunk, max(1, ACTIVATION_BUDGET // per_sample))
    chunks = -(-len(inputs) // chunk)
    return -(-len(inputs) // chunks)


def _normalises_by_batch_statistics(module: nn.Module) -> bool:
    """A BatchNorm in train mode, or one that keeps no running statistics: it normalises by the batch's."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or not module.track_running_stats)


def _stock_norm(module: nn.Module) -> bool:
    """A BatchNorm running torch's own forward: on a batch of one ``_PerSampleNorm`` computes the same."""
    return type(module).forward is nn.modules.batchnorm._BatchNorm.forward


class _PerSampleNorm(nn.Module):
    """BatchNorm applied to a batch of one, for every sample at once: instance normalisation with the
    BatchNorm's eps and affine parameters (statistics over all dims after the channel dim). Where the
    input has ``r`` rows per sample (tokens or channels folded into the batch, ``samples`` the number of
    samples in the model's call), the statistics are over each sample's ``r`` consecutive rows together,
    as BatchNorm computes them on one sample's rows."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.samples: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, samples = x.shape[0], self.samples or x.shape[0]
        if rows <= samples:  # a row per sample (of all samples, or of some the model picked)
            return self._normalised(x)
        if rows % samples:
            raise UnsupportedModelError(f"a BatchNorm gets {rows} rows for {samples} samples (no whole number "
                                        "of rows per sample), so its single-sample statistics are not known")
        # (samples * r, C, ...) -> (samples, C, r, ...): one sample's rows are its instance's positions
        grouped = x.unflatten(0, (samples, rows // samples)).transpose(1, 2)
        return self._normalised(grouped).transpose(1, 2).flatten(0, 1)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Instance normalisation of (samples, C, ...) by group normalisation with a group per channel
        (the same formula, faster than ``F.instance_norm`` on a CPU where a channel has more than
        ``FEW_NORM_POSITIONS`` values; on a copy laid out contiguously, as ``F.instance_norm`` takes one,
        since torch's channels-last group normalisation with a group per channel took 3.3-16x as long:
        ``python bench/layer_kernels.py --norms``);
        with one value per channel ``F.instance_norm`` raises torch's error for it (group normalisation
        would give the bias)."""
        if x.dim() > 2 and math.prod(x.shape[2:]) > FEW_NORM_POSITIONS:
            return F.group_norm(x.contiguous(), x.shape[1], self.weight, self.bias, self.eps)
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


class _IdentityProjection(nn.Module):
    """Stands in for an attention's out_proj inside the functional attention: weight I, bias 0."""

    def __init__(self, projection: nn.Linear):
        super().__init__()
        like = projection.weight
        self.register_buffer("weight", torch.eye(like.shape[1], dtype=like.dtype, device=like.device))
        self.register_buffer("bias", torch.zeros(like.shape[0], dtype=like.dtype, device=like.device))


_ATTENTION_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _stock_attention(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` running torch's own forward (a subclass's forward may do anything
    around it, so the batched form leaves such modules as they are)."""
    return isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward


def _attention_with_modular_out_proj(self: nn.MultiheadAttention, query: torch.Tensor, *args, **kwargs):
    """``nn.MultiheadAttention.forward`` with the output projection applied by calling ``out_proj`` as a
    module (exactly the same product). Attention on batched inputs without extra key/value biases or zero
    attention is computed directly (``_plain_attention``); any other call runs the functional attention
    with an identity projection inside it and the product after."""
    call = _ATTENTION_SIGNATURE.bind(self, query, *args, **kwargs)
    call.apply_defaults()
    options = call.arguments
    if (query.dim() == 3 and self.bias_k is None and not self.add_zero_attn
            and not (options["is_causal"] and options["attn_mask"] is None)):  # torch refuses that call
        return _plain_attention(self, query, options["key"], options["value"], options["key_padding_mask"],
                                options["attn_mask"], is_causal=options["is_causal"],
                                need_weights=options["need_weights"], average_weights=options["average_attn_weights"])
    projection = self.out_proj
    self._modules["out_proj"] = _IdentityProjection(projection)
    try:
        output, weights = nn.MultiheadAttention.forward(self, query, *args, **kwargs)
    finally:
        self._modules["out_proj"] = projection
    if self.batch_first or output.dim() < 3:
        return projection(output), weights
    return projection(output.transpose(0, 1)).transpose(0, 1), weights


def _plain_attention(attention: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
                     *, is_causal: bool, need_weights: bool, average_weights: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention softmax(q k^T / sqrt(d) + mask) v of each head, as
    ``F.multi_head_attention_forward`` computes it (query, key and value projected by the attention's
    input weights; boolean masks mean -inf where True, float masks are added, the key padding mask to
    every query and head; ``is_causal`` replaces the given causal mask only where torch does so: no key
    padding mask, no weights returned), the heads' outputs side by side, then ``out_proj`` called as a
    module on (samples, tokens, features). With ``need_weights`` the attention weights are formed
    explicitly, as torch does then, and returned (averaged over heads with ``average_weights``)."""
    embed = attention.embed_dim
    if attention._qkv_same_embed_dim and query is key is value:  # self-attention: one product, as torch
        projected = F.linear(query, attention.in_proj_weight, attention.in_proj_bias).chunk(3, -1)
    else:
        weights = (attention.in_proj_weight.split(embed) if attention._qkv_same_embed_dim else
                   (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight))
        biases = attention.in_proj_bias.split(embed) if attention.in_proj_bias is not None else (None,) * 3
        projected = [F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)]
    output, scores = _attention_of_projections(
        *projected, attention.num_heads, batch_first=attention.batch_first, key_padding_mask=key_padding_mask,
        attn_mask=attn_mask, is_causal=is_causal, need_weights=need_weights, average_weights=average_weights,
        dropout=attention.dropout if attention.training else 0.0)
    output = attention.out_proj(output)
    return (output if attention.batch_first else output.transpose(0, 1)), scores


def _attention_of_projections(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, batch_first: bool,
                              key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
                              is_causal: bool, need_weights: bool, average_weights: bool, dropout: float
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention part of ``F.multi_head_attention_forward`` on projected queries, keys and values:
    the heads' outputs side by side as (samples, tokens, features), before the output projection, and the
    attention weights where ``need_weights`` (see ``_plain_attention``)."""
    def heads_first(x: torch.Tensor) -> torch.Tensor:  # (samples, heads, tokens, head features)
        if not batch_first:
            x = x.transpose(0, 1)
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)

    q, k, v = map(heads_first, (q, k, v))
    causal = is_causal and key_padding_mask is None and not need_weights
    mask = None if causal else _attention_mask(attn_mask, key_padding_mask, q)
    scores = None
    if need_weights:
        logits = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
        scores = torch.softmax(logits if mask is None else logits + mask, dim=-1)
        output = F.dropout(scores, dropout) @ v if dropout else scores @ v
    else:
        output = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    if scores is not None and average_weights:
        scores = scores.mean(dim=1)
    return output.transpose(1, 2).flatten(2), scores


def _attention_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, q: torch.Tensor
                    ) -> torch.Tensor | None:
    """The additive mask, broadcastable to (samples, heads, queries, keys), of an attention call's
    ``attn_mask`` ((queries, keys) or (samples * heads, queries, keys)) and ``key_padding_mask``
    ((samples, keys)); a boolean mask is -inf where True. ``q``: the queries, (samples, heads, queries, d)."""
    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask, float("-inf"))
        return mask.to(q.dtype)

    samples, heads = q.shape[:2]
    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(samples, heads, *mask.shape[1:]) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(samples, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    return mask


class BatchedForm:
    """The model rewritten for the batched engine, exactly: every BatchNorm that normalises by batch
    statistics replaced with ``_PerSampleNorm``, and every ``nn.MultiheadAttention`` that runs torch's own
    forward calling its out_proj as a module (so that its gradient hook sees it); ``undo`` restores the
    model."""

    def __init__(self, model: nn.Module, *, attention: bool = True, stock_norms_only: bool = False):
        self.swapped: list[tuple[nn.Module, str, nn.Module]] = []
        self.attentions: list[nn.MultiheadAttention] = []
        for parent in list(model.modules()):
            if attention and _stock_attention(parent):
                parent.forward = types.MethodType(_attention_with_modular_out_proj, parent)
                self.attentions.append(parent)
            for name, child in parent.named_children():
                if _normalises_by_batch_statistics(child) and (not stock_norms_only or _stock_norm(child)):
                    setattr(parent, name, _PerSampleNorm(child))
                    self.swapped.append((parent, name, child))
        norms = [getattr(parent, name) for parent, name, _ in self.swapped]

        def count_samples(module: nn.Module, args: tuple) -> None:  # each call of the model: its batch's samples
            for norm in norms:
                norm.samples = len(args[0]) if args and isinstance(args[0], torch.Tensor) else None
        self.samples_hook = model.register_forward_pre_hook(count_samples) if norms else None

    def undo(self) -> None:
        for parent, name, norm in self.swapped:
            setattr(parent, name, norm)
        for attention in self.attentions:
            del attention.forward
        if self.samples_hook is not None:
            self.samples_hook.remove()
        self.swapped, self.attentions, self.samples_hook = [], [], None


def _conv2d_sample_grads(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor,
                         scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row dL/dW of a Conv2d, shape (rows, *W.shape), from its input and output gradient. ``scratch``:
    a flat buffer the result may be written into (when the chosen way can and it is large enough)."""
    x, padding = _padded_input(conv, x)
    if _use_sample_by_sample(conv, x, grad_out):
        return _sample_by_sample_grads(conv, x, grad_out, padding, scratch)
    if _use_forward_convolution(conv, x, grad_out):
        return _forward_convolution_sample_grads(conv, x, grad_out, padding)
    if _use_matmul(conv, x, grad_out):
        return _conv2d_sample_grads_matmul(conv, x, grad_out, padding, scratch)
    batch = x.shape[0]
    out_channels, in_per_group, *kernel = conv.weight.shape
    grads = torch.nn.grad.conv2d_weight(
        x.reshape(1, -1, *x.shape[2:]), (batch * out_channels, in_per_group, *kernel),
        grad_out.reshape(1, -1, *grad_out.shape[2:]), stride=conv.stride, padding=padding,
        dilation=conv.dilation, groups=batch * conv.groups)
    return grads.reshape(batch, *conv.weight.shape)


def _padded_input(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | int]:
    """``x`` and the zero padding left to the convolution: padding given by a string or of another mode
    than zeros is applied to ``x`` itself."""
    if x.dim() != 4:
        raise UnsupportedModelError("Conv2d called on unbatched input")
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0
    return x, conv.padding


def _padded_maps(x: torch.Tensor, padding: tuple[int, int] | int) -> torch.Tensor:
    """``x`` with ``padding`` (one int, or (height, width)) zeros on each side of its maps."""
    pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
    return F.pad(x, (pad_w, pad_w, pad_h, pad_h))


def _use_sample_by_sample(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> bool:
    """Whether a float32 stem on a CPU with oneDNN forms its per-sample gradients fastest one sample at a
    time (``_sample_by_sample_grads``): ungrouped, on fewer than ``FEW_INPUT_CHANNELS`` input channels,
    kernels above 3x3, and at least ``SAMPLE_BY_SAMPLE_WORK`` times torch's threads input channels x
    kernel taps x output positions (with one thread a 7x7 RGB stem from 32x32 output maps on)."""
    if not (x.dtype == torch.float32 and _on_onednn_cpu(x)):
        return False
    taps = conv.weight.shape[2] * conv.weight.shape[3]
    positions = grad_out.shape[2] * grad_out.shape[3]
    return (conv.groups == 1 and conv.in_channels < FEW_INPUT_CHANNELS and taps > 9
            and conv.in_channels * taps * positions >= SAMPLE_BY_SAMPLE_WORK * torch.get_num_threads())


def _sample_by_sample_grads(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor,
                            padding: tuple[int, int] | int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample dL/dW of an ungrouped Conv2d, (samples, *W.shape), by torch's weight-gradient convolution
    of each sample alone: what a backward pass of that sample computes. ``scratch``: a flat buffer the
    result may be written into."""
    grads = _scratch_view(scratch, (len(x), *conv.weight.shape), x.dtype)
    if grads is None:
        grads = x.new_empty(len(x), *conv.weight.shape)
    for i in range(len(x)):
        grads[i] = torch.nn.grad.conv2d_weight(x[i:i + 1], conv.weight.shape, grad_out[i:i + 1], stride=conv.stride,
                                               padding=padding, dilation=conv.dilation)
    return grads


def _use_forward_convolution(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> bool:
    """On a CPU, where a forward convolution forms the per-sample gradients faster than the grouped
    weight-gradient one and the matrix product (bench/layer_kernels.py): depthwise convolutions with
    kernels larger than 3x3 or on maps of at most ``GROUPED_MATMUL_POSITIONS`` output positions, and stems
    on few input channels (``_few_input_channels``) whose overlapping kernels are larger than 3x3, on more
    than ``MATMUL_POSITIONS`` output positions."""
    if x.device.type != "cpu":
        return False
    positions = grad_out.shape[2] * grad_out.shape[3]
    above_3x3 = conv.weight.shape[2] * conv.weight.shape[3] > 9
    if conv.groups == conv.in_channels == conv.out_channels:
        return above_3x3 or positions <= GROUPED_MATMUL_POSITIONS
    return (above_3x3 and _few_input_channels(conv, positions) and positions > MATMUL_POSITIONS
            and any(k > s for k, s in zip(conv.kernel_size, conv.stride)))


def _few_input_channels(conv: nn.Conv2d, positions: int) -> bool:
    """An ungrouped convolution on fewer than ``FEW_INPUT_CHANNELS`` channels (a stem on an image) with at
    most ``FEW_CHANNEL_POSITIONS`` output positions."""
    return conv.groups == 1 and conv.in_channels < FEW_INPUT_CHANNELS and positions <= FEW_CHANNEL_POSITIONS


def _forward_convolution_sample_grads(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor,
                                      padding: tuple[int, int] | int) -> torch.Tensor:
    """dW[i, o, c, a, b] = sum_pq grad_out[i, o, p, q] x_padded[i, g C + c, p s + a d, q s + b d] for output
    channel o of group g with C input channels (stride s, dilation d): a forward convolution whose batch
    is the C input channels of a group, whose channels are the samples' groups (one convolution group
    each), with the output-gradient maps as kernels, taken with stride d and dilation s."""
    batch, out_channels, *out_size = grad_out.shape
    groups, in_per_group = conv.groups, conv.weight.shape[1]
    x = _padded_maps(x, padding)
    x = x.reshape(batch, groups, in_per_group, *x.shape[2:]).permute(2, 0, 1, 3, 4)
    grads = F.conv2d(x.reshape(in_per_group, batch * groups, *x.shape[3:]),
                     grad_out.reshape(batch * out_channels, 1, *out_size),
                     stride=conv.dilation, dilation=conv.stride, groups=batch * groups)
    kernel_h, kernel_w = conv.kernel_size
    grads = grads[:, :, :kernel_h, :kernel_w].reshape(in_per_group, batch, out_channels, kernel_h, kernel_w)
    return grads.permute(1, 2, 0, 3, 4)


def _use_matmul(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> bool:
    """A batched matrix product instead of the grouped weight-gradient convolution, on a CPU: for ungrouped
    convolutions that are 1x1 without padding (no unfolding needed), have at most ``MATMUL_POSITIONS``
    output positions or few input channels (``_few_input_channels``), and for grouped ones with at most
    ``GROUPED_MATMUL_POSITIONS`` (where the grouped convolution is slower; measured by
    bench/layer_kernels.py) or in float64."""
    if x.device.type != "cpu":
        return False
    positions = grad_out.shape[2] * grad_out.shape[3]
    if conv.groups != 1:  # in float64 torch's grouped convolutions take one group at a time
        return positions <= GROUPED_MATMUL_POSITIONS or x.dtype == torch.float64
    pointwise = conv.weight.shape[2:] == (1, 1) and conv.dilation == (1, 1) and tuple(conv.padding) == (0, 0)
    return pointwise or positions <= MATMUL_POSITIONS or _few_input_channels(conv, positions)


def _conv2d_factors(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, padding: tuple[int, int] | int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns), (batch * groups, C_out/G, P) and (batch * groups, C_in/G k k, P) for P output
    positions: sample i's dL/dW for group g is rows_ig columns_ig^T (its output gradient times its
    unfolded input)."""
    batch, groups = x.shape[0], conv.groups
    if conv.weight.shape[2:] == (1, 1) and padding in (0, (0, 0)) and conv.dilation == (1, 1):
        x = x[:, :, ::conv.stride[0], ::conv.stride[1]][:, :, :grad_out.shape[2], :grad_out.shape[3]]
        columns = x.reshape(batch, x.shape[1], -1)
    else:
        columns = _unfolded(x, conv, padding, grad_out.shape[2:])
    columns = columns.reshape(batch * groups, -1, columns.shape[-1])
    return grad_out.reshape(batch * groups, -1, columns.shape[-1]), columns


def _unfolded(x: torch.Tensor, conv: nn.Conv2d, padding: tuple[int, int] | int, out_size: torch.Size
              ) -> torch.Tensor:
    """``F.unfold`` of ``x`` for ``conv``'s kernel, (batch, C k k, P): on a CPU with more than
    ``SHALLOW_PRODUCT_DEPTH`` output positions, one strided copy of the zero-padded input (1.7-6x faster than
    torch's im2col on 8x8 to 32x32 maps: ``python bench/layer_kernels.py --unfold``; slower on 4x4 and
    2x2 ones, which keep im2col)."""
    if x.device.type != "cpu" or out_size[0] * out_size[1] <= SHALLOW_PRODUCT_DEPTH:
        return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    x = _padded_maps(x, padding)
    batch, channels = x.shape[:2]
    (kernel_h, kernel_w), (stride_h, stride_w), (dilation_h, dilation_w) = conv.kernel_size, conv.stride, conv.dilation
    step_b, step_c, step_h, step_w = x.stride()
    windows = x.as_strided((batch, channels, kernel_h, kernel_w, *out_size),
                           (step_b, step_c, step_h * dilation_h, step_w * dilation_w, step_h * stride_h,
                            step_w * stride_w))
    columns = x.new_empty(batch, channels * kernel_h * kernel_w, out_size[0] * out_size[1])
    columns.view(windows.shape).copy_(windows)
    return columns


def _grouped_in_fused_loop(conv: nn.Conv2d, rows: torch.Tensor) -> bool:
    """Whether a grouped convolution's per-sample products ``rows`` (samples, out, positions) go to the fused
    loop: on at most ``GROUPED_MATMUL_POSITIONS`` positions (a multiple of four), with output channels per
    group a multiple of four and more than one input channel per group, where the loop is available.
    On RegNetX's 2x2 maps (24 groups of 16 channels) 0.34-0.40x the time of the per-sample-and-group
    products (``python bench/layer_kernels.py --small-maps``); on 4x4 maps slower."""
    positions = rows.shape[2]
    return (positions <= GROUPED_MATMUL_POSITIONS and positions % 4 == 0 and (conv.out_channels // conv.groups) % 4 == 0
            and conv.in_channels // conv.groups > 1 and fused_available(rows))


def _unfolded_channels_last(x: torch.Tensor, conv: nn.Conv2d, padding: tuple[int, int] | int, out_size: torch.Size
                            ) -> torch.Tensor:
    """The input windows of every output position, (groups, batch, positions, k_h k_w C/G), each ordered
    (kernel row, kernel column, channel of the group): one copy of ``x`` zero-padded channels-last (none
    without padding) and one strided copy along its channels (for the fused loop, which wants the
    positions before the columns; ``python bench/layer_kernels.py --small-maps`` times the whole call
    against torch's im2col copied transposed)."""
    pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
    batch, channels, height, width = x.shape
    padded = x.permute(0, 2, 3, 1)
    if pad_h or pad_w:
        padded = x.new_zeros(batch, height + 2 * pad_h, width + 2 * pad_w, channels)
        padded[:, pad_h:pad_h + height, pad_w:pad_w + width] = x.permute(0, 2, 3, 1)
    groups, in_per_group = conv.groups, channels // conv.groups
    (kernel_h, kernel_w), (stride_h, stride_w), (dilation_h, dilation_w) = conv.kernel_size, conv.stride, conv.dilation
    step_b, step_h, step_w, step_c = padded.stride()
    windows = padded.as_strided((groups, batch, *out_size, kernel_h, kernel_w, in_per_group),
                                (in_per_group * step_c, step_b, step_h * stride_h, step_w * stride_w,
                                 step_h * dilation_h, step_w * dilation_w, step_c), padded.storage_offset())
    columns = x.new_empty(groups, batch, out_size[0] * out_size[1], kernel_h * kernel_w * in_per_group)
    columns.view(windows.shape).copy_(windows)
    return columns


def _conv2d_sample_grads_matmul(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor,
                                padding: tuple[int, int] | int, scratch: torch.Tensor | None = None
                                ) -> torch.Tensor:
    """Per-sample dL/dW by one batched product over samples and groups of ``_conv2d_factors``."""
    rows, columns = _conv2d_factors(conv, x, grad_out, padding)
    batch = x.shape[0]
    shape = (len(rows), rows.shape[1], columns.shape[1])
    out = _scratch_view(scratch, shape, rows.dtype)
    grads = torch.bmm(rows, columns.transpose(1, 2), out=out) if out is not None else torch.bmm(
        rows, columns.transpose(1, 2))
    return grads.reshape(batch, *conv.weight.shape)


def _scratch_view(scratch: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype
                  ) -> torch.Tensor | None:
    """``scratch``'s first elements as a tensor of ``shape``, or None without a large enough buffer of
    ``dtype``."""
    numel = math.prod(shape)
    if scratch is None or scratch.numel() < numel or scratch.dtype != dtype:
        return None
    return scratch[:numel].view(shape)


def _embedding_sample_grads(embedding: nn.Embedding, ids: torch.Tensor, grad_out: torch.Tensor,
                            samples: int) -> torch.Tensor:
    """Per-sample dL/dW of an Embedding, shape (samples, *W.shape): each sample's output-gradient rows added
    at its ids (none at ``padding_idx``), as the Embedding's own backward adds them for a batch of one."""
    rows, width = embedding.weight.shape
    ids = ids.reshape(samples, -1)
    flat = (ids + torch.arange(samples, device=ids.device)[:, None] * rows).flatten()
    values = grad_out.reshape(-1, width)
    if embedding.padding_idx is not None:
        keep = ids.flatten() != embedding.padding_idx
        flat, values = flat[keep], values[keep]
    grads = grad_out.new_zeros(samples * rows, width)
    return grads.index_add_(0, flat, values).view(samples, rows, width)


def _sample_grads(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, samples: int,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weight gradients of ``samples`` samples whose rows fill ``x``'s first dimension."""
    if len(x) != samples:
        grads = _conv2d_sample_grads(conv, x, grad_out)
        return grads.reshape(samples, -1, *grads.shape[1:]).sum(1)
    return _conv2d_sample_grads(conv, x, grad_out, scratch)


class _SignCountHooks:
    """Forward hooks that attach, to each counted module's output, a gradient hook forming the module's
    per-sample weight gradients and adding their signs to ``totals``. A weight used in several calls in
    one forward (a reused module, or modules sharing it) has its per-sample gradients summed over the
    calls before the sign is taken. The per-sample gradients of sample ``verified`` of the first chunk
    (if any) are kept in ``prefix``, one row per weight, for verification; with ``verified_only``, only
    that sample's are formed and kept, and no signs counted (``totals`` is not used).

    How a call's input holds the samples is read by comparing its shape with the same call's input shape
    for a single sample (``single_shapes``): ``samples`` times as many rows (a sample's rows consecutive),
    or, for a Linear, ``samples`` along the second dimension (sequence-first); the verification checks
    the reading."""

    def __init__(self, users: list[tuple[str, nn.Module]], totals: dict[str, torch.Tensor],
                 verified: int | None, single_shapes: _CallShapes, *, verified_only: bool = False):
        self.totals = totals
        self.shapes = {name: m.weight.shape for name, m in users}
        self.verified = verified
        self.verified_only = verified_only and verified is not None
        self.prefix: dict[str, torch.Tensor] = {}
        self.samples = 0
        self.first_chunk = True
        self.single_shapes = single_shapes
        self.calls: dict[str, int] = {}
        self.pending_calls: dict[str, int] = {}
        self.partial: dict[str, torch.Tensor] = {}
        self.linear_rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.scratch: dict[str, torch.Tensor] = {}
        self.chunk_inputs: torch.Tensor | None = None
        # autograd nodes of the chunk's hooked outputs: a gradient through them reaches a counted layer
        self.hooked_nodes: set = set()
        # an Embedding with its own forward changes its lookup's rows (e.g. scales them): its call is seen
        # at its F.embedding under _FunctionalLinearCalls instead. Each hook runs before the module's other
        # forward hooks, so that it sees the layer's own output even where the model's hooks replace it
        self.handles = [m.register_forward_hook(self._forward_hook(name), prepend=True) for name, m in users
                        if not _embedding_with_own_forward(m)]

    def start_chunk(self, samples: int, inputs: torch.Tensor | None = None) -> None:
        """A chunk of ``samples`` samples; ``inputs``: the tensor the model is called with, when it
        requires grad only so that the graph reaches every layer (its own gradient is never used)."""
        self.samples = samples
        self.chunk_inputs = inputs

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise UnsupportedModelError(f"layer {name} does not return a tensor")
            return self.call(name, module, args[0], output)
        return hook

    def call(self, name: str, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """One call of counted weight ``name`` by ``module`` (or as ``module`` would) on ``x``: attaches the
        gradient hook to ``output`` and returns the output the model goes on with."""
        if _rows_picked_by_index(x):
            raise UnsupportedModelError(
                f"layer {name} gets rows picked by an index (e.g. tokens routed to experts, or kept by a mask): how "
                "many of them each sample has can differ between samples, which a batched pass cannot tell")
        sequence_first = self._sequence_first(name, module, x)
        if not torch.is_grad_enabled():  # a call under no_grad: no gradient reaches the weight through it
            return output
        if not output.requires_grad or self._no_layer_behind(x):
            # the input does not depend on the batch (e.g. zeros from a cut-off path), or only on the
            # batch itself, whose gradient nobody needs: start the graph anew at the output, so that the
            # gradient arriving at it is still seen and none is computed for the input (a copy of a leaf:
            # the model may change the output in place, which a leaf that requires grad refuses)
            output = output.detach().requires_grad_(True).clone()
        self.pending_calls[name] = self.pending_calls.get(name, 0) + 1
        x = x.detach()
        shape = output.shape
        hooked = _hooked_tensor(output)
        self.hooked_nodes.update(t.grad_fn for t in (hooked, output) if t.grad_fn is not None)
        if sequence_first:  # a Linear acts on each position alone: put the samples first
            hooked.register_hook(lambda grad: self._accumulate_call(
                name, module, *self._formed(x.transpose(0, 1), grad.reshape(shape).transpose(0, 1))))
        else:
            hooked.register_hook(
                lambda grad: self._accumulate_call(name, module, *self._formed(x, grad.reshape(shape))))
        return output

    def _formed(self, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of a call whose per-sample gradients are formed: the chunk's, or with
        ``verified_only`` the verified sample's."""
        if not self.verified_only:
            return x, grad_out
        rows = len(x) // self.samples
        return x.narrow(0, self.verified * rows, rows), grad_out.narrow(0, self.verified * rows, rows)

    @property
    def formed_samples(self) -> int:
        return 1 if self.verified_only else self.samples

    def _kept_sample(self) -> int | None:
        """Which of the formed samples' gradients go to ``prefix`` now (None: none)."""
        if not self.first_chunk or self.verified is None:
            return None
        return 0 if self.verified_only else self.verified

    def _no_layer_behind(self, x: torch.Tensor) -> bool:
        """Whether ``x`` depends on no hooked output: only on the chunk's inputs (which require grad only
        so that the graph reaches every layer), directly or through operations without counted weights (a
        stem's padding, normalising pixel values), so that no hook needs a gradient through it. Its graph
        is walked back until a hooked output's node or a leaf other than the inputs says otherwise."""
        inputs = self.chunk_inputs
        if inputs is None or not x.requires_grad:
            return False
        if x is inputs or x._base is inputs:
            return True
        if x.grad_fn is None:  # another leaf
            return False
        pending, seen = [x.grad_fn], {x.grad_fn}
        while pending:
            node = pending.pop()
            if node in self.hooked_nodes:
                return False
            for child, _ in node.next_functions:
                if child is None or child in seen:
                    continue
                seen.add(child)
                if hasattr(child, "variable"):  # a leaf's gradient accumulator
                    if child.variable is not inputs:
                        return False
                else:
                    pending.append(child)
        return True

    def _sequence_first(self, name: str, module: nn.Module, x: torch.Tensor) -> bool:
        call = (name, self.calls.get(name, 0))
        self.calls[name] = call[1] + 1
        one = self.single_shapes.get(call)
        shape = x.shape
        if one is None or len(one) != len(shape) or not shape:
            raise UnsupportedModelError(f"layer {name} is called differently for a single sample")
        if shape[0] == self.samples * one[0] and shape[1:] == one[1:]:
            return False
        if (isinstance(module, nn.Linear) and len(shape) >= 3 and one[1] == 1 and shape[1] == self.samples
                and shape[0] == one[0] and shape[2:] == one[2:]):
            return True
        if shape == one:
            raise UnsupportedModelError(
                f"layer {name} gets an input of the same shape {tuple(shape)} for {self.samples} samples as for "
                "one: it does not hold the samples apart (a table shared by all of them, such as relative-position "
                "embeddings), so a batched pass cannot separate their gradients")
        raise UnsupportedModelError(
            f"layer {name} gets an input of shape {tuple(shape)} for {self.samples} samples and "
            f"{tuple(one)} for one: its first dimension is not the sample index")

    def _accumulate_call(self, name: str, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """``_accumulate``, its failures turned into an ``UnsupportedModelError`` naming the layer."""
        # a NaN output gradient gives NaN per-sample gradients, whose sign torch takes as 0
        _raise_on_nan([grad_out], f"the output gradient of layer {name}")
        if x.is_floating_point() and grad_out.dtype != x.dtype:
            x = x.to(grad_out.dtype)  # autocast ran the call in its output's precision, its input rounded to it
        try:
            self._accumulate(name, module, x, grad_out)
        except RuntimeError as error:
            if isinstance(error, torch.cuda.OutOfMemoryError):
                raise
            own = _own_forward(module)
            why = f"a {own} with its own forward" if own else f"a {type(module).__name__}"
            raise UnsupportedModelError(
                f"layer {name} ({why}): its per-sample gradients cannot be formed from the call's input and "
                f"output gradient ({_first_line(error)})") from error

    def _accumulate(self, name: str, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        self.pending_calls[name] -= 1
        if isinstance(module, nn.Linear):
            # every call's rows of the sample side by side: the per-sample gradient of all calls together is
            # one product grad_out_i^T x_i over them, formed once when the last call's gradient arrives
            self.linear_rows.setdefault(name, []).append(
                (x.reshape(self.formed_samples, -1, x.shape[-1]),
                 grad_out.reshape(self.formed_samples, -1, grad_out.shape[-1])))
            if not self.pending_calls[name]:
                self._reduce_linear(name)
            return
        if isinstance(module, nn.Embedding):
            self._add_call(name, _embedding_sample_grads(module, x, grad_out, self.formed_samples))
            return
        rows = len(x) // self.formed_samples
        if not self.pending_calls[name] and name not in self.partial:
            # the layer's only call: reduce to sign counts slice by slice
            if rows == 1 and (self._add_shallow_conv_signs(name, module, x, grad_out)
                              or self._add_depthwise_signs(name, module, x, grad_out)):
                return
            step = self._slice(module.weight.numel() * rows, x)
            scratch = self._scratch(step * module.weight.numel(), x)
            for part in _chunks(self.formed_samples, step):
                rows_part = slice(part.start * rows, part.stop * rows)
                grads = _sample_grads(module, x[rows_part], grad_out[rows_part], part.stop - part.start, scratch)
                self._add_signs(name, grads, part.start)
            return
        self._add_call(name, _sample_grads(module, x, grad_out, self.formed_samples))

    def _add_call(self, name: str, sample_grads: torch.Tensor) -> None:
        """One call's per-sample gradients of a weight used in several calls: summed with the other calls',
        the signs taken after the last (with the rows of its Linear calls, if any are pending)."""
        if name in self.partial:
            sample_grads = sample_grads + self.partial.pop(name)
        self.partial[name] = sample_grads
        if self.pending_calls[name]:
            return
        if name in self.linear_rows:
            self._reduce_linear(name)
        else:
            self._add_signs(name, self.partial.pop(name), 0)

    def _add_shallow_conv_signs(self, name: str, conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor
                                ) -> bool:
        """Sign counts of a Conv2d's one call by ``_add_product_signs`` when its per-sample gradients are
        products over at most ``SHALLOW_PRODUCT_DEPTH`` positions (True), else False: ungrouped ones where
        ``_use_matmul`` takes them; grouped ones on 2x2 maps (RegNet's last stage) by the fused loop, when
        it is available and each group has a multiple of four output channels and more than one input
        channel (``_grouped_in_fused_loop``)."""
        positions = grad_out.shape[2] * grad_out.shape[3] if grad_out.dim() == 4 else None
        if positions is None or positions > SHALLOW_PRODUCT_DEPTH:
            return False
        out_channels, in_per_group, kernel_h, kernel_w = conv.weight.shape
        rows = grad_out.reshape(len(grad_out), out_channels, -1)
        grouped = conv.groups > 1
        if not (_grouped_in_fused_loop(conv, rows) if grouped else _use_matmul(conv, x, grad_out)):
            return False
        x, padding = _padded_input(conv, x)
        columns = _unfolded_channels_last(x, conv, padding, grad_out.shape[2:])
        # columns in the order (kernel row, kernel column, channel), and so the products
        formed, permutation = torch.Size((out_channels, kernel_h, kernel_w, in_per_group)), (0, 3, 1, 2)
        if grouped:
            self._add_grouped_product_signs(name, rows, columns, formed, permutation)
        else:
            self._add_product_signs(name, rows, columns[0], formed, permutation)
        return True

    def _add_grouped_product_signs(self, name: str, a: torch.Tensor, b: torch.Tensor, shape: torch.Size,
                                   permutation: tuple[int, ...]) -> None:
        """``_add_product_signs`` for a grouped layer by the fused loop, all groups in one call: ``a``:
        (samples, out, depth), a group's output channels consecutive; ``b``: (groups, samples, depth,
        in/groups)."""
        groups, samples = b.shape[:2]
        a = a.reshape(samples, groups, -1, a.shape[2]).transpose(0, 1).contiguous()
        kept_sample = self._kept_sample()
        if kept_sample is not None:
            self._keep(name, torch.bmm(a[:, kept_sample], b[:, kept_sample]).reshape(1, *shape), permutation)
        if self.verified_only:
            return
        counts = self._formed_counts(shape, a)
        add_grouped_product_signs(a, b, counts.view(groups, a.shape[2], -1))
        self.totals[name] += counts.permute(permutation)

    def _add_depthwise_signs(self, name: str, conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> bool:
        """Sign counts of a depthwise Conv2d's one call by the depthwise loop of ``gradsign.sign_kernels``
        where it is available and faster (True), else False."""
        if not depthwise_available(conv, x, grad_out):
            return False
        kept_sample = self._kept_sample()
        x, padding = _padded_input(conv, x)
        counts = self.totals[name] if not self.verified_only else torch.zeros_like(conv.weight)
        kept = add_depthwise_signs(conv, x, grad_out, counts, padding, kept_sample)
        if kept is not None:
            self.prefix[name] = kept[None]
        return True

    def _add_product_signs(self, name: str, a: torch.Tensor, b: torch.Tensor, shape: torch.Size,
                           permutation: tuple[int, ...] | None = None) -> None:
        """Sign counts, added to the totals, of per-sample gradients that are products ``a_n b_n`` (``a``:
        (samples, out, depth), ``b``: (samples, depth, in); reshaped to ``shape``: the weight's, or with
        ``permutation`` the weight's dimensions in another order, which ``permutation`` restores). They are
        formed for all samples at once a slice of the larger side at a time (of about ``SLICE_ELEMENTS``
        floats on a CPU), the smaller side spanning each product's rows, so that every slice's sign sum
        is already its rows' sum over the chunk. Where numba is installed, one fused loop forms and counts
        them instead (``gradsign.sign_kernels``). With ``verified_only`` only its product is kept."""
        kept_sample, fused = self._kept_sample(), fused_available(a)
        if kept_sample is not None and (self.verified_only or fused):  # torch's way keeps it as it forms it
            self._keep(name, (a[kept_sample] @ b[kept_sample]).detach().reshape(1, *shape), permutation)
        if self.verified_only:
            return
        totals = self.totals[name]
        counts = totals if permutation is None else self._formed_counts(shape, totals)
        if fused:
            rows = counts.view(a.shape[1], b.shape[2])
            add_product_signs(a, b, rows, self._scratch(scratch_elements(a, b, rows), a, "fused"))
        else:
            kept = self._add_product_signs_by_torch(a, b, counts, kept_sample)
            if kept is not None:
                self._keep(name, kept.reshape(1, *shape), permutation)
        if permutation is not None:
            totals += counts.permute(permutation)

    def _add_product_signs_by_torch(self, a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor,
                                    kept_sample: int | None) -> torch.Tensor | None:
        """``_add_product_signs`` by batched products into a reused buffer, their signs and sums, added to
        ``counts`` (any shape of out x in elements); returns sample ``kept_sample``'s product (out, in)."""
        samples, transposed = len(a), b.shape[2] > a.shape[1]
        if transposed:  # slices of the input side: products b_n^T a_n^T, whose sums are the counts transposed
            a, b = b.transpose(1, 2), a.transpose(1, 2)
        sliced, whole = a.shape[1], b.shape[2]
        step = max(1, SLICE_ELEMENTS // (samples * whole)) if a.device.type == "cpu" else sliced
        buffer = self._scratch(samples * min(step, sliced) * whole, a)
        sums = self._scratch(sliced * whole, a, "sums")[:sliced * whole].view(sliced, whole)
        kept = a.new_empty(sliced, whole) if kept_sample is not None else None
        for part in _chunks(sliced, step):
            out = _scratch_view(buffer, (samples, part.stop - part.start, whole), a.dtype)
            products = torch.bmm(a[:, part], b, out=out)
            if kept is not None:
                kept[part] = products[kept_sample]
            torch.sum(torch.sign(products, out=products), 0, out=sums[part])
        total = counts.view(-1, whole if not transposed else sliced)
        total += sums.t() if transposed else sums
        return None if kept is None else kept.t() if transposed else kept

    def _formed_counts(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """Zeroed sign counts of ``shape`` (the order in which products are formed) in a reused buffer of
        ``like``'s dtype, to be added to the totals permuted into the weight's order."""
        return self._scratch(shape.numel(), like, "permuted")[:shape.numel()].view(shape).zero_()

    def _keep(self, name: str, sample_grads: torch.Tensor, permutation: tuple[int, ...] | None) -> None:
        """Keep the verified sample's gradients (1, *shape), their dimensions put in the weight's order."""
        self.prefix[name] = sample_grads if permutation is None else sample_grads.permute(
            0, *(d + 1 for d in permutation))

    def _slice(self, per_sample: int, x: torch.Tensor) -> int:
        """Samples per slice: per-sample gradients of about ``SLICE_ELEMENTS`` floats on a CPU."""
        return max(1, SLICE_ELEMENTS // per_sample) if x.device.type == "cpu" else self.formed_samples

    def _scratch(self, numel: int, like: torch.Tensor, purpose: str = "grads") -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements, one per ``purpose``, reused by every slice of every
        layer: a fresh allocation of a wide layer's slice is paged in anew each time, which doubled the
        cost of forming its per-sample gradients (bench/layer_kernels.py)."""
        buffer = self.scratch.get(purpose)
        if (buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype
                or buffer.device != like.device):
            buffer = self.scratch[purpose] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer

    def _reduce_linear(self, name: str) -> None:
        """Sign counts of a Linear weight from the rows of its calls, (samples, rows, features) each."""
        calls = self.linear_rows.pop(name)
        x = torch.cat([c[0] for c in calls], 1) if len(calls) > 1 else calls[0][0]
        grad_out = torch.cat([c[1] for c in calls], 1) if len(calls) > 1 else calls[0][1]
        others = self.partial.pop(name, None)  # the per-sample gradients of its calls as another module
        if others is not None:
            self._add_signs(name, torch.bmm(grad_out.transpose(1, 2), x) + others, 0)
            return
        if x.shape[1] == 1:
            self._add_outer_product_signs(name, x[:, 0], grad_out[:, 0])
            return
        if x.shape[1] <= SHALLOW_PRODUCT_DEPTH:
            self._add_product_signs(name, grad_out.transpose(1, 2), x, self.shapes[name])
            return
        step = self._slice(x.shape[2] * grad_out.shape[2], x)
        scratch = self._scratch(step * x.shape[2] * grad_out.shape[2], x)
        for part in _chunks(self.formed_samples, step):
            out = _scratch_view(scratch, (part.stop - part.start, grad_out.shape[2], x.shape[2]), grad_out.dtype)
            self._add_signs(name, torch.bmm(grad_out[part].transpose(1, 2), x[part], out=out), part.start)

    def _add_outer_product_signs(self, name: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """A Linear called once with one row per sample: sample i's gradient is the outer product
        grad_out_i x_i^T, whose signs are sign(grad_out_i) sign(x_i)^T, so the counts are one matrix
        product of signs (exact: integer sums far below float32's 2^24)."""
        v = self._kept_sample()
        if v is not None:
            self.prefix[name] = (grad_out[v:v + 1, :, None] * x[v:v + 1, None, :]).detach()
        if self.verified_only:
            return
        total = self.totals[name]
        total.addmm_(torch.sign(grad_out).transpose(0, 1).to(total.dtype), torch.sign(x).to(total.dtype))

    def _add_signs(self, name: str, sample_grads: torch.Tensor, first: int) -> None:
        kept_sample = self._kept_sample()
        if kept_sample is not None and 0 <= kept_sample - first < len(sample_grads):
            v = kept_sample - first
            self.prefix[name] = sample_grads[v:v + 1].detach().clone()
        if self.verified_only:
            return
        # signs in place (no copy of the per-sample gradients, whose memory traffic dominates on wide
        # layers), summed into a reused buffer and added to the totals
        signs = torch.sign(sample_grads, out=sample_grads)
        if len(signs) == 1:
            summed = signs[0]
        else:
            summed = torch.sum(signs, 0, out=self._scratch(signs[0].numel(), signs, "sums")[:signs[0].numel()]
                               .view(signs.shape[1:]))
        self.totals[name] += summed

    def finish_chunk(self) -> None:
        """Close the chunk: calls whose output got no gradient contribute zero."""
        for name in list(self.linear_rows):
            self._reduce_linear(name)  # takes the weight's other calls' gradients along
        for name, sample_grads in self.partial.items():
            self._add_signs(name, sample_grads, 0)
        self.partial.clear()
        self.pending_calls.clear()
        self.calls.clear()
        self.first_chunk = False
        self._forget_graph()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._forget_graph()

    def _forget_graph(self) -> None:
        """Drop the references to the chunk's graph: its nodes hold the gradient hooks, whose closures hold
        this object, a cycle through torch's C++ graph that Python's collector cannot see (each pass's
        layer inputs were never freed)."""
        self.hooked_nodes = set()
        self.chunk_inputs = None


#: operations that keep each row's values in their row (reshapes, activations, scalar arithmetic, layer
#: norm), looked through for an operation that picked rows (``_rows_picked_by_index``; at most
#: ``_ROW_PICKING_DEPTH`` of them, each of one differentiable input); not selections such as ``h[:, -1]``,
#: after which rows may be whole samples again
_ROW_KEEPING_NODES = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0",
                      "ToCopyBackward0", "TransposeBackward0", "PermuteBackward0", "GeluBackward0",
                      "ReluBackward0", "TanhBackward0", "SigmoidBackward0", "SiluBackward0", "EluBackward0",
                      "LeakyReluBackward0", "HardswishBackward0", "HardtanhBackward0", "SoftplusBackward0",
                      "MishBackward0", "MulBackward0", "DivBackward0", "AddBackward0", "SubBackward0",
                      "NativeLayerNormBackward0"}
_ROW_PICKING_DEPTH = 8


def _rows_picked_by_index(x: torch.Tensor) -> bool:
    """Whether ``x`` comes (through reshapes) from picking rows of a tensor by an index along its first
    dimension (``h[idx]``, ``h[mask]``, ``h.index_select(0, idx)``, ``h.gather(0, idx)`` as unpadding code
    does; ``h[None, idx]`` alike), or from rows concatenated along it (per-sample pieces packed together),
    through operations that keep rows (``gelu(h[idx])``, ``_ROW_KEEPING_NODES``): the number of rows each
    sample keeps may then vary, so equal blocks of rows need not be the samples. Picking
    ``h[torch.arange(n), ...]`` (one row per sample, in order) does not count."""
    node = x.grad_fn
    for _ in range(_ROW_PICKING_DEPTH):
        if node is None or type(node).__name__ not in _ROW_KEEPING_NODES:
            break
        inputs = [n for n, _ in node.next_functions if n is not None]
        node = inputs[0] if len(inputs) == 1 else None
    kind = type(node).__name__ if node is not None else ""
    if kind in ("IndexSelectBackward0", "GatherBackward0", "CatBackward0"):
        return node._saved_dim == 0
    if kind == "MaskedSelectBackward0":
        return True
    if kind != "IndexBackward0":
        return False
    # the index of the first dimension of more than one row: h[None, idx] indexes h with a new axis first
    # (Switch Transformers' experts pick their tokens so)
    indexed = list(zip(node._saved_indices, node._saved_self_sym_sizes))
    while len(indexed) > 1 and indexed[0][0] is None and indexed[0][1] == 1:
        indexed.pop(0)
    first = indexed[0][0] if indexed else None
    if first is None:
        return False
    in_order = first.dim() == 1 and not first.is_floating_point() and first.dtype != torch.bool and torch.equal(
        first, torch.arange(len(first), device=first.device, dtype=first.dtype))
    return not in_order


def _hooked_tensor(output: torch.Tensor) -> torch.Tensor:
    """The tensor whose gradient hook sees a layer output's gradient: the output itself, or, where the
    output is a view reshaping a whole tensor (``F.linear`` returns one for inputs of three or more
    dimensions), that tensor: a hook on such a view is lost when the model changes the view in place
    (Longformer divides its global queries so), one on the tensor still sees the gradient before the change."""
    base = output._base
    if (base is not None and base.requires_grad and base.numel() == output.numel() and output.is_contiguous()
            and base.is_contiguous() and output.storage_offset() == base.storage_offset()):
        return base
    return output


def _make_leaves_hooks(model: nn.Module) -> list:
    """Forward hooks making every floating output that needs no gradient a leaf that takes one, so that
    a graph reaches every counted layer when the inputs themselves cannot require grad (token ids)."""
    def hook(module: nn.Module, args: tuple, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
            return output.detach().requires_grad_(True)
        return output
    return [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]


def _batched_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                    layers: list[tuple[str, nn.Module]], chunk_size: int | None, *, verified: int | None = None,
                    single_shapes: _CallShapes | None = None, verified_only: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Sign counts from batched passes, and the per-sample gradients of sample ``verified`` (one row per
    counted weight; none without it). With ``verified_only`` only that sample's gradients are formed
    (the other samples still run through the model) and no signs are counted (the counts are empty).
    ``single_shapes``: the counted weights' calls' input shapes for one sample, when already known (a
    one-sample probe reads them otherwise); where they include functional ``F.linear`` calls, the forwards
    run under ``_FunctionalLinearCalls`` so that those calls are counted too."""
    model.requires_grad_(False)
    # added to in place, turned into int32 counts once at the end
    totals = _zero_totals(layers) if not verified_only else {}
    users = _weight_users(model, layers)
    if single_shapes is None:
        single_shapes = _single_sample_input_shapes(model, inputs[:1], users)
    # the verified sample shares the first pass with a sample on each side, whatever chunk size was asked for
    least = 0 if verified is None else min(verified + 2, len(inputs))
    chunk_size = max(chunk_size or _batched_chunk(layers, single_shapes, inputs), least)
    hooks = _SignCountHooks(users, totals, verified, single_shapes, verified_only=verified_only)
    floating = inputs.is_floating_point()
    leaf_hooks = [] if floating else _make_leaves_hooks(model)
    try:
        for part in _chunks(len(inputs), chunk_size):
            # floating inputs require grad so that every path to the loss is differentiable and no module
            # takes a no-grad fast path (fused attention) that skips its layers' calls
            x = inputs[part].detach().requires_grad_(True) if floating else inputs[part]
            hooks.start_chunk(len(x), x if floating else None)
            functional = _FunctionalLinearCalls(users, hooks.call) if single_shapes.functional else None
            with functional or contextlib.nullcontext():
                outputs = model(x)
            loss = per_sample_loss_sum(outputs, targets[part], loss_fn)
            _raise_on_nan([loss], "the loss")
            if loss.requires_grad:
                loss.backward()
            hooks.finish_chunk()
    finally:
        hooks.remove()
        for handle in leaf_hooks:
            handle.remove()
    return _integer_counts(totals), hooks.prefix


class _CallShapes(dict):
    """(counted name, call number) -> that call's input shape for one sample, calls numbered in forward
    order; ``functional``: some call was ``F.linear`` on a counted Linear weight outside its modules;
    ``used_elsewhere``: the forward's graph used some counted weight more often than the calls recorded."""

    functional = False
    used_elsewhere = False


_FUNCTIONAL_ATTENTION_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_MATRIX_PRODUCTS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class _FunctionalLinearCalls(TorchFunctionMode):
    """Within the block, each ``F.linear`` call on a counted Linear weight made outside every module call
    that uses the weight (e.g. ``F.linear(h, layer.weight)``) goes to ``on_call(name, module, x, output)``,
    which returns the output the model goes on with; so does a matrix product that is such a call written
    out (``_matrix_product``), and the ``F.embedding`` call inside an ``nn.Embedding`` subclass with its own
    forward on a counted weight (a head tied to a scaled embedding). ``F.multi_head_attention_forward``
    given counted Linear weights as its separate query, key and value projections (as WavLM calls it) is
    computed here, its projections by such calls; other calls inside functions that dispatch as a whole
    are not seen."""

    def __init__(self, users: list[tuple[str, nn.Module]], on_call: Callable):
        super().__init__()
        self.users = users
        self.owners = {id(m.weight): (name, m) for name, m in reversed(users) if isinstance(m, nn.Linear)}
        self.lookups = {id(m.weight): (name, m) for name, m in users if _embedding_with_own_forward(m)}
        self.on_call = on_call
        self.running: dict[int, int] = {}
        self.handles: list = []

    def __enter__(self):
        for _, m in self.users:
            if _embedding_with_own_forward(m):  # its F.embedding call is the use of the weight
                continue
            self.handles.append(m.register_forward_pre_hook(self._enter_call))
            self.handles.append(m.register_forward_hook(self._leave_call, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return super().__exit__(*exc)

    def _enter_call(self, module: nn.Module, args: tuple) -> None:
        self.running[id(module.weight)] = self.running.get(id(module.weight), 0) + 1

    def _leave_call(self, module: nn.Module, args: tuple, output) -> None:
        self.running[id(module.weight)] -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            computed = self._attention(args, kwargs)
            if computed is not None:
                return computed
        if func in _MATRIX_PRODUCTS and len(args) == 2 and not kwargs:
            computed = self._matrix_product(*args)
            if computed is not None:
                return computed
        output = func(*args, **kwargs)
        if func is F.linear and isinstance(output, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            output = self._seen(weight, args[0] if args else kwargs["input"], output)
        elif func is F.embedding and isinstance(output, torch.Tensor):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            lookup = self.lookups.get(id(weight))
            if lookup is not None and not self.running.get(id(weight)):
                output = self.on_call(*lookup, args[0] if args else kwargs["input"], output)
        return output

    def _matrix_product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """``a @ b`` computed as the ``F.linear`` call it is and seen, where it applies a counted Linear
        weight ``W`` outside its modules: ``x @ W.t()`` (``W.T``, ``W.mT``) is ``F.linear(x, W)``; ``W @ x``
        with ``x`` of three or more dims, samples first (Mamba applies its ``dt_proj`` so), is
        ``F.linear(x.mT, W).mT``; None for any other product."""
        transposed = b._base if isinstance(b, torch.Tensor) and b._base is not None and b.dim() == 2 else None
        if (transposed is not None and isinstance(a, torch.Tensor) and a.dim() >= 2
                and b.shape == transposed.shape[::-1] and b.stride() == transposed.stride()[::-1]
                and self._unseen_call(transposed)):
            return self._seen(transposed, a, F.linear(a, transposed))
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and b.dim() >= 3 and self._unseen_call(a):
            x = b.mT
            return self._seen(a, x, F.linear(x, a)).mT
        return None

    def _unseen_call(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` is a counted Linear weight used outside every call of its modules."""
        return id(weight) in self.owners and not self.running.get(id(weight))

    def _seen(self, weight: torch.Tensor, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not self._unseen_call(weight):
            return output
        name, module = self.owners[id(weight)]
        return self.on_call(name, module, x, output)

    def _attention(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``F.multi_head_attention_forward(*args, **kwargs)`` with its projections seen, where its query,
        key and value weights are separate and counted Linear weights and the inputs are batched (torch's
        rules otherwise); None for any other call."""
        call = _FUNCTIONAL_ATTENTION_SIGNATURE.bind(*args, **kwargs)
        call.apply_defaults()
        options = call.arguments
        weights = (options["q_proj_weight"], options["k_proj_weight"], options["v_proj_weight"])
        if (not options["use_separate_proj_weight"] or any(id(w) not in self.owners for w in weights)
                or options["query"].dim() != 3 or options["bias_k"] is not None or options["add_zero_attn"]
                or options["static_k"] is not None or options["static_v"] is not None
                or (options["is_causal"] and options["attn_mask"] is None)):
            return None
        embed = options["embed_dim_to_check"]
        biases = options["in_proj_bias"].split(embed) if options["in_proj_bias"] is not None else (None,) * 3
        projected = [self._seen(w, x, F.linear(x, w, b))
                     for x, w, b in zip((options["query"], options["key"], options["value"]), weights, biases)]
        output, scores = _attention_of_projections(
            *projected, options["num_heads"], batch_first=False, key_padding_mask=options["key_padding_mask"],
            attn_mask=options["attn_mask"], is_causal=options["is_causal"], need_weights=options["need_weights"],
            average_weights=options["average_attn_weights"],
            dropout=options["dropout_p"] if options["training"] else 0.0)
        out_weight = options["out_proj_weight"]
        output = self._seen(out_weight, output, F.linear(output, out_weight, options["out_proj_bias"]))
        return output.transpose(0, 1), scores


def _modular_out_proj_shape(attention: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Size:
    """The input shape of the ``out_proj`` call that ``BatchedForm``'s attention makes, for this call of
    ``attention`` (samples first, as ``_attention_with_modular_out_proj`` calls it)."""
    query = args[0] if args else kwargs["query"]
    if query.dim() < 3:
        return torch.Size((query.shape[0], attention.embed_dim))
    samples, length = query.shape[:2] if attention.batch_first else query.shape[1::-1]
    return torch.Size((samples, length, attention.embed_dim))


@contextlib.contextmanager
def _input_shapes_recorded(users: list[tuple[str, nn.Module]], shapes: _CallShapes, *,
                           functional: bool = False, attentions: Iterable[nn.MultiheadAttention] = ()
                           ) -> Iterator[None]:
    """Within the block, forwards record the input shape of each call of each counted module in ``shapes``;
    with ``functional``, also of each ``F.linear`` call on a counted Linear weight outside its modules
    (seeing them costs Python work on every torch call of the forward). Each call of one of
    ``attentions`` whose out_proj is counted records the out_proj call it makes in the ``BatchedForm`` (in
    the model as it is, out_proj's weight is used inside the functional attention)."""
    def record(name: str, shape: torch.Size) -> None:
        shapes[(name, sum(key[0] == name for key in shapes))] = shape

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if _embedding_with_own_forward(module):  # seen at its F.embedding call under the functional mode
                if functional:
                    return
                shapes.functional = True
            record(name, args[0].shape)
        return hook

    def record_functional(name: str, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        shapes.functional = True
        record(name, x.shape)
        return output

    def attention_recorder(name: str):
        def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
            record(name, _modular_out_proj_shape(module, args, kwargs))
        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in users]
    names = {id(m): name for name, m in users}
    handles += [m.register_forward_pre_hook(attention_recorder(names[id(m.out_proj)]), with_kwargs=True)
                for m in attentions if id(m.out_proj) in names]
    try:
        with _FunctionalLinearCalls(users, record_functional) if functional else contextlib.nullcontext():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _single_sample_input_shapes(model: nn.Module, x: torch.Tensor, users: list[tuple[str, nn.Module]]
                                ) -> _CallShapes:
    """The input shape of each call of each counted weight in a forward of one sample, functional
    ``F.linear`` calls included."""
    shapes = _CallShapes()
    with _input_shapes_recorded(users, shapes, functional=True), torch.no_grad():
        model(x)
    return shapes


def _first_mismatch(batched: dict[str, torch.Tensor], reference: list[dict[str, torch.Tensor | None]],
                    tolerance: float) -> tuple[str, str] | None:
    """(layer, how much) for the first counted weight whose batched per-sample gradients (``batched``, a
    row per verified sample) differ from the single-sample gradients of the model as it is (``reference``,
    its own norm layers), or None when all agree within ``tolerance``.

    A weight's differences are measured against its largest gradient, but never against less than
    ``NOISE_FLOOR`` of the largest gradient of any weight for that sample: weights whose exact gradient
    is zero (e.g. a branch ending in BatchNorm right before global pooling, whose pooled output is its
    bias for every single sample) get rounding noise of that size in any implementation."""
    for i, single in enumerate(reference):
        grads = [g for g in single.values() if g is not None]
        largest = max(map(_largest_magnitude, grads), default=0.0)
        # one buffer for every weight's differences (fresh weight-sized arrays are paged in anew)
        buffer = torch.empty(max((g.numel() for g in grads), default=0), dtype=grads[0].dtype,
                             device=grads[0].device) if grads else None
        for name, grad in single.items():
            difference = _difference(batched[name][i] if name in batched else None, grad, tolerance,
                                     NOISE_FLOOR * largest, buffer)
            if difference is not None:
                return name, difference
    return None


def _sign_disagreement(batched: dict[str, torch.Tensor], reference: dict[str, torch.Tensor | None],
                       sample: int | None = SIGN_SAMPLE) -> float:
    """Share of the counted weights whose gradient has another sign (-1, 0, +1) in ``batched``'s first row
    than in ``reference`` (None, or a weight missing from ``batched``: zeros), measured on about ``sample``
    weights taken from each layer in proportion to its size (None: on every weight): tiles of
    ``SIGN_TILE`` x ``SIGN_TILE`` weights (output channels x the rest, flattened) spread along the
    diagonal of the weight (``_diagonal_tiles``)."""
    total = sum(g.numel() for g in reference.values() if g is not None)
    differing = measured = 0
    for name, single in reference.items():
        grads = [batched[name][0] if name in batched else None, single]
        present = [g for g in grads if g is not None]
        if not present:
            continue
        rows = len(present[0])
        columns = present[0].numel() // max(rows, 1)
        tiles = round(sample * rows * columns / total / SIGN_TILE ** 2) if sample and total > sample else 0
        if tiles and min(rows, columns) > SIGN_TILE:
            grads = [None if g is None else _diagonal_tiles(g, rows, columns, tiles) for g in grads]
            present = [g for g in grads if g is not None]
        if len(present) == 1:  # against zeros: every nonzero gradient differs
            differing += int(present[0].count_nonzero())
        else:
            differing += int(torch.count_nonzero(torch.sign(grads[0]) - torch.sign(grads[1])))
        measured += present[0].numel()
    return differing / measured if measured else 0.0


def _diagonal_tiles(g: torch.Tensor, rows: int, columns: int, tiles: int) -> torch.Tensor:
    """``tiles`` tiles of ``SIGN_TILE`` x ``SIGN_TILE`` elements of ``g`` seen as (rows, columns), spread
    along its diagonal, (tiles, SIGN_TILE, SIGN_TILE): a view where ``g``'s layout allows one, so that
    memory is read a cache line at a time whichever of the two layouts the batched gradients have (a
    transposed product keeps output channels adjacent); else gathered (gradients formed with the kernel's
    dimensions in another order, kept as a permuted view, whose flattening would copy the whole weight)."""
    step_rows, step_columns = (rows - SIGN_TILE) // tiles, (columns - SIGN_TILE) // tiles
    try:
        flat = g.view(rows, columns)
    except RuntimeError:
        tile, offset = torch.arange(tiles, device=g.device)[:, None, None], torch.arange(SIGN_TILE, device=g.device)
        return torch.take(g, (tile * step_rows + offset[:, None]) * columns + tile * step_columns + offset)
    return flat.as_strided((tiles, SIGN_TILE, SIGN_TILE),
                           (step_rows * flat.stride(0) + step_columns * flat.stride(1), *flat.stride()))


def _warn_if_rounding_decides_signs(precision: torch.dtype, share: float | None) -> None:
    """Warn where rounding decides many of the counted signs: computations in ``precision`` below float32
    (bfloat16, float16; also under autocast) always, since there exact computations of the totals differ
    where float32's agree (a small CNN: 2837 by this engine and 2833 by the loop in bfloat16, 2840 each in
    float32; tests/test_engine.py); otherwise where two computations of one sample's gradients that the
    verification accepted (equal up to rounding, or exact as float64 showed) give another sign on more
    than ``NOISY_SIGN_SHARE`` of the counted weights (``share``; None: not measured): that share of the
    counts is decided by rounding, in any engine."""
    if _below_float32(precision):
        _warn_of_low_precision(precision, share)
        return
    if share is None or share <= NOISY_SIGN_SHARE:
        return
    name = str(precision).removeprefix("torch.")
    advice = ": score a float64 copy of the model and inputs for counts without it" if precision != torch.float64 else ""
    warnings.warn(RoundingNoiseWarning(
        f"{name} rounding decides many of this model's gradient signs: two exact {name} computations "
        f"of one sample's gradients (in the batch, and alone) differ in sign on {share:.1%} of the counted "
        "weights sampled (gradients that are zero but for rounding, as in a branch that ends in BatchNorm "
        "and reaches the logits only through global pooling, or normalisation over near-constant or 2x2 "
        f"maps); GradSign's counts carry that noise in any engine{advice}", share), stacklevel=3)


def _below_float32(dtype: torch.dtype) -> bool:
    """A floating dtype with fewer mantissa bits than float32 (bfloat16, float16)."""
    return dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(torch.float32).eps


def _warn_of_low_precision(dtype: torch.dtype, share: float | None) -> None:
    """``RoundingNoiseWarning`` for counts in a precision below float32, with the share of one sample's
    signs that two computations disagreed on where it was measured (``share``; None: not measured)."""
    precision = str(dtype).removeprefix("torch.")
    measured = "" if share is None else (f" (here two computations of one sample's gradients differ in sign on "
                                         f"{share:.1%} of the counted weights sampled)")
    warnings.warn(RoundingNoiseWarning(
        f"{precision} rounding decides some of this model's gradient signs: exact {precision} computations of "
        f"the counts (batched, and sample by sample) can differ{measured}; score a float32 copy of the model "
        "and inputs, outside autocast, for counts that do not depend on how they are computed", share),
        stacklevel=3)


def _largest_magnitude(t: torch.Tensor) -> float:
    """max |t| (0 when empty; NaN if any is), without forming |t| (4x faster over a model's weights)."""
    if not t.numel():
        return 0.0
    low, high = torch.aminmax(t)
    return max(float(high), -float(low))


def _largest_difference(batched: torch.Tensor | None, single: torch.Tensor | None, floor: float = 0.0,
                        buffer: torch.Tensor | None = None) -> tuple[float, float]:
    """(max |batched - single|, the larger of ``single``'s largest magnitude and ``floor``); None stands
    for zeros. ``buffer``: a flat array the differences may be written into."""
    if single is None:
        single = torch.zeros(()) if batched is None else torch.zeros_like(batched)
    if batched is None:
        batched = torch.zeros_like(single)
    out = _scratch_view(buffer, single.shape, single.dtype) if batched.shape == single.shape else None
    scale = max(_largest_magnitude(single), floor)
    return _largest_magnitude(torch.sub(batched.to(single.dtype), single, out=out)), scale


def _difference(batched: torch.Tensor | None, single: torch.Tensor | None, tolerance: float,
                floor: float = 0.0, buffer: torch.Tensor | None = None) -> str | None:
    """None when ``batched`` equals ``single`` within ``tolerance`` times the larger of ``single``'s
    largest magnitude and ``floor`` (None stands for zeros), else how far it is. ``buffer``: a flat
    array the differences may be written into."""
    error, scale = _largest_difference(batched, single, floor, buffer)
    if error <= tolerance * scale or (scale == 0 and error == 0):
        return None
    return f"largest difference {error:.3g} of {scale:.3g}"


def _convolutions_on_onednn_differ(model: nn.Module, inputs: torch.Tensor) -> bool:
    """Whether ``_ConvolutionsOnOneDNN`` would change how a reference pass computes ``model``: float32
    ``Conv2d`` weights and inputs on a CPU where torch has oneDNN."""
    return _on_onednn_cpu(inputs) and any(
        isinstance(m, nn.Conv2d) and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
        for m in model.modules())


def _on_onednn_cpu(t: torch.Tensor) -> bool:
    """Whether ``t`` is on a CPU where torch has oneDNN, and it is enabled."""
    return t.device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _reference_on_onednn(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                         layers: list[tuple[str, nn.Module]], batch: int) -> list[dict[str, torch.Tensor | None]]:
    """The single-sample gradients of ``inputs`` (the verified sample) as the verification takes them (torch's
    own BatchNorm layers in their single-sample form), its convolutions on oneDNN where torch ran them so
    for the ``batch`` samples of the batched pass (``_ConvolutionsOnOneDNN``); the call shapes and weight
    uses are the first reference's (``_reference_grads``), not recorded again (3-4 ms of RegNetX's 45)."""
    norms = BatchedForm(model, attention=False, stock_norms_only=True)
    try:
        with _ConvolutionsOnOneDNN(batch):
            return list(_single_sample_grads(model, inputs, targets, loss_fn, layers))
    finally:
        norms.undo()


class _ConvolutionsOnOneDNN(TorchFunctionMode):
    """Within the block, ``F.conv2d`` of one float32 sample on a CPU (numeric padding) runs on oneDNN
    (``torch.mkldnn_convolution``) where torch runs it so for ``batch`` samples (``_onednn_for_batch``),
    instead of the unfolding convolution torch takes for a batch of one: a reference pass so computed
    rounds the sample's activations and gradients as the batched pass did. Two exact float32 computations
    that round otherwise differ by more than the verification's tolerance on chaotic models (RegNetX at
    64x64, whose 2x2 maps normalised per sample amplify rounding a thousandfold) and where an activation
    sits within rounding of a ReLU's kink; rounded alike, by 0.001-0.01 of it (``python bench/doubts.py``)."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch = batch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            x, weight, bias, stride, padding, dilation, groups = _conv2d_arguments(args, kwargs)
            pair = nn.modules.utils._pair
            if (x.dim() == 4 and len(x) == 1 and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
                    and not isinstance(padding, str) and _onednn_for_batch(weight, pair(stride), pair(dilation),
                                                                            self.batch)):
                return torch.mkldnn_convolution(x, weight, bias, list(pair(padding)), list(pair(stride)),
                                                list(pair(dilation)), groups)
        return func(*args, **kwargs)


def _onednn_for_batch(weight: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int], batch: int) -> bool:
    """Whether torch convolves ``batch`` (more than one) float32 samples on a CPU with oneDNN, by its rule
    (ATen's ``use_mkldnn``): all but unstrided, undilated 1x1 kernels on fewer than 16 samples in one
    thread, which it computes sample by sample as it computes one sample alone. Where this misjudges, the
    references differ in rounding as before and the float64 check decides."""
    pointwise = tuple(weight.shape[2:]) == (1, 1) and stride == (1, 1) and dilation == (1, 1)
    return not pointwise or batch >= 16 or torch.get_num_threads() > 1


def _float64_mismatch(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                      verified: int) -> str | None:
    """The batched-vs-single verification of sample ``verified`` of ``inputs`` in float64 (``_in_float64``),
    where float noise is far below the tolerance: None when the batched engine is exact for this model,
    else the cause."""
    if inputs.is_floating_point():
        inputs = inputs.double()
    if targets.is_floating_point():
        targets = targets.double()
    layers = counted_layers(model)
    sample = slice(verified, verified + 1)
    depthwise = any(isinstance(m, nn.Conv2d) and m.groups > 1 and m.weight.shape[1] == 1 for m in model.modules())
    with _in_float64(model), _requires_grad_kept(model), \
            _DepthwiseConvolutionsUnfolded() if depthwise else contextlib.nullcontext():
        try:
            reference, single_shapes, swap = _reference_then_batched_form(model, inputs[sample], targets[sample],
                                                                          loss_fn, layers)
        except (RuntimeError, ValueError, NotImplementedError) as error:  # e.g. float32 tensors the model holds
            return f"float32 rounding cannot be told from a difference: the model does not run in float64 " \
                   f"({_first_line(error)})"
        try:
            _, mismatch, _ = _verified_batched_counts(model, inputs, targets, loss_fn, layers, len(inputs),
                                                      verified, reference, single_shapes, FLOAT64_TOLERANCE,
                                                      verified_only=True)
        except NonFiniteGradientError:
            return ("float32 rounding cannot be told from a difference: the model's gradients are not finite in "
                    "float64")
        except (UnsupportedModelError, RuntimeError, ValueError, NotImplementedError) as error:
            return _first_line(error)
        finally:
            swap.undo()
        if mismatch is None:
            return None
        return _mismatch_cause(model, inputs, targets, loss_fn, layers, inputs[sample], targets[sample], *mismatch)


@contextlib.contextmanager
def _in_float64(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s floating parameters and buffers hold float64 copies of their values
    (the same Parameter objects); afterwards they hold their own tensors again, and gradients taken
    meanwhile are dropped. Cheaper than a deep copy in float64, whose cost is mostly the model's Python
    objects (55 ms for RegNetX, a quarter of its forward+backward at batch 32)."""
    parameters = [p for p in model.parameters() if p.is_floating_point()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items()
               if b is not None and b.is_floating_point()]
    originals = [(p.data, p.grad) for p in parameters]
    try:
        for p in parameters:
            p.grad = None
            p.data = p.data.double()
        for m, name, b in buffers:
            m._buffers[name] = b.double()
        yield
    finally:
        for p, (data, grad) in zip(parameters, originals):
            p.grad = None
            p.data = data
            p.grad = grad
        for m, name, b in buffers:
            m._buffers[name] = b


_CONV2D_SIGNATURE = inspect.signature(lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1: None)


def _conv2d_arguments(args: tuple, kwargs: dict) -> tuple:
    """An ``F.conv2d`` call's (input, weight, bias, stride, padding, dilation, groups), defaults filled in;
    read straight from the seven positional arguments ``nn.Conv2d`` passes (binding the signature costs
    more, on every convolution of a pass under a torch function mode)."""
    if len(args) == 7 and not kwargs:
        return args
    call = _CONV2D_SIGNATURE.bind(*args, **kwargs)
    call.apply_defaults()
    return tuple(call.arguments.values())


class _DepthwiseConvolutionsUnfolded(TorchFunctionMode):
    """Within the block, a depthwise ``F.conv2d`` in float64 on a CPU with a batched input, numeric padding
    and at most ``MATMUL_POSITIONS`` output positions is computed as the product of each channel's kernel
    with its unfolded input (the same sums): torch computes float64 grouped convolutions one group at a
    time, forward and backward, which was most of MobileNetV2's float64 check (about 16,000 calls;
    1.02x -> 0.70x of its forward+backward, ad hoc interleaved runs). Every torch call in the block pays
    the mode's Python dispatch, so it is entered only for models with depthwise layers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            arguments = _conv2d_arguments(args, kwargs)
            if _unfolds_well(*arguments):
                return _grouped_conv2d_unfolded(*arguments)
        return func(*args, **kwargs)


def _unfolds_well(input: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation, groups: int) -> bool:
    """Whether ``_DepthwiseConvolutionsUnfolded`` computes this ``F.conv2d`` call itself."""
    if weight.shape[1] != 1 or input.dim() != 4 or input.dtype != torch.float64 or input.device.type != "cpu":
        return False
    if isinstance(padding, str):
        return False
    return math.prod(_conv2d_output_size(input, weight, stride, padding, dilation)) <= MATMUL_POSITIONS


def _conv2d_output_size(input: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> tuple[int, int]:
    (pad_h, pad_w), (stride_h, stride_w), (dil_h, dil_w) = map(nn.modules.utils._pair, (padding, stride, dilation))
    return ((input.shape[2] + 2 * pad_h - dil_h * (weight.shape[2] - 1) - 1) // stride_h + 1,
            (input.shape[3] + 2 * pad_w - dil_w * (weight.shape[3] - 1) - 1) // stride_w + 1)


def _grouped_conv2d_unfolded(input: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation,
                             groups: int) -> torch.Tensor:
    """``F.conv2d`` of a batched input with ``groups`` as a product per group over the unfolded input."""
    out_size = _conv2d_output_size(input, weight, stride, padding, dilation)
    out_channels, in_per_group, *kernel = weight.shape
    columns = F.unfold(input, kernel, dilation=dilation, padding=padding, stride=stride)
    columns = columns.view(len(input), groups, in_per_group * math.prod(kernel), math.prod(out_size))
    out = torch.matmul(weight.reshape(groups, out_channels // groups, -1), columns)
    out = out.reshape(len(input), out_channels, *out_size)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _mismatch_cause(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                    layers: list[tuple[str, nn.Module]], one_input: torch.Tensor, one_target: torch.Tensor,
                    name: str, difference: str) -> str:
    """Why layer ``name``'s batched per-sample gradients are wrong: the model's output is random (two
    passes over the same sample differ); samples of ``inputs`` interact, in the forward pass or only in
    the backward pass; or, on a batch of one (``one_input``), the hooked formula already misses gradient (a
    gradient hook of the model's on the layer's output, a forward hook replacing that output, the layer's
    class computing its output in its own way, or the weight used outside the layer's call); or else the
    layer's batch dimension does not index samples."""
    with torch.no_grad():
        random_output = not torch.equal(model(one_input), model(one_input))
    if random_output:
        return ("the model's output is random in scoring mode (two passes over one sample differ: it draws "
                "random numbers outside dropout, e.g. a noise layer), so GradSign of it is one random draw")
    if samples_interact(model, inputs, rtol=FLOAT64_TOLERANCE):
        grouped = _norms_over_several_rows(model, one_input)
        if grouped:
            return ("samples interact within a batch, or a BatchNorm normalises several rows per sample that are "
                    f"not consecutive ({', '.join(grouped)}; e.g. tokens flattened sequence-first), which the "
                    "batched form normalises as each sample's rows")
        return "samples interact within a batch"
    model.requires_grad_(True)
    if _backward_interacts(model, inputs, targets, loss_fn, layers):
        return ("samples interact within a batch in the backward pass only (a gradient hook or an autograd "
                "function that mixes the samples' gradients)")
    _, alone = _batched_counts(model, one_input, one_target, loss_fn, layers, 1, verified=0)
    model.requires_grad_(True)
    reference = next(iter(_single_sample_grads(model, one_input, one_target, loss_fn, layers)))[name]
    if _difference(alone[name][0] if name in alone else None, reference, FLOAT64_TOLERANCE) is not None:
        if name in _outputs_with_gradient_hooks(model, one_input, layers):
            return (f"a gradient hook on layer {name}'s output (Tensor.register_hook) changes the gradient its "
                    "weight gets, and the batched engine reads that gradient before the model's own hooks run")
        if name in _outputs_replaced_by_forward_hooks(model, one_input, layers):
            return (f"a global forward hook (register_module_forward_hook) replaces layer {name}'s output before "
                    "the batched engine's own hook sees it, so that it reads the gradient of the replaced output")
        own = _own_forward(dict(layers)[name])
        if own:
            return (f"layer {name} is a {own} with its own forward, which does not apply the weight to the "
                    "call's input as torch's does (it changes the weight or the input first)")
        return (f"weight of layer {name} gets gradient outside the layer's own call "
                "(a shared weight or a functional use of it)")
    return (f"the first dimension of layer {name}'s input does not index samples (a reshaped or "
            f"transposed batch dimension; {difference})")


def _backward_interacts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                        layers: list[tuple[str, nn.Module]]) -> bool:
    """Whether the counted weights' gradients of ``inputs``' losses, back-propagated through the batch,
    differ from each sample's alone (within ``FLOAT64_TOLERANCE`` of each weight's largest): the first
    sample's loss alone, and the sum of all samples' losses, against the first sample's single-sample
    gradients and the sum of every sample's. Where the outputs do not interact (``samples_interact``),
    only the backward pass can mix samples: a gradient hook or an autograd function over the batch (one
    that mixes linearly shows in the first comparison, one that normalises in the second). Batch-statistics
    BatchNorm is in its single-sample form (``BatchedForm``)."""
    if len(inputs) < 2:
        return False
    weights = [m.weight for _, m in layers]

    def grads(loss: torch.Tensor, retain: bool = False) -> list[torch.Tensor | None]:
        return list(torch.autograd.grad(loss, weights, retain_graph=retain, allow_unused=True))

    swap = BatchedForm(model, attention=False)
    try:
        alone = [grads(loss_fn(model(inputs[i:i + 1]), targets[i:i + 1])) for i in range(len(inputs))]
        outputs = model(inputs)
        losses = [loss_fn(outputs[i:i + 1], targets[i:i + 1]) for i in range(len(inputs))]
        first = grads(losses[0], retain=True)
        together = grads(torch.stack(losses).sum())
    finally:
        swap.undo()
    summed = [None if all(g is None for g in per_weight) else sum(g for g in per_weight if g is not None)
              for per_weight in zip(*alone)]
    return any(_difference(batched, single, FLOAT64_TOLERANCE) is not None
               for pairs in (zip(first, alone[0]), zip(together, summed)) for batched, single in pairs)


def _outputs_with_gradient_hooks(model: nn.Module, one_input: torch.Tensor,
                                 layers: list[tuple[str, nn.Module]]) -> set[str]:
    """The counted layers whose output the model gives a gradient hook (``Tensor.register_hook``) in a
    forward of one sample."""
    outputs: list[tuple[str, torch.Tensor]] = []

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if isinstance(output, torch.Tensor):
                outputs.append((name, output))
        return hook

    _probe_forward(model, one_input, [(m, keep(name)) for name, m in _weight_users(model, layers)], grad=True)
    return {name for name, output in outputs if output._backward_hooks}


def _outputs_replaced_by_forward_hooks(model: nn.Module, one_input: torch.Tensor,
                                       layers: list[tuple[str, nn.Module]]) -> set[str]:
    """The counted layers whose output a global forward hook replaces by another value in a forward of one
    sample: the output that a hook run first among the layer's own (as the batched engine's runs) sees
    differs from the layer's own forward of the same inputs."""
    replaced: set[str] = set()

    def compare(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            try:
                own = module.forward(*args)
            except (RuntimeError, TypeError):  # a call that also needs keywords: not judged
                return
            if isinstance(output, torch.Tensor) and (own.shape != output.shape or not torch.equal(own, output)):
                replaced.add(name)
        return hook

    _probe_forward(model, one_input, [(m, compare(name)) for name, m in _weight_users(model, layers)], grad=False,
                   first=True)
    return replaced


def _norms_over_several_rows(model: nn.Module, one_input: torch.Tensor) -> list[str]:
    """The BatchNorm modules (normalising by batch statistics) that see more than one row for one sample."""
    seen: list[str] = []

    def watch(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if len(args[0]) > 1:
                seen.append(name)
        return hook

    _probe_forward(model, one_input, [(m, watch(name)) for name, m in model.named_modules()
                                      if _normalises_by_batch_statistics(m)], grad=False)
    return list(dict.fromkeys(seen))


def _probe_forward(model: nn.Module, one_input: torch.Tensor, hooks: list[tuple[nn.Module, Callable]], *,
                   grad: bool, first: bool = False) -> None:
    """One forward of ``one_input``, with autograd on or off, while each (module, forward hook) of ``hooks``
    is installed (with ``first``, before the module's other forward hooks; global ones still run before)."""
    handles = [module.register_forward_hook(hook, prepend=first) for module, hook in hooks]
    try:
        with torch.set_grad_enabled(grad):
            model(one_input)
    finally:
        for handle in handles:
            handle.remove()


def _own_forward(layer: nn.Module) -> str | None:
    """The class name of a layer using a counted weight whose class computes its output itself (a
    subclass of ``nn.Conv2d``, ``nn.Linear`` or ``nn.Embedding`` overriding the forward), else None."""
    torch_class = next(c for c in (nn.Conv2d, nn.Embedding, nn.Linear) if isinstance(layer, c))
    methods = ("forward", "_conv_forward") if torch_class is nn.Conv2d else ("forward",)
    if all(getattr(type(layer), m, None) is getattr(torch_class, m) for m in methods):
        return None
    return type(layer).__name__


def samples_interact(model: nn.Module, x: torch.Tensor, *, rtol: float, relative_atol: float = 0.0) -> bool:
    """Whether a sample's output depends on the other samples of its batch: ``model(x)`` against each
    sample's output alone, with train-mode BatchNorm in its single-sample form (``BatchedForm``), compared
    by ``torch.allclose`` with ``rtol`` and an absolute tolerance of ``relative_atol`` times the largest
    output."""
    if len(x) < 2:
        return False
    swap = BatchedForm(model, attention=False)
    try:
        with torch.no_grad():
            together = model(x)
            alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    finally:
        swap.undo()
    finite = alone[torch.isfinite(alone)]
    return not torch.allclose(together, alone, rtol=max(rtol, 0.0), atol=relative_atol * _largest_magnitude(finite),
                              equal_nan=True)


def _vmap_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                 layers: list[tuple[str, nn.Module]], chunk_size: int | None) -> dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

    replace_all_batch_norm_modules_(model)
    names = {id(p): n for n, p in model.named_parameters()}
    keys = {name: names[id(m.weight)] for name, m in layers}
    weights = {keys[name]: m.weight.detach() for name, m in layers}
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in weights}
    fixed.update({k: v.detach() for k, v in model.named_buffers()})

    def sample_loss(w: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(functional_call(model, (w, fixed), (x[None],)), t[None])
        # one loss of shape (1,) (a loss_fn with reduction="none") is the sample's loss, as in the loop
        return loss.reshape(()) if loss.numel() == 1 else loss

    total = sum(w.numel() for w in weights.values()) or 1
    chunk_size = chunk_size or max(1, min(len(inputs), DEFAULT_ELEMENT_BUDGET // total,
                                          _default_chunk(layers, len(inputs), VMAP_WEIGHT_BUDGET)))
    sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="error")
    totals = _zero_totals(layers)
    for part in _chunks(len(inputs), chunk_size):
        with warnings.catch_warnings():  # torch's notes on ops without a batching rule (slower, exact)
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = sample_grads(weights, inputs[part], targets[part])
        _raise_on_nan(grads.values(), "a counted weight's per-sample gradient")
        for name, _ in layers:
            totals[name] += torch.sign(grads[keys[name]]).sum(0)
    return _integer_counts(totals)
