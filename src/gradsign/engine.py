"""Per-sample gradient engine: sign counts of per-sample weight gradients.

For every Conv2d and Linear layer it returns ``counts[k] = sum_i sign(dL_i/dw_k)`` over the samples ``i``
of a batch, where ``L_i`` is the loss of sample ``i`` alone and the network runs in train mode on a batch
of one, so BatchNorm normalises each sample by its own statistics (the official GradSign semantics,
Zhang & Jia, ICLR 2022). Counts are reduced layer by layer; no samples x all-weights array is built.

Engines:
- ``batched``: one forward/backward per chunk of samples. Train-mode BatchNorm is swapped for instance
  normalisation with the same affine parameters (identical to BatchNorm on one sample), the per-sample
  losses are summed, and each layer's per-sample weight gradients are formed from its input and output
  gradient (a grouped weight-gradient convolution for Conv2d, an einsum for Linear) inside a gradient
  hook, then reduced to sign counts (on a CPU in cache-sized slices of samples).
- ``vmap``: ``torch.func.vmap(grad(...))`` over single-sample calls of the functional model.
- ``loop``: the reference; one forward/backward per sample.
- ``auto``: ``batched``, checked on the first chunk that samples do not interact; falls back to ``loop``
  (with a logged warning) for models the batched engine cannot handle.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ENGINES = ("auto", "batched", "vmap", "loop")
#: per-layer budget, in float elements, for one chunk's per-sample gradients
DEFAULT_ELEMENT_BUDGET = 1 << 25
#: float elements of per-sample gradients a layer's hook forms at once on a CPU (2 MiB): slices that stay
#: in cache make the grouped weight-gradient convolution of wide layers several times faster there
#: (2^17..2^21 measured, docs/performance.md); other devices take the whole chunk in one call
SLICE_ELEMENTS = 1 << 19

log = logging.getLogger("gradsign")


class UnsupportedModelError(RuntimeError):
    """The batched engine cannot compute exact per-sample gradients for this model."""


def counted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers of ``model``: the layers whose weights GradSign counts."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def per_sample_loss_sum(outputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """sum_i loss_fn(outputs[i:i+1], targets[i:i+1]): its gradient w.r.t. output i is dL_i/d output_i.

    One vectorised call (``torch.func.vmap`` over the samples) where ``loss_fn`` allows it, otherwise one
    call per sample; both give the same sum.
    """
    from torch.func import vmap

    try:
        losses = vmap(lambda o, t: loss_fn(o[None], t[None]))(outputs, targets)
    except Exception:  # any loss vmap cannot trace (data-dependent control flow, .item(), randomness)
        losses = None
    if losses is None or losses.shape != (len(outputs),):
        losses = torch.stack([loss_fn(outputs[i:i + 1], targets[i:i + 1]) for i in range(len(outputs))])
    return losses.sum()


def sign_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
                engine: str = "auto", chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per-layer ``sum_i sign(dL_i/dW)`` (int32, the weight's shape) for the Conv2d/Linear layers.

    ``model`` must be a private copy in train mode: the engines modify it (requires_grad flags, norm
    layers). Dropout is switched off so the counts are a deterministic function of weights and batch.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    layers = counted_layers(model)
    if engine == "loop":
        return _loop_counts(model, inputs, targets, loss_fn, layers)
    if engine == "vmap":
        return _vmap_counts(model, inputs, targets, loss_fn, layers, chunk_size)
    requires_grad = [p.requires_grad for p in model.parameters()]
    swapped = _swap_batch_norms(model)
    try:
        return _batched_counts(model, inputs, targets, loss_fn, layers, chunk_size,
                               check_independence=engine == "auto")
    except (UnsupportedModelError, RuntimeError, ValueError, NotImplementedError) as error:
        if engine == "batched":
            raise
        log.warning("gradsign: batched engine cannot handle this model (%s); using the loop engine",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)
        # the loop sees the model as it was: its own norm layers and gradient flags
        for parent, name, norm in swapped:
            setattr(parent, name, norm)
        for p, flag in zip(model.parameters(), requires_grad):
            p.requires_grad_(flag)
        return _loop_counts(model, inputs, targets, loss_fn, layers)


def _zero_counts(layers: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(m.weight, dtype=torch.int32) for name, m in layers}


def _loop_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                 layers: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    counts = _zero_counts(layers)
    for _, m in layers:
        m.weight.requires_grad_(True)
    for i in range(len(inputs)):
        model.zero_grad(set_to_none=True)
        loss_fn(model(inputs[i:i + 1]), targets[i:i + 1]).backward()
        for name, m in layers:
            if m.weight.grad is not None:
                counts[name] += torch.sign(m.weight.grad).to(torch.int32)
    model.zero_grad(set_to_none=True)
    return counts


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _default_chunk(layers: list[tuple[str, nn.Module]], n: int, budget: int) -> int:
    largest = max((m.weight.numel() for _, m in layers), default=1)
    return max(1, min(n, budget // largest))


class _PerSampleNorm(nn.Module):
    """BatchNorm applied to a batch of one, for every sample at once: instance normalisation with the
    BatchNorm's eps and affine parameters (statistics over all dims after the channel dim)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise UnsupportedModelError("BatchNorm on (N, C) input has no single-sample statistics")
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


