"""The per-sample gradient engines against the reference loop, and the API's promises."""
import collections
import contextlib
import copy
import functools
import math
import warnings

import pytest
import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

import gradsign
import gradsign.engine as engine_module
from gradsign.engine import sign_counts


class Residual(nn.Module):
    def __init__(self, channels: int, norm, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False, groups=groups)
        self.norm1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=True)
        self.stride = stride

    def forward(self, x):
        y = self.conv2(F.relu(self.norm1(self.conv1(x))))
        return F.relu(y + x[:, :, ::self.stride, ::self.stride])


def cnn(norm, *, classes: int = 10, depthwise: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(inplace=True),
        Residual(8, norm), Residual(8, norm, stride=2, groups=8 if depthwise else 1),
        nn.Conv2d(8, 16, 3, stride=2, padding="same" if False else 1, padding_mode="reflect"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def small_map_cnn() -> nn.Module:
    """Convolutions whose per-sample gradients the engine forms in other ways: depthwise 5x5 (strided)
    and 7x7 (dilated, 'same' padding); 3x3 (plain, strided with reflect padding, dilated) and strided
    1x1 convolutions on maps of at most 64 positions; grouped and depthwise 3x3 convolutions on 2x2 maps;
    ungrouped 3x3 convolutions on a 2x2 map, strided onto a 1x1 map and on a 1x1 map (products of depth
    4 and 1, kernel offsets that read only padding)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8), nn.ReLU(),
        nn.Conv2d(8, 8, 7, dilation=2, padding="same", groups=8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 12, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(12, 12, 3, dilation=2, padding=2), nn.ReLU(),
        nn.Conv2d(12, 16, 1, stride=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class TokenMLP(nn.Module):
    """Linear layers on (B, T, F) inputs, LayerNorm, a reused layer (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.shared = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        h = self.norm(torch.tanh(self.embed(x)))
        h = self.shared(torch.relu(self.shared(h)))
        return self.head(h.mean(1)).squeeze(-1)


class InputReaders(nn.Module):
    """Three layers reading the raw batch (itself, a view of it, a view of a view), one of them followed by
    another reader of its output, and the raw batch added again downstream."""

    def __init__(self):
        super().__init__()
        self.full = nn.Conv2d(3, 6, 3, padding=1)
        self.strided = nn.Conv2d(3, 6, 1)
        self.corner = nn.Conv2d(3, 6, 3)
        self.after = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        a = self.after(torch.relu(self.full(x))) + x.mean(1, keepdim=True)
        b = self.strided(x[:, :, ::2, ::2])
        c = self.corner(x[:, :, :8][:, :, :, :8])
        pooled = a.mean((2, 3)) + torch.tanh(b).mean((2, 3)) + c.amax((2, 3))
        return self.head(pooled)


def plain_gradsign(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy) -> float:
    """GradSign by its definition, independently of the package: each sample alone, every module in eval
    mode except normalisation layers, sign(0) = 0, each distinct Conv2d/Linear weight once."""
    return plain_gradsign_of_calls(model, [((x[i:i + 1],), {}) for i in range(len(x))], y, loss_fn)


def plain_gradsign_of_calls(model: nn.Module, calls: list[tuple[tuple, dict]], y: torch.Tensor,
                            loss_fn=F.cross_entropy, output=lambda out: out) -> float:
    """``plain_gradsign`` with sample i's call given as ``model(*args, **kwargs)`` (``calls[i]``) and its
    prediction as ``output`` of what the model returns."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                          nn.modules.instancenorm._InstanceNorm)):
            m.train()
    weights = list({id(m.weight): m.weight for m in model.modules()
                    if isinstance(m, (nn.Conv2d, nn.Linear))}.values())
    total = [torch.zeros_like(w) for w in weights]
    for i, (args, kwargs) in enumerate(calls):
        out = output(model(*args, **kwargs))
        grads = torch.autograd.grad(loss_fn(out, y[i:i + 1]), weights, allow_unused=True)
        total = [t + (torch.sign(g) if g is not None else 0) for t, g in zip(total, grads)]
    return float(sum(t.abs().sum() for t in total))


def scored_without_warnings(model: nn.Module, x: torch.Tensor, y: torch.Tensor, caplog) -> float:
    """``gradsign.score`` of the model, asserting that the "gradsign" logger warned of nothing (no fallback)."""
    caplog.clear()
    score = score_logging_warnings(model, x, y, caplog)
    assert caplog.text == ""
    return score


def score_logging_warnings(model: nn.Module, x: torch.Tensor, y: torch.Tensor, caplog) -> float:
    """``gradsign.score`` of the model, with what the "gradsign" logger warned of in ``caplog.text``."""
    with caplog.at_level("WARNING", logger="gradsign"):
        return gradsign.score(model, x, y)


MODELS = {
    "bn-running-stats": (lambda: cnn(nn.BatchNorm2d), "image"),
    "bn-no-running-stats": (lambda: cnn(lambda c: nn.BatchNorm2d(c, track_running_stats=False)), "image"),
    "groupnorm-depthwise": (lambda: cnn(lambda c: nn.GroupNorm(2, c), depthwise=True), "image"),
    "instancenorm": (lambda: cnn(lambda c: nn.InstanceNorm2d(c, affine=True)), "image"),
    "token-mlp-mse": (TokenMLP, "tokens"),
    "small-maps-depthwise": (small_map_cnn, "image"),
    "input-readers": (InputReaders, "image"),
}


def batch(kind: str, n: int = 12):
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g), None
    return torch.randn(n, 5, 12, generator=g), torch.randn(n, generator=g), F.mse_loss


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("engine", ["batched", "vmap", "auto"])
def test_engines_match_reference_loop(name, engine):
    make, kind = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x, y, loss = batch(kind)
    reference = gradsign.score(model, x, y, loss_fn=loss, engine="loop")
    fast = gradsign.score(model, x, y, loss_fn=loss, engine=engine)
    assert reference > 0
    assert fast == pytest.approx(reference, rel=1e-3)


class RecordedBackward(torch.autograd.Function):
    """The identity, recording each backward pass through it."""

    @staticmethod
    def forward(ctx, x, record):
        ctx.record = record
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.record.append(grad.shape)
        return grad, None


class PreprocessedStem(nn.Module):
    """Pixels normalised and padded before the first convolution, as image models do: no counted weight
    lies before the stem, so no gradient needs to flow into the preprocessing."""

    def __init__(self, record: list):
        super().__init__()
        self.record = record
        self.stem, self.norm, self.head = nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x):
        x = F.pad(RecordedBackward.apply((x - 0.5) / 0.25, self.record), (1, 1, 1, 1))
        return self.head(torch.relu(self.norm(self.stem(x))).mean((2, 3)))


def test_no_gradient_is_formed_for_the_input_behind_the_first_layer():
    record = []
    torch.manual_seed(0)
    model = PreprocessedStem(record).double()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))
    loop = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy, engine="loop")
    batched = sign_counts(model, x, y, F.cross_entropy, engine="batched")
    assert all(torch.equal(batched[k], loop[k]) for k in loop)
    assert model.record is record and record == []


@pytest.mark.parametrize("name", MODELS)
def test_the_float64_check_passes_every_exact_model(name, monkeypatch, caplog):
    # every float32 comparison "fails", so the float64 check (which forms the verified sample's
    # gradients alone) decides: it must find these models exact, and the counts are the batched pass's
    make, kind = MODELS[name]
    torch.manual_seed(0)
    model = make()
    x, y, loss = batch(kind)
    batched = gradsign.score(model, x, y, loss_fn=loss, engine="batched")
    monkeypatch.setattr(engine_module, "FLOAT32_TOLERANCE", -1.0)
    with caplog.at_level("WARNING", logger="gradsign"), warnings.catch_warnings():
        # two float32 computations of these models' gradients agree in sign: no rounding-noise warning
        warnings.simplefilter("error", engine_module.RoundingNoiseWarning)
        assert gradsign.score(model, x, y, loss_fn=loss) == batched
    assert caplog.text == ""


@pytest.mark.parametrize("options", [dict(), dict(stride=2, padding=2, bias=True), dict(dilation=2, padding=(2, 1)),
                                     dict(kernel_size=(3, 5), padding=(0, 2), stride=(1, 2))])
def test_depthwise_convolutions_unfolded_in_the_float64_check_are_torchs(options):
    torch.manual_seed(0)
    options = {"kernel_size": 3, "padding": 1, "bias": False, **options}
    conv = nn.Conv2d(6, 6, groups=6, **options).double()
    x = torch.randn(3, 6, 7, 8, dtype=torch.float64, requires_grad=True)
    expected = conv(x)
    weight_grad, input_grad = torch.autograd.grad(expected.square().sum(), (conv.weight, x))
    with engine_module._DepthwiseConvolutionsUnfolded():
        assert engine_module._unfolds_well(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                           conv.groups)
        out = conv(x)
        grads = torch.autograd.grad(out.square().sum(), (conv.weight, x))
    assert out.grad_fn.name() != expected.grad_fn.name()  # not torch's convolution
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(grads, (weight_grad, input_grad)))


def test_only_small_float64_depthwise_convolutions_are_unfolded():
    depthwise, grouped = torch.zeros(4, 1, 3, 3, dtype=torch.float64), torch.zeros(4, 2, 3, 3, dtype=torch.float64)
    small, large = torch.zeros(2, 4, 8, 8, dtype=torch.float64), torch.zeros(2, 4, 9, 9, dtype=torch.float64)
    assert engine_module._unfolds_well(small, depthwise, None, 1, 1, 1, 4)
    assert not engine_module._unfolds_well(large, depthwise, None, 1, 1, 1, 4)  # 81 output positions
    assert not engine_module._unfolds_well(small, grouped, None, 1, 1, 1, 2)
    assert not engine_module._unfolds_well(small, depthwise, None, 1, "same", 1, 4)
    assert not engine_module._unfolds_well(small.float(), depthwise.float(), None, 1, 1, 1, 4)
    assert not engine_module._unfolds_well(small[0], depthwise, None, 1, 1, 1, 4)


def test_sign_disagreement_counts_zeros_and_missing_gradients_as_signs():
    batched = {"a": torch.tensor([[1.0, -2.0, 0.0, 3.0]]), "b": torch.tensor([[0.0, 5.0]])}
    reference = {"a": torch.tensor([1.0, 2.0, 0.0, -1e-30]), "b": None, "c": torch.tensor([0.0, 0.0])}
    # a: two of four differ; b: its reference is zeros, one of two differs; c: formed nowhere, zeros both
    assert engine_module._sign_disagreement(batched, reference) == pytest.approx(3 / 8)
    assert engine_module._sign_disagreement(batched, {"a": batched["a"][0]}) == 0.0


def test_sampled_sign_disagreement_reads_the_same_weights_in_any_layout():
    # gradients kept as a permuted view (formed with the kernel's channel last) are sampled at the same
    # weights as contiguous ones: the tiles along the diagonal of (out channels, the rest flattened)
    torch.manual_seed(0)
    single = torch.randn(16, 8, 3, 3)
    flipped = torch.where(torch.rand(single.shape) < 0.3, -single, single)
    permuted = flipped.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)[None]
    assert not permuted[0].is_contiguous()
    tiles, rows, columns = 4, 16, 72  # sample 256 of 1,152 weights: four 8x8 tiles
    step_rows, step_columns = (rows - 8) // tiles, (columns - 8) // tiles
    flat_single, flat_flipped = single.reshape(rows, columns), flipped.reshape(rows, columns)
    expected = sum(int(torch.sign(flat_single[r, c]) != torch.sign(flat_flipped[r, c]))
                   for t in range(tiles) for r in range(t * step_rows, t * step_rows + 8)
                   for c in range(t * step_columns, t * step_columns + 8)) / (tiles * 64)
    for batched in (flipped[None], permuted):
        assert engine_module._sign_disagreement({"w": batched}, {"w": single}, sample=256) == pytest.approx(expected)


@pytest.mark.parametrize("name", ["bn-running-stats", "token-mlp-mse", "small-maps-depthwise"])
@pytest.mark.parametrize("slice_elements", [1 << 19, 700])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_layer_counts_match_loop_in_chunks(name, slice_elements, dtype, monkeypatch):
    # chunks of 5 samples per pass; with 700 elements, a layer's hook also splits each chunk into slices
    # (of samples, or of weight rows for the shallow products of Linear layers on 5 tokens and of
    # convolutions on maps up to 4x4); in float64 every count is the loop's
    monkeypatch.setattr(engine_module, "SLICE_ELEMENTS", slice_elements)
    make, kind = MODELS[name]
    torch.manual_seed(0)
    model = make().train().to(dtype)
    x, y, loss = batch(kind)
    x, y = x.to(dtype), y.to(dtype) if y.is_floating_point() else y
    loss = loss or F.cross_entropy
    reference = sign_counts(copy.deepcopy(model), x, y, loss, engine="loop")
    chunked = sign_counts(copy.deepcopy(model), x, y, loss, engine="batched", chunk_size=5)
    assert reference.keys() == chunked.keys()
    total = sum(int(c.abs().sum()) for c in reference.values())
    differing = sum(int((reference[k] - chunked[k]).abs().sum()) for k in reference)
    assert differing <= (0 if dtype is torch.float64 else 1e-3 * total)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
def test_every_padding_mode_with_uneven_same_padding_matches_the_loop_in_float64(padding_mode):
    # even kernels under padding="same" pad one side more than the other; the engine pads the input itself
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 2, padding="same", dilation=2, groups=4, padding_mode=padding_mode), nn.ReLU(),
        nn.Conv2d(8, 8, (2, 3), padding="same", padding_mode=padding_mode), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode=padding_mode), nn.Flatten(),
        nn.Linear(8 * 5 * 4, 3)).double()
    x, y = torch.randn(6, 4, 9, 7, dtype=torch.float64), torch.randint(0, 3, (6,))
    counts = {e: sign_counts(copy.deepcopy(model), x, y, F.cross_entropy, engine=e) for e in ("batched", "loop")}
    assert all(torch.equal(counts["batched"][k], counts["loop"][k]) for k in counts["loop"])


def autograd_per_sample(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """dW of each sample alone, by autograd: (samples, *W.shape)."""
    return torch.stack([torch.autograd.grad(conv(x[i:i + 1]), conv.weight, grad_out[i:i + 1])[0]
                        for i in range(len(x))])


@pytest.mark.parametrize("conv, size, rule_picks_it", [
    (nn.Conv2d(3, 5, 7, stride=2, padding=3), 20, True),  # a ResNet stem
    (nn.Conv2d(1, 4, 5, padding=2), 12, True),
    (nn.Conv2d(6, 4, (5, 2), stride=(1, 2), dilation=(2, 1), padding=(4, 1)), 17, True),
    (nn.Conv2d(3, 4, 5, padding="same", padding_mode="reflect"), 11, True),
    (nn.Conv2d(3, 4, 3, padding=1), 12, False),  # 3x3: the matrix product
    (nn.Conv2d(3, 4, 4, stride=4), 40, False),  # non-overlapping patches
    (nn.Conv2d(8, 4, 3, padding=1), 12, False),  # 8 input channels
    (nn.Conv2d(6, 4, 3, padding=1, groups=2), 10, False),  # grouped: the formula holds, the rule does not take it
    (nn.Conv2d(4, 4, 5, padding=2, groups=4), 9, True),  # depthwise with a kernel above 3x3
])
def test_per_sample_gradients_by_forward_convolution_match_autograd_per_sample(conv, size, rule_picks_it):
    # dW of each sample alone by autograd, against the forward convolution over input channels
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(5, conv.in_channels, size, size, dtype=torch.float64)
    grad_out = torch.randn_like(conv(x))
    expected = autograd_per_sample(conv, x, grad_out)
    padded, padding = engine_module._padded_input(conv, x)
    assert engine_module._use_forward_convolution(conv, padded, grad_out) == rule_picks_it
    grads = engine_module._forward_convolution_sample_grads(conv, padded, grad_out, padding)
    assert grads.shape == expected.shape
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv, size, rule_picks_it", [
    (nn.Conv2d(3, 8, 7, stride=2, padding=3), 64, True),  # a ResNet stem at 64x64
    (nn.Conv2d(1, 4, 5, padding="same", padding_mode="reflect"), 52, True),
    (nn.Conv2d(3, 4, (5, 7), stride=(1, 2), dilation=(2, 1), padding=(4, 3)), 48, True),
    (nn.Conv2d(3, 8, 7, stride=2, padding=3), 32, False),  # 16x16 output maps: too little work per sample
    (nn.Conv2d(3, 8, 3, padding=1), 64, False),  # 3x3
    (nn.Conv2d(8, 4, 5, padding=2), 64, False),  # 8 input channels
    (nn.Conv2d(4, 4, 5, padding=2, groups=2), 64, False),  # grouped
])
def test_per_sample_gradients_sample_by_sample_match_autograd_per_sample(conv, size, rule_picks_it):
    # float32, where the rule applies (one torch thread, as conftest sets): each sample's weight-gradient
    # convolution against autograd on it
    torch.manual_seed(0)
    x = torch.randn(3, conv.in_channels, size, size)
    grad_out = torch.randn_like(conv(x))
    padded, padding = engine_module._padded_input(conv, x)
    onednn = torch.backends.mkldnn.is_available()
    assert engine_module._use_sample_by_sample(conv, padded, grad_out) == (rule_picks_it and onednn)
    if conv.groups > 1:
        return
    expected = autograd_per_sample(conv, x, grad_out)
    scratch = torch.full((expected.numel() + 3,), float("nan"))  # old contents play no part
    for buffer in (None, scratch):
        grads = engine_module._sample_by_sample_grads(conv, padded, grad_out, padding, buffer)
        torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


class LargeStem(nn.Module):
    """A 7x7 stride-2 stem on 64x64 RGB inputs (the sample-by-sample way's shape), optionally on frames
    folded into the batch (two rows per sample)."""

    def __init__(self, frames: bool):
        super().__init__()
        self.frames = frames
        self.stem = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        rows = x.flatten(0, 1) if self.frames else x
        pooled = torch.relu(self.stem(rows)).mean((2, 3))
        return self.head(pooled.unflatten(0, (len(x), -1)).mean(1) if self.frames else pooled)


@pytest.mark.parametrize("frames", [False, True])
def test_a_large_stem_taken_sample_by_sample_scores_as_the_definition(frames, caplog, engine_calls):
    calls = engine_calls("_sample_by_sample_grads")
    torch.manual_seed(0)
    model = LargeStem(frames)
    x = torch.randn(6, 2, 3, 64, 64) if frames else torch.randn(6, 3, 64, 64)
    y = torch.randint(0, 3, (6,))
    score = scored_without_warnings(model, x, y, caplog)
    assert calls == {"_sample_by_sample_grads": int(torch.backends.mkldnn.is_available())}
    assert score == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(6, 5, 3, padding=1), 8),
    (nn.Conv2d(6, 5, (3, 2), stride=2, dilation=(2, 1), padding=(2, 0)), 13),
    (nn.Conv2d(6, 5, 3, padding=1), 9),  # 81 positions
    (nn.Conv2d(6, 5, 1), 6),  # 1x1: the input itself
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_per_sample_gradients_by_matrix_product_match_autograd_per_sample(conv, size, channels_last):
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(4, conv.in_channels, size, size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(conv(x))
    expected = autograd_per_sample(conv, x, grad_out)
    padded, padding = engine_module._padded_input(conv, x)
    scratch = torch.full((expected.numel() + 3,), float("nan"), dtype=torch.float64)  # old contents play no part
    for buffer in (None, scratch):
        grads = engine_module._conv2d_sample_grads_matmul(conv, padded, grad_out, padding, buffer)
        torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(4, 4, 3, padding=1), (3, 4, 9, 9)),
    (nn.Conv2d(4, 4, (3, 5), stride=(2, 1), dilation=(1, 2), padding=(1, 3)), (3, 4, 13, 11)),
    (nn.Conv2d(2, 4, 4, stride=4), (2, 2, 24, 20)),
    (nn.Conv2d(4, 4, 3, padding=1), (3, 4, 4, 4)),  # 16 positions: torch's im2col itself
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "a slice"])
def test_the_engines_unfolding_is_torchs(conv, shape, layout):
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "a slice":  # a storage offset, and strides of a larger tensor
        x = torch.randn(shape[0] + 1, shape[1], shape[2] + 3, shape[3] + 2)[1:, :, 2:-1, 1:-1]
    out_size = conv(x).shape[2:]
    expected = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    assert torch.equal(engine_module._unfolded(x, conv, conv.padding, out_size), expected)
    # the fused loop's layout: (samples, positions, kernel row, kernel column, channel)
    samples, channels = shape[:2]
    expected = expected.view(samples, channels, *conv.kernel_size, -1).permute(0, 4, 2, 3, 1)
    assert torch.equal(engine_module._unfolded_channels_last(x, conv, conv.padding, out_size),
                       expected.reshape(1, samples, expected.shape[1], -1))


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(8, 6, 3, padding=1, groups=2), (3, 8, 4, 4)),
    (nn.Conv2d(12, 8, (3, 2), stride=2, dilation=(1, 2), padding=(1, 2), groups=4), (2, 12, 5, 6)),
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_channels_last_unfolding_of_a_grouped_convolution_holds_each_groups_windows(conv, shape, layout):
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out_size = conv(x).shape[2:]
    groups, per_group = conv.groups, shape[1] // conv.groups
    columns = engine_module._unfolded_channels_last(x, conv, conv.padding, out_size)
    for g in range(groups):
        own = x[:, g * per_group:(g + 1) * per_group]
        expected = F.unfold(own, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        expected = expected.view(shape[0], per_group, *conv.kernel_size, -1).permute(0, 4, 2, 3, 1)
        assert torch.equal(columns[g], expected.reshape(shape[0], expected.shape[1], -1))


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_the_verified_samples_share_a_pass_whatever_the_chunk_size(chunk_size):
    # the default engine compares the second sample's batched gradients with its single-sample ones
    make, kind = MODELS["bn-running-stats"]
    torch.manual_seed(0)
    model = make()
    x, y, _ = batch(kind)
    assert gradsign.score(model, x, y, chunk_size=chunk_size) == pytest.approx(
        gradsign.score(model, x, y, engine="loop"), rel=1e-3)


def test_hand_computed_linear_model():
    # y = W x with W = 0: dL_i/dW = (p_i - onehot(t_i)) x_i^T, p_i = softmax(0) = 1/2
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, -1.0]])
    t = torch.tensor([0, 0, 1])
    # sample signs of (p - onehot): row 0 gets -, row 1 gets + for class 0; reversed for class 1
    # sample 0: [[-1, +1], [+1, -1]]; sample 1: [[-1, 0], [+1, 0]]; sample 2: [[-1, -1], [+1, +1]]
    # sums: [[-3, 0], [3, 0]] -> |.| summed = 6; mean over 4 weights = 1.5
    for engine in ("loop", "batched", "vmap"):
        assert gradsign.score(model, x, t, engine=engine) == 6.0
        assert gradsign.score(model, x, t, engine=engine, aggregation="mean") == 1.5


def test_scoring_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = cnn(nn.BatchNorm2d).eval()
    before = copy.deepcopy(model.state_dict())
    x, y, _ = batch("image")
    gradsign.scores(model, x, y, proxies=["gradsign"], n_inits=2)
    gradsign.score(model, x, y, engine="loop")
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())


class LentModel(nn.Module):
    """BatchNorm with running statistics, attention (whose forward the engine overrides), dropout, a
    frozen layer and, with ``functional=True``, a weight also used by a matrix product (``auto`` falls
    back to vmap, which rewrites BatchNorm modules)."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.attention = nn.MultiheadAttention(8, 2, dropout=0.1, batch_first=True)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 10)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        h = torch.relu(self.norm(self.conv(x))).flatten(2).transpose(1, 2)
        h = self.frozen(self.attention(h, h, h)[0]).mean(1)
        out = self.head(self.drop(h))
        return out + h @ self.head.weight.t() if self.functional else out


def fingerprint(model: nn.Module) -> dict:
    """Everything of a model scoring may touch: objects, values, modes, flags, gradients, hooks."""
    return {
        "modules": [(name, id(m), m.training, sorted(m.__dict__), len(m._forward_hooks))
                    for name, m in model.named_modules()],
        "parameters": [(name, id(p), p.requires_grad, id(p.grad), None if p.grad is None else p.grad.clone(),
                        p.detach().clone()) for name, p in model.named_parameters()],
        "buffers": [(name, id(b), b.clone()) for name, b in model.named_buffers()],
        "attributes": {name: {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str))}
                       for name, m in model.named_modules()},
    }


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("engine", ["auto", "batched", "vmap", "loop"])
def test_the_lent_model_is_given_back_as_it_was(functional, engine):
    torch.manual_seed(0)
    model = LentModel(functional).train()
    model.attention.eval()
    x, y, _ = batch("image", 6)
    F.cross_entropy(model(x), y).backward()  # the caller's own gradients, which scoring must keep
    fired = []
    model.head.register_forward_hook(lambda *args: fired.append(1))
    before = fingerprint(model)
    gradsign.score(model, x, y, engine=engine)
    assert same(fingerprint(model), before)
    fired.clear()
    model(x)
    assert fired == [1]  # the caller's hook is still there, once


class LazilyHooked(nn.Module):
    """Installs a forward hook on its first forward and marks itself so (as `transformers` installs the
    hooks that collect hidden states when a model first asks for them); the hook's outputs feed the head."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.collected: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "hooks_installed", False):
            self.body.register_forward_hook(lambda module, args, output: self.collected.append(output))
            self.hooks_installed = True
        self.collected.clear()
        self.body(x)
        return self.head(torch.tanh(sum(self.collected)))


@pytest.mark.parametrize("engine", ["auto", "loop"])
def test_a_model_that_hooks_itself_lazily_works_after_scoring(engine):
    # the lent model's new attributes were deleted and its hook dicts kept: the mark went, the hook stayed,
    # and the next forward installed a second one (SegFormer's segmentation model then failed to run)
    torch.manual_seed(0)
    model = LazilyHooked()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    expected = copy.deepcopy(model)(x)
    gradsign.score(model, x, y, engine=engine)
    assert torch.equal(model(x), expected)
    assert len(model.body._forward_hooks) == 1


@pytest.mark.parametrize("calls", [1, 2])
def test_an_interrupt_while_scoring_gives_the_model_back(calls):
    # the loss is called by the single-sample reference pass, then by the batched pass
    torch.manual_seed(0)
    model = LentModel().train()
    x, y, _ = batch("image", 6)
    before = fingerprint(model)
    seen = []

    def interrupting_loss(outputs, targets):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return F.cross_entropy(outputs, targets)

    with pytest.raises(KeyboardInterrupt):
        gradsign.score(model, x, y, loss_fn=interrupting_loss)
    assert same(fingerprint(model), before)


def test_a_model_that_writes_its_own_weights_gets_them_back():
    # an Embedding with max_norm renormalises the rows it looks up, in place, in every forward
    torch.manual_seed(0)
    model = RenormalisedTiedEmbedding()
    g = torch.Generator().manual_seed(3)
    tokens, targets = torch.randint(0, 12, (8, 5), generator=g), torch.randint(0, 12, (8,), generator=g)
    before = fingerprint(model)
    gradsign.score(model, tokens, targets)
    assert same(fingerprint(model), before)


class WritesThroughData(nn.Module):
    """Writes two of its weights in every forward through ``.data`` (which autograd's version counters do
    not see): one value changed, and a zero's sign flipped (equal to the old value, not the same bytes);
    odd-sized parameters before them."""

    def __init__(self):
        super().__init__()
        self.first, self.scale, self.out = nn.Linear(3, 5), nn.Parameter(torch.ones(1)), nn.Linear(5, 4)
        with torch.no_grad():
            self.out.weight[0, 0] = 0.0

    def forward(self, x):
        self.first.bias.data.add_(1.0)
        self.out.weight.data[0, 0] = -0.0
        return self.out(torch.tanh(self.first(x)) * self.scale)


def test_weights_a_model_writes_through_data_come_back_to_the_bit():
    torch.manual_seed(0)
    model = WritesThroughData()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 3), torch.randint(0, 4, (6,))
    gradsign.score(model, x, y)
    bits = lambda t: t.view(torch.int32)
    assert all(torch.equal(bits(p.detach()), bits(b)) for p, b in zip(model.parameters(), before))


def test_rng_state_is_restored_and_seeded_scores_repeat():
    torch.manual_seed(0)
    model = cnn(nn.BatchNorm2d)
    x, y, _ = batch("image")
    state = torch.get_rng_state()
    first = gradsign.score(model, x, y, n_inits=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert gradsign.score(model, x, y, n_inits=3, seed=7) == first
    assert gradsign.score(model, x, y, n_inits=3, seed=8) != first


def test_multiple_initialisations_average_fresh_draws():
    torch.manual_seed(0)
    model = cnn(nn.BatchNorm2d)
    x, y, _ = batch("image")
    draws = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        fresh = copy.deepcopy(model)
        gradsign.api.reinitialise_parameters(fresh)
        draws.append(gradsign.score(fresh, x, y))
    assert gradsign.score(model, x, y, n_inits=2, seed=3) == pytest.approx(sum(draws) / 2)


def test_auto_falls_back_to_an_exact_engine_when_samples_interact(caplog):
    class Centre(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Centre(), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with caplog.at_level("WARNING", logger="gradsign"):
        auto = gradsign.score(model, x, y, engine="auto")
    assert "samples interact within a batch" in caplog.text and "vmap engine" in caplog.text
    assert auto == pytest.approx(plain_gradsign(model, x, y), rel=1e-6)
    assert gradsign.score(model, x, y, engine="batched") != pytest.approx(auto, rel=1e-3)


class ConvolutionsThatMix(nn.Module):
    """Convolutions whose samples interact slightly (each map gets 0.01 of the batch's mean map): a real
    difference, which a reference rounded as the batched pass (on oneDNN) must not explain away."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.first(x))
        h = h + 0.01 * h.mean(0, keepdim=True)
        return self.head(torch.relu(self.second(h)).mean((2, 3)))


def test_a_real_interaction_is_not_settled_by_the_reference_on_onednn(caplog, engine_calls):
    calls = engine_calls("_reference_on_onednn", "_float64_mismatch")
    torch.manual_seed(0)
    model = ConvolutionsThatMix()
    x, y = torch.randn(6, 3, 5, 5), torch.randint(0, 3, (6,))
    with caplog.at_level("WARNING", logger="gradsign"):
        counts = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy)
    assert calls == {"_reference_on_onednn": 1, "_float64_mismatch": 1}
    assert "samples interact within a batch" in caplog.text
    reference = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy, engine="loop")
    assert all(torch.equal(counts[k], reference[k]) for k in reference)


def test_a_reference_on_onednn_that_fails_leaves_the_doubt_to_the_float64_check(monkeypatch, caplog, engine_calls):
    def refused(*args, **kwargs):
        raise RuntimeError("oneDNN refuses this convolution")

    monkeypatch.setattr(engine_module, "FLOAT32_TOLERANCE", -1.0)  # every float32 comparison "fails"
    monkeypatch.setattr(torch, "mkldnn_convolution", refused)
    calls = engine_calls("_reference_on_onednn", "_float64_mismatch")
    torch.manual_seed(0)
    model = cnn(nn.BatchNorm2d)
    x, y, _ = batch("image")
    batched = gradsign.score(model, x, y, engine="batched")
    assert scored_without_warnings(model, x, y, caplog) == batched
    assert calls == {"_reference_on_onednn": 1, "_float64_mismatch": 1}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("options", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=(2, 1)),
                                     dict(kernel_size=(3, 5), dilation=2, bias=False), dict(kernel_size=3, groups=4),
                                     dict(kernel_size=1), dict(kernel_size=1, stride=2), dict(kernel_size=3, padding="same")])
