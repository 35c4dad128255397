"""The public scoring API: ``score``, ``scores``, ``available_proxies``, ``proxy_info``."""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradsign.engine import LossFn, scoring_mode
from gradsign.proxies import PROXIES, ProxyInfo, get_proxy

#: options the API itself takes; everything else goes to the proxies that accept it
API_OPTIONS = ("n_inits", "seed")

OutputFn = Callable[[Any], torch.Tensor]
#: a batch: one tensor, or a model's several inputs (a dict of keyword inputs, a tuple of positional ones)
Inputs = torch.Tensor | Mapping[str, Any] | Sequence[Any]


def default_output(output: Any) -> torch.Tensor:
    """The prediction tensor of a model's output: a tensor as it is; the ``logits`` of an output object or
    dict (e.g. a ``transformers`` ModelOutput); the first element of a tuple or list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the prediction tensor in a model output of type {type(output).__name__}; "
                    "pass output_fn=... to pick it")


#: the integer dtype of each floating dtype's width, to carry its values bit for bit
_SAME_WIDTH_INTEGER = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class _InputLayout:
    """How a model's several per-sample inputs (a dict of keyword inputs, e.g. a tokenizer's ``input_ids`` and
    ``attention_mask``, or a tuple of positional ones; non-tensor values are constants of every call) lie
    side by side in the rows of one (samples, features) tensor, which every proxy and engine slices along
    its first dimension as it slices a single input: integer tensors as int64, floating ones in their
    (common) dtype, or, beside integer ones, as int64 rows of their bit patterns (each in its own dtype)."""

    def __init__(self, inputs: Mapping[str, Any] | Sequence[Any]):
        self.keyword = isinstance(inputs, Mapping)
        self.slots = list(inputs.items()) if self.keyword else list(enumerate(inputs))
        tensors = [(key, value) for key, value in self.slots if isinstance(value, torch.Tensor)]
        nested = [str(key) for key, value in self.slots if not isinstance(value, torch.Tensor) and _holds_tensor(value)]
        if nested:
            raise ValueError(f"input {nested[0]} holds tensors inside a container: give each per-sample tensor as "
                             "an input of its own (a container is passed to every call as it is)")
        if not tensors:
            raise ValueError("inputs hold no tensor: give the per-sample inputs as tensors of one row per sample")
        first_key, first = tensors[0]
        for key, value in tensors:
            if value.dim() == 0 or len(value) != len(first):
                rows = "no rows" if value.dim() == 0 else f"{len(value)} rows"
                raise ValueError(f"input {key} has {rows} and input {first_key} has {len(first)}: every input "
                                 "tensor must hold one row per sample (a tensor shared by all samples belongs "
                                 "in the model)")
        complex_inputs = [str(key) for key, value in tensors if value.is_complex()]
        if complex_inputs:
            raise ValueError(f"complex inputs ({', '.join(complex_inputs)}): several inputs must be integer or "
                             "floating tensors")
        # floating inputs beside integer ones (pixel values and a mask, audio and an attention mask) lie in
        # the int64 rows as their bit patterns, so that a proxy's own floating draws cannot pass for them
        self.mixed = len({value.is_floating_point() for _, value in tensors}) > 1
        floating = {value.dtype for _, value in tensors if value.is_floating_point()}
        if len(floating) > 1 and not self.mixed:
            raise ValueError(f"floating inputs of different dtypes ({', '.join(map(str, floating))}): give them "
                             "in one dtype")
        self.dtype = floating.pop() if floating and not self.mixed else torch.int64
        self.keys = [key for key, _ in tensors]
        self.names = [str(key) for key in self.keys]
        self.shapes = [value.shape[1:] for _, value in tensors]
        self.dtypes = [value.dtype for _, value in tensors]
        self.widths = [value[0].numel() for _, value in tensors]
        self.packed = torch.cat([self._row_values(value) for _, value in tensors], 1)

    def _row_values(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` as (samples, features) of the rows' dtype (floating ones bit for bit in mixed rows)."""
        rows = value.reshape(len(value), -1)
        if self.mixed and rows.is_floating_point():
            return rows.contiguous().view(_SAME_WIDTH_INTEGER[rows.element_size()]).to(torch.int64)
        return rows.to(self.dtype, copy=False)

    def unpacked(self, packed: torch.Tensor, precision: torch.dtype | None = None) -> tuple[tuple, dict]:
        """The model's positional and keyword arguments for the samples in ``packed``'s rows. Floating inputs
        packed beside integer ones are widened to ``precision`` (the model's) where it is wider, as the
        rows of floating inputs alone are when a check runs the model in float64."""
        if not packed.is_floating_point() and self.dtype.is_floating_point:
            raise ValueError(f"the model gets {packed.dtype} inputs where its inputs are floating")
        if packed.is_floating_point() and not self.dtype.is_floating_point:
            integer = [name for name, dtype in zip(self.names, self.dtypes) if not dtype.is_floating_point]
            raise ValueError(f"the model gets {packed.dtype} inputs where its inputs are "
                             f"{'integer' if not self.mixed else 'partly integer'} ({', '.join(integer)}): a "
                             "proxy that draws its own floating inputs (zen, synflow) cannot score it")
        values = {}
        for key, part, shape, dtype in zip(self.keys, packed.split(self.widths, 1), self.shapes, self.dtypes):
            part = part.reshape(len(packed), *shape)
            if self.mixed and dtype.is_floating_point:
                part = part.to(_SAME_WIDTH_INTEGER[dtype.itemsize]).view(dtype)
                wider = precision is not None and precision.is_floating_point and precision.itemsize > dtype.itemsize
                values[key] = part.to(precision) if wider else part
                continue
            # integer inputs take back their own dtype (a bool mask, int32 ids); floating ones keep the rows'
            # dtype, which a proxy or check may have changed (float64 for synflow and exactness checks)
            values[key] = part if part.is_floating_point() else part.to(dtype)
        arguments = [(key, values.get(key, value)) for key, value in self.slots]
        if self.keyword:
            return (), dict(arguments)
        return tuple(value for _, value in arguments), {}


