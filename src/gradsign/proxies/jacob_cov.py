"""jacob_cov: how uncorrelated the input Jacobians of the samples of a batch are."""
from __future__ import annotations

import torch
from torch import nn

from gradsign.proxies.registry import LossFn, register


@register(
    "jacob_cov",
    formula="-sum_i [ln(v_i + k) + 1/(v_i + k)], v the eigenvalues of corrcoef(J), "
            "J_n = d(sum of outputs)/d(input n) flattened, k = 1e-5",
    source="Mellor et al., Neural Architecture Search without Training, arXiv 2006.04647v1, 2020; "
           "zero-cost form from Abdelfattah et al., ICLR 2021",
    higher_is_better=True,
    uses_targets=False,
    reads_weights_only=True,
)
def jacob_cov(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
              loss_fn: LossFn | None = None, *, k: float = 1e-5) -> float:
    """Score = -sum_i [ln(v_i + k) + 1/(v_i + k)].

    J (B x D) stacks, per sample n, the gradient of the sum of all outputs of the batch with respect to
    input n (so in train mode BatchNorm couples samples, as in the reference code); C is the B x B
    correlation matrix of the rows of J and v its eigenvalues (Mellor et al. 2020, v1). The score is
    largest when C is the identity, i.e. when the network separates the samples' local linear maps.
    A sample whose Jacobian is constant gives a NaN correlation and thus a NaN score; so does a network
    whose output does not depend on its input (e.g. a NAS-Bench-201 cell cut off by 'none' edges).
    """
    if not inputs.is_floating_point():
        raise ValueError(f"jacob_cov differentiates the outputs with respect to the inputs, and {inputs.dtype} "
                         "inputs (e.g. token ids) have no gradient")
    param = next(model.parameters(), None)
    device = param.device if param is not None else inputs.device
    x = inputs.detach().to(device).clone().requires_grad_(True)
    out = model(x)
    if not out.requires_grad:
        return float("nan")
    (jac,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
    if jac is None:
        return float("nan")
    jac = jac.reshape(jac.shape[0], -1).double()
    corr = torch.corrcoef(jac)
    eig = torch.linalg.eigvalsh(corr)
    return float(-(torch.log(eig + k) + 1.0 / (eig + k)).sum().item())