@pytest.mark.parametrize("batch", [8, 32])
def test_convolutions_on_onednn_are_torchs_where_torch_runs_the_batch_there(options, batch):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **options)
    x = torch.randn(1, 8, 9, 9, requires_grad=True)
    expected = conv(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, conv.weight))
    with engine_module._ConvolutionsOnOneDNN(batch):
        out = conv(x)
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight))
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-4) for g, e in zip(grads, expected_grads))
    # torch runs a batch of 8 unstrided 1x1 convolutions in one thread sample by sample, as one sample
    pointwise = options.get("kernel_size") == 1 and "stride" not in options
    routed = options.get("padding") != "same" and (not pointwise or batch >= 16 or torch.get_num_threads() > 1)
    assert ("Mkldnn" in type(out.grad_fn).__name__) == routed
    with engine_module._ConvolutionsOnOneDNN(batch):  # batches are torch's to run
        assert type(conv(x.expand(2, -1, -1, -1)).grad_fn).__name__ == "ConvolutionBackward0"


class NeighbourMix(nn.Module):
    """Each sample gets half of its neighbour's features: the one before it (``shift=1``) or after it
    (``shift=-1``); the first or last sample of the batch has no such neighbour and is left alone."""

    def __init__(self, shift: int):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        mixed = x.clone()
        if self.shift > 0:
            mixed[1:] = x[1:] + 0.5 * x[:-1]
        else:
            mixed[:-1] = x[:-1] + 0.5 * x[1:]
        return mixed


