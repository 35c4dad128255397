"""params: the number of trainable parameters, in millions."""
from __future__ import annotations

import torch
from torch import nn

from gradsign.proxies.registry import LossFn, register


@register(
    "params",
    formula="(number of trainable parameters, norm affine parameters included) / 1e6",
    source="model size baseline, as tabulated by NAS-Bench-201 (Dong & Yang, ICLR 2020) and "
           "NAS-Bench-Suite-Zero (Krishnakumar et al., NeurIPS 2022)",
    higher_is_better=True,
    uses_targets=False,
    reads_weights_only=True,
)
def params(model: nn.Module, inputs: torch.Tensor | None = None, targets: torch.Tensor | None = None,
           loss_fn: LossFn | None = None) -> float:
    """Score = #{trainable parameters} / 1e6: every parameter with requires_grad (weights, biases and
    normalisation affine parameters; a shared parameter counts once), in millions like the benchmarks'
    ``params`` columns. Buffers (e.g. running statistics) are not counted. Needs no data."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
