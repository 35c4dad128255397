"""Sign counts of shallow per-sample products and of depthwise convolutions in fused loops (compiled by numba,
where it is installed).

A layer's per-sample gradient over a few positions or rows of a sample (a convolution on maps of up to
4x4, a Linear on up to 16 tokens) is ``a_s b_s`` with ``a_s``: (rows, depth), ``b_s``: (depth,
columns), and GradSign needs ``sum_s sign(a_s b_s)``. Formed by torch, as a batched product into a
buffer, its sign and its sum over the samples, the work is bound by memory traffic (three passes over
samples x weights floats for a few multiply-adds each). The loop here takes four weight rows at a time,
adds four positions' products at a time into one row of partial sums per weight row (which stays in
cache), and adds the sign of each finished product at once to the four rows' integer sign sums, which
go to the counts after the last sample: with one torch thread, 2.9-4.1x faster than torch at depth 4
and 1.4-1.8x at depth 16 on the zoo's layers (``python bench/layer_kernels.py --products --threads 1
--batch-size 32``). The products are those of the torch
way up to the order of their additions (float rounding).

A depthwise convolution's per-sample gradient sums, for each sample, channel and kernel tap, a product
of two maps; ``add_depthwise_signs`` forms them along the channels of channels-last maps (vector
multiply-adds, no per-sample gradient array) and counts their signs in the same loop: 0.08-0.72x the
torch ways' time on the zoo's depthwise shapes laid out channels-last (as ConvNeXt's are), at one or
two torch threads, with single rows up to 1.13x in some runs (``python bench/layer_kernels.py
--depthwise``).

The loops run in the calling thread: with two torch threads the product loop still beats torch's
two-thread way at depth 4 to 8, while splitting its rows among threads of its own was slower (torch's idle threads
spin-wait for a while after each operation, on the same cores). Numba is optional (``pip install
gradsign[fast]``); without it, and for other dtypes than float32 and float64, ``fused_available`` and
``depthwise_available`` say no and the engine forms the gradients with torch.
"""
from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch
from torch import nn

FUSED_DTYPES = (torch.float32, torch.float64)
#: the loop runs in one thread and torch's products in all of its threads: the loop is faster up to
#: depth 16 with one torch thread and up to depth 8 with two, not clearly beyond (at depth 9-16 with two
#: threads it takes 0.85-1.2x torch's time: ``python bench/layer_kernels.py --products --threads 2
#: --batch-size 32``)
FUSED_DEPTH_THREADS = 16
#: a depthwise convolution whose input is not channels-last goes to the depthwise loop on maps of at
#: most this many output positions (2x2), or four times as many for kernels above 3x3: there copying
#: both maps channels-last and the loop take 0.16-0.44x of the torch ways' time, on larger maps up to
#: 5x more (``python bench/layer_kernels.py --depthwise``)
DEPTHWISE_FEW_POSITIONS = 4


def loops_available() -> bool:
    """Whether the compiled loops can run here (numba installed and the loops importable), whatever the
    shapes and thread count that ``fused_available`` and ``depthwise_available`` also weigh."""
    return _loops() is not None


def fused_available(a: torch.Tensor) -> bool:
    """Whether ``add_product_signs`` takes these factors (samples, rows, depth) and is faster than torch
    on them: numba installed, a CPU tensor of float32 or float64, and its depth (rounded up to a
    multiple of four) times torch's threads at most ``FUSED_DEPTH_THREADS``."""
    return (a.device.type == "cpu" and a.dtype in FUSED_DTYPES
            and _round_up(a.shape[-1]) * torch.get_num_threads() <= FUSED_DEPTH_THREADS and loops_available())


