"""Baseline zero-cost proxies: hand-checked values, metadata, determinism, generality."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradsign.proxies import PROXIES

BASELINES = ("grad_norm", "snip", "grasp", "fisher", "synflow", "jacob_cov", "naswot", "zen", "params",
             "flops")
TARGET_FREE = {"synflow", "jacob_cov", "naswot", "zen", "params", "flops"}


def run(name: str, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None,
        loss_fn=F.cross_entropy, **options) -> float:
    """Call a proxy the way the public API does: on a private copy in train mode."""
    work = copy.deepcopy(model)
    work.train()
    return PROXIES[name].fn(work, inputs, targets, loss_fn, **options)


def linear_case() -> tuple[nn.Linear, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A one-layer 3 -> 2 linear model with fixed weights and a batch of 4 samples."""
    w = np.array([[0.5, -1.0, 0.25], [1.5, 0.75, -0.5]])
    b = np.array([0.1, -0.2])
    x = np.array([[1.0, 2.0, -1.0], [0.5, -0.5, 2.0], [-1.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    y = np.array([0, 1, 1, 0])
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w))
        model.bias.copy_(torch.tensor(b))
    return model, w, b, x, y, np.eye(2)[y]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


# ---------------------------------------------------------------- hand-checked values


def test_grad_norm_snip_fisher_on_linear_softmax_model():
    model, w, b, x, y, onehot = linear_case()
    z = x @ w.T + b
    dz = (softmax(z) - onehot) / len(x)  # d(mean cross-entropy)/dz
    gw = dz.T @ x
    assert run("grad_norm", model, t(x), torch.tensor(y)) == pytest.approx(np.sqrt((gw ** 2).sum()), rel=1e-5)
    assert run("snip", model, t(x), torch.tensor(y)) == pytest.approx(np.abs(w * gw).sum(), rel=1e-5)
    fisher = (0.5 * ((z * dz) ** 2).mean(axis=0)).sum()
    assert run("fisher", model, t(x), torch.tensor(y)) == pytest.approx(fisher, rel=1e-4)
    # the reference code's weighting: each channel value counted once per weight of the channel (3)
    weighted = run("fisher", model, t(x), torch.tensor(y), fan_in_weighted=True)
    assert weighted == pytest.approx(3 * fisher, rel=1e-4)


def test_fisher_sums_spatial_positions_and_weights_by_conv_fan_in():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Flatten())
    x = torch.randn(5, 4, 3, 3)
    target = torch.randn(5, 54)
    a = model(x)
    (grad,) = torch.autograd.grad(F.mse_loss(a, target), a)
    per_channel = (a * grad).detach().reshape(5, 6, 9).sum(dim=2)
    expected = (0.5 * per_channel.double().pow(2).mean(dim=0)).sum().item()
    assert run("fisher", model, x, target, F.mse_loss) == pytest.approx(expected, rel=1e-5)
    weighted = run("fisher", model, x, target, F.mse_loss, fan_in_weighted=True)
    assert weighted == pytest.approx(2 * 9 * expected, rel=1e-5)


def test_grasp_on_linear_mse_model_has_closed_form():
    # L = mean over B*K entries of (W x + b - t)^2, so g = (2/(BK)) E^T X and H g = (2/(BK)) g X^T X.
    model, w, b, x, _, _ = linear_case()
    targets = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 2.0]])
    err = x @ w.T + b - targets
    scale = 2.0 / err.size
    g = scale * err.T @ x
    hg = scale * g @ (x.T @ x)
    got = run("grasp", model, t(x), t(targets), F.mse_loss)
    assert got == pytest.approx(-(w * hg).sum(), rel=1e-5)


def test_grasp_matches_finite_difference_hessian_gradient_product():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    weights = [model[0].weight, model[2].weight]

    def weight_grads(shift: list[torch.Tensor]) -> list[torch.Tensor]:
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            shifted[0].weight += shift[0]
            shifted[2].weight += shift[1]
        loss = F.cross_entropy(shifted(x), y)
        return list(torch.autograd.grad(loss, [shifted[0].weight, shifted[2].weight]))

    g = weight_grads([torch.zeros_like(w) for w in weights])
    h = 1e-5
    plus = weight_grads([h * gi for gi in g])
    minus = weight_grads([-h * gi for gi in g])
    hg = [(p - m) / (2 * h) for p, m in zip(plus, minus)]
    expected = -sum((w.detach() * v).sum().item() for w, v in zip(weights, hg))
    assert run("grasp", model, x, y) == pytest.approx(expected, rel=1e-6)


