"""The DARTS-family cell network (DARTS's CIFAR-10 evaluation network, ``NetworkCIFAR``), built from a genotype.

This one builder serves the five NDS design spaces (DARTS, ENAS, PNAS, NASNet, Amoeba): they differ only
in the op set, the number of nodes per cell and which nodes a cell concatenates, all of which a genotype
states. Facts and sources: ``docs/nds.md``.

Layout (C = ``width``, L = ``depth`` cells, K = ``num_classes``)::

    Conv3x3(3 -> 3C, no bias) - BN(3C)                                   stem; s0 = s1 = stem output
    cell i = 0..L-1: reduction cell (channels doubled, stride 2) when i in {L // 3, 2L // 3}, else normal
    [auxiliary head on the output of cell 2L // 3, training mode only]
    global average pool - Linear(C_last -> K, with bias)

A cell with inputs (s0, s1) = (output of the cell before the previous one, output of the previous one)
and per-op channels c: preprocess s0 with FactorizedReduce(-> c) if the previous cell reduced, else
ReLU-Conv1x1-BN(-> c); preprocess s1 with ReLU-Conv1x1-BN(-> c). States 0 and 1 are the preprocessed
inputs; node j (state j + 2) = op_a(state in_a) + op_b(state in_b) for the j-th pair of genotype entries;
in a reduction cell an op applied to state 0 or 1 has stride 2. The cell output concatenates the states
listed in ``normal_concat`` / ``reduce_concat`` (so it has c * len(concat) channels).

Ops (C channels in and out, ``stride`` s; every BN affine):
``none`` zero (spatially subsampled by s); ``skip_connect`` identity (s = 1) or FactorizedReduce (s = 2);
``avg_pool_3x3`` AvgPool(3, s, pad 1, count_include_pad=False); ``max_pool_kxk`` MaxPool(k, s, pad k // 2);
``conv_1x1`` / ``conv_3x3`` ReLU-Conv(k, s)-BN; ``conv_3x1_1x3`` / ``conv_7x1_1x7`` ReLU-Conv(1 x k, stride
(1, s))-Conv(k x 1, stride (s, 1))-BN; ``sep_conv_kxk`` (ReLU-depthwise Conv(k, s)-Conv1x1-BN) then
(ReLU-depthwise Conv(k, 1)-Conv1x1-BN); ``dil_conv_kxk`` ReLU-depthwise Conv(k, s, dilation 2)-Conv1x1-BN;
``dil_sep_conv_3x3`` the sep_conv pattern with dilation 2 in both depthwise convs. FactorizedReduce:
ReLU, then two Conv1x1(stride 2, C_out / 2 each) on the input and on the input shifted by one pixel
(zero-padded at the far edge), concatenated, then BN. Convs have no bias.

Auxiliary head (CIFAR, expects 8 x 8 inputs): ReLU - AvgPool(5, stride 3, count_include_pad=False) -
Conv1x1(-> 128) - BN - ReLU - Conv2x2(128 -> 768) - BN - ReLU - Linear(768 -> K). In training mode a
network with the head returns ``(logits, aux_logits)`` like DARTS's; the proxies of this package score the
first element (``gradsign.api``'s default ``output_fn``), so the head's weights get no gradient there.
Drop path (a training-time regulariser of DARTS and NDS) is not applied: these networks are built to be
scored at initialisation.
"""
from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["OPS", "Genotype", "DartsNetwork", "build_darts", "format_genotype", "parse_genotype",
           "param_count", "DARTS_V1", "DARTS_V2", "NASNET_A", "AMOEBANET_A"]