def depthwise_available(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor) -> bool:
    """Whether ``add_depthwise_signs`` takes this depthwise convolution's call and is faster than the
    engine's torch ways: numba installed, CPU tensors of float32 or float64, and an input laid out
    channels-last (as a model that permutes its maps between convolutions and Linear layers leaves it)
    or on few output positions (``DEPTHWISE_FEW_POSITIONS``), where copying both maps channels-last costs
    less than the torch ways' fixed costs (``python bench/layer_kernels.py --depthwise``)."""
    if not (x.device.type == "cpu" and x.dtype in FUSED_DTYPES and x.dim() == 4 and grad_out.dim() == 4
            and conv.groups == conv.in_channels == conv.out_channels and loops_available()):
        return False
    positions = grad_out.shape[2] * grad_out.shape[3]
    few = DEPTHWISE_FEW_POSITIONS * (4 if conv.kernel_size[0] * conv.kernel_size[1] > 9 else 1)
    return _channels_last(x) or positions <= few


def add_depthwise_signs(conv: nn.Conv2d, x: torch.Tensor, grad_out: torch.Tensor, totals: torch.Tensor,
                        padding: tuple[int, int] | int, kept_sample: int | None = None) -> torch.Tensor | None:
    """``totals[c, 0, a, b] += sum_s sign(dL_s/dW[c, 0, a, b])`` for a depthwise ``conv`` (one filter per
    channel), from its input ``x`` (zero ``padding`` on each side still to apply) and output gradient,
    by one loop over the samples along the channels (``_sign_loops.depthwise_signs``). Returns sample
    ``kept_sample``'s gradient dL_s/dW (None without one)."""
    loops = _required_loops()
    pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
    kernel_h, kernel_w = conv.kernel_size
    channels = conv.in_channels
    signs = np.zeros((kernel_h, kernel_w, channels), dtype=np.int32)
    partial = np.empty((kernel_h, kernel_w, channels), dtype=_numpy_dtype(x))
    kept = np.empty_like(partial)
    loops.depthwise_signs(_channels_last_array(x.detach()), _channels_last_array(grad_out.detach()), signs, partial,
                          kept, -1 if kept_sample is None else kept_sample, *conv.stride, *conv.dilation, pad_h, pad_w)
    totals += torch.from_numpy(signs).permute(2, 0, 1).unsqueeze(1).to(totals.dtype)
    return None if kept_sample is None else torch.from_numpy(kept).permute(2, 0, 1).unsqueeze(1)


def _channels_last(t: torch.Tensor) -> bool:
    return t.permute(0, 2, 3, 1).is_contiguous()


def _channels_last_array(t: torch.Tensor) -> np.ndarray:
    """(samples, height, width, channels) C-contiguous: a view of a channels-last ``t``, else a copy."""
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def _numpy_dtype(t: torch.Tensor) -> np.dtype:
    return np.float64 if t.dtype == torch.float64 else np.float32


def scratch_elements(a: torch.Tensor, b: torch.Tensor, totals: torch.Tensor) -> int:
    """Elements of the flat ``buffer`` that ``add_product_signs`` works in for these arguments."""
    samples, rows, depth = a.shape
    padded_rows, padded_depth, columns = _round_up(rows), _round_up(depth), b.shape[2]
    counts_rows = 4 if _counted_in_place(a, totals) else padded_rows
    return (counts_rows + 8) * columns + samples * padded_depth * (padded_rows + columns)