def _swap_batch_norms(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every BatchNorm that normalises by batch statistics with ``_PerSampleNorm``; returns
    (parent, attribute, replaced BatchNorm) for each, so the swap can be undone."""
    swapped = []
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and (child.training
                                                                   or not child.track_running_stats):
            setattr(module, name, _PerSampleNorm(child))
            swapped.append((module, name, child))
        else:
            swapped += _swap_batch_norms(child)
    return swapped


def _conv2d_sample_grads(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Per-sample dL/dW of a Conv2d, shape (B, *W.shape), from its input and output gradient: the
    weight gradient of one convolution whose groups are (sample, group) pairs."""
    if x.dim() != 4:
        raise UnsupportedModelError("Conv2d called on unbatched input")
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    batch = x.shape[0]
    out_channels, in_per_group, *kernel = conv.weight.shape
    grads = torch.nn.grad.conv2d_weight(
        x.reshape(1, -1, *x.shape[2:]), (batch * out_channels, in_per_group, *kernel),
        grad_out.reshape(1, -1, *grad_out.shape[2:]), stride=conv.stride, padding=padding,
        dilation=conv.dilation, groups=batch * conv.groups)
    return grads.reshape(batch, *conv.weight.shape)


def _linear_sample_grads(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Per-sample dL/dW of a Linear layer (inputs of any shape (B, ..., in))."""
    if x.dim() < 2:
        raise UnsupportedModelError("Linear called on unbatched input")
    batch = x.shape[0]
    x = x.reshape(batch, -1, x.shape[-1])
    grad_out = grad_out.reshape(batch, -1, grad_out.shape[-1])
    return torch.einsum("bto,bti->boi", grad_out, x)


def _sample_grads(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return _conv2d_sample_grads(module, x, grad_out)
    return _linear_sample_grads(x, grad_out)


class _SignCountHooks:
    """Forward hooks that attach, to each counted layer's output, a gradient hook forming the layer's
    per-sample weight gradients and adding their signs to ``counts``. A layer called several times in
    one forward has its per-sample gradients summed over the calls before the sign is taken."""

    def __init__(self, layers: list[tuple[str, nn.Module]], counts: dict[str, torch.Tensor]):
        self.counts = counts
        self.pending_calls: dict[str, int] = {}
        self.partial: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._forward_hook(name)) for name, m in layers]

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise UnsupportedModelError(f"layer {name} does not return a tensor")
            if not output.requires_grad:
                # the input does not depend on the batch (e.g. zeros from a cut-off path): make the
                # output a leaf so that the gradient arriving at it is still seen
                output = output.detach().requires_grad_(True)
            self.pending_calls[name] = self.pending_calls.get(name, 0) + 1
            x = args[0].detach()
            output.register_hook(lambda grad: self._accumulate(name, module, x, grad))
            return output
        return hook

    def _accumulate(self, name: str, module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        self.pending_calls[name] -= 1
        if not self.pending_calls[name] and name not in self.partial:
            # the layer's only call: reduce to sign counts slice by slice
            step = max(1, SLICE_ELEMENTS // module.weight.numel()) if x.device.type == "cpu" else len(x)
            for part in _chunks(len(x), step):
                self._add_signs(name, _sample_grads(module, x[part], grad_out[part]))
            return
        sample_grads = _sample_grads(module, x, grad_out)
        if name in self.partial:
            sample_grads = sample_grads + self.partial.pop(name)
        if self.pending_calls[name]:
            self.partial[name] = sample_grads
        else:
            self._add_signs(name, sample_grads)

    def _add_signs(self, name: str, sample_grads: torch.Tensor) -> None:
        self.counts[name] += torch.sign(sample_grads).sum(0).to(torch.int32)

    def finish_chunk(self) -> None:
        """Close the chunk: calls whose output got no gradient contribute zero."""
        for name, sample_grads in self.partial.items():
            self._add_signs(name, sample_grads)
        self.partial.clear()
        self.pending_calls.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _assert_samples_independent(model: nn.Module, x: torch.Tensor) -> None:
    """Raise if a sample's output depends on the other samples of its batch."""
    if len(x) < 2:
        return
    with torch.no_grad():
        together = model(x[:2])
        alone = torch.cat([model(x[:1]), model(x[1:2])])
    if not torch.allclose(together, alone, rtol=1e-3, atol=1e-5 * float(alone.abs().max()) + 1e-12):
        raise UnsupportedModelError("samples interact within a batch")


def _batched_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                    layers: list[tuple[str, nn.Module]], chunk_size: int | None, *,
                    check_independence: bool) -> dict[str, torch.Tensor]:
    model.requires_grad_(False)
    counts = _zero_counts(layers)
    chunk_size = chunk_size or _default_chunk(layers, len(inputs), DEFAULT_ELEMENT_BUDGET)
    if check_independence:
        _assert_samples_independent(model, inputs)
    hooks = _SignCountHooks(layers, counts)
    try:
        for part in _chunks(len(inputs), chunk_size):
            x = inputs[part].detach().requires_grad_(True)
            per_sample_loss_sum(model(x), targets[part], loss_fn).backward()
            hooks.finish_chunk()
    finally:
        hooks.remove()
    return counts


def _vmap_counts(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
                 layers: list[tuple[str, nn.Module]], chunk_size: int | None) -> dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap

    replace_all_batch_norm_modules_(model)
    keys = {name: f"{name}.weight" if name else "weight" for name, _ in layers}
    weights = {keys[name]: m.weight.detach() for name, m in layers}
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in weights}
    fixed.update({k: v.detach() for k, v in model.named_buffers()})

    def sample_loss(w: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, (w, fixed), (x[None],)), t[None])

    total = sum(w.numel() for w in weights.values()) or 1
    chunk_size = chunk_size or max(1, min(len(inputs), DEFAULT_ELEMENT_BUDGET // total))
    sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    counts = _zero_counts(layers)
    for part in _chunks(len(inputs), chunk_size):
        grads = sample_grads(weights, inputs[part], targets[part])
        for name, _ in layers:
            counts[name] += torch.sign(grads[keys[name]]).sum(0).to(torch.int32)
    return counts