class _OutputAdapter(nn.Module):
    """``output_fn(model(x))``: lets every proxy see the prediction tensor of any model; with a ``layout``,
    ``x`` holds the model's several inputs, unpacked for each call."""

    def __init__(self, model: nn.Module, output_fn: OutputFn, layout: _InputLayout | None = None):
        super().__init__()
        self.model, self.output_fn, self.layout = model, output_fn, layout

    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.layout is not None:
            precision = next((p.dtype for p in self.model.parameters() if p.is_floating_point()),
                             None) if self.layout.mixed else None  # only bit-packed floats are widened
            args, kwargs = self.layout.unpacked(*args, precision=precision)
        return self.output_fn(self.model(*args, **kwargs))


#: where torch keeps quantized layers (integer weights packed for inference)
_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def _unscorable_layers(model: nn.Module) -> str | None:
    """Why no proxy can score ``model`` (None: it can): a TorchScript module runs compiled code (no Python
    hooks, no module types); a graph of ATen operations (``torch.export``'s ``ExportedProgram.module()``)
    applies its weights as operations, with no Conv2d or Linear modules; a quantized layer's weights are
    packed integers, which have no gradient."""
    unseen = ("the proxies read a model's Conv2d and Linear layers as modules (their calls, gradients and "
              "types), which it runs out of their sight; score the nn.Module it was made from")
    for name, module in model.named_modules():
        where = f"module {name!r}" if name else "the model"
        if isinstance(module, torch.jit.ScriptModule):
            return f"{where}, a TorchScript module: {unseen}"
        if isinstance(module, torch.fx.GraphModule) and any(
                node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                for node in module.graph.nodes):
            return f"{where}, a graph of ATen operations (as torch.export makes): {unseen}"
        if type(module).__module__.startswith(_QUANTIZED_MODULES):
            return (f"{where}, a quantized {type(module).__name__}: its weights are packed integers, which have "
                    "no gradient; score the floating-point model it was quantized from")
    return None


