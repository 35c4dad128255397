"""The fused sign-count loops (shallow products, depthwise convolutions) against torch's per-sample
gradients, sign and sum, and the engine with and without them against a per-sample loop."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradsign.engine as engine_module
from gradsign.engine import engine_warnings, sign_counts
from gradsign.sign_kernels import (add_depthwise_signs, add_grouped_product_signs, add_product_signs,
                                  depthwise_available, fused_available, loops_available, scratch_elements)

pytest.importorskip("numba")


def torch_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sign(torch.bmm(a, b)).sum(0)


@pytest.mark.parametrize("samples, rows, columns, depth", [
    (5, 8, 9, 4),
    (5, 7, 9, 4),  # rows padded to a multiple of four
    (6, 13, 70, 16),  # partial sums over four groups of positions
    (6, 12, 33, 9),  # depth padded to a multiple of four
    (3, 5, 21, 1),
    (1, 4, 1, 2),
])
def test_counts_equal_torch_in_float64(samples, rows, columns, depth):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(samples, rows, depth, generator=g, dtype=torch.float64)
    b = torch.randn(samples, depth, columns, generator=g, dtype=torch.float64)
    b[:, :, 0] = 0  # exact zero products: sign 0
    totals = torch.full((rows, columns), 3.0, dtype=torch.float64)
    add_product_signs(a, b, totals)
    assert torch.equal(totals, torch_counts(a, b) + 3)
    transposed = torch.zeros(columns, rows, dtype=torch.float64).t()  # totals that are not contiguous
    add_product_signs(a, b, transposed)
    assert torch.equal(transposed, torch_counts(a, b))
    # a reused buffer's old contents (here NaN) play no part
    again = torch.zeros(rows, columns, dtype=torch.float64)
    stale = torch.full((scratch_elements(a, b, again) + 5,), float("nan"), dtype=torch.float64)
    add_product_signs(a, b, again, stale)
    assert torch.equal(again, torch_counts(a, b))


@pytest.mark.parametrize("groups, samples, rows, depth, columns", [
    (3, 5, 8, 4, 9), (24, 4, 16, 4, 144), (2, 3, 4, 16, 1)])
def test_grouped_counts_equal_torch_per_group_in_float64(groups, samples, rows, depth, columns):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(groups, samples, rows, depth, generator=g, dtype=torch.float64)
    b = torch.randn(groups, samples, depth, columns, generator=g, dtype=torch.float64)
    b[:, :, :, 0] = 0  # exact zero products: sign 0
    totals = torch.full((groups, rows, columns), 2.0, dtype=torch.float64)
    add_grouped_product_signs(a, b, totals)
    assert torch.equal(totals, torch.stack([torch_counts(a[i], b[i]) for i in range(groups)]) + 2)


@pytest.mark.parametrize("a, b, totals", [
    (torch.zeros(2, 3, 6, 4), torch.zeros(2, 3, 4, 5), torch.zeros(2, 6, 5)),  # rows not a multiple of four
    (torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5), torch.zeros(2, 5, 4).transpose(1, 2)),  # not contiguous
    (torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 5, dtype=torch.float64)),
])
def test_grouped_counts_refuse_what_the_loop_cannot_read(a, b, totals):
    with pytest.raises(ValueError, match="multiples of four"):
        add_grouped_product_signs(a, b, totals)


def test_float32_counts_differ_from_float64_only_by_rounding():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 64, 12, generator=g), torch.randn(16, 12, 96, generator=g)
    totals = torch.zeros(64, 96)
    add_product_signs(a.transpose(0, 1).contiguous().transpose(0, 1), b.transpose(1, 2).contiguous().transpose(1, 2),
                      totals)  # any strides
    exact = torch_counts(a.double(), b.double()).float()
    assert (totals - exact).abs().sum() <= 4


def test_only_float32_and_float64_are_taken():
    assert fused_available(torch.zeros(2, 3, 4))
    assert fused_available(torch.zeros(2, 3, 4, dtype=torch.float64))
    assert not fused_available(torch.zeros(2, 3, 4, dtype=torch.bfloat16))
    assert not fused_available(torch.zeros(2, 3, 4, dtype=torch.float16))


def test_deeper_products_are_left_to_torch_when_it_runs_more_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fused_available(torch.zeros(2, 3, 16)) and not fused_available(torch.zeros(2, 3, 17))
        torch.set_num_threads(2)
        assert fused_available(torch.zeros(2, 3, 8)) and not fused_available(torch.zeros(2, 3, 9))
    finally:
        torch.set_num_threads(threads)


class FewTokens(nn.Module):
    """A 3x3 convolution on 2x2 maps (a product of depth 4), Linear layers on its four positions and on
    three more tokens (depth 7), one with few weight columns."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.wide = nn.Linear(8, 96)
        self.narrow = nn.Linear(96, 12)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)  # (samples, 4, 8)
        tokens = torch.cat([tokens, tokens[:, :3] ** 2], 1)  # (samples, 7, 8)
        h = self.narrow(torch.relu(self.wide(tokens)))
        return self.head(torch.tanh(h).mean(1))


