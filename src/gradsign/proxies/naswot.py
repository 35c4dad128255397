"""naswot: log-determinant of the Hamming-similarity kernel of the batch's ReLU activation codes."""
from __future__ import annotations

import torch
from torch import nn

from gradsign.proxies.registry import LossFn, register


@register(
    "naswot",
    formula="ln|det K|, K = c c^T + (1-c)(1-c)^T, c_(n,u) = 1 if the input of ReLU unit u is > 0 "
            "for sample n (all nn.ReLU modules)",
    source="Mellor et al., Neural Architecture Search without Training, ICML 2021",
    higher_is_better=True,
    uses_targets=False,
    reads_weights_only=True,
)
def naswot(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
           loss_fn: LossFn | None = None) -> float:
    """Score = ln|det K| with K = c c^T + (1 - c)(1 - c)^T (float64, B x B).

    c (B x N) is the binary code of the batch: for every unit of every ``nn.ReLU`` module, 1 where
    the unit's input is > 0 (Mellor et al., ICML 2021). K[n, m] is the number of units on which samples
    n and m agree, i.e. N minus their Hamming distance. Codes are read by forward pre-hooks on
    ``nn.ReLU`` modules, as the reference code does, so ReLUs applied as functions
    (``torch.nn.functional.relu``) are not seen; a model without any ``nn.ReLU`` raises ValueError.
    Duplicate samples (or codes) make K singular and the score -inf.
    """
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("naswot needs nn.ReLU modules to read activation codes from; the model has none")
    param = next(model.parameters(), None)
    device = param.device if param is not None else inputs.device
    batch = inputs.shape[0]
    kernel = torch.zeros((batch, batch), dtype=torch.float64, device=device)

    def on_input(module: nn.Module, args: tuple) -> None:
        nonlocal kernel
        codes = (args[0].detach().reshape(batch, -1) > 0).double()
        kernel = kernel + codes @ codes.T + (1.0 - codes) @ (1.0 - codes).T

    handles = [m.register_forward_pre_hook(on_input) for m in relus]
    try:
        with torch.no_grad():
            model(inputs.to(device))
    finally:
        for h in handles:
            h.remove()
    return float(torch.linalg.slogdet(kernel).logabsdet.item())
