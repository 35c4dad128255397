"""The NAS-Bench-201 network ("tiny network" of Dong & Yang, ICLR 2020), built from a cell's six ops.

Layout (C = ``stem_channels``, N = ``cells_per_stage``, K = ``num_classes``)::

    Conv3x3(3 -> C, no bias) - BN(C)
    N cells at C      | residual reduction C -> 2C
    N cells at 2C     | residual reduction 2C -> 4C
    N cells at 4C
    BN(4C) - ReLU - global average pool - Linear(4C -> K, with bias)

A cell has nodes 0..3; node 0 is the cell input, node j = sum over i < j of op_{j<-i}(node i), and the cell
output is node 3. Edge order (the order of an arch string and of op tuples):
``1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2``. Ops: ``none`` (zero; nothing is built), ``skip_connect``
(identity), ``nor_conv_1x1`` / ``nor_conv_3x3`` (ReLU - Conv(k x k, stride 1, same padding, no bias) -
BN affine), ``avg_pool_3x3`` (AvgPool2d(3, stride 1, padding 1, count_include_pad=False)). A node whose
inputs are all ``none`` is zero.

Residual reduction (ResNet basic block, stride 2): residual = ReLU-Conv3x3(s=2)-BN, ReLU-Conv3x3-BN;
shortcut = AvgPool2d(2, 2) - Conv1x1(no bias); output = shortcut + residual.

All BatchNorms are affine and track running statistics, as in the benchmark's trained networks, so the
parameter count (``nb201_param_count``) equals the benchmark's ``params`` column::

    params = 29C + sum_stages N * sum_edges w(op, C_s)
             + sum_{reductions C_s -> 2C_s} (18 C_s^2 + 4 C_s + 36 C_s^2 + 4 C_s + 2 C_s^2)
             + 8C + 4C K + K,
    w(nor_conv_1x1, c) = c^2 + 2c,   w(nor_conv_3x3, c) = 9c^2 + 2c,   w(other, c) = 0.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

#: the five NAS-Bench-201 operations, in the benchmark's op order
OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
#: the six edges of a cell as (target node, source node), in arch-string order
EDGES: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
#: conv kernel size of each op (0: no weights)
_KERNEL = {"none": 0, "skip_connect": 0, "nor_conv_1x1": 1, "nor_conv_3x3": 3, "avg_pool_3x3": 0}


def _op_names(ops: Sequence[int | str]) -> tuple[str, ...]:
    """Op names of a six-edge cell given as op indices or names."""
    if len(ops) != len(EDGES):
        raise ValueError(f"a NAS-Bench-201 cell has {len(EDGES)} edges, got {len(ops)} ops")
    names = []
    for op in ops:
        if isinstance(op, str):
            if op not in OPS:
                raise ValueError(f"unknown NAS-Bench-201 op {op!r}; ops: {', '.join(OPS)}")
            names.append(op)
        else:
            index = int(op)
            if not 0 <= index < len(OPS):
                raise ValueError(f"op index {index} out of range 0..{len(OPS) - 1}")
            names.append(OPS[index])
    return tuple(names)


def _check_options(stem_channels: int, cells_per_stage: int, num_classes: int) -> None:
    if stem_channels < 1 or cells_per_stage < 0 or num_classes < 1:
        raise ValueError("stem_channels and num_classes must be >= 1 and cells_per_stage >= 0, got "
                         f"{stem_channels}, {num_classes}, {cells_per_stage}")


def nb201_param_counts(ops: np.ndarray, num_classes: int, stem_channels: int = 16,
                       cells_per_stage: int = 5) -> np.ndarray:
    """Exact parameter counts (conv, BN affine and linear weights and biases) of many cells at once.

    ``ops`` is an integer array of shape (..., 6) of op indices; returns int64 counts of shape (...),
    from the formula in the module docstring.
    """
    _check_options(stem_channels, cells_per_stage, num_classes)
    ops = np.asarray(ops)
    if ops.shape[-1] != len(EDGES):
        raise ValueError(f"ops must have {len(EDGES)} columns, got shape {ops.shape}")
    n_1x1 = (ops == OPS.index("nor_conv_1x1")).sum(axis=-1).astype(np.int64)
    n_3x3 = (ops == OPS.index("nor_conv_3x3")).sum(axis=-1).astype(np.int64)
    c = stem_channels
    total = np.full(ops.shape[:-1], 27 * c + 2 * c, dtype=np.int64)
    for stage in range(3):
        cs = c * 2 ** stage
        total += cells_per_stage * (n_1x1 * (cs * cs + 2 * cs) + n_3x3 * (9 * cs * cs + 2 * cs))
        if stage < 2:
            total += 9 * cs * 2 * cs + 2 * 2 * cs + 9 * 4 * cs * cs + 2 * 2 * cs + 2 * cs * cs
    total += 2 * 4 * c + 4 * c * num_classes + num_classes
    return total


def nb201_param_count(ops: Sequence[int | str], num_classes: int, stem_channels: int = 16,
                      cells_per_stage: int = 5) -> int:
    """Exact parameter count of the network of one cell (see ``nb201_param_counts``)."""
    indices = np.array([OPS.index(name) for name in _op_names(ops)])
    return int(nb201_param_counts(indices, num_classes, stem_channels, cells_per_stage))


class ReLUConvBN(nn.Sequential):
    """ReLU - Conv2d(k x k, no bias) - BatchNorm2d(affine)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=False),
            nn.BatchNorm2d(c_out, affine=True, track_running_stats=True),
        )


