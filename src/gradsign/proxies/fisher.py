"""fisher: a channel-saliency estimate of the loss change from removing each layer output channel."""
from __future__ import annotations

import torch
from torch import nn

from gradsign.proxies.registry import LossFn, register, weight_layers


@register(
    "fisher",
    formula="sum over Conv2d/Linear layers l, output channels c of "
            "0.5 * mean_n (sum over positions of a * dL/da)_{n,c}^2, a the layer output "
            "(option fan_in_weighted: each layer's term times its weights per output channel)",
    source="Theis et al., Faster gaze prediction with dense networks and Fisher pruning, 2018; "
           "Turner et al., BlockSwap, ICLR 2020; zero-cost form from Abdelfattah et al., ICLR 2021",
    higher_is_better=True,
    uses_targets=True,
    reads_weights_only=True,
)
def fisher(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
           fan_in_weighted: bool = False) -> float:
    """Score = sum_l sum_c 0.5 * mean_n (sum_s a_{n,c,s} * dL/da_{n,c,s})^2.

    a is the output of Conv2d/Linear layer l (batch n, channel c, spatial positions s; for a Linear
    layer the last dimension is the channel one and all other non-batch dimensions are positions),
    dL/da its gradient under the batch loss. The per-channel value is the Fisher pruning saliency of
    Theis et al. (2018), used for NAS by Turner et al. (ICLR 2020) and summed over channels and layers
    by Abdelfattah et al. (ICLR 2021). A layer called several times sums its per-call saliencies.

    Args:
        fan_in_weighted: multiply each layer's term by its number of weights per output channel
            (C_in / groups * kernel size for a convolution, in_features for a Linear layer). The
            zero-cost-NAS reference code (Abdelfattah et al.) broadcasts each channel value to every
            weight of the channel before summing, which is this weighting; the published fisher scores
            (e.g. NAS-Bench-Suite-Zero) use it. By default channels are summed unweighted.
    """
    layers = [m for _, m in weight_layers(model)]
    if not layers:
        return 0.0
    device = layers[0].weight.device
    weights = [layer.weight for layer in layers]
    for w in weights:
        w.requires_grad_(True)
    saliency: list[torch.Tensor] = []
    handles = []

    def on_output(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return
        act = out.detach()
        channel_dim = act.dim() - 1 if isinstance(module, nn.Linear) else 1

        def on_grad(grad: torch.Tensor) -> None:
            prod = (act * grad).double().movedim(channel_dim, 1)
            per_channel = prod.reshape(prod.shape[0], prod.shape[1], -1).sum(dim=2)
            fan_in = module.weight[0].numel() if fan_in_weighted else 1
            saliency.append(0.5 * fan_in * per_channel.pow(2).mean(dim=0).sum())

        out.register_hook(on_grad)

    for layer in layers:
        handles.append(layer.register_forward_hook(on_output))
    try:
        loss = loss_fn(model(inputs.to(device)), targets.to(device))
        # The weight gradients are only a vehicle: they make autograd run the activation hooks.
        torch.autograd.grad(loss, weights, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return float(sum(s.item() for s in saliency))