class SelfAttention(nn.Module):
    """One head of ``F.scaled_dot_product_attention`` over 4 tokens (torch's fused kernel on a CPU, which
    has no second derivative), then a Linear head on the mean token."""

    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(5, 15), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x.view(len(x), 1, 4, 5)).chunk(3, dim=-1)  # (samples, heads, tokens, width)
        return self.head(F.scaled_dot_product_attention(q, k, v).mean((1, 2)))


def test_grasp_through_fused_attention_matches_finite_differences():
    # before, torch's error: "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
    # not implemented" (BERT-style models of transformers attend this way)
    torch.manual_seed(3)
    model = SelfAttention().double()
    x, y = torch.randn(6, 20, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    weights = [model.qkv.weight, model.head.weight]

    def weight_grads(shift: list[torch.Tensor]) -> list[torch.Tensor]:
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            shifted.qkv.weight += shift[0]
            shifted.head.weight += shift[1]
        loss = F.cross_entropy(shifted(x), y)
        return list(torch.autograd.grad(loss, [shifted.qkv.weight, shifted.head.weight]))

    g = weight_grads([torch.zeros_like(w) for w in weights])
    h = 1e-5
    plus = weight_grads([h * gi for gi in g])
    minus = weight_grads([-h * gi for gi in g])
    expected = -sum((w.detach() * (p - m) / (2 * h)).sum().item() for w, p, m in zip(weights, plus, minus))
    assert run("grasp", model, x, y) == pytest.approx(expected, rel=1e-6)


def test_synflow_of_bias_free_chain_is_depth_times_path_sum():
    # With |W| and an all-ones input, every layer of a bias-free ReLU chain carries the whole synaptic
    # flow R = 1^T |W2| |W1| 1 (Tanaka et al.), so the score is 2 R; BatchNorm is removed first.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.Linear(6, 3, bias=False))
    w1 = model[0].weight.detach().double().abs().numpy()
    w2 = model[3].weight.detach().double().abs().numpy()
    flow = (w2 @ w1 @ np.ones(4)).sum()
    x = torch.randn(5, 4)
    assert run("synflow", model, x, None) == pytest.approx(2 * flow, rel=1e-12)
    assert run("synflow", model, x, None, log=True) == pytest.approx(math.log(2 * flow), rel=1e-12)


def test_jacob_cov_matches_numpy_on_relu_mlp():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(6, 4)
    w1, b1 = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    w2 = model[2].weight.detach().double().numpy()
    active = (x.double().numpy() @ w1.T + b1) > 0
    # d(sum of outputs)/dx_n = W1^T diag(active_n) W2^T 1
    jac = np.stack([w1.T @ (a * (w2.T @ np.ones(3))) for a in active])
    eig = np.linalg.eigvalsh(np.corrcoef(jac))
    expected = -np.sum(np.log(eig + 1e-5) + 1 / (eig + 1e-5))
    assert run("jacob_cov", model, x, None) == pytest.approx(expected, rel=1e-4)


def test_jacob_cov_of_a_linear_model_sees_identical_jacobians():
    # All rows of J equal W^T 1: the correlation matrix is all ones, eigenvalues B, 0, ..., 0.
    model, *_ = linear_case()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    k = 1e-5
    expected = -(math.log(5 + k) + 1 / (5 + k) + 4 * (math.log(k) + 1 / k))
    assert run("jacob_cov", model, x, None) == pytest.approx(expected, rel=1e-3)


def test_naswot_hand_example():
    # Codes [1, 0] and [1, 1]: K = [[2, 1], [1, 2]], det 3.
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    assert run("naswot", model, x, None) == pytest.approx(math.log(3.0), abs=1e-12)


def test_naswot_matches_numpy_kernel_over_two_relus():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 12), nn.ReLU(inplace=True), nn.Linear(12, 7), nn.ReLU(),
                          nn.Linear(7, 2))
    x = torch.randn(8, 5)
    with torch.no_grad():
        h1 = model[0](x)
        h2 = model[2](torch.relu(h1))
    codes = torch.cat([h1 > 0, h2 > 0], dim=1).double().numpy()
    kernel = codes @ codes.T + (1 - codes) @ (1 - codes).T
    assert run("naswot", model, x, None) == pytest.approx(np.linalg.slogdet(kernel)[1], rel=1e-10)


def test_zen_scale_of_both_terms():
    # Weights ~ N(0, 1), x ~ N(0, 1): the BN input A x has variance ~ D per unit, so the BN term is
    # ~ 0.5 ln D; BN(A x) moves by ~ alpha * N(0, 1) per unit, so Delta ~ alpha * H * sqrt(2 / pi).
    d, h = 400, 64
    model = nn.Sequential(nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.Linear(h, 3))
    x = torch.zeros(512, d)
    expected = math.log(0.01 * h * math.sqrt(2 / math.pi)) + 0.5 * math.log(d)
    assert run("zen", model, x, None) == pytest.approx(expected, abs=0.05)


