"""The NAS-Bench-101 network (Ying et al., ICML 2019), built from a pruned cell spec.

Layout (CIFAR-10, ``stem_channels`` C = 128)::

    Conv3x3(3 -> C, no bias) - BN(C) - ReLU
    3 cells at C   | MaxPool 2x2 stride 2
    3 cells at 2C  | MaxPool 2x2 stride 2
    3 cells at 4C
    global average pool - Linear(4C -> K, with bias)

A cell is a DAG given by an upper-triangular 0/1 ``matrix`` over n vertices (0 = cell input, n-1 = cell
output) and the ops of the inner vertices, each one of ``conv3x3-bn-relu``, ``conv1x1-bn-relu``,
``maxpool3x3``. With C_in channels in and C_out out (benchmark's ``compute_vertex_channels``):
the d inner vertices feeding the output get C_out // d channels each, the first C_out % d of them one more;
going backwards, every other inner vertex takes the max of the channels of its inner successors.

Vertex t (inner) sums its inputs: the cell input through a 1x1 conv-bn-relu projection to t's channels,
and each inner predecessor truncated to t's channels (its first channels); then applies its op (a conv
keeps t's channels; max pool 3x3 stride 1, same padding). The cell output concatenates the inner vertices
that feed it, plus (added) a 1x1 conv-bn-relu projection of the input to C_out when the input feeds the
output directly (the projection alone when nothing else does). Convs have no bias; BatchNorm has scale and
shift, so the parameter count equals the benchmark's ``trainable_parameters``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

#: the three operations of an inner vertex, in the benchmark's op order (module-hash label = position)
OPS: tuple[str, ...] = ("conv3x3-bn-relu", "conv1x1-bn-relu", "maxpool3x3")
INPUT, OUTPUT = "input", "output"


def vertex_channels(in_channels: int, out_channels: int, matrix: np.ndarray) -> list[int]:
    """Channels of every vertex of a cell (benchmark's ``compute_vertex_channels``)."""
    n = len(matrix)
    channels = [0] * n
    channels[0], channels[n - 1] = in_channels, out_channels
    if n == 2:
        return channels
    feeding = [v for v in range(1, n - 1) if matrix[v, n - 1]]
    share, extra = divmod(out_channels, len(feeding))
    for v in feeding:
        channels[v] = share + (1 if extra > 0 else 0)
        extra -= 1
    for v in range(n - 3, 0, -1):
        if not matrix[v, n - 1]:
            for dst in range(v + 1, n - 1):
                if matrix[v, dst]:
                    channels[v] = max(channels[v], channels[dst])
    return channels


class ConvBnRelu(nn.Sequential):
    """Conv(k x k, stride 1, same padding, no bias) - BatchNorm (affine) - ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


def _op(name: str, channels: int) -> nn.Module:
    if name == "conv3x3-bn-relu":
        return ConvBnRelu(channels, channels, 3)
    if name == "conv1x1-bn-relu":
        return ConvBnRelu(channels, channels, 1)
    if name == "maxpool3x3":
        return nn.MaxPool2d(3, stride=1, padding=1)
    raise ValueError(f"unknown NAS-Bench-101 op {name!r}; ops: {', '.join(OPS)}")


class NB101Cell(nn.Module):
    """One cell of a pruned spec (see the module docstring for the wiring)."""

    def __init__(self, matrix: np.ndarray, ops: Sequence[str], in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.matrix = np.asarray(matrix, dtype=np.int64)
        n = len(self.matrix)
        self.channels = vertex_channels(in_channels, out_channels, self.matrix)
        self.projections = nn.ModuleDict()
        self.ops = nn.ModuleDict()
        for t in range(1, n - 1):
            if self.matrix[0, t]:
                self.projections[str(t)] = ConvBnRelu(in_channels, self.channels[t], 1)
            self.ops[str(t)] = _op(ops[t], self.channels[t])
        if self.matrix[0, n - 1]:
            self.projections[str(n - 1)] = ConvBnRelu(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.matrix)
        values: list[torch.Tensor | None] = [x] + [None] * (n - 1)
        for t in range(1, n - 1):
            terms = [values[s][:, : self.channels[t]] for s in range(1, t) if self.matrix[s, t]]
            if self.matrix[0, t]:
                terms.append(self.projections[str(t)](x))
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            values[t] = self.ops[str(t)](total)
        feeding = [values[s] for s in range(1, n - 1) if self.matrix[s, n - 1]]
        out = torch.cat(feeding, dim=1) if feeding else None
        if self.matrix[0, n - 1]:
            projected = self.projections[str(n - 1)](x)
            out = projected if out is None else out + projected
        return out


class NB101Network(nn.Module):
    """The benchmark network: stem, 3 stacks of ``cells_per_stack`` cells with max-pool down-sampling and
    channel doubling between stacks, global average pool, linear classifier."""

    def __init__(self, matrix: np.ndarray, ops: Sequence[str], num_classes: int, *, stem_channels: int = 128,
                 num_stacks: int = 3, cells_per_stack: int = 3) -> None:
        super().__init__()
        self.stem = ConvBnRelu(3, stem_channels, 3)
        layers: list[nn.Module] = []
        channels = stem_channels
        in_channels = stem_channels
        for stack in range(num_stacks):
            if stack > 0:
                layers.append(nn.MaxPool2d(2, stride=2))
                channels *= 2
            for _ in range(cells_per_stack):
                layers.append(NB101Cell(matrix, ops, in_channels, channels))
                in_channels = channels
        self.cells = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cells(self.stem(x))
        return self.classifier(x.mean(dim=(2, 3)))


def build_nb101(matrix: np.ndarray, ops: Sequence[str], num_classes: int, *, stem_channels: int = 128,
                num_stacks: int = 3, cells_per_stack: int = 3) -> NB101Network:
    """A freshly initialised NB101 network of a **pruned** spec (initialise under ``torch.manual_seed``)."""
    return NB101Network(np.asarray(matrix), list(ops), num_classes, stem_channels=stem_channels,
                        num_stacks=num_stacks, cells_per_stack=cells_per_stack)


def nb101_param_count(matrix: np.ndarray, ops: Sequence[str], num_classes: int = 10, *,
                      stem_channels: int = 128, num_stacks: int = 3, cells_per_stack: int = 3) -> int:
    """Trainable parameters of ``build_nb101`` counted analytically from the same channel rule: a k x k
    conv-bn-relu from a to b channels has k*k*a*b + 2b parameters, the classifier 4C*K + K."""
    matrix = np.asarray(matrix, dtype=np.int64)
    n = len(matrix)

    def conv(a: int, b: int, k: int) -> int:
        return k * k * a * b + 2 * b

    total = conv(3, stem_channels, 3)
    channels = in_channels = stem_channels
    for stack in range(num_stacks):
        if stack > 0:
            channels *= 2
        for _ in range(cells_per_stack):
            vc = vertex_channels(in_channels, channels, matrix)
            for t in range(1, n - 1):
                if matrix[0, t]:
                    total += conv(in_channels, vc[t], 1)
                if ops[t] != "maxpool3x3":
                    total += conv(vc[t], vc[t], 3 if ops[t] == "conv3x3-bn-relu" else 1)
            if matrix[0, n - 1]:
                total += conv(in_channels, channels, 1)
            in_channels = channels
    return total + channels * num_classes + num_classes
