"""effective_params: how many Conv2d/Linear weights receive any gradient at initialisation.

GradSign (sum_k |sum_i sign(dL_i/dw_k)|) gives 0 to every weight no sample's gradient reaches, and at a
random initialisation the signs of the weights that are reached agree little more than fair coins would
(docs/what_gradsign_measures.md). This proxy counts the reached weights directly, with one batched
forward/backward instead of per-sample gradients.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from gradsign.engine import BatchedForm, counted_layers, per_sample_loss_sum, samples_interact
from gradsign.proxies.registry import LossFn, register

log = logging.getLogger("gradsign")


def reached_weights_batched(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                            loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Per Conv2d/Linear layer, a bool mask of the weights with d(sum_i L_i)/dw != 0, from one batched
    forward/backward; train-mode BatchNorm is replaced by its single-sample form first, so L_i is sample
    i's loss alone (GradSign's semantics). Modifies ``model`` (a private copy). Raises ValueError when the
    samples still interact after the replacement."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    single_sample_norms = BatchedForm(model, attention=False)
    layers = counted_layers(model)
    try:
        # the first two samples, to float32 noise
        if samples_interact(model, inputs[:2], rtol=1e-3, relative_atol=1e-3):
            raise ValueError("samples interact within a batch")
    except ValueError:
        single_sample_norms.undo()
        raise
    model.requires_grad_(False)
    weights = [m.weight for _, m in layers]
    for w in weights:
        w.requires_grad_(True)
    x = inputs.detach()
    if x.is_floating_point():
        x.requires_grad_(True)  # keeps a graph even when no weight is on the path
    loss = per_sample_loss_sum(model(x), targets, loss_fn)
    grads = torch.autograd.grad(loss, weights, allow_unused=True) if weights and loss.requires_grad else []
    grads = list(grads) + [None] * (len(weights) - len(grads))
    return {name: (torch.zeros_like(m.weight, dtype=torch.bool) if g is None else g != 0)
            for (name, m), g in zip(layers, grads)}


def reached_weights_loop(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """Per Conv2d/Linear layer, a bool mask of the weights with dL_i/dw != 0 for at least one sample i,
    one forward/backward per sample (train mode, batch of one). Modifies ``model`` (a private copy)."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    layers = counted_layers(model)
    reached = {name: torch.zeros_like(m.weight, dtype=torch.bool) for name, m in layers}
    for _, m in layers:
        m.weight.requires_grad_(True)
    for i in range(len(inputs)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs[i:i + 1]), targets[i:i + 1])
        if loss.requires_grad:
            loss.backward()
        for name, m in layers:
            if m.weight.grad is not None:
                reached[name] |= m.weight.grad != 0
    model.zero_grad(set_to_none=True)
    return reached


@register(
    "effective_params",
    formula="#{Conv2d/Linear weights w_k : sum_i dL_i/dw_k != 0}, L_i the loss of sample i alone (train "
            "mode, BatchNorm with single-sample statistics), one batched forward/backward",
    source="this package (docs/what_gradsign_measures.md): the weights GradSign can count at all",
    higher_is_better=True,
    uses_targets=True,
)
def effective_params(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> float:
    """Score = #{k : sum_i dL_i/dw_k != 0} over the Conv2d/Linear weights w_k at initialisation.

    L_i is the loss of sample i of the batch alone, with the network in train mode and BatchNorm
    normalising each sample by its own statistics: GradSign's semantics (Zhang & Jia, ICLR 2022), so a
    weight is counted exactly when it can contribute to GradSign (up to an exact cancellation of non-zero
    per-sample gradients, which has probability zero). The gradient of sum_i L_i comes from one batched
    forward/backward after replacing train-mode BatchNorm by instance normalisation (identical on one
    sample); when samples still interact (a norm on (N, C) inputs, any other batch-level layer) it falls
    back, with a logged warning, to one forward/backward per sample, counting the weights with a non-zero
    gradient for at least one sample. Biases and norm parameters are not counted. Dropout is switched off.
    """
    try:
        reached = reached_weights_batched(model, inputs, targets, loss_fn)
    except ValueError as error:
        log.warning("effective_params: batched backward cannot keep samples apart (%s); using the loop",
                    error)
        reached = reached_weights_loop(model, inputs, targets, loss_fn)
    return float(sum(int(mask.sum()) for mask in reached.values()))