@dataclass(frozen=True)
class Genotype:
    """A DARTS-style genotype: for each of the normal and the reduction cell, a pair of (op, input state)
    entries per node (states 0 and 1 are the cell inputs, state j + 2 is node j), and the states the cell
    output concatenates."""

    normal: tuple[tuple[str, int], ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[tuple[str, int], ...]
    reduce_concat: tuple[int, ...]

    def cell(self, reduction: bool) -> tuple[tuple[tuple[str, int], ...], tuple[int, ...]]:
        """(entries, concat) of the reduction cell if ``reduction`` else of the normal cell."""
        return (self.reduce, self.reduce_concat) if reduction else (self.normal, self.normal_concat)


# ----------------------------------------------------------------------------------------------- ops
class Zero(nn.Module):
    """The ``none`` op: zeros, spatially subsampled by the stride."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x if self.stride == 1 else x[:, :, ::self.stride, ::self.stride]).mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two stride-2 1x1 convs on the input and on the input shifted by one pixel."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = nn.functional.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def relu_conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """ReLU - Conv(kernel, stride, same padding, no bias) - BN."""
    return nn.Sequential(nn.ReLU(inplace=False),
                         nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out))


def _depthwise_pointwise(c: int, kernel: int, stride: int, dilation: int) -> list[nn.Module]:
    pad = dilation * (kernel - 1) // 2
    return [nn.ReLU(inplace=False),
            nn.Conv2d(c, c, kernel, stride=stride, padding=pad, dilation=dilation, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)]


def sep_conv(c: int, kernel: int, stride: int, dilation: int = 1) -> nn.Sequential:
    """Two (ReLU - depthwise conv - pointwise conv - BN) blocks; only the first has the stride."""
    return nn.Sequential(*_depthwise_pointwise(c, kernel, stride, dilation),
                         *_depthwise_pointwise(c, kernel, 1, dilation))


def dil_conv(c: int, kernel: int, stride: int) -> nn.Sequential:
    """ReLU - depthwise conv (dilation 2) - pointwise conv - BN."""
    return nn.Sequential(*_depthwise_pointwise(c, kernel, stride, 2))


def factorized_conv(c: int, kernel: int, stride: int) -> nn.Sequential:
    """ReLU - Conv(1 x k, stride (1, s)) - Conv(k x 1, stride (s, 1)) - BN."""
    return nn.Sequential(nn.ReLU(inplace=False),
                         nn.Conv2d(c, c, (1, kernel), stride=(1, stride), padding=(0, kernel // 2), bias=False),
                         nn.Conv2d(c, c, (kernel, 1), stride=(stride, 1), padding=(kernel // 2, 0), bias=False),
                         nn.BatchNorm2d(c))


def _max_pool(kernel: int) -> Callable[[int, int], nn.Module]:
    return lambda c, stride: nn.MaxPool2d(kernel, stride=stride, padding=kernel // 2)


#: every op of the five NDS design spaces: name -> factory(channels, stride)
OPS: dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda c, stride: Zero(stride),
    "skip_connect": lambda c, stride: nn.Identity() if stride == 1 else FactorizedReduce(c, c),
    "avg_pool_3x3": lambda c, stride: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": _max_pool(3),
    "max_pool_5x5": _max_pool(5),
    "max_pool_7x7": _max_pool(7),
    "conv_1x1": lambda c, stride: relu_conv_bn(c, c, 1, stride),
    "conv_3x3": lambda c, stride: relu_conv_bn(c, c, 3, stride),
    "conv_3x1_1x3": lambda c, stride: factorized_conv(c, 3, stride),
    "conv_7x1_1x7": lambda c, stride: factorized_conv(c, 7, stride),
    "sep_conv_3x3": lambda c, stride: sep_conv(c, 3, stride),
    "sep_conv_5x5": lambda c, stride: sep_conv(c, 5, stride),
    "sep_conv_7x7": lambda c, stride: sep_conv(c, 7, stride),
    "dil_conv_3x3": lambda c, stride: dil_conv(c, 3, stride),
    "dil_conv_5x5": lambda c, stride: dil_conv(c, 5, stride),
    "dil_sep_conv_3x3": lambda c, stride: sep_conv(c, 3, stride, dilation=2),
}


# ----------------------------------------------------------------------------------------------- network
class Cell(nn.Module):
    """One normal or reduction cell (see the module docstring)."""

    def __init__(self, entries: Sequence[tuple[str, int]], concat: Sequence[int], c_prev_prev: int,
                 c_prev: int, c: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.preprocess0 = FactorizedReduce(c_prev_prev, c) if reduction_prev else relu_conv_bn(c_prev_prev, c, 1)
        self.preprocess1 = relu_conv_bn(c_prev, c, 1)
        self.inputs = tuple(int(i) for _, i in entries)
        self.concat = tuple(int(i) for i in concat)
        self.ops = nn.ModuleList(OPS[op](c, 2 if reduction and i < 2 else 1) for op, i in entries)
        self.out_channels = c * len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for j in range(len(self.ops) // 2):
            a, b = 2 * j, 2 * j + 1
            states.append(self.ops[a](states[self.inputs[a]]) + self.ops[b](states[self.inputs[b]]))
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """DARTS's CIFAR auxiliary classifier (expects 8 x 8 feature maps)."""

    def __init__(self, c: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False), nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=False))
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class DartsNetwork(nn.Module):
    """DARTS's CIFAR evaluation network for ``genotype`` (see the module docstring)."""

    def __init__(self, genotype: Genotype, *, num_classes: int, width: int, depth: int, auxiliary: bool):
        super().__init__()
        if width < 1 or depth < 1 or num_classes < 1:
            raise ValueError(f"width, depth and num_classes must be >= 1, got {width}, {depth}, {num_classes}")
        self.genotype, self.depth, self.auxiliary = genotype, depth, auxiliary
        self.stem = nn.Sequential(nn.Conv2d(3, 3 * width, 3, padding=1, bias=False), nn.BatchNorm2d(3 * width))
        c_prev_prev, c_prev, c = 3 * width, 3 * width, width
        self.reductions = (depth // 3, 2 * depth // 3)
        self.cells = nn.ModuleList()
        reduction_prev, c_aux = False, c_prev
        for i in range(depth):
            reduction = i in self.reductions
            if reduction:
                c *= 2
            entries, concat = genotype.cell(reduction)
            cell = Cell(entries, concat, c_prev_prev, c_prev, c, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.out_channels
            if i == 2 * depth // 3:
                c_aux = c_prev
        self.auxiliary_head = AuxiliaryHeadCIFAR(c_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        s0 = s1 = self.stem(x)
        aux_logits = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if i == 2 * self.depth // 3 and self.auxiliary_head is not None and self.training:
                aux_logits = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return logits if aux_logits is None else (logits, aux_logits)


def build_darts(genotype: Genotype | str, *, num_classes: int, width: int, depth: int,
                auxiliary: bool = False) -> DartsNetwork:
    """A freshly initialised ``DartsNetwork`` (initialise under ``torch.manual_seed``); ``genotype`` may be
    a genotype string (``parse_genotype``)."""
    if isinstance(genotype, str):
        genotype = parse_genotype(genotype)
    check_genotype(genotype, OPS)
    return DartsNetwork(genotype, num_classes=num_classes, width=width, depth=depth, auxiliary=auxiliary)


def param_count(model: nn.Module, *, auxiliary: bool = True) -> int:
    """Number of parameters of ``model``; ``auxiliary=False`` leaves out the auxiliary head's, as DARTS's
    reported sizes do (DARTS ``utils.count_parameters_in_MB`` skips parameters named ``auxiliary``)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if auxiliary or not name.startswith("auxiliary_head."))


# ----------------------------------------------------------------------------------------------- text form
_GENOTYPE_RE = re.compile(r"^\s*(?:Genotype\s*)?\((?P<body>.*)\)\s*$", re.S)
_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")


def parse_genotype(text: str) -> Genotype:
    """A genotype from its usual text form, e.g. ``Genotype(normal=[('sep_conv_3x3', 0), ...],
    normal_concat=[2, 3, 4, 5], reduce=[...], reduce_concat=[...])`` (``range(2, 6)`` is accepted for a
    concat, as DARTS's own genotypes write it). Raises ValueError for anything else."""
    match = _GENOTYPE_RE.match(text)
    if not match:
        raise ValueError(f"not a genotype (expected Genotype(normal=[...], normal_concat=[...], reduce=[...], "
                         f"reduce_concat=[...])): {text[:80]!r}")
    try:
        call = ast.parse(f"f({match.group('body')})", mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"cannot parse genotype: {error.msg}") from None
    if not isinstance(call, ast.Call) or call.args or {k.arg for k in call.keywords} != set(_FIELDS) \
            or len(call.keywords) != 4:
        raise ValueError(f"a genotype has exactly the fields {', '.join(_FIELDS)}")
    fields = {k.arg: _literal(k.value, k.arg) for k in call.keywords}
    return genotype_from_lists(**fields)


def _literal(node: ast.expr, name: str):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
            and not node.keywords and 1 <= len(node.args) <= 2):
        return list(range(*(_literal(a, name) for a in node.args)))
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"genotype field {name} is not a literal list") from None


def genotype_from_lists(normal: Sequence, normal_concat: Sequence, reduce: Sequence, reduce_concat: Sequence
                        ) -> Genotype:
    """A ``Genotype`` from plain lists, as JSON or Python hold them (pairs may be lists or tuples)."""
    def entries(value, name):
        if not isinstance(value, (list, tuple)) or not value or len(value) % 2:
            raise ValueError(f"genotype field {name} must be a non-empty list of an even number of (op, input) pairs")
        out = []
        for pair in value:
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str)
                    or isinstance(pair[1], bool) or not isinstance(pair[1], int)):
                raise ValueError(f"genotype field {name}: {pair!r} is not an (op name, input index) pair")
            out.append((pair[0], int(pair[1])))
        return tuple(out)

    def concat(value, name):
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
            raise ValueError(f"genotype field {name} must be a non-empty list of state indices")
        return tuple(int(i) for i in value)

    return Genotype(entries(normal, "normal"), concat(normal_concat, "normal_concat"),
                    entries(reduce, "reduce"), concat(reduce_concat, "reduce_concat"))