def assert_engine_equals_loop(model_class: type[nn.Module], samples: int) -> None:
    """The default engine's float64 counts on a random batch of 16x16 RGB images equal the loop engine's,
    with no fallback."""
    torch.manual_seed(0)
    model = model_class().double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(samples, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (samples,), generator=g)
    reference = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy, engine="loop")
    with engine_warnings() as fallbacks:  # the batched pass passed its verification: its own counts
        batched = sign_counts(copy.deepcopy(model), x, y, F.cross_entropy, engine="auto")
    assert not fallbacks
    assert all(torch.equal(reference[k], batched[k]) for k in reference)


@pytest.mark.parametrize("channels, kernel, size, stride, dilation, padding, channels_last", [
    (8, 3, 9, 1, 1, 1, False),
    (8, 7, 4, 1, 1, 3, True),  # the kernel larger than the map
    (5, 3, 9, 2, 1, 1, True),  # odd map, stride 2
    (6, 3, 8, 1, 2, 2, False),  # dilated
    (4, (3, 5), 7, (2, 1), 1, (0, 2), True),  # rectangular, no padding along the height
])
def test_depthwise_counts_equal_torch_in_float64(channels, kernel, size, stride, dilation, padding, channels_last):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(channels, channels, kernel, stride, padding, dilation, groups=channels).double()
    x = torch.randn(6, channels, size, size, generator=g, dtype=torch.float64)
    grad_out = torch.randn(conv(x).shape, generator=g, dtype=torch.float64)
    grad_out[:, 0] = 0  # a channel without gradient: sign 0
    if channels_last:
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    per_sample = torch.stack([torch.nn.grad.conv2d_weight(x[i:i + 1], conv.weight.shape, grad_out[i:i + 1], stride,
                                                          padding, dilation, channels) for i in range(len(x))])
    totals = torch.full(conv.weight.shape, 2.0, dtype=torch.float64)
    kept = add_depthwise_signs(conv, x, grad_out, totals, conv.padding, kept_sample=4)
    assert torch.equal(totals, torch.sign(per_sample).sum(0) + 2)
    assert torch.allclose(kept, per_sample[4], rtol=1e-12, atol=0)


def test_depthwise_loop_takes_channels_last_inputs_and_small_maps_of_depthwise_layers():
    depthwise, grouped = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 3, padding=1, groups=4)
    wide = nn.Conv2d(8, 8, 5, padding=2, groups=8)
    small, medium, large = torch.zeros(2, 8, 2, 2), torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 5, 5)
    assert depthwise_available(depthwise, small, small) and not depthwise_available(depthwise, medium, medium)
    assert depthwise_available(wide, medium, medium) and not depthwise_available(wide, large, large)
    assert depthwise_available(depthwise, large.contiguous(memory_format=torch.channels_last), large)
    assert not depthwise_available(grouped, small, small)
    assert not depthwise_available(depthwise, small.half(), small.half())


