"""Sign counts of shallow per-sample products in one fused loop (compiled by numba, where it is installed).

A layer's per-sample gradient over a few positions or rows of a sample (a convolution on maps of up to
4x4, a Linear on up to 16 tokens) is ``a_s b_s`` with ``a_s``: (rows, depth), ``b_s``: (depth,
columns), and GradSign needs ``sum_s sign(a_s b_s)``. Formed by torch, as a batched product into a
buffer, its sign and its sum over the samples, the work is bound by memory traffic (three passes over
samples x weights floats for a few multiply-adds each). The loop here takes four weight rows at a time,
adds four positions' products at a time into one row of partial sums per weight row (which stays in
cache), and adds the sign of each finished product to the counts at once: 2.3-3.2x faster than torch
at depth 4 and 1.3-1.7x at depth 16 on the zoo's layers (``python bench/layer_kernels.py --products
--threads 1 --batch-size 32``). The products are those of the torch way up to the order of their
additions (float rounding).

Numba is optional (``pip install gradsign[fast]``); without it, for other dtypes than float32 and
float64, and with more than one torch thread, ``fused_available`` says no and the engine forms the
products with torch.
"""
from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

FUSED_DTYPES = (torch.float32, torch.float64)


def fused_available(a: torch.Tensor) -> bool:
    """Whether ``add_product_signs`` takes these factors: numba installed, a CPU tensor of float32 or
    float64, and torch running one thread. With more, torch's idle threads spin-wait after each of its
    operations, on the cores this loop would use, and slow it down 2-3x: in the engine, with two torch
    threads, it was then no faster than torch's own two-thread product (on the zoo's ResNet and RegNetX
    layers on 2x2 maps) and slower at depth 16. The CLI's scoring workers run one torch thread each."""
    return (a.device.type == "cpu" and a.dtype in FUSED_DTYPES and torch.get_num_threads() == 1
            and _kernel() is not None)


def add_product_signs(a: torch.Tensor, b: torch.Tensor, totals: torch.Tensor) -> None:
    """``totals[o, i] += sum_s sign(sum_p a[s, o, p] b[s, p, i])`` for ``a``: (samples, rows, depth) and
    ``b``: (samples, depth, columns), in place on ``totals`` (rows, columns)."""
    samples, rows, depth = a.shape
    columns = b.shape[2]
    # rows and depth padded with zeros to multiples of four: a padded product adds 0 * 0, exactly zero
    padded_rows, padded_depth = -(-rows // 4) * 4, -(-depth // 4) * 4
    a = _zero_padded(a.detach(), (samples, padded_rows, padded_depth))
    b = _zero_padded(b.detach(), (samples, padded_depth, columns))
    counts = np.zeros((padded_rows, columns), dtype=a.dtype)
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the fused loop needs numba")
    kernel(a, b, counts, np.empty((4, columns), dtype=a.dtype))
    totals += torch.from_numpy(counts[:rows]).to(totals.dtype)


def _zero_padded(t: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    if t.shape == shape:
        return np.ascontiguousarray(t.numpy())
    padded = np.zeros(shape, dtype=t.numpy().dtype)
    padded[tuple(slice(0, n) for n in t.shape)] = t.numpy()
    return padded


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