def add_product_signs(a: torch.Tensor, b: torch.Tensor, totals: torch.Tensor,
                      buffer: torch.Tensor | None = None) -> None:
    """``totals[o, i] += sum_s sign(sum_p a[s, o, p] b[s, p, i])`` for ``a``: (samples, rows, depth) and
    ``b``: (samples, depth, columns), in place on ``totals`` (rows, columns), in the calling thread.
    ``buffer``: a flat CPU tensor of the factors' dtype and at least ``scratch_elements(a, b, totals)``
    elements to work in, reused from call to call: memory allocated afresh is paged in by the loop's
    first writes, and after torch's multi-threaded operations those page faults made it 3x slower."""
    samples, rows, depth = a.shape
    columns = b.shape[2]
    # rows and depth padded with zeros to multiples of four: a padded product adds 0 * 0, exactly zero
    padded_rows, padded_depth = _round_up(rows), _round_up(depth)
    in_place = _counted_in_place(a, totals)
    needed = scratch_elements(a, b, totals)
    if buffer is None:
        buffer = torch.empty(needed, dtype=a.dtype)
    counts, partial, signs, a_space, b_space = np.split(buffer.numpy()[:needed], np.cumsum(
        [(4 if in_place else padded_rows) * columns, 4 * columns, 4 * columns, samples * padded_rows * padded_depth]))
    kernel = _required_loops().product_signs
    factors = (_zero_padded(a.detach(), a_space.reshape(samples, padded_rows, padded_depth)),
               _zero_padded(b.detach(), b_space.reshape(samples, padded_depth, columns)))
    partial = partial.reshape(4, columns)
    signs = signs.view(np.int32)[:4 * columns].reshape(4, columns)  # float elements hold int32 ones
    counts = counts.reshape(-1, columns)
    counts.fill(0)
    if not in_place:
        kernel(*factors, counts, partial, signs, 0, padded_rows)
        totals += torch.from_numpy(counts[:rows]).to(totals.dtype)
        return
    whole = rows - rows % 4  # whole groups of four rows are counted in the totals themselves
    kernel(*factors, totals.numpy(), partial, signs, 0, whole)
    if whole < rows:
        kernel(*factors, counts, partial, signs, whole, padded_rows)
        totals[whole:] += torch.from_numpy(counts[:rows - whole])


def add_grouped_product_signs(a: torch.Tensor, b: torch.Tensor, totals: torch.Tensor) -> None:
    """``totals[g, o, i] += sum_s sign(sum_p a[g, s, o, p] b[g, s, p, i])`` for every group g, in place,
    in the calling thread: ``a``: (groups, samples, rows, depth) and ``b``: (groups, samples, depth,
    columns), C-contiguous CPU tensors with rows and depth multiples of four; ``totals``: (groups, rows,
    columns), C-contiguous, of their dtype."""
    groups, samples, rows, depth = a.shape
    columns = b.shape[3]
    if (rows % 4 or depth % 4 or b.shape != (groups, samples, depth, columns) or totals.shape != (groups, rows, columns)
            or not all(t.is_contiguous() and t.dtype == a.dtype for t in (a, b, totals))):
        raise ValueError("add_grouped_product_signs needs contiguous factors of one dtype, rows and depth multiples "
                         "of four")
    partial = np.empty((4, columns), dtype=_numpy_dtype(a))
    signs = np.empty((4, columns), dtype=np.int32)
    _required_loops().grouped_product_signs(a.detach().numpy(), b.detach().numpy(), totals.numpy(), partial, signs)


def _counted_in_place(a: torch.Tensor, totals: torch.Tensor) -> bool:
    return totals.is_contiguous() and totals.dtype == a.dtype and totals.device.type == "cpu"


def _round_up(n: int) -> int:
    return -(-n // 4) * 4


def _zero_padded(t: torch.Tensor, space: np.ndarray) -> np.ndarray:
    """``t`` as a C-contiguous array of ``space``'s shape, zero padded, in ``space`` unless ``t`` already is."""
    if t.shape == space.shape and t.is_contiguous():
        return t.numpy()
    if t.shape != space.shape:
        space.fill(0)
    space[tuple(slice(0, n) for n in t.shape)] = t.numpy()
    return space


def _required_loops():
    """``_loops()``, or RuntimeError where numba cannot run them."""
    loops = _loops()
    if loops is None:
        raise RuntimeError("the fused loop needs numba")
    return loops


@functools.cache
def _loops():
    """The module of compiled loops, or None without numba: each loop is compiled on first use (1-2 s for
    each dtype), then read from numba's on-disk cache (``gradsign/__pycache__``, or numba's user-wide
    cache where that is not writable; where neither is, numba refuses to set it up and the engine does
    without)."""
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        from gradsign import _sign_loops
    except (ImportError, RuntimeError):
        return None
    return _sign_loops
