"""synflow: synaptic flow of the network with absolute weights on an all-ones input."""
from __future__ import annotations

import math

import torch
from torch import nn

from gradsign.proxies.registry import LossFn, drawn_inputs, register, weight_layers


def _drop_batch_norms(model: nn.Module) -> None:
    """Replace every BatchNorm module of ``model`` (in place) by an identity."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            _drop_batch_norms(child)


@register(
    "synflow",
    formula="sum over Conv2d/Linear layers l of sum |W_l * dR/dW_l|, R = sum f_|theta|(1), "
            "BatchNorm removed, float64, all-ones input of batch size 1 (option log: ln of the score)",
    source="Tanaka et al., Pruning neural networks without any data by iteratively conserving "
           "synaptic flow, NeurIPS 2020; zero-cost form from Abdelfattah et al., ICLR 2021",
    higher_is_better=True,
    uses_targets=False,
)
def synflow(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
            loss_fn: LossFn | None = None, *, log: bool = False) -> float:
    """Score = sum_l sum |W_l * dR/dW_l| with R = 1^T f(1; |theta|).

    Following Tanaka et al. (NeurIPS 2020) and the zero-cost form of Abdelfattah et al. (ICLR 2021):
    every BatchNorm is replaced by an identity, the model is cast to float64, every parameter is
    replaced by its absolute value, and R is the sum of the outputs for one all-ones input of the
    inputs' per-sample shape. The model is put in eval mode (no BatchNorm is left; this only makes
    dropout inactive), so the score is deterministic and independent of the data and targets.

    Args:
        log: return ln(score) instead of the score (the score overflows float32 on deep networks).
    """
    _drop_batch_norms(model)
    model.double()
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    weights = [m.weight for _, m in weight_layers(model)]
    if not weights:
        return -math.inf if log else 0.0
    for w in weights:
        w.requires_grad_(True)
    ones = torch.ones((1,) + tuple(inputs.shape[1:]), dtype=torch.float64, device=weights[0].device)
    with drawn_inputs("synflow", inputs, "an all-ones input"):
        r = model(ones).sum()
    grads = torch.autograd.grad(r, weights, allow_unused=True)
    total = 0.0
    for w, g in zip(weights, grads):
        if g is not None:
            total += (w.detach() * g).abs().sum().item()
    if log:
        return math.log(total) if total > 0 else -math.inf
    return float(total)