@pytest.mark.parametrize("shift", [1, -1])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_auto_sees_a_dependence_on_earlier_and_on_later_samples(caplog, shift, chunk_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), NeighbourMix(shift), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with caplog.at_level("WARNING", logger="gradsign"):
        counts = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy, engine="auto", chunk_size=chunk_size)
    assert "samples interact within a batch" in caplog.text
    reference = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy, engine="loop")
    assert all(torch.equal(counts[k], reference[k]) for k in reference)


def test_fallback_runs_the_loop_on_the_model_as_it_was():
    class Centre(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Centre(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model[1].bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))
    reference = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy, engine="loop")
    counts = sign_counts(model, x, y, F.cross_entropy, engine="auto")
    assert type(model[1]) is nn.BatchNorm2d
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(counts[k], reference[k]) for k in reference)


class ShiftedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (its output shifted): the batched form's single-sample
    normalisation computes torch's BatchNorm, not this."""

    def forward(self, x):
        return super().forward(x) - 0.5


def test_the_reference_runs_a_batchnorm_subclass_own_forward(caplog):
    torch.manual_seed(0)
    model = cnn(ShiftedBatchNorm)
    x, y, _ = batch("image", 6)
    with caplog.at_level("WARNING", logger="gradsign"):
        auto = gradsign.score(model, x, y)
    assert "not exact for this model" in caplog.text
    assert auto == pytest.approx(plain_gradsign(model, x, y), rel=1e-6)
    assert all(type(m) is ShiftedBatchNorm for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_the_reference_and_the_batched_pass_normalise_a_sample_alike():
    """Torch's BatchNorm, swapped for its single-sample form before the reference pass, normalises the
    verified sample in its batch to the bit as alone: the float32 verification sees no difference there."""
    torch.manual_seed(0)
    model = engine_module.scoring_mode(nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False)))
    form = engine_module.BatchedForm(model, attention=False, stock_norms_only=True)
    try:
        assert all(isinstance(m, engine_module._PerSampleNorm) for m in model)
        for size in (6, 2):  # group normalisation, and instance normalisation on 2x2 maps
            x = torch.randn(5, 4, size, size) * 3 + 1
            with torch.no_grad():
                assert torch.equal(model(x)[1], model(x[1:2])[0])
                alone = F.batch_norm(F.batch_norm(x[1:2], None, None, model[0].weight, model[0].bias, True),
                                     None, None, training=True)
                assert torch.allclose(model(x[1:2]), alone, atol=1e-5)
    finally:
        form.undo()
    assert all(type(m) is nn.BatchNorm2d for m in model)


