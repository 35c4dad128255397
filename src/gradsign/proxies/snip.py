"""snip: connection sensitivity |W * dL/dW| summed over every Conv2d/Linear weight."""
from __future__ import annotations

import torch
from torch import nn

from gradsign.proxies.registry import LossFn, register, weight_gradients


@register(
    "snip",
    formula="sum over Conv2d/Linear layers l of sum |W_l * dL/dW_l|, L the batch loss",
    source="Lee et al., SNIP, ICLR 2019; zero-cost form from Abdelfattah et al., ICLR 2021",
    higher_is_better=True,
    uses_targets=True,
    reads_weights_only=True,
)
def snip(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> float:
    """Score = sum_l sum |W_l * dL/dW_l|, one batched forward/backward.

    SNIP's saliency is |dL/dc| for a multiplicative mask c = 1 on each weight, which equals
    |W * dL/dW| (Lee et al., ICLR 2019); summing it over the network is the zero-cost form of
    Abdelfattah et al., ICLR 2021.
    """
    pairs = weight_gradients(model, inputs, targets, loss_fn)
    return float(sum((w.detach().double() * g.double()).abs().sum().item() for w, g in pairs))