def _make_op(name: str, channels: int) -> nn.Module:
    if name == "skip_connect":
        return nn.Identity()
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    return ReLUConvBN(channels, channels, _KERNEL[name])


class NB201Cell(nn.Module):
    """A NAS-Bench-201 cell: node j = sum_{i<j} op_{j<-i}(node i); output node 3. Only non-``none``
    edges are built; a node with no incoming non-``none`` edge is zero."""

    def __init__(self, ops: Sequence[int | str], channels: int) -> None:
        super().__init__()
        self.op_names = _op_names(ops)
        self.edges = nn.ModuleDict()
        for (target, source), name in zip(EDGES, self.op_names):
            if name != "none":
                self.edges[f"{target}<-{source}"] = _make_op(name, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for target in (1, 2, 3):
            value = None
            for source in range(target):
                key = f"{target}<-{source}"
                if key in self.edges:
                    out = self.edges[key](nodes[source])
                    value = out if value is None else value + out
            nodes.append(torch.zeros_like(x) if value is None else value)
        return nodes[3]

    def extra_repr(self) -> str:
        return "|".join(f"{n}~{s}->{t}" for (t, s), n in zip(EDGES, self.op_names))


class ResidualReduction(nn.Module):
    """ResNet basic block with stride 2: (ReLU-Conv3x3/2-BN, ReLU-Conv3x3-BN) + (AvgPool2-Conv1x1)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, stride=1)
        self.shortcut = nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2, padding=0),
            nn.Conv2d(c_in, c_out, kernel_size=1, stride=1, padding=0, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class NB201Network(nn.Module):
    """The NAS-Bench-201 network for one cell; ``forward`` returns logits of shape (batch, num_classes)."""

    def __init__(self, ops: Sequence[int | str], num_classes: int, stem_channels: int = 16,
                 cells_per_stage: int = 5) -> None:
        super().__init__()
        _check_options(stem_channels, cells_per_stage, num_classes)
        self.op_names = _op_names(ops)
        c = stem_channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(c, affine=True, track_running_stats=True),
        )
        layers: list[nn.Module] = []
        for stage in range(3):
            cs = c * 2 ** stage
            if stage > 0:
                layers.append(ResidualReduction(cs // 2, cs))
            layers.extend(NB201Cell(self.op_names, cs) for _ in range(cells_per_stage))
        self.cells = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.BatchNorm2d(4 * c, affine=True, track_running_stats=True),
            nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * c, num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.cells(self.stem(x))))


def build_nb201(ops: Sequence[int | str], num_classes: int, stem_channels: int = 16,
                cells_per_stage: int = 5) -> NB201Network:
    """A freshly initialised NAS-Bench-201 network (PyTorch default init; seed with ``torch.manual_seed``)."""
    return NB201Network(ops, num_classes, stem_channels=stem_channels, cells_per_stage=cells_per_stage)