def test_a_channels_last_model_counts_as_the_loop_in_float64(caplog):
    torch.manual_seed(0)
    model = cnn(nn.BatchNorm2d).double().to(memory_format=torch.channels_last)
    x, y, _ = batch("image", 6)
    x = x.double().contiguous(memory_format=torch.channels_last)
    loop = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy, engine="loop")
    with caplog.at_level("WARNING", logger="gradsign"):
        auto = sign_counts(model, x, y, F.cross_entropy, engine="auto")
    assert caplog.text == ""
    assert all(torch.equal(auto[k], loop[k]) for k in loop)


def test_bad_options_are_rejected():
    model = nn.Linear(2, 2)
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="engine"):
        gradsign.score(model, x, y, engine="fastest")
    with pytest.raises(ValueError, match="aggregation"):
        gradsign.score(model, x, y, aggregation="max")
    with pytest.raises(ValueError, match="not accepted"):
        gradsign.score(model, x, y, colour="red")
    with pytest.raises(ValueError, match="unknown proxy"):
        gradsign.score(model, x, y, proxy="magic")


def test_layer_fed_by_a_constant_matches_loop():
    class CutOff(nn.Module):
        """A conv whose input does not depend on the batch, added to the main path."""

        def __init__(self):
            super().__init__()
            self.main = nn.Conv2d(3, 4, 3, padding=1)
            self.constant_fed = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, 5)

        def forward(self, x):
            y = self.main(x) + self.constant_fed(torch.ones_like(x).detach() * 0.5)
            return self.head(torch.relu(y).mean((2, 3)))

    torch.manual_seed(0)
    model = CutOff()
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    reference = gradsign.score(model, x, y, engine="loop")
    assert gradsign.score(model, x, y, engine="batched") == pytest.approx(reference, rel=1e-3)


def test_layer_whose_output_is_unused_counts_zero_in_every_engine():
    class DeadBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    torch.manual_seed(0)
    model = DeadBranch()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    counts = {e: sign_counts(copy.deepcopy(model).train(), x, y, F.cross_entropy, engine=e)
              for e in ("loop", "batched", "vmap")}
    for per_layer in counts.values():
        assert int(per_layer["unused"].abs().sum()) == 0
        assert torch.equal(per_layer["used"], counts["loop"]["used"])


def test_each_initialisation_gets_its_own_seed_for_seeded_proxies():
    torch.manual_seed(0)
    model = cnn(nn.BatchNorm2d)
    x, y, _ = batch("image")
    one = [gradsign.score(model, x, y, proxy="zen", seed=s) for s in (4, 5)]
    assert gradsign.score(model, x, y, proxy="zen", n_inits=2, seed=4) != pytest.approx(one[0])


def test_per_sample_loss_sum_vectorised_and_fallback_agree():
    from gradsign.engine import per_sample_loss_sum

    outputs = torch.randn(6, 4, requires_grad=True)
    targets = torch.tensor([0, 3, 1, 2, 2, 0])
    expected = sum(F.cross_entropy(outputs[i:i + 1], targets[i:i + 1]) for i in range(6))
    (expected_grad,) = torch.autograd.grad(expected, outputs)

    def untraceable(o, t):  # data-dependent Python control flow: vmap cannot run it
        loss = F.cross_entropy(o, t)
        return loss * 2 if loss.item() > 1e9 else loss

    for loss_fn in (F.cross_entropy, untraceable):
        total = per_sample_loss_sum(outputs, targets, loss_fn)
        assert torch.allclose(total, expected)
        (grad,) = torch.autograd.grad(total, outputs)
        assert torch.allclose(grad, expected_grad)


@pytest.mark.parametrize("engine", ["auto", "batched", "vmap", "loop"])
def test_a_loss_of_one_element_per_sample_is_that_samples_loss_in_every_engine(engine):
    # a loss_fn with reduction="none" gives each sample's loss as shape (1,); a plain loop takes it as it is
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    unreduced = functools.partial(F.cross_entropy, reduction="none")
    expected = plain_gradsign(model, x, y)
    assert gradsign.score(model, x, y, loss_fn=unreduced, engine=engine) == expected


# ---------------------------------------------------------------- exactness on models that defeat hooks
class TokenTransformer(nn.Module):
    """Token ids -> Embedding -> TransformerEncoderLayer (its attention uses out_proj.weight without
    calling out_proj) -> mean -> Linear."""

    def __init__(self, batch_first: bool = True, dropout: float = 0.0):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(20, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens):
        h = self.embed(tokens)
        if not self.batch_first:
            return self.head(self.encoder(h.transpose(0, 1)).mean(0))
        return self.head(self.encoder(h).mean(1))


class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TiedEmbedding(nn.Module):
    """A language-model head tied to the embedding: the Linear's weight is also used by F.embedding."""

    def __init__(self, **embedding_options):
        super().__init__()
        self.embed = nn.Embedding(12, 8, **embedding_options)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 12, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embed(tokens))).mean(1))


class PaddedTiedEmbedding(TiedEmbedding):
    """Id 0 is padding: its rows get no gradient from the embedding."""

    def __init__(self):
        super().__init__(padding_idx=0)