def check_genotype(genotype: Genotype, ops: Sequence[str] | dict) -> None:
    """Raise ValueError unless every op is in ``ops``, every input names an earlier state and every
    concat index names a node (states 2 .. nodes + 1), without repeats."""
    for name, reduction in (("normal", False), ("reduce", True)):
        entries, concat = genotype.cell(reduction)
        nodes = len(entries) // 2
        for k, (op, i) in enumerate(entries):
            if op not in ops:
                raise ValueError(f"{name} cell: unknown op {op!r}; ops: {', '.join(ops)}")
            if not 0 <= i < 2 + k // 2:
                raise ValueError(f"{name} cell: node {k // 2} takes input {i}, but only states 0..{1 + k // 2} "
                                 "exist before it")
        if len(set(concat)) != len(concat) or not all(2 <= i < 2 + nodes for i in concat):
            raise ValueError(f"{name}_concat {list(concat)} must list distinct nodes among {2}..{nodes + 1}")


def format_genotype(genotype: Genotype) -> str:
    """The usual text form, with lists: ``Genotype(normal=[('op', i), ...], normal_concat=[...], ...)``."""
    def entries(value):
        return "[" + ", ".join(f"({op!r}, {i})" for op, i in value) + "]"
    return (f"Genotype(normal={entries(genotype.normal)}, normal_concat={list(genotype.normal_concat)}, "
            f"reduce={entries(genotype.reduce)}, reduce_concat={list(genotype.reduce_concat)})")


