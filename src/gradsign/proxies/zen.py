"""zen: Zen-NAS expressivity score of a Gaussian-initialised network."""
from __future__ import annotations

import math

import torch
from torch import nn

from gradsign.proxies.registry import LossFn, drawn_inputs, register

_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _feature_module(model: nn.Module) -> nn.Module | None:
    """The module whose input is the final feature map: the last adaptive average pool if there is
    one (Zen-NAS's pre-global-pooling feature map), else the last Linear layer, else None (output)."""
    pools = [m for m in model.modules() if isinstance(m, _POOLS)]
    if pools:
        return pools[-1]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


@register(
    "zen",
    formula="ln(mean_n sum |f(x_n) - f(x_n + alpha eps_n)|) + sum over BatchNorm layers of "
            "ln sqrt(mean over channels of the batch variance of the BN input on x); weights ~ N(0,1), "
            "x, eps ~ N(0,1), alpha = 0.01, f the feature map before global pooling",
    source="Lin et al., Zen-NAS: A Zero-Shot NAS for High-Performance Image Recognition, ICCV 2021",
    higher_is_better=True,
    uses_targets=False,
)
def zen(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
        loss_fn: LossFn | None = None, *, alpha: float = 0.01, seed: int = 0) -> float:
    """Score = ln(Delta) + sum_BN ln(sigma_BN) (Lin et al., ICCV 2021).

    Every Conv/Linear weight is redrawn from N(0, 1) (biases 0, norm scales 1 and shifts 0), and
    x, eps ~ N(0, 1) have the inputs' shape; all draws come from a CPU generator seeded with ``seed``.
    Delta = mean over samples n of sum over features of |f(x_n) - f(x_n + alpha eps_n)|, the L1
    difference per sample as in the Zen-NAS reference code (the paper writes a Frobenius norm; it
    does not divide by alpha either). f is the input of the last adaptive average pool (the feature
    map before global pooling, as in Zen-NAS); without such a pool, the input of the last Linear
    layer; without a Linear layer, the model output.
    sigma_BN = sqrt(mean over channels of the per-channel batch variance of the BatchNorm's input),
    measured in the forward pass on the clean x in train mode: the paper's definition. (The reference
    code reads BatchNorm's running_var after both forward passes instead, which mixes in the initial
    value 1 through the BN momentum.)
    """
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    device = param.device if param is not None else inputs.device
    dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        x = torch.randn(inputs.shape, generator=gen, dtype=dtype).to(device)
        eps = torch.randn(inputs.shape, generator=gen, dtype=dtype).to(device)

        phase = ["clean"]
        features: dict[str, torch.Tensor] = {}
        bn_vars: list[torch.Tensor] = []

        def on_feature(module: nn.Module, args: tuple) -> None:
            features[phase[0]] = args[0].detach()  # the last call of a forward pass wins

        def on_bn(module: nn.Module, args: tuple) -> None:
            if phase[0] == "clean":
                a = args[0].detach().double()
                per_channel = a.movedim(1, 0).reshape(a.shape[1], -1).var(dim=1, unbiased=False)
                bn_vars.append(per_channel.mean())

        handles = [m.register_forward_pre_hook(on_bn) for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        feature = _feature_module(model)
        if feature is not None:
            handles.append(feature.register_forward_pre_hook(on_feature))
        try:
            with drawn_inputs("zen", inputs, "Gaussian inputs"):
                features["clean_out"] = model(x)
                phase[0] = "mixed"
                features["mixed_out"] = model(x + alpha * eps)
        finally:
            for h in handles:
                h.remove()
    seen = "clean" in features and "mixed" in features
    key_clean, key_mixed = ("clean", "mixed") if seen else ("clean_out", "mixed_out")
    f_clean, f_mixed = features[key_clean], features[key_mixed]
    diff = (f_clean - f_mixed).double().abs().reshape(f_clean.shape[0], -1).sum(dim=1).mean()
    terms = [diff] + [v.sqrt() for v in bn_vars]
    return float(sum(torch.log(t).item() for t in terms))