class Depthwise(nn.Module):
    """Depthwise layers on 16x16 maps laid out channels-last (7x7, then 3x3 with stride 2), and on 4x4 and
    2x2 maps as torch leaves them (5x5 with reflection padding, then 3x3 with padding "same")."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.large = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.strided = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.reflected = nn.Conv2d(16, 16, 5, padding=2, groups=16, padding_mode="reflect")
        self.same = nn.Conv2d(16, 16, 3, padding="same", groups=16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x)).contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(torch.relu(self.strided(torch.relu(self.large(x)))), 2).contiguous()
        return self.head(self.same(F.max_pool2d(torch.tanh(self.reflected(x)), 2)).mean((2, 3)))


@pytest.mark.parametrize("fused", [True, False])
def test_engine_counts_equal_the_loop_in_float64_with_and_without_the_depthwise_loop(fused, monkeypatch):
    calls = []
    monkeypatch.setattr(engine_module, "add_depthwise_signs",
                        lambda *args: calls.append(1) or add_depthwise_signs(*args))
    if not fused:
        monkeypatch.setattr(engine_module, "depthwise_available", lambda *args: False)
    assert_engine_equals_loop(Depthwise, samples=9)
    assert len(calls) == (4 if fused else 0)


class SmallMaps(nn.Module):
    """Ungrouped convolutions whose outputs have at most 16 positions: 3x3 with stride 2 (8x8 -> 4x4), a
    dilated 3x3 on channels-last maps, a 2x3 kernel with reflection padding, 1x1 with stride 2 (-> 2x2)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 16x16 -> 8x8
        self.strided = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(12, 12, 3, padding=2, dilation=2)
        self.rectangular = nn.Conv2d(12, 10, (2, 3), padding=(0, 1), padding_mode="reflect")  # -> 3x4
        self.pointwise = nn.Conv2d(10, 16, 1, stride=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.strided(torch.relu(self.stem(x))))
        x = torch.tanh(self.dilated(x.contiguous(memory_format=torch.channels_last)))
        return self.head(self.pointwise(torch.relu(self.rectangular(x))).mean((2, 3)))


class GroupedSmallMaps(nn.Module):
    """Grouped convolutions on 4x4 and 2x2 maps (as in RegNet's last stages): two groups of eight channels
    on 4x4 maps (not the fused loop's), then on 2x2 maps four groups with a stride of 2 and a rectangular
    kernel, a grouped 1x1 on channels-last maps, and groups of two output channels (not the fused
    loop's)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=4, padding=1)  # 16x16 -> 4x4, 3 input channels
        self.two_groups = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.strided = nn.Conv2d(16, 32, (3, 2), stride=2, padding=(1, 0), groups=4)  # -> 2x2
        self.pointwise = nn.Conv2d(32, 16, 1, groups=4)
        self.narrow_groups = nn.Conv2d(16, 16, 3, padding=1, groups=8)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.two_groups(torch.relu(self.stem(x))))
        x = torch.relu(self.strided(x)).contiguous(memory_format=torch.channels_last)
        x = torch.relu(self.pointwise(x))
        return self.head(torch.tanh(self.narrow_groups(x)).mean((2, 3)))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("model_class, samples, fused_calls", [
    (FewTokens, 12, 3),  # conv, wide and narrow; the head sees one row per sample
    (SmallMaps, 7, 4),  # all but the stem (64 positions); the head sees one row per sample
    (GroupedSmallMaps, 6, 3),  # the stem (4x4 maps), two grouped layers on 2x2 maps (one call each)
])
def test_engine_counts_equal_the_loop_in_float64_with_and_without_the_fused_loop(fused, model_class, samples,
                                                                                fused_calls, monkeypatch):
    calls = []
    monkeypatch.setattr(engine_module, "add_product_signs", lambda *args: calls.append(1) or add_product_signs(*args))
    monkeypatch.setattr(engine_module, "add_grouped_product_signs",
                        lambda *args: calls.append(1) or add_grouped_product_signs(*args))
    if not fused:
        monkeypatch.setattr(engine_module, "fused_available", lambda a: False)
    assert_engine_equals_loop(model_class, samples)
    assert len(calls) == (fused_calls if fused else 0)


def test_without_numba_the_engine_forms_the_gradients_with_torch(monkeypatch):
    import importlib.util

    from gradsign import sign_kernels

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(sign_kernels.importlib.util, "find_spec",
                        lambda name, *args: None if name == "numba" else real_find_spec(name, *args))
    sign_kernels._loops.cache_clear()
    try:
        assert not loops_available() and not fused_available(torch.zeros(2, 3, 4))
        with pytest.raises(RuntimeError, match="numba"):
            add_product_signs(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), torch.zeros(4, 4))
        assert not depthwise_available(nn.Conv2d(4, 4, 3, groups=4), torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 1, 1))
        assert_engine_equals_loop(FewTokens, samples=6)
        assert_engine_equals_loop(Depthwise, samples=6)
    finally:
        monkeypatch.undo()
        sign_kernels._loops.cache_clear()
    assert loops_available() and fused_available(torch.zeros(2, 3, 4))
