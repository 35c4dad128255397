"""Sign counts of shallow per-sample products in one fused loop (compiled by numba, where it is installed).

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

The loop runs in the calling thread: with two torch threads it still beats torch's two-thread way at
depth 4 to 8, while splitting its rows among threads of its own was slower (torch's idle threads
spin-wait for a while after each operation, on the same cores). Numba is optional (``pip install
gradsign[fast]``); without it, and for other dtypes than float32 and float64, ``fused_available`` says
no and the engine forms the products with torch.
"""
from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

FUSED_DTYPES = (torch.float32, torch.float64)
#: the loop runs in one thread and torch's products in all of its threads: the loop is faster up to
#: depth 16 with one torch thread and up to depth 8 with two, not clearly beyond (at depth 9-16 with two
#: threads it takes 0.85-1.2x torch's time: ``python bench/layer_kernels.py --products --threads 2
#: --batch-size 32``)
FUSED_DEPTH_THREADS = 16


def fused_available(a: torch.Tensor) -> bool:
    """Whether ``add_product_signs`` takes these factors (samples, rows, depth) and is faster than torch
    on them: numba installed, a CPU tensor of float32 or float64, and its depth (rounded up to a
    multiple of four) times torch's threads at most ``FUSED_DEPTH_THREADS``."""
    return (a.device.type == "cpu" and a.dtype in FUSED_DTYPES
            and _round_up(a.shape[-1]) * torch.get_num_threads() <= FUSED_DEPTH_THREADS and _kernel() is not None)


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
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the fused loop needs numba")
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


@functools.cache
def _kernel():
    """The compiled loop, or None without numba: compiled on first use (1-2 s for each dtype), then read
    from numba's on-disk cache (``gradsign/__pycache__``, or numba's user-wide cache where that is not
    writable; where neither is, numba refuses to set it up and the engine does without)."""
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        from gradsign import _sign_loops
    except (ImportError, RuntimeError):
        return None
    return _sign_loops.product_signs