class ScaledEmbedding(nn.Embedding):
    """An Embedding whose own forward scales the rows it looks up (as Gemma's and BART's embeddings do)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 3.0


class ScaledTiedEmbedding(TiedEmbedding):
    """The head tied to a ``ScaledEmbedding``: the gradient at the Embedding's output is not the one at
    its lookup."""

    def __init__(self):
        super().__init__()
        self.embed = ScaledEmbedding(12, 8)
        self.out.weight = self.embed.weight


class RenormalisedTiedEmbedding(TiedEmbedding):
    """Rows renormalised to norm <= 1 in every forward (the model writes its own weight)."""

    def __init__(self):
        super().__init__(max_norm=1.0)
        with torch.no_grad():
            self.embed.weight.mul_(3.0)


class FunctionalReuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.head(torch.tanh(F.linear(h, self.hidden.weight)))


class KeywordFunctionalReuse(FunctionalReuse):
    """The functional use with keyword arguments, on (batch, tokens, features) inputs."""

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.head(torch.tanh(F.linear(input=h, weight=self.hidden.weight)).mean(1))


class MatmulReuse(FunctionalReuse):
    """A Linear weight used again by a matrix product with its transpose (``F.linear`` written out)."""

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.head(torch.tanh(h @ self.hidden.weight.t()))


class WeightFirstMatmul(FunctionalReuse):
    """A Linear weight applied only as ``W @ h`` to (samples, features, tokens), never called as a module
    (as Mamba's mixer applies its ``dt_proj``)."""

    def forward(self, x):
        h = torch.tanh(self.hidden.weight @ x.transpose(1, 2))
        return self.head(torch.tanh(h).mean(2))


class EinsumReuse(FunctionalReuse):
    """A Linear weight used again by ``torch.einsum``: a use no call the engine sees."""

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.head(torch.tanh(torch.einsum("ni,oi->no", h, self.hidden.weight)))


class WindowFolding(nn.Module):
    """Swin-style window partition: each sample's 4 windows become 4 consecutive rows of the batch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.window_conv = nn.Conv2d(8, 8, 3, padding=1)
        self.window_mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.norm(self.stem(x)))                         # (B, 8, 8, 8)
        b, c = h.shape[:2]
        windows = h.reshape(b, c, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(b * 4, c, 4, 4)
        windows = F.relu(self.window_conv(windows))
        tokens = self.window_mlp(windows.flatten(2).transpose(1, 2))  # (B*4, 16, 8)
        return self.head(tokens.reshape(b, -1, c).mean(1))


class SampleMinorFolding(nn.Module):
    """Two rows per sample folded into the batch dimension sample-minor (row r belongs to sample r % B):
    the shapes look like consecutive rows, and only the verification can tell."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(3, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        b = x.shape[0]
        rows = torch.tanh(self.mix(x.reshape(b, 2, 3).transpose(0, 1).reshape(2 * b, 3)))
        return self.head(rows.reshape(2, b, 6).mean(0))


class SequenceFirst(nn.Module):
    """Linear layers on (T, B, F) inputs with T == B: only the single-sample shapes tell which dimension
    holds the samples."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x.transpose(0, 1))).mean(0))


def _tokens(n: int = 8, length: int = 6, vocabulary: int = 20):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocabulary, (n, length), generator=g), torch.randint(0, 3, (n,), generator=g)


def test_transformer_encoder_layer_matches_the_definition(caplog):
    # nn.MultiheadAttention uses out_proj.weight inside its functional call, and sequence-first layers
    # get (positions, samples, features) inputs: both are scored by the batched engine
    torch.manual_seed(0)
    for batch_first in (True, False):
        model = TokenTransformer(batch_first)
        x, y = _tokens()
        caplog.clear()
        with caplog.at_level("WARNING", logger="gradsign"):
            score = gradsign.score(model, x, y)
        reference = plain_gradsign(model, x, y)
        assert score == pytest.approx(reference, rel=1e-3)
        assert score == pytest.approx(gradsign.score(model, x, y, engine="loop"), rel=1e-3)
        assert "not exact" not in caplog.text


class AttentionVariants(nn.Module):
    """Learned queries attending to the tokens through ``nn.MultiheadAttention`` called in one of several
    ways: ``kind`` "self", "cross", "kdim" (keys and values of another width: separate input weights),
    "no-bias", "dropout" (off while scoring), "weights" (need_weights=True), "padding" (a key padding
    mask from the tokens), "causal" (an attention mask with is_causal), "bias-kv" (learned extra key and
    value)."""

    def __init__(self, kind: str, batch_first: bool = True):
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        width = 6 if kind == "kdim" else 12
        self.embed = nn.Linear(5, width)
        self.queries = nn.Parameter(torch.randn(4 if kind not in ("self", "causal") else 5, 12))
        self.attention = nn.MultiheadAttention(12, 3, bias=kind != "no-bias", dropout=0.3 if kind == "dropout" else 0.0,
                                               add_bias_kv=kind == "bias-kv", kdim=width, vdim=width,
                                               batch_first=batch_first)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        tokens = self.embed(x)
        queries = self.queries.expand(len(x), -1, -1)
        if self.kind in ("self", "causal"):
            queries = tokens = queries + torch.tanh(tokens)
        options = {"need_weights": self.kind == "weights"}
        if self.kind == "padding":
            options["key_padding_mask"] = x[..., 0] > 1.0
        if self.kind == "causal":
            options["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            options["is_causal"] = True
        if not self.batch_first:
            queries, tokens = queries.transpose(0, 1), tokens.transpose(0, 1)
        h, _ = self.attention(queries, tokens, tokens, **options)
        return self.head(torch.tanh(h).mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("kind", ["self", "cross", "kdim", "no-bias", "dropout", "weights", "padding", "causal",
                                  "bias-kv"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_is_computed_directly_where_it_can_be(kind, batch_first, monkeypatch, caplog):
    # attention runs without the identity projection inside the functional attention, except with extra
    # key/value biases; every variant gives the definition's value without a fallback
    identity_projections = []
    original = engine_module._IdentityProjection
    monkeypatch.setattr(engine_module, "_IdentityProjection",
                        lambda projection: identity_projections.append(1) or original(projection))
    torch.manual_seed(0)
    model = AttentionVariants(kind, batch_first)
    x, y = torch.randn(8, 5, 5), torch.randint(0, 3, (8,))
    score = scored_without_warnings(model, x, y, caplog)
    assert bool(identity_projections) == (kind == "bias-kv")
    assert score == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)
    counts = {e: sign_counts(copy.deepcopy(model).double(), x.double(), y, F.cross_entropy, engine=e)
              for e in ("auto", "loop")}
    assert all(torch.equal(counts["auto"][k], counts["loop"][k]) for k in counts["loop"])


def _masks(kind: str, samples: int, queries: int, keys: int, heads: int) -> dict:
    g = torch.Generator().manual_seed(5)
    padding = torch.rand(samples, keys, generator=g) < 0.3
    padding[:, 0] = False  # every query sees at least one key
    causal = nn.Transformer.generate_square_subsequent_mask(keys)[:queries]
    return {"none": {},
            "padding": {"key_padding_mask": padding},
            "float padding": {"key_padding_mask": torch.randn(samples, keys, generator=g)},
            "bool mask": {"attn_mask": torch.rand(queries, keys, generator=g) < 0.2},
            "per-head mask": {"attn_mask": torch.randn(samples * heads, queries, keys, generator=g)},
            "causal": {"attn_mask": causal, "is_causal": True},
            "causal padding": {"attn_mask": causal.isinf(), "is_causal": True, "key_padding_mask": padding}}[kind]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("options", [{"need_weights": False}, {}, {"average_attn_weights": False}])
@pytest.mark.parametrize("masks", ["none", "padding", "float padding", "bool mask", "per-head mask", "causal",
                                   "causal padding"])
@pytest.mark.parametrize("cross", [False, True])
def test_the_direct_attention_returns_what_torch_returns(batch_first, options, masks, cross):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(12, 3, batch_first=batch_first).eval()
    keys = 7 if cross and not masks.startswith("causal") else 5
    x = torch.randn(4, 5, 12)
    memory = torch.randn(4, keys, 12) if cross else x
    if not batch_first:
        x, memory = x.transpose(0, 1), memory.transpose(0, 1)
    options = {**options, **_masks(masks, 4, 5, keys, 3)}
    expected = attention(x, memory, memory, **options)
    form = engine_module.BatchedForm(attention)
    try:
        got = attention(x, memory, memory, **options)
    finally:
        form.undo()
    assert torch.allclose(got[0], expected[0], atol=1e-6)
    assert (got[1] is None) == (expected[1] is None)
    if expected[1] is not None:
        assert got[1].shape == expected[1].shape and torch.allclose(got[1], expected[1], atol=1e-6)


class WrappedAttention(nn.MultiheadAttention):
    """A subclass whose forward adds to torch's (which uses out_proj's weight inside the functional call)."""

    def forward(self, query, key, value, **options):
        output, weights = super().forward(query, key, value, **options)
        return 2.0 * output + query, weights


def test_an_attention_subclass_with_its_own_forward_falls_back_naming_the_unseen_weight(caplog):
    # the batched form cannot rewrite a forward it does not know: out_proj's weight is then used where
    # no hook sees it, and the fallback says so (before, the rewrite dropped the subclass's own work and
    # the fallback blamed the batch dimension)
    model = AttentionVariants("self")
    torch.manual_seed(0)
    model.attention = WrappedAttention(12, 3, batch_first=True)
    x, y = torch.randn(8, 5, 5), torch.randint(0, 3, (8,))
    score = score_logging_warnings(model, x, y, caplog)
    assert "attention.out_proj gets gradient outside the layer's own call" in caplog.text
    assert score == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)


class ShiftedInputLinear(nn.Linear):
    """A Linear subclass whose forward shifts its input before applying the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x - 0.5, self.weight, self.bias)


class ManuallyPaddedConv(nn.Conv2d):
    """A Conv2d subclass that pads its input itself (its own ``padding`` is 0), as "same"-padding
    convolutions of some libraries do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_a_layer_subclass_with_its_own_forward_falls_back_naming_its_class(layer, caplog):
    # the hook sees the call's input, not what the subclass's forward multiplies the weight with: the
    # per-sample formula is then wrong (linear) or does not fit (conv); before, the fallback blamed a
    # shared weight or printed torch's reshape error
    torch.manual_seed(0)
    if layer == "linear":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), ShiftedInputLinear(8, 3))
        x, expected = torch.randn(8, 6), "layer model.2 is a ShiftedInputLinear with its own forward"
    else:
        model = nn.Sequential(ManuallyPaddedConv(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3))
        x, expected = torch.randn(8, 3, 6, 6), "layer model.0 (a ManuallyPaddedConv with its own forward)"
    y = torch.randint(0, 3, (8,))
    score = score_logging_warnings(model, x, y, caplog)
    assert expected in caplog.text and "used the vmap engine" in caplog.text
    assert score == plain_gradsign(model, x, y)


class NaNForSomeSamples(nn.Module):
    """Finite for most samples; for samples whose first feature exceeds 1 the output is NaN (``forward``)
    or only the backward pass is (``backward``: the square root of a masked zero, whose derivative is
    infinite, times the mask's zero, the ``torch.where``-style NaN of many hand-written safe functions)."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        flagged = (x[:, :1] > 1).float()
        if self.where == "forward":
            extra = torch.log(1 - 2 * flagged)  # log(-1) = NaN where flagged
        else:
            extra = torch.sqrt(h * 0 * flagged + 1 - flagged)  # finite; d/dh = inf * 0 = NaN where flagged
        return self.out(torch.tanh(h) + extra)


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("engine", ["auto", "batched", "vmap", "loop"])
def test_a_nan_gradient_makes_gradsign_nan_in_every_engine(where, engine):
    # torch.sign(NaN) is 0: a NaN gradient used to count as a zero one (the loop gave a number, the default
    # engine raised torch's "atol must be greater than or equal to zero, but got -nan")
    torch.manual_seed(0)
    model = NaNForSomeSamples(where)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    x[:, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0])  # sample 5 alone; 1 (verified) finite
    with pytest.warns(UserWarning, match="gradsign scored NaN: .* is NaN for some sample"):
        assert math.isnan(gradsign.score(model, x, y, engine=engine))
    x[:, 0] = 0.0
    assert gradsign.score(model, x, y, engine=engine) == plain_gradsign(model, x, y)


def test_samples_interact_compares_nan_outputs_without_an_error():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    x[2] = float("nan")
    assert not engine_module.samples_interact(model, x, rtol=1e-7, relative_atol=1e-6)