# ----------------------------------------------------------------------------------------------- published genotypes
# Data from DARTS's cnn/genotypes.py (Liu, Simonyan & Yang, ICLR 2019, github.com/quark0/darts): the
# cells found by DARTS (first and second order) and its transcriptions of NASNet-A and AmoebaNet-A.
DARTS_V1 = parse_genotype(
    "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), "
    "('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), "
    "('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])")
DARTS_V2 = parse_genotype(
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], "
    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), "
    "('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")
NASNET_A = parse_genotype(
    "Genotype(normal=[('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 0), ('sep_conv_3x3', 0), "
    "('avg_pool_3x3', 1), ('skip_connect', 0), ('avg_pool_3x3', 0), ('avg_pool_3x3', 0), ('sep_conv_3x3', 1), "
    "('skip_connect', 1)], normal_concat=[2, 3, 4, 5, 6], "
    "reduce=[('sep_conv_5x5', 1), ('sep_conv_7x7', 0), ('max_pool_3x3', 1), ('sep_conv_7x7', 0), "
    "('avg_pool_3x3', 1), ('sep_conv_5x5', 0), ('skip_connect', 3), ('avg_pool_3x3', 2), ('sep_conv_3x3', 2), "
    "('max_pool_3x3', 1)], reduce_concat=[4, 5, 6])")
AMOEBANET_A = parse_genotype(
    "Genotype(normal=[('avg_pool_3x3', 0), ('max_pool_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 2), "
    "('sep_conv_3x3', 0), ('avg_pool_3x3', 3), ('sep_conv_3x3', 1), ('skip_connect', 1), ('skip_connect', 0), "
    "('avg_pool_3x3', 1)], normal_concat=[4, 5, 6], "
    "reduce=[('avg_pool_3x3', 0), ('sep_conv_3x3', 1), ('max_pool_3x3', 0), ('sep_conv_7x7', 2), "
    "('sep_conv_7x7', 0), ('avg_pool_3x3', 1), ('max_pool_3x3', 0), ('max_pool_3x3', 1), ('conv_7x1_1x7', 0), "
    "('sep_conv_3x3', 5)], reduce_concat=[3, 4, 6])")
