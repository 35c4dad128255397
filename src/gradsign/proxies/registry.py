"""Registry of zero-cost proxies, each registered by name with its formula and source.

A proxy is a function ``fn(model, inputs, targets, loss_fn, **options) -> float``. It receives a private
copy of the caller's model (in scoring mode) and may change it freely; the public API makes the copy, so a
proxy never needs to restore anything. A proxy registered with ``reads_weights_only=True`` instead gets the
caller's model itself, lent: it must never write the weights' values, and the API puts back everything else
it may change (see ``gradsign.api``). Options a proxy accepts are the keyword-only parameters of ``fn``.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from gradsign.engine import counted_layers

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ProxyFn = Callable[..., float]


@dataclass(frozen=True)
class ProxyInfo:
    """What a user needs to know about one proxy."""

    name: str
    fn: ProxyFn = field(repr=False)
    formula: str
    source: str
    higher_is_better: bool = True
    uses_targets: bool = True
    reads_weights_only: bool = False

    @property
    def options(self) -> tuple[str, ...]:
        """Names of the keyword-only options the proxy accepts."""
        params = inspect.signature(self.fn).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


PROXIES: dict[str, ProxyInfo] = {}


def register(name: str, *, formula: str, source: str, higher_is_better: bool = True,
             uses_targets: bool = True, reads_weights_only: bool = False) -> Callable[[ProxyFn], ProxyFn]:
    """Decorator that registers ``fn`` as the proxy ``name``."""

    def wrap(fn: ProxyFn) -> ProxyFn:
        if name in PROXIES:
            raise ValueError(f"proxy {name!r} is registered twice")
        PROXIES[name] = ProxyInfo(name, fn, formula, source, higher_is_better, uses_targets, reads_weights_only)
        return fn

    return wrap


class UnknownProxyError(ValueError):
    """Raised for a proxy name that is not registered."""


def get_proxy(name: str) -> ProxyInfo:
    """The registered proxy ``name``; raises UnknownProxyError listing the known names."""
    try:
        return PROXIES[name]
    except KeyError:
        known = ", ".join(sorted(PROXIES))
        raise UnknownProxyError(f"unknown proxy {name!r}; known proxies: {known}") from None


#: the Conv2d and Linear layers of a model, in registration order: the layers proxies sum over
weight_layers = counted_layers


def load_plugins() -> list[str]:
    """Import the modules named in ``$GRADSIGN_PLUGINS`` (comma-separated), so that the proxies they
    register are known to the command line and to worker processes. Returns the names imported."""
    names = [n.strip() for n in os.environ.get("GRADSIGN_PLUGINS", "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"cannot import plugin module {name!r} from GRADSIGN_PLUGINS: {error}") from None
    return names


@contextlib.contextmanager
def drawn_inputs(proxy: str, inputs: torch.Tensor, drawn: str) -> Iterator[None]:
    """Within the block, where ``inputs`` are integers (token ids), torch's error from a model that does not
    take the floating inputs ``proxy`` draws in their place (``drawn``) becomes a ValueError saying so."""
    try:
        yield
    except RuntimeError as error:
        if inputs.is_floating_point():
            raise
        raise ValueError(f"{proxy} feeds the model {drawn} of the batch's shape in place of its {inputs.dtype} "
                         f"inputs, which this model does not take (e.g. token ids): "
                         f"{str(error).splitlines()[0]}") from error


def weight_gradients(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
                     create_graph: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W, dL/dW) for every Conv2d/Linear weight that gets a gradient, L = loss_fn(model(inputs), targets)
    on the whole batch (one forward/backward; ``create_graph`` keeps it differentiable)."""
    weights = [m.weight for _, m in weight_layers(model)]
    if not weights:
        return []
    device = weights[0].device
    for w in weights:
        w.requires_grad_(True)
    loss = loss_fn(model(inputs.to(device)), targets.to(device))
    grads = torch.autograd.grad(loss, weights, create_graph=create_graph, allow_unused=True)
    return [(w, g) for w, g in zip(weights, grads) if g is not None]