class SharedTableBias(nn.Module):
    """Token features plus a Linear applied to a position table shared by all samples (as relative-position
    biases are formed): the table's Linear sees the same input for any batch."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 4))
        self.position = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x + self.position(self.table))).mean(1)


class GlobalQueries(nn.Module):
    """Longformer's global attention in small: the first token of each sequence-first sample scattered into
    a zero tensor, a Linear on it, its output (a view: ``F.linear`` on a 3-d input) divided in place."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.transpose(0, 1)
        first = tokens.new_zeros(1, tokens.shape[1], 6)
        first[0] = tokens[0]
        queries = self.query(first)
        queries /= 2.0
        return self.head(torch.tanh(queries[0]))


class RoutedExperts(nn.Module):
    """Tokens routed to one of two Linear experts by the sign of their first feature (top-1 routing as in
    Switch Transformers), the experts' outputs put back in place; a Linear head on the mean token."""

    def __init__(self, pick: str = "index"):
        super().__init__()
        # "index": h[rows] ("index, then gelu": gelu(h[rows])); "new axis, index": h[None, rows] reshaped,
        # as Switch Transformers' experts pick tokens; "gather": h.gather(0, ...), as unpadding code picks
        # tokens; "cat": each sample's routed tokens concatenated, as packing code does
        self.pick = pick
        self.experts = nn.ModuleList([nn.Linear(6, 6) for _ in range(2)])
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = x.reshape(n * t, d)
        choice = (h[:, 0] < 0).long()
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().flatten()
            if self.pick == "index":
                picked = h[rows]
            elif self.pick == "index, then gelu":
                picked = F.gelu(h[rows])
            elif self.pick == "new axis, index":
                picked = h[None, rows].reshape(-1, d)
            elif self.pick == "gather":
                picked = h.gather(0, rows[:, None].expand(-1, d))
            else:
                picked = torch.cat([h[r:r + 1] for r in rows.tolist()])
            out = out.index_add(0, rows, expert(picked))
        return self.head(torch.tanh(out.reshape(n, t, d))).mean(1)


class PooledAtPositions(nn.Module):
    """One token per sample picked by ``h[torch.arange(n), positions]``, then a Linear: rows in sample order."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(x))
        positions = (x[:, :, 1] > 0).long().argmax(1)
        return self.head(h[torch.arange(len(x)), positions])


@pytest.mark.parametrize("pick", ["index", "index, then gelu", "new axis, index", "gather", "cat"])
def test_rows_routed_by_an_index_fall_back_even_where_the_verified_sample_lines_up(pick, caplog):
    # expert 0 gets 2, 2, 3 and 1 tokens of the four samples: 8 rows, twice as many as the verified sample
    # has, so the batched reading (equal blocks of 2) passed the shape check, sample 1's block held its own
    # rows and the verification passed, while samples 2 and 3 were misread: 142 instead of 154, silently
    torch.manual_seed(0)
    model = RoutedExperts(pick)
    x, y = torch.randn(4, 4, 6), torch.randint(0, 3, (4,))
    first = torch.tensor([[1, 1, -1, -1], [1, -1, 1, -1], [1, 1, 1, -1], [-1, -1, 1, -1]], dtype=torch.float)
    x[:, :, 0] = x[:, :, 0].abs() * first
    score = score_logging_warnings(model, x, y, caplog)
    assert "layer model.experts.0 gets rows picked by an index" in caplog.text
    assert score == plain_gradsign(model, x, y)


@pytest.mark.parametrize("make", [GlobalQueries, PooledAtPositions])
def test_outputs_changed_in_place_and_rows_picked_in_sample_order_stay_batched(make, caplog):
    # GlobalQueries: a gradient hook on a view is lost when the view is changed in place, so the batched
    # pass missed the layer and the default engine fell back to vmap (blaming a weight used outside the
    # layer's call). PooledAtPositions: one row per sample, in order, is not a row-picking to refuse.
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(8, 5, 6), torch.randint(0, 3, (8,))
    assert scored_without_warnings(model, x, y, caplog) == plain_gradsign(model, x, y)


class NoiseLayer(nn.Module):
    """Gaussian noise added to a hidden layer in every mode (not a dropout): the output is random."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x) + 0.1 * torch.randn(len(x), 8)))


def test_a_model_with_random_output_falls_back_naming_the_randomness(caplog):
    # before, the cause was "samples interact within a batch"
    torch.manual_seed(0)
    model = NoiseLayer()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with caplog.at_level("WARNING", logger="gradsign"):
        gradsign.score(model, x, y)
    assert "the model's output is random in scoring mode" in caplog.text
    assert "samples interact" not in caplog.text


class FunctionalAttention(nn.Module):
    """WavLM's attention in small: ``F.multi_head_attention_forward`` called with four Linear modules' weights
    as separate projections (none called as a module), sequence-first, with a per-head float bias computed
    from the tokens as its attention mask; a Linear head on the mean token."""

    def __init__(self, need_weights: bool, width: int = 8, heads: int = 2):
        super().__init__()
        self.need_weights, self.heads = need_weights, heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))
        self.gate = nn.Linear(width, heads)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        bias = torch.tanh(self.gate(x)).transpose(1, 2)[..., None].expand(n, self.heads, t, t).reshape(-1, t, t)
        h = x.transpose(0, 1)
        out, _ = F.multi_head_attention_forward(
            h, h, h, h.shape[-1], self.heads, torch.empty([0]),
            torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)), None, None, False, 0.1,
            self.out_proj.weight, self.out_proj.bias, self.training, None, need_weights=self.need_weights,
            attn_mask=bias, use_separate_proj_weight=True, q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight)
        return self.head(out.transpose(0, 1)).mean(1)


@pytest.mark.parametrize("need_weights", [True, False])
def test_functional_attention_on_counted_linear_weights_is_scored_batched(need_weights, caplog):
    # before, the projections' weights were used inside F.multi_head_attention_forward, where no hook sees
    # them, and the model fell back to vmap ("gets gradient outside the layer's own call")
    torch.manual_seed(0)
    model = FunctionalAttention(need_weights)
    x, y = torch.randn(8, 5, 8), torch.randint(0, 3, (8,))
    assert scored_without_warnings(model, x, y, caplog) == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)
    model64, x64 = copy.deepcopy(model).double(), x.double()
    assert scored_without_warnings(model64, x64, y, caplog) == plain_gradsign(model64, x64, y)


class PooledBatchNorm(nn.Module):
    """Two branches pooled into a Linear head: one convolution, BatchNorm and ReLU; and two convolutions
    ending in BatchNorm (``dead``: the pooled BatchNorm output of a single sample is its bias, so that
    branch's exact gradients are zero and float32 gives them rounding noise, as in NDS cells; otherwise a
    ReLU after it lets the pooling see the input)."""

    def __init__(self, dead: bool):
        super().__init__()
        self.live = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.other = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                   nn.BatchNorm2d(16), nn.Identity() if dead else nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.live(x).mean((2, 3)), self.other(x).mean((2, 3))], 1))


@pytest.mark.parametrize("dead", [True, False])
def test_rounding_noise_is_reported_where_the_verification_passes(dead):
    # with this seed the float32 comparison accepts the dead model (its noise lies below the comparison's
    # floor), and nothing said that about a third of its counts are rounding signs
    torch.manual_seed(2)
    model = PooledBatchNorm(dead)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradsign.score(model, x, y)
    noise = [w for w in caught if issubclass(w.category, engine_module.RoundingNoiseWarning)]
    assert len(noise) == (1 if dead else 0)
    if dead:
        assert noise[0].message.share > 0.2 and f"{noise[0].message.share:.1%}" in str(noise[0].message)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_precision_counts_warn_that_rounding_decides_signs(dtype):
    # on this model and batch the default engine, the loop engine and plain_gradsign gave 2837, 2833 and
    # 2848 in bfloat16, 2840, 2834 and 2834 in float16, 2840 each in float32; nothing said that counts at
    # the lower precisions depend on how they are computed
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 12, 12).to(dtype), torch.randint(0, 5, (8,))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradsign.score(model, x, y)
    noise = [w for w in caught if issubclass(w.category, engine_module.RoundingNoiseWarning)]
    if dtype == torch.float32:
        assert noise == []
    else:
        assert len(noise) == 1 and str(dtype).removeprefix("torch.") in str(noise[0].message)
        assert "float32 copy" in str(noise[0].message) and noise[0].message.share is not None
    for engine in ("loop", "vmap", "batched"):  # they measure no share, and say so in a lower precision
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gradsign.score(model, x, y, engine=engine)
        noise = [w for w in caught if issubclass(w.category, engine_module.RoundingNoiseWarning)]
        assert len(noise) == (0 if dtype == torch.float32 else 1), engine
        assert all(w.message.share is None for w in noise)


class AutocastInside(nn.Module):
    """A float32 CNN whose forward runs under bfloat16 autocast (its convolutions compute in bfloat16)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 5))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x).float()


@pytest.mark.parametrize("where", ["inside the forward", "around the score"])
def test_counts_under_autocast_warn_that_bfloat16_rounding_decides_signs(where, caplog):
    # a float32 model whose layers compute in bfloat16 scored without a word (its weights' dtype does not
    # show it); with autocast inside its forward the default engine also fell back to the loop, naming a
    # dtype error as the cause
    torch.manual_seed(0)
    model = AutocastInside()
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))
    if where == "around the score":
        model = model.net
    context = torch.autocast("cpu", dtype=torch.bfloat16) if where == "around the score" else contextlib.nullcontext()
    values = {}
    for engine in ("auto", "batched", "loop"):
        with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger="gradsign"), context:
            warnings.simplefilter("always")
            values[engine] = gradsign.score(model, x, y, engine=engine)
        noise = [w for w in caught if issubclass(w.category, engine_module.RoundingNoiseWarning)]
        assert len(noise) == 1 and "bfloat16 rounding" in str(noise[0].message), engine
        assert (noise[0].message.share is not None) == (engine == "auto")
    assert caplog.text == ""  # no fallback
    assert values["auto"] == values["batched"] == values["loop"]
    float32 = model.net if where == "inside the forward" else model
    assert values["loop"] != gradsign.score(float32, x, y, engine="loop")  # float32 counts differ


class KeywordCrossAttention(nn.Module):
    """``nn.MultiheadAttention`` called by keywords, with 3 learned queries attending over the sequence."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.queries = nn.Parameter(torch.randn(3, 12))
        self.attention = nn.MultiheadAttention(12, 2, batch_first=batch_first)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        queries = self.queries.expand(len(x), -1, -1)
        if not self.batch_first:
            queries, x = queries.transpose(0, 1), x.transpose(0, 1)
        h, _ = self.attention(query=queries, key=x, value=x, need_weights=False)
        return self.head(torch.tanh(h).mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_shapes_come_from_the_reference_pass(batch_first, monkeypatch, caplog):
    # the out_proj call the batched form makes is read from the attention's call in the reference pass
    # (queries shorter than keys, passed by keyword): no extra one-sample probe, the loop's value
    def no_probe(*args):
        raise AssertionError("probed the call shapes again")

    monkeypatch.setattr(engine_module, "_single_sample_input_shapes", no_probe)
    torch.manual_seed(0)
    model = KeywordCrossAttention(batch_first)
    x, y = torch.randn(8, 5, 12), torch.randint(0, 3, (8,))
    score = score_logging_warnings(model, x, y, caplog)
    assert "not exact" not in caplog.text
    assert score == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)


