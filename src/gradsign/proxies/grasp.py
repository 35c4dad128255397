"""grasp: -W * (H g) summed over every Conv2d/Linear weight, H g by double backpropagation."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from gradsign.proxies.registry import LossFn, register, weight_gradients


@register(
    "grasp",
    formula="-sum over Conv2d/Linear layers l of sum W_l * (H g)_l, g = dL/dW, H = d2L/dW2 "
            "(weights only); higher is better",
    source="Wang et al., GraSP, ICLR 2020; zero-cost form from Abdelfattah et al., ICLR 2021",
    higher_is_better=True,
    uses_targets=True,
    reads_weights_only=True,
)
def grasp(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> float:
    """Score = -sum_l sum W_l * (H g)_l, with g = dL/dW and H g = d(g . stop_grad(g))/dW.

    GraSP (Wang et al., ICLR 2020) scores a weight by S = -W * (H g): removing weights with large S
    preserves gradient flow. The zero-cost form (Abdelfattah et al., ICLR 2021) sums S over all
    Conv2d/Linear weights and reads a larger sum as a better network; this function follows that sign
    convention. H is the Hessian block of the weights only (biases and norm parameters are held fixed).
    ``scaled_dot_product_attention`` runs as its plain matrix products and softmax (torch's fused CPU
    kernels have no second derivative).
    """
    with _attention_twice_differentiable():
        return _grasp(model, inputs, targets, loss_fn)


def _attention_twice_differentiable() -> contextlib.AbstractContextManager:
    """Within the block, ``F.scaled_dot_product_attention`` takes torch's math backend (composite, so
    differentiable twice); where this torch has no ``torch.nn.attention`` (before 2.3), nothing changes."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _grasp(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> float:
    pairs = weight_gradients(model, inputs, targets, loss_fn, create_graph=True)
    if not pairs:
        return 0.0
    z = sum((g * g.detach()).sum() for _, g in pairs)
    if not z.requires_grad:  # the loss is linear in every weight: H g = 0
        return 0.0
    hg = torch.autograd.grad(z, [w for w, _ in pairs], allow_unused=True)
    total = 0.0
    for (w, _), h in zip(pairs, hg):
        if h is not None:
            total -= (w.detach().double() * h.double()).sum().item()
    return float(total)
