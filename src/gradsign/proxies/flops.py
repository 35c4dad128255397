"""flops: multiply-accumulate operations of the Conv/Linear layers for one sample, in millions."""
from __future__ import annotations

import torch
from torch import nn

from gradsign.proxies.registry import LossFn, register


@register(
    "flops",
    formula="(sum over Conv/Linear calls of #outputs * (C_in / groups) * prod(kernel size)) / 1e6 "
            "for one sample (multiply-accumulates; bias additions, norms and pooling not counted)",
    source="compute-cost baseline, as tabulated by NAS-Bench-201 (Dong & Yang, ICLR 2020) and "
           "NAS-Bench-Suite-Zero (Krishnakumar et al., NeurIPS 2022)",
    higher_is_better=True,
    uses_targets=False,
    reads_weights_only=True,
)
def flops(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
          loss_fn: LossFn | None = None) -> float:
    """Score = MACs / 1e6 of one forward pass of the first sample of ``inputs``.

    A Conv layer costs C_out * prod(output spatial size) * (C_in / groups) * prod(kernel size) MACs
    (e.g. Cout*Hout*Wout*(Cin/groups)*kh*kw for Conv2d); a Linear layer in_features * (number of its
    outputs), so a Linear applied to a (1, T, D) input costs T * D * out_features. Bias additions,
    normalisation, activations and pooling are not counted: they are a small share of the cost and
    rankings barely depend on them. A layer called several times is counted for each call. The
    forward pass runs in eval mode (BatchNorm cannot run in train mode on one sample); the count
    does not depend on the mode.
    """
    counts: list[int] = []

    def on_output(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            counts.append(out.numel() * module.in_features)
        else:
            kernel = 1
            for k in module.kernel_size:
                kernel *= k
            counts.append(out.numel() * (module.in_channels // module.groups) * kernel)

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    param = next(model.parameters(), None)
    device = param.device if param is not None else inputs.device
    model.eval()
    handles = [m.register_forward_hook(on_output) for m in layers]
    try:
        with torch.no_grad():
            model(inputs[:1].to(device))
    finally:
        for h in handles:
            h.remove()
    return sum(counts) / 1e6
