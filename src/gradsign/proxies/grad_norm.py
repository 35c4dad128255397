"""grad_norm: the summed L2 norms of the loss gradient of every Conv2d/Linear weight."""
from __future__ import annotations

import torch
from torch import nn

from gradsign.proxies.registry import LossFn, register, weight_gradients


@register(
    "grad_norm",
    formula="sum over Conv2d/Linear layers l of ||dL/dW_l||_2, L the batch loss",
    source="Abdelfattah et al., Zero-Cost Proxies for Lightweight NAS, ICLR 2021",
    higher_is_better=True,
    uses_targets=True,
    reads_weights_only=True,
)
def grad_norm(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> float:
    """Score = sum_l ||dL/dW_l||_2 (Frobenius norm per layer weight), one batched forward/backward.

    Abdelfattah et al., ICLR 2021. Biases and normalisation parameters are not counted; a layer that
    gets no gradient contributes 0.
    """
    pairs = weight_gradients(model, inputs, targets, loss_fn)
    return float(sum(g.double().norm().item() for _, g in pairs))