def test_zen_of_an_identity_feature_map():
    # f = the flattened input itself: Delta = alpha * mean L1 norm of eps ~ alpha * D * sqrt(2 / pi).
    model = nn.Sequential(nn.Flatten(), nn.Linear(3000, 2))
    x = torch.zeros(8, 3, 1000)
    expected = math.log(0.01 * 3000 * math.sqrt(2 / math.pi))
    assert run("zen", model, x, None) == pytest.approx(expected, abs=0.01)


def test_params_counts_every_trainable_parameter_in_millions():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert run("params", model, torch.zeros(2, 3), None) == pytest.approx((12 + 4 + 4 + 4 + 8 + 2) / 1e6)


def test_flops_counts_multiply_accumulates_per_sample():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 5))
    macs = 8 * 10 * 10 * 3 * 9 + 8 * 5 * 5 * 2 * 9 + 200 * 5
    assert run("flops", model, torch.zeros(7, 3, 10, 10), None) == pytest.approx(macs / 1e6)


# ---------------------------------------------------------------- metadata and behaviour


def test_every_baseline_is_registered_with_metadata():
    for name in BASELINES:
        info = PROXIES[name]
        assert info.formula and info.source
        assert info.higher_is_better
        assert info.uses_targets == (name not in TARGET_FREE)
    assert PROXIES["synflow"].options == ("log",)
    assert PROXIES["fisher"].options == ("fan_in_weighted",)
    assert "seed" in PROXIES["zen"].options


def small_cnn() -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                                      nn.GroupNorm(2, 8), nn.ReLU(inplace=True),
                                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), Block(), Block(),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.parametrize("name", BASELINES)
def test_runs_on_residual_cnn_and_is_deterministic(name):
    model = small_cnn()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    before = copy.deepcopy(model.state_dict())
    first = run(name, model, x, y)
    assert math.isfinite(first)
    assert run(name, model, x, y) == first
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_zen_seed_changes_the_draw():
    model = small_cnn()
    x = torch.zeros(8, 3, 8, 8)
    assert run("zen", model, x, None, seed=0) == run("zen", model, x, None, seed=0)
    assert run("zen", model, x, None, seed=0) != run("zen", model, x, None, seed=1)


@pytest.mark.parametrize("name", BASELINES)
def test_runs_on_mlp_with_mse_loss(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(10, 6)
    y = torch.randn(10, 2)
    value = run(name, model, x, y, F.mse_loss)
    assert math.isfinite(value)


def test_grad_norm_uses_the_given_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 2))
    x, y = torch.randn(10, 6), torch.randn(10, 2)
    loss = F.mse_loss(model(x), y)
    (g,) = torch.autograd.grad(loss, model[0].weight)
    assert run("grad_norm", model, x, y, F.mse_loss) == pytest.approx(g.norm().item(), rel=1e-6)
    doubled = run("grad_norm", model, x, y, lambda out, tgt: 2 * F.mse_loss(out, tgt))
    assert doubled == pytest.approx(2 * g.norm().item(), rel=1e-6)


def test_public_api_reaches_the_baselines():
    from gradsign import scores

    model = small_cnn()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    result = scores(model, x, y, proxies=BASELINES)
    assert set(result) == set(BASELINES)
    assert all(math.isfinite(v) for v in result.values())


def test_jacob_cov_is_nan_when_the_output_ignores_the_input():
    import gradsign
    from gradsign.spaces import get_space
    space = get_space("nb201")
    torch.manual_seed(0)
    model = space.build("|avg_pool_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|none~0|none~1|none~2|", num_classes=10)
    assert math.isnan(gradsign.score(model, torch.randn(4, 3, 32, 32), proxy="jacob_cov"))


def test_jacob_cov_refuses_integer_inputs_plainly():
    # before, torch's "only Tensors of floating point dtype can require gradients"
    import gradsign
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match="jacob_cov differentiates the outputs with respect to the inputs, and "
                                         "torch.int64 inputs"):
        gradsign.score(model, torch.randint(0, 10, (5, 3)), proxy="jacob_cov")


@pytest.mark.parametrize("proxy, drawn", [("zen", "Gaussian inputs"), ("synflow", "an all-ones input")])
def test_a_proxy_drawing_floating_inputs_says_why_a_token_model_refuses_them(proxy, drawn):
    # before, torch's "Expected tensor for argument #1 'indices' to have one of the following scalar types"
    import gradsign
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ValueError, match=f"{proxy} feeds the model {drawn} of the batch's shape in place of its "
                                         "torch.int64 inputs"):
        gradsign.score(model, torch.randint(0, 10, (5, 3)), torch.zeros(5, dtype=torch.long), proxy=proxy)
