"""GradSign against its chance level: how much of the score is sign agreement beyond fair coins.

If weight k gets a non-zero gradient from n_k of the N samples and those gradients' signs were
independent fair coins, |sum_i sign(dL_i/dw_k)| would be |S_{n_k}|, S_n a simple random walk after n
steps, whose mean has the closed form

    E|S_n| = n * C(n-1, floor((n-1)/2)) / 2^(n-1)      (n >= 1; E|S_0| = 0)

(e.g. Feller, An Introduction to Probability Theory, vol. 1, ch. III; ~ sqrt(2n/pi) for large n).
The chance level of an architecture is chance = sum_k E|S_{n_k}|, and

    excess = GradSign - chance,    ratio = GradSign / chance.

A ranking by GradSign that is only a ranking by the number of weights a gradient reaches (weighted by
E|S_n|) shows as an excess that carries no information about accuracy.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from gradsign.engine import LossFn, counted_layers


def expected_abs_walk(n: int) -> float:
    """E|S_n| for S_n the sum of n independent fair +-1 signs: n C(n-1, floor((n-1)/2)) / 2^(n-1)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return 0.0
    return n * math.comb(n - 1, (n - 1) // 2) / 2 ** (n - 1)  # exact integers, one rounding


def expected_abs_walk_table(n_max: int) -> np.ndarray:
    """``[E|S_0|, ..., E|S_{n_max}|]`` as float64."""
    return np.array([expected_abs_walk(n) for n in range(n_max + 1)], dtype=np.float64)


def per_sample_sign_stats(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn
                          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per Conv2d/Linear layer: (sum_i sign(dL_i/dW), #{i : dL_i/dW != 0}), both int32, the weight's shape.

    The reference semantics of GradSign: one forward/backward per sample, network in train mode on a
    batch of one (BatchNorm with the sample's own statistics), dropout off. ``model`` must be a private
    copy: its gradient flags and modes are changed.
    """
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    layers = counted_layers(model)
    signs = {name: torch.zeros_like(m.weight, dtype=torch.int32) for name, m in layers}
    nonzero = {name: torch.zeros_like(m.weight, dtype=torch.int32) for name, m in layers}
    model.requires_grad_(False)
    for _, m in layers:
        m.weight.requires_grad_(True)
    for i in range(len(inputs)):
        model.zero_grad(set_to_none=True)
        x = inputs[i:i + 1].detach()
        if x.is_floating_point():
            x.requires_grad_(True)  # a graph even when no weight is on the path
        loss = loss_fn(model(x), targets[i:i + 1])
        if loss.requires_grad:
            loss.backward()
        for name, m in layers:
            if m.weight.grad is not None:
                signs[name] += torch.sign(m.weight.grad).to(torch.int32)
                nonzero[name] += (m.weight.grad != 0).to(torch.int32)
    model.zero_grad(set_to_none=True)
    return {name: (signs[name], nonzero[name]) for name, _ in layers}


@dataclass(frozen=True)
class ChanceReport:
    """GradSign of one model and batch beside its chance level (see the module docstring)."""

    samples: int           #: N, the batch size
    weights: int           #: Conv2d/Linear weights counted
    reached: int           #: weights with n_k >= 1 (a non-zero gradient from at least one sample)
    full: int              #: weights with n_k = N
    gradsign: float        #: sum_k |sum_i sign(dL_i/dw_k)|
    chance: float          #: sum_k E|S_{n_k}|

    @property
    def excess(self) -> float:
        """GradSign - chance."""
        return self.gradsign - self.chance

    @property
    def ratio(self) -> float:
        """GradSign / chance (NaN when no weight is reached)."""
        return self.gradsign / self.chance if self.chance > 0 else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "excess": self.excess, "ratio": self.ratio}


def chance_report(stats: dict[str, tuple[torch.Tensor, torch.Tensor]], samples: int) -> ChanceReport:
    """Summarise ``per_sample_sign_stats`` of a batch of ``samples``: GradSign, chance level, counts."""
    table = torch.from_numpy(expected_abs_walk_table(samples))
    gradsign = chance = 0.0
    weights = reached = full = 0
    for signs, nonzero in stats.values():
        if nonzero.numel() and (int(nonzero.max()) > samples or int(nonzero.min()) < 0):
            raise ValueError("a non-zero count exceeds the number of samples")
        gradsign += float(signs.abs().sum())
        chance += float(table[nonzero.long()].sum())
        weights += nonzero.numel()
        reached += int((nonzero > 0).sum())
        full += int((nonzero == samples).sum())
    return ChanceReport(samples, weights, reached, full, gradsign, chance)


def gradsign_vs_chance(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                       loss_fn: LossFn | None = None) -> ChanceReport:
    """GradSign of ``model`` on ``(inputs, targets)`` with its chance level, on a copy of the model
    (the caller's model, its modes and the global RNG state are left as they were)."""
    import copy

    loss_fn = loss_fn or nn.functional.cross_entropy
    with torch.random.fork_rng():
        work = copy.deepcopy(model)
        stats = per_sample_sign_stats(work, inputs, targets, loss_fn)
    return chance_report(stats, len(inputs))


def partial_spearman(x, y, z, *, n_boot: int = 0, seed: int = 0) -> dict:
    """Signed partial Spearman correlation of ``x`` and ``y`` given ``z``: the Pearson partial
    correlation of their ranks, r_xy.z = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)), over the
    entries where all three are finite; with ``n_boot`` > 0 a 95% percentile bootstrap interval (entries
    resampled with replacement, ``default_rng(seed)``). Returns {"n", "partial", "ci95"}."""
    from scipy.stats import rankdata

    x, y, z = (np.asarray(v, dtype=np.float64) for v in (x, y, z))
    finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    x, y, z = x[finite], y[finite], z[finite]

    def value(pick: np.ndarray) -> float:
        r = np.corrcoef([rankdata(x[pick]), rankdata(y[pick]), rankdata(z[pick])])
        denominator = math.sqrt(max(0.0, (1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2)))
        return (r[0, 1] - r[0, 2] * r[1, 2]) / denominator if denominator > 0 else math.nan

    result = {"n": int(len(x)), "partial": math.nan, "ci95": [math.nan, math.nan]}
    if len(x) < 4:
        return result
    with np.errstate(invalid="ignore", divide="ignore"):
        result["partial"] = float(value(np.arange(len(x))))
        if n_boot:
            rng = np.random.default_rng(seed)
            boot = [value(rng.integers(0, len(x), len(x))) for _ in range(n_boot)]
            result["ci95"] = [float(v) for v in np.nanpercentile(np.asarray(boot, float), [2.5, 97.5])]
    return result
