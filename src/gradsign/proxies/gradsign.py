"""GradSign (Zhang & Jia, ICLR 2022): agreement in sign of per-sample gradients at initialisation."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from gradsign.engine import LossFn, NonFiniteGradientError, parametrized_layers, sign_counts, uncounted_weights
from gradsign.proxies.registry import register

AGGREGATIONS = ("sum", "mean")


@register(
    "gradsign",
    formula="sum_k |sum_i sign(dL_i/dw_k)| over the Conv2d/Linear weights w_k, L_i the loss of sample i "
            "alone (train mode, BatchNorm with single-sample statistics, sign(0)=0); 'mean' divides by "
            "the number of weights",
    source="Zhang & Jia, GradSign: Model Performance Inference with Theoretical Insights, ICLR 2022",
    reads_weights_only=True,
)
def gradsign(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
             aggregation: str = "sum", engine: str = "auto", chunk_size: int | None = None) -> float:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    try:
        counts = sign_counts(model, inputs, targets, loss_fn, engine=engine, chunk_size=chunk_size)
    except NonFiniteGradientError as error:
        warnings.warn(f"gradsign scored NaN: {error}", stacklevel=4)
        return float("nan")
    counted = sum(c.numel() for c in counts.values())
    _warn_about_uncounted_weights(model, counted)
    total = sum(int(c.abs().sum()) for c in counts.values())
    if aggregation == "mean":
        return total / max(1, counted)
    return float(total)


def _warn_about_uncounted_weights(model: nn.Module, counted: int) -> None:
    """GradSign's definition counts Conv2d and Linear weights only: name the layers of those types whose
    weights it cannot count (computed from other parameters), and say so where most of a model's weight matrices are in
    other layers (the score then describes a small part of the network)."""
    parametrized = parametrized_layers(model)
    if parametrized:
        warnings.warn(f"gradsign does not count the weights of {len(parametrized)} layer(s) whose weight is "
                      f"computed from other parameters (weight_norm, spectral_norm, a pruning mask, ...): "
                      f"{', '.join(parametrized[:5])}"
                      + (", ..." if len(parametrized) > 5 else ""), stacklevel=4)
    uncounted = uncounted_weights(model)
    if sum(uncounted.values()) > counted:
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(uncounted.items(), key=lambda kv: -kv[1]))
        warnings.warn(f"gradsign counts Conv2d and Linear weights only ({counted:,} here); more of this model's "
                      f"weights are in other layers, which it does not count: {kinds}", stacklevel=4)