def _holds_tensor(value: Any) -> bool:
    """Whether a dict, list or tuple holds a tensor, at any depth."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return False


def _as_rows(inputs: Any) -> tuple[torch.Tensor, _InputLayout | None]:
    """``inputs`` as one tensor of one row per sample, and the layout of several inputs in it (None: one)."""
    if isinstance(inputs, torch.Tensor):
        return inputs, None
    if isinstance(inputs, (Mapping, tuple, list)):
        layout = _InputLayout(inputs)
        return layout.packed, layout
    raise TypeError("inputs must be a tensor, a dict of keyword inputs or a tuple of positional ones, not "
                    f"{type(inputs).__name__}")


def available_proxies() -> list[str]:
    """Names of all registered proxies."""
    return sorted(PROXIES)


def proxy_info(name: str) -> ProxyInfo:
    """Formula, source, direction (``higher_is_better``) and options of proxy ``name``."""
    return get_proxy(name)


def score(model: nn.Module, inputs: Inputs, targets: torch.Tensor | None = None,
          proxy: str = "gradsign", loss_fn: LossFn | None = None, **options) -> float:
    """Score an untrained ``model`` on one mini-batch with ``proxy`` (GradSign by default).

    ``inputs``: the batch (one row per sample), or the model's several inputs as a dict of keyword inputs
    (e.g. ``input_ids`` and ``attention_mask``) or a tuple of positional ones, each tensor one row per
    sample (see ``scores``). ``loss_fn(outputs, targets) -> scalar`` defaults to cross-entropy; options
    are those of the proxy (see ``proxy_info(name).options``) plus ``n_inits``, ``seed`` and
    ``output_fn`` (see ``scores``).
    """
    return scores(model, inputs, targets, [proxy], loss_fn, **options)[proxy]


def scores(model: nn.Module, inputs: Inputs, targets: torch.Tensor | None = None,
           proxies: Sequence[str] = ("gradsign",), loss_fn: LossFn | None = None, *,
           n_inits: int = 1, seed: int = 0, output_fn: OutputFn = default_output,
           **options) -> dict[str, float]:
    """Scores of several proxies for one model and batch, each on its own copy of the model (proxies that
    never write weights, GradSign among them, on the model itself, put back as it was afterwards).

    The caller's model is never changed (parameters, buffers, running statistics, train/eval mode) and
    the global RNG state is restored. With ``n_inits > 1`` every proxy is averaged over ``n_inits``
    fresh initialisations of the model, drawn with seeds ``seed, seed+1, ...`` through each module's
    ``reset_parameters`` (GradSign paper, appendix: averaging over several theta_0); with ``n_inits=1``
    the model is scored as given. ``output_fn`` maps the model's output to the prediction tensor the loss
    and the proxies see (default: ``default_output``, which takes the ``logits`` of a ModelOutput or dict
    and the first element of a tuple). A model with several inputs gets them as ``inputs``, a dict (called
    ``model(**inputs)``) or a tuple (``model(*inputs)``): every tensor in it holds one row per sample and each
    sample is scored with its own rows of each (its own attention mask); other values are passed to every
    call as they are (a container holding tensors is refused). Floating tensors alone must share one dtype;
    beside integer ones (masks) each keeps its own, widened to the model's precision where that is wider.
    Proxies that draw their own floating inputs (zen, synflow) refuse integer ones. Options are passed to
    the proxies that accept them; an option no requested proxy accepts is an error. NaN or infinite
    scores are returned as they are.
    """
    infos = [get_proxy(name) for name in proxies]
    inputs, layout = _as_rows(inputs)
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        raise ValueError("the model has uninitialised parameters (lazy modules such as nn.LazyLinear, "
                         "which take their shapes from their first input): run it once on a batch first")
    unscorable = _unscorable_layers(model)
    if unscorable:
        raise ValueError(f"cannot score {unscorable}")
    if n_inits < 1:
        raise ValueError(f"n_inits must be >= 1, got {n_inits}")
    if targets is not None and len(targets) != len(inputs):
        raise ValueError(f"inputs and targets differ in length: {len(inputs)} samples, {len(targets)} targets")
    accepted = {option for info in infos for option in info.options}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"option {unknown[0]!r} is not accepted by proxies {', '.join(proxies)}")
    loss_fn = loss_fn or F.cross_entropy
    device = next((p.device for p in model.parameters()), inputs.device)
    inputs = inputs.to(device)
    if targets is not None:
        targets = targets.to(device)
    result = {}
    for info in infos:
        if info.uses_targets and targets is None:
            raise ValueError(f"proxy {info.name!r} needs targets")
        proxy_options = {k: v for k, v in options.items() if k in info.options}
        values = []
        for i in range(n_inits):
            if "seed" in info.options:  # proxies that draw their own randomness (zen) re-draw it too
                proxy_options["seed"] = seed + i
            values.append(_score_once(model, inputs, targets, loss_fn, info, proxy_options, seed=seed + i,
                                      reinitialise=n_inits > 1, output_fn=output_fn, layout=layout))
        result[info.name] = math.fsum(values) / n_inits
        if info.uses_targets and result[info.name] == 0:
            warnings.warn(f"{info.name} scored 0: no weight got a nonzero gradient of the loss. A constant "
                          "loss gives 0 for every network (e.g. cross-entropy over a single output: give the "
                          "model >= 2 outputs or pass another loss_fn); so does a network whose output does "
                          "not depend on its weights", stacklevel=2)
    return result


def _score_once(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None, loss_fn: LossFn,
                info: ProxyInfo, options: dict, *, seed: int, reinitialise: bool, output_fn: OutputFn,
                layout: _InputLayout | None = None) -> float:
    with torch.random.fork_rng(devices=_cuda_devices(inputs)), contextlib.ExitStack() as stack:
        _seed(seed, inputs)
        if info.reads_weights_only and not reinitialise:
            work = stack.enter_context(_lent(model))
        else:
            work = copy.deepcopy(model)
        if reinitialise:
            reinitialise_parameters(work)
        work = scoring_mode(_OutputAdapter(work, output_fn, layout))
        work.requires_grad_(True)
        return float(info.fn(work, inputs, targets, loss_fn, **options))


@contextlib.contextmanager
def _lent(model: nn.Module) -> Iterator[nn.Module]:
    """The caller's model itself, for a proxy that never writes its weights (cheaper than a copy for large
    models: a deep copy's cost is mostly its Python objects). Afterwards, after an error or an interrupt
    too, every module's attributes (mode, forward overrides, flags), submodules, parameters and buffers
    are the objects they were, buffer values (e.g. running statistics) are restored, and every
    parameter's ``requires_grad`` and ``grad`` are back; so are parameter values that the model's own
    forward wrote (e.g. ``nn.Embedding(max_norm=...)`` renormalising rows), to the bit, and the contents
    of every dict a module holds: its submodules, parameters, buffers and hook tables (a model that
    installs hooks on its first forward and marks itself so, as ``transformers`` models collecting hidden
    states do, loses both the mark and the hooks, and installs them again when next run)."""
    modules = list(model.modules())
    attributes = [dict(m.__dict__) for m in modules]
    # copies of the dicts that hold something: most of a module's dicts are empty hook tables, and each
    # copy kept through the score is one more object for Python's garbage collector to pass over
    tables = [table for m in modules for table in m.__dict__.values() if isinstance(table, dict)]
    contents = [(table, dict(table)) for table in tables if table]
    with torch.no_grad():
        buffer_values = _Values(_distinct(b for m in modules for b in m._buffers.values()))
        parameter_values = _Values(_distinct(p for m in modules for p in m._parameters.values()))
    parameters = [(p, p.requires_grad, p.grad) for p, _ in parameter_values.saved]
    for p, _, _ in parameters:
        p.grad = None  # the proxy's backward passes must not add to the caller's gradients
    try:
        yield model
    finally:
        for m, saved in zip(modules, attributes):
            for key in set(m.__dict__) - set(saved):
                del m.__dict__[key]
            m.__dict__.update(saved)
        for table in tables:
            table.clear()
        for table, kept in contents:
            table.update(kept)
        with torch.no_grad():
            buffer_values.restore()
            parameter_values.restore(changed_only=True)
        for p, flag, grad in parameters:
            p.requires_grad_(flag)
            p.grad = grad


def _distinct(tensors: Iterable[torch.Tensor | None]) -> list[torch.Tensor]:
    """The tensors that are not None, each once, in order (as ``model.parameters()`` and ``model.buffers()``
    list a module tree's, read here from one walk of its modules)."""
    return list({id(t): t for t in tensors if t is not None}.values())


class _Values:
    """Copies of the values of ``tensors``, kept in one flat tensor per dtype and device: one allocation
    instead of one per tensor (a copy of ResNet-50-style models' 62 parameters, 2.8M values, in a fifth
    of the time of 62 clones on the development machine). Each copy starts at a multiple of 8 bytes, so
    that ``_same_bytes`` compares it a word at a time."""

    def __init__(self, tensors: list[torch.Tensor]):
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in groups.values():
            per_word = max(1, 8 // group[0].element_size())
            gaps = [-t.numel() % per_word for t in group]
            pieces = [t.detach().reshape(-1) for t in group]
            if any(gaps):  # (empty pieces would take torch.cat off its fast path)
                filler = group[0].new_zeros(per_word)
                pieces = [part for piece, gap in zip(pieces, gaps)
                          for part in ((piece, filler[:gap]) if gap else (piece,))]
            flat, start = torch.cat(pieces), 0
            for t, gap in zip(group, gaps):
                self.saved.append((t, flat[start:start + t.numel()].view(t.shape)))
                start += t.numel() + gap

    def restore(self, changed_only: bool = False) -> None:
        """Write the saved values back (with ``changed_only``, only into tensors that ``_same_bytes`` finds
        changed)."""
        for t, value in self.saved:
            if not changed_only or not _same_bytes(t, value):
                t.copy_(value)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (one shape and dtype) hold the same bytes, compared as 8-byte words where
    both are contiguous and aligned to them (``torch.equal``'s time is per element), else whether
    ``torch.equal`` finds their values equal (a NaN then counts as a change; either way equal bytes are
    never a change)."""
    if not all(t.is_contiguous() and (t.storage_offset() * t.element_size()) % 8 == 0 for t in (a, b)) \
            or (a.numel() * a.element_size()) % 8:
        return torch.equal(a, b)
    return torch.equal(*(t.reshape(-1).view(torch.uint8).view(torch.int64) for t in (a, b)))


def reinitialise_parameters(model: nn.Module) -> None:
    """Re-draw every parameter by calling ``reset_parameters`` on each module that has one (uses the
    global torch RNG: seed it first)."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def _seed(seed: int, inputs: torch.Tensor) -> None:
    """Seed the generators that ``fork_rng`` keeps for ``inputs``: the CPU's and, for CUDA inputs, their
    device's. ``torch.manual_seed`` would also reseed the other CUDA devices, which the fork does not
    restore, and queue the seeding of each uninitialised backend with a stack trace (up to 0.5 ms per
    score); it is kept for inputs on other device types, whose generators it seeds."""
    if inputs.device.type not in ("cpu", "cuda"):
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    for device in _cuda_devices(inputs):
        torch.cuda.default_generators[device].manual_seed(seed)


def _cuda_devices(tensor: torch.Tensor) -> list[int]:
    return [tensor.device.index or 0] if tensor.device.type == "cuda" else []