@pytest.mark.parametrize("make, kind, falls_back", [
    (TiedLinears, "features", False), (TiedEmbedding, "tokens", False), (PaddedTiedEmbedding, "tokens", False),
    (ScaledTiedEmbedding, "tokens", False),
    (FunctionalReuse, "features", False), (KeywordFunctionalReuse, "sequence", False),
    (MatmulReuse, "features", False), (WeightFirstMatmul, "sequence", False), (EinsumReuse, "features", True),
    (WindowFolding, "image", False), (SequenceFirst, "sequence", False), (SampleMinorFolding, "features", True)])
@pytest.mark.parametrize("doubted", [False, True])
def test_shared_functional_and_folded_weights_match_the_definition(make, kind, falls_back, doubted, caplog,
                                                                   monkeypatch):
    if doubted:  # every float32 comparison "fails": the float64 check decides
        monkeypatch.setattr(engine_module, "FLOAT32_TOLERANCE", -1.0)
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(3)
    x = {"features": lambda: torch.randn(8, 5 if issubclass(make, FunctionalReuse) else 6, generator=g),
         "tokens": lambda: torch.randint(0, 12, (8, 5), generator=g),
         "image": lambda: torch.randn(8, 3, 8, 8, generator=g),
         "sequence": lambda: torch.randn(8, 8, 5 if issubclass(make, FunctionalReuse) else 6, generator=g)}[kind]()
    y = torch.randint(0, 4 if make is WindowFolding else 12 if issubclass(make, TiedEmbedding) else 3, (8,),
                      generator=g)
    score = score_logging_warnings(model, x, y, caplog)
    assert score == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)
    assert ("not exact" in caplog.text) == falls_back
    counts = {e: sign_counts(copy.deepcopy(model).double(), x.double() if x.is_floating_point() else x,
                             y, F.cross_entropy, engine=e) for e in ("auto", "loop")}
    assert all(torch.equal(counts["auto"][k], counts["loop"][k]) for k in counts["loop"])


@pytest.mark.parametrize("make, x, outside", [
    (FunctionalReuse, torch.randn(1, 5), {"hidden": 1}), (KeywordFunctionalReuse, torch.randn(1, 4, 5), {"hidden": 1}),
    (MatmulReuse, torch.randn(1, 5), {"hidden": 1}), (TiedLinears, torch.randn(1, 6), {}),
    (TiedEmbedding, torch.randint(0, 12, (1, 5)), {}), (LentModel, torch.randn(1, 3, 4, 4), {}),
    (functools.partial(KeywordCrossAttention, False), torch.randn(1, 4, 12), {})], ids=lambda v: "")
def test_the_reference_graph_shows_uses_outside_the_modules(make, x, outside):
    # a weight's uses in the single-sample graph beyond its modules' calls (and attentions' out_proj)
    torch.manual_seed(0)
    model = engine_module.scoring_mode(make())
    layers, y = engine_module.counted_layers(model), torch.zeros(1, dtype=torch.long)
    _, shapes = engine_module._reference_grads(model, x, y, F.cross_entropy, layers)
    calls = collections.Counter(name for name, _ in shapes)
    with engine_module._counted_weights_only(model, layers):
        _, loss = engine_module._sample_gradients(model, x, y, F.cross_entropy, layers)
        uses = engine_module._graph_uses(loss, layers)
    assert {name: uses[name] - calls[name] for name in uses if uses[name] != calls[name]} == outside
    assert shapes.used_elsewhere == bool(outside)


def test_a_float32_doubt_probes_no_model_whose_weights_stay_in_their_modules(monkeypatch, caplog, engine_calls):
    # LentModel: BatchNorm, attention (out_proj used inside the functional attention), a frozen Linear
    monkeypatch.setattr(engine_module, "FLOAT32_TOLERANCE", -1.0)
    calls = engine_calls("_single_sample_input_shapes", "_batched_counts")
    torch.manual_seed(0)
    model = LentModel()
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 10, (8,))
    score = scored_without_warnings(model, x, y, caplog)
    assert calls == {"_single_sample_input_shapes": 0, "_batched_counts": 2}  # float32, float64
    assert score == pytest.approx(gradsign.score(model, x, y, engine="loop"), rel=1e-3)


def test_a_functional_use_is_probed_once_before_the_one_batched_pass(caplog, engine_calls):
    calls = engine_calls("_single_sample_input_shapes", "_batched_counts")
    torch.manual_seed(0)
    model = FunctionalReuse()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    score = scored_without_warnings(model, x, y, caplog)
    assert score == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)
    assert calls == {"_single_sample_input_shapes": 1, "_batched_counts": 1}


class InPlaceAfterLayers(nn.Module):
    """Layer outputs changed in place: the first layer's (it reads the batch itself) and a later one's."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.first(x)
        h.tanh_()
        g = self.second(h)
        g += h
        return self.head(g.relu_())


def test_layer_outputs_changed_in_place_are_scored_by_the_batched_engine(caplog):
    torch.manual_seed(0)
    model = InPlaceAfterLayers()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    score = scored_without_warnings(model, x, y, caplog)
    assert score == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)


class FrozenByNoGrad(nn.Module):
    """A feature layer run under torch.no_grad() inside the model: its weight gets no gradient."""

    def __init__(self):
        super().__init__()
        self.frozen, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.frozen(x)
        return self.head(torch.relu(self.conv(torch.relu(h))).mean((2, 3)))


def test_a_layer_called_under_no_grad_counts_zero_without_a_fallback(caplog):
    torch.manual_seed(0)
    model = FrozenByNoGrad()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    with caplog.at_level("WARNING", logger="gradsign"):
        counts = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy)
    assert caplog.text == ""
    assert not counts["frozen"].any()
    assert sum(int(c.abs().sum()) for c in counts.values()) == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)


def test_tied_weights_count_once():
    torch.manual_seed(0)
    model = TiedLinears()
    counts = sign_counts(copy.deepcopy(model), torch.randn(4, 6), torch.tensor([0, 1, 2, 0]),
                         F.cross_entropy, engine="loop")
    assert sorted(counts) == ["a", "head"]


def test_dropout_of_every_kind_is_off_while_scoring(caplog):
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.attention = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True)
            self.drop = nn.Dropout(0.5)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.embed(x)
            return self.head(self.drop(self.attention(h, h, h)[0]).mean(1))

    torch.manual_seed(0)
    model = Noisy()
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    with caplog.at_level("WARNING", logger="gradsign"):
        scores = {gradsign.score(model, x, y, seed=s) for s in (0, 1)}
    assert len(scores) == 1
    assert scores.pop() == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)
    assert "interact" not in caplog.text


def test_batchnorm_without_single_sample_statistics_is_refused_plainly():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="cannot score this model.*single value per channel"):
        gradsign.score(model, torch.randn(6, 4), torch.randint(0, 3, (6,)))


class CheckpointedBlocks(nn.Module):
    """Two residual MLP blocks under activation checkpointing (``torch.utils.checkpoint``), which runs
    each block again during the backward pass."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.embed, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6)) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant)
        return self.head(h.mean(1))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_scored_batched(reentrant, caplog):
    # the reference pass records the calls the backward pass makes again, so the batched pass matches them;
    # the loop is the reference here: torch.autograd.grad refuses reentrant checkpointing
    torch.manual_seed(0)
    model = CheckpointedBlocks(reentrant)
    x, y = torch.randn(8, 5, 4), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own warning that no input of a reentrant checkpoint needs grad
        assert scored_without_warnings(model, x, y, caplog) == gradsign.score(model, x, y, engine="loop")
        counts = {e: sign_counts(copy.deepcopy(model).double(), x.double(), y, F.cross_entropy, engine=e)
                  for e in ("auto", "loop")}
    assert all(torch.equal(counts["auto"][k], counts["loop"][k]) for k in counts["loop"])


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over the tokens of the batch flattened to rows (as some token mixers normalise): one
    sample alone has several rows per channel, so its statistics are defined."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        samples, tokens, _ = x.shape
        h = self.norm(self.embed(x).flatten(0, 1)).view(samples, tokens, 8)
        return self.head(torch.relu(h).mean(1))


class ChannelFoldedBatchNorm(nn.Module):
    """Each input channel's patches embedded alone, the channels folded into the batch and BatchNorm1d over
    (samples x channels, features, patches) (as PatchTST's encoder normalises)."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(3 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        samples, channels, patches, _ = x.shape
        h = self.embed(x).view(samples * channels, patches, 8).transpose(1, 2)
        h = self.norm(h).transpose(1, 2).reshape(samples, channels, patches, 8)
        return self.head(torch.relu(h).mean(2).flatten(1))


class PickedSamplesBatchNorm(nn.Module):
    """BatchNorm1d (features by tokens) on the samples whose first input is positive, a row each: fewer
    rows than samples."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(1, 2)
        picked = x[:, 0, 0] > 0
        h = h.masked_scatter(picked[:, None, None], self.norm(h[picked])) if picked.any() else h
        return self.head(torch.relu(h).mean(2))


@pytest.mark.parametrize("model_class, shape", [(TokenBatchNorm, (6, 4)), (ChannelFoldedBatchNorm, (3, 5, 4)),
                                                (PickedSamplesBatchNorm, (6, 4))])
def test_batchnorm_over_several_rows_per_sample_is_scored_batched(model_class, shape, caplog):
    torch.manual_seed(0)
    model = model_class()
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    assert scored_without_warnings(model, x, y, caplog) == plain_gradsign(model, x, y)


class RowCountingBatchNorm(nn.Module):
    """BatchNorm1d on the rows of every sample but the first: no whole number of rows per sample."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        rest = self.norm(h[1:].flatten(0, 1)).view(len(x) - 1, -1, 8) if len(x) > 1 else h[1:]
        return self.head(torch.relu(torch.cat([h[:1], rest])).mean(1))


class SequenceFirstBatchNorm(nn.Module):
    """BatchNorm1d over tokens flattened sequence-first, (tokens x samples, C): a sample's rows are not
    consecutive, so the batched form's per-sample statistics mix samples."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(0, 1)
        tokens, samples, _ = h.shape
        h = self.norm(h.reshape(tokens * samples, 8)).view(tokens, samples, 8).transpose(0, 1)
        return self.head(torch.relu(h).mean(1))


@pytest.mark.parametrize("make, shape, cause", [
    (SharedTableBias, (5, 6), "layer model.position gets an input of the same shape (5, 4) for 8 samples as for one"),
    (RowCountingBatchNorm, (6, 4), "a BatchNorm gets 42 rows for 8 samples"),
    (SequenceFirstBatchNorm, (6, 4), "samples interact within a batch, or a BatchNorm normalises several rows per "
                                     "sample that are not consecutive (model.norm;")],
    ids=["shared table", "rows", "sequence-first rows"])
def test_a_shared_table_or_a_batchnorm_on_rows_it_cannot_group_falls_back_saying_so(make, shape, cause, caplog):
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    score = score_logging_warnings(model, x, y, caplog)
    assert cause in caplog.text
    assert score == plain_gradsign(model, x, y)


class GradientMixing(torch.autograd.Function):
    """The identity forward; backward, each row's gradient plus half the batch's mean gradient: samples
    interact in the backward pass only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad + 0.5 * grad.mean(0, keepdim=True)


class BackwardMixing(nn.Module):
    """Two Linear layers, between them ``GradientMixing``."""

    def __init__(self):
        super().__init__()
        self.hidden, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(GradientMixing.apply(torch.relu(self.hidden(x))))


class NormalisedGradient(BackwardMixing):
    """A gradient hook between the two layers that divides the batch's gradient by its norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(x))
        if h.requires_grad:
            h.register_hook(lambda grad: grad / grad.norm())
        return self.head(h)


class ClampedOutputGradient(BackwardMixing):
    """A gradient hook on the first layer's output that clamps each element (no sample sees another)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        if h.requires_grad:
            h.register_hook(lambda grad: grad.clamp(-0.01, 0.01))
        return self.head(torch.relu(h))


@pytest.mark.parametrize("make, cause", [
    (BackwardMixing, "samples interact within a batch in the backward pass"),
    (NormalisedGradient, "samples interact within a batch in the backward pass"),
    (ClampedOutputGradient, "a gradient hook on layer model.hidden's output")],
    ids=["autograd function", "hook over the batch", "hook on a layer's output"])
def test_a_backward_that_mixes_samples_or_a_hook_on_a_layers_output_falls_back_saying_so(make, cause, caplog):
    # before, the causes given were "the first dimension of layer model.hidden's input does not index
    # samples" and "weight of layer model.hidden gets gradient outside the layer's own call"
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    score = score_logging_warnings(model, x, y, caplog)
    assert cause in caplog.text
    assert "does not index samples" not in caplog.text and "outside the layer's own call" not in caplog.text
    assert score == plain_gradsign(model, x, y)


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.mark.parametrize("replace", [lambda out: out * torch.linspace(0.5, 2, 8)[None, :, None, None],
                                     torch.tanh], ids=["scale", "tanh"])
def test_a_forward_hook_that_replaces_a_layers_output_is_scored_exactly_without_a_fallback(replace, caplog):
    # the engine's hook ran after the model's and read the gradient of the replaced output: the
    # verification saw it and fell back to vmap, blaming "gradient outside the layer's own call"
    torch.manual_seed(0)
    model = small_cnn()
    model[2].register_forward_hook(lambda module, args, output: replace(output))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    assert score_logging_warnings(model, x, y, caplog) == pytest.approx(plain_gradsign(model, x, y), rel=1e-3)
    assert caplog.text == ""


def test_a_global_forward_hook_that_replaces_a_layers_output_falls_back_saying_so(caplog):
    # global forward hooks run before a module's own, the engine's among them
    torch.manual_seed(0)
    model = small_cnn().double()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
    model[2].replaced = True  # a mark that copies of the model keep
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, args, output: torch.tanh(output) if getattr(module, "replaced", False) else None)
    try:
        score = score_logging_warnings(model, x, y, caplog)
        assert score == plain_gradsign(model, x, y)
    finally:
        handle.remove()
    assert "a global forward hook (register_module_forward_hook) replaces layer model.2's output" in caplog.text


class HookedAndFunctional(nn.Module):
    """small_cnn whose first convolution's weight is also applied by ``F.conv2d`` outside its call, with a
    forward hook of its own that replaces that convolution's output."""

    def __init__(self):
        super().__init__()
        self.net = small_cnn()
        self.net[0].register_forward_hook(lambda module, args, output: torch.tanh(output))

    def forward(self, x):
        h = self.net[0](x) + 0.5 * F.conv2d(x, self.net[0].weight, padding=1)
        return self.net[1:](h)


def test_a_models_own_forward_hook_is_not_blamed_for_another_cause(caplog):
    # the cause analysis read the output after the model's own hooks and blamed a global forward hook
    torch.manual_seed(0)
    model = HookedAndFunctional().double()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (8,))
    assert score_logging_warnings(model, x, y, caplog) == plain_gradsign(model, x, y)
    assert "weight of layer model.net.0 gets gradient outside the layer's own call" in caplog.text
    assert "global forward hook" not in caplog.text


def test_float32_noise_is_settled_in_float64_without_a_fallback(monkeypatch, caplog):
    torch.manual_seed(0)
    model = cnn(nn.BatchNorm2d)
    x, y, _ = batch("image")
    expected = gradsign.score(model, x, y, engine="batched")
    monkeypatch.setattr(engine_module, "FLOAT32_TOLERANCE", -1.0)  # every float32 comparison "fails"
    with caplog.at_level("WARNING", logger="gradsign"):
        assert gradsign.score(model, x, y) == expected
    assert caplog.text == ""
    monkeypatch.setattr(engine_module, "FLOAT64_TOLERANCE", -1.0)
    with caplog.at_level("WARNING", logger="gradsign"):
        assert gradsign.score(model, x, y) == pytest.approx(expected, rel=1e-3)
    assert "vmap engine" in caplog.text


@pytest.mark.parametrize("interrupted", [False, True])
def test_the_float64_check_gives_back_the_models_own_tensors(interrupted, monkeypatch):
    # the check runs on the model itself in float64; afterwards (also after Ctrl-C inside it) every
    # parameter and buffer holds its own float32 tensor again, and the counts are the loop's
    torch.manual_seed(0)
    model = cnn(nn.BatchNorm2d)
    x, y, _ = batch("image")
    tensors = lambda: ([(id(p), p.data_ptr(), p.dtype, p.grad) for p in model.parameters()]
                       + [(id(b), b.data_ptr(), b.dtype) for b in model.buffers()])
    before = tensors()
    monkeypatch.setattr(engine_module, "FLOAT32_TOLERANCE", -1.0)  # every float32 comparison "fails"

    def loss(outputs, targets):
        if interrupted and outputs.dtype == torch.float64:
            raise KeyboardInterrupt
        return F.cross_entropy(outputs, targets)

    if interrupted:
        with pytest.raises(KeyboardInterrupt):
            sign_counts(model, x, y, loss)
    else:
        counts = sign_counts(model, x, y, loss)
        reference = sign_counts(copy.deepcopy(model), x, y, loss, engine="loop")
        assert all(torch.equal(counts[k], reference[k]) for k in reference)
    assert tensors() == before


class FixedProjection(nn.Module):
    """A Linear, then a product with a float32 tensor the model keeps as a plain attribute (neither a
    parameter nor a buffer, so converting the model to float64 leaves it float32)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.projection = torch.randn(6, 3)

    def forward(self, x):
        return torch.tanh(self.fc(x)) @ self.projection


def test_a_doubt_the_float64_check_cannot_settle_falls_back_with_its_cause(monkeypatch, caplog):
    torch.manual_seed(0)
    model = FixedProjection()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    monkeypatch.setattr(engine_module, "FLOAT32_TOLERANCE", -1.0)  # every float32 comparison "fails"
    with caplog.at_level("WARNING", logger="gradsign"):
        counts = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy)
    assert "does not run in float64" in caplog.text and "vmap engine" in caplog.text
    reference = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy, engine="loop")
    assert all(torch.equal(counts[k], reference[k]) for k in reference)


def test_engine_warnings_collects_the_fallback_causes_of_a_block():
    from gradsign.engine import engine_warnings

    torch.manual_seed(0)
    model = EinsumReuse()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with engine_warnings() as messages:
        gradsign.score(model, x, y)
        gradsign.score(TiedLinears(), torch.randn(6, 6), y)  # no fallback: nothing added
    assert len(messages) == 1 and "model.hidden gets gradient outside the layer's own call" in messages[0]


@pytest.mark.parametrize("proxy", [name for name in gradsign.available_proxies()
                                   if gradsign.proxy_info(name).reads_weights_only])
def test_proxies_that_get_the_model_itself_give_it_back_and_score_as_on_a_copy(proxy):
    from gradsign.api import _OutputAdapter, default_output
    from gradsign.engine import scoring_mode

    torch.manual_seed(0)
    model = cnn(nn.BatchNorm2d).train()
    x, y, _ = batch("image", 6)
    F.cross_entropy(model(x), y).backward()
    model[-1].register_forward_hook(lambda *args: None)
    copied = scoring_mode(_OutputAdapter(copy.deepcopy(model), default_output)).requires_grad_(True)
    expected = gradsign.proxy_info(proxy).fn(copied, x, y, F.cross_entropy)
    before = fingerprint(model)
    assert gradsign.score(model, x, y, proxy=proxy) == pytest.approx(expected, rel=1e-6, nan_ok=True)
    assert same(fingerprint(model), before)


def _repeated_scores(live_tensors, make, x, y, engine: str, times: int = 3) -> int:
    """Live tensors after ``times`` more scores of a fresh model than after the first score."""
    torch.manual_seed(0)
    model = make()
    gradsign.score(model, x, y, engine=engine)
    before = live_tensors()
    for _ in range(times):
        gradsign.score(model, x, y, engine=engine)
    return live_tensors() - before


@pytest.mark.parametrize("engine", ["auto", "batched", "loop", "vmap"])
def test_scoring_again_and_again_keeps_no_tensor_alive(engine, live_tensors):
    # the batched pass's gradient hooks sit in torch's graph and hold the engine's state: a reference from
    # that state back to the graph is a cycle Python's collector cannot see, which kept every pass's layer
    # inputs alive (about 45 MB per score of a ResNet at 64x64)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    assert _repeated_scores(live_tensors, lambda: cnn(nn.BatchNorm2d), x, y, engine) == 0


@pytest.mark.parametrize("make", [TokenTransformer, TiedEmbedding, FunctionalReuse], ids=lambda m: m.__name__)
def test_scoring_models_with_other_hook_paths_keeps_no_tensor_alive(make, live_tensors):
    # attention rewritten, an Embedding tied to a Linear, a weight used by F.linear outside its module
    g = torch.Generator().manual_seed(1)
    if make is FunctionalReuse:
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    else:
        classes = 3 if make is TokenTransformer else 12
        x, y = torch.randint(0, 12, (8, 5), generator=g), torch.randint(0, classes, (8,), generator=g)
    assert _repeated_scores(live_tensors, make, x, y, "auto") == 0
