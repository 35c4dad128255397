"""The fused sign-count loop of ``gradsign.sign_kernels``, compiled by numba (imported only where numba is
installed and the loop is used)."""
import numba
import numpy as np


@numba.njit(inline="always", boundscheck=False, cache=True)
def quad(q0, q1, q2, q3, p):
    """Four rows' factors at positions p..p+3, row by row."""
    return (q0[p], q0[p + 1], q0[p + 2], q0[p + 3], q1[p], q1[p + 1], q1[p + 2], q1[p + 3],
            q2[p], q2[p + 1], q2[p + 2], q2[p + 3], q3[p], q3[p + 1], q3[p + 2], q3[p + 3])


# "contract" lets multiply-adds fuse; no other fast-math flag (NaN must stay NaN, whose sign counts 0)
@numba.njit(cache=True, boundscheck=False, nogil=True, fastmath={"contract"})
def product_signs(a, b, counts, partial, signs, first, stop):
    """counts[o - first, i] += sum_s sign(a[s, o] . b[s, :, i]) for rows o from first to stop; depth and
    row numbers multiples of four; ``partial``: (4, columns), scratch for partial sums; ``signs``: (4,
    columns) int32, scratch for the four rows' sign sums (integer additions of the comparisons are
    cheaper than float ones), added to the counts after the last sample."""
    samples, depth = a.shape[0], a.shape[2]
    columns = b.shape[2]
    v0, v1, v2, v3 = partial[0], partial[1], partial[2], partial[3]
    t0, t1, t2, t3 = signs[0], signs[1], signs[2], signs[3]
    last = depth - 4
    for o in range(first, stop, 4):
        signs[:, :] = 0
        for s in range(samples):
            q0, q1, q2, q3 = a[s, o], a[s, o + 1], a[s, o + 2], a[s, o + 3]
            bs = b[s]
            if last:  # the first four positions' products, then four more at a time
                a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33 = quad(
                    q0, q1, q2, q3, 0)
                b0, b1, b2, b3 = bs[0], bs[1], bs[2], bs[3]
                for i in range(columns):
                    c0, c1, c2, c3 = b0[i], b1[i], b2[i], b3[i]
                    v0[i] = a00 * c0 + a01 * c1 + a02 * c2 + a03 * c3
                    v1[i] = a10 * c0 + a11 * c1 + a12 * c2 + a13 * c3
                    v2[i] = a20 * c0 + a21 * c1 + a22 * c2 + a23 * c3
                    v3[i] = a30 * c0 + a31 * c1 + a32 * c2 + a33 * c3
                for p in range(4, last, 4):
                    a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33 = quad(
                        q0, q1, q2, q3, p)
                    b0, b1, b2, b3 = bs[p], bs[p + 1], bs[p + 2], bs[p + 3]
                    for i in range(columns):
                        c0, c1, c2, c3 = b0[i], b1[i], b2[i], b3[i]
                        v0[i] += a00 * c0 + a01 * c1 + a02 * c2 + a03 * c3
                        v1[i] += a10 * c0 + a11 * c1 + a12 * c2 + a13 * c3
                        v2[i] += a20 * c0 + a21 * c1 + a22 * c2 + a23 * c3
                        v3[i] += a30 * c0 + a31 * c1 + a32 * c2 + a33 * c3
            # the last four positions' products finish each sum, whose sign is added at once (two
            # copies of the loop: one branch inside it costs a third of its speed)
            a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33 = quad(
                q0, q1, q2, q3, last)
            b0, b1, b2, b3 = bs[last], bs[last + 1], bs[last + 2], bs[last + 3]
            if last:
                for i in range(columns):
                    c0, c1, c2, c3 = b0[i], b1[i], b2[i], b3[i]
                    x0 = v0[i] + a00 * c0 + a01 * c1 + a02 * c2 + a03 * c3
                    x1 = v1[i] + a10 * c0 + a11 * c1 + a12 * c2 + a13 * c3
                    x2 = v2[i] + a20 * c0 + a21 * c1 + a22 * c2 + a23 * c3
                    x3 = v3[i] + a30 * c0 + a31 * c1 + a32 * c2 + a33 * c3
                    t0[i] += np.int32(x0 > 0) - np.int32(x0 < 0)
                    t1[i] += np.int32(x1 > 0) - np.int32(x1 < 0)
                    t2[i] += np.int32(x2 > 0) - np.int32(x2 < 0)
                    t3[i] += np.int32(x3 > 0) - np.int32(x3 < 0)
            else:
                for i in range(columns):
                    c0, c1, c2, c3 = b0[i], b1[i], b2[i], b3[i]
                    x0 = a00 * c0 + a01 * c1 + a02 * c2 + a03 * c3
                    x1 = a10 * c0 + a11 * c1 + a12 * c2 + a13 * c3
                    x2 = a20 * c0 + a21 * c1 + a22 * c2 + a23 * c3
                    x3 = a30 * c0 + a31 * c1 + a32 * c2 + a33 * c3
                    t0[i] += np.int32(x0 > 0) - np.int32(x0 < 0)
                    t1[i] += np.int32(x1 > 0) - np.int32(x1 < 0)
                    t2[i] += np.int32(x2 > 0) - np.int32(x2 < 0)
                    t3[i] += np.int32(x3 > 0) - np.int32(x3 < 0)
        r0, r1, r2, r3 = counts[o - first], counts[o - first + 1], counts[o - first + 2], counts[o - first + 3]
        for i in range(columns):
            r0[i] += t0[i]
            r1[i] += t1[i]
            r2[i] += t2[i]
            r3[i] += t3[i]


# "contract" only, as above: the sums are formed in the order a plain loop over positions forms them
@numba.njit(cache=True, boundscheck=False, nogil=True, fastmath={"contract"})
def depthwise_signs(x, g, signs, partial, kept, kept_sample, stride_h, stride_w, dilation_h, dilation_w, padding_h,
                    padding_w):
    """signs[a, b, c] += sum_s sign(sum_pq g[s, p, q, c] x[s, p stride_h + a dilation_h - padding_h,
    q stride_w + b dilation_w - padding_w, c]) (positions outside ``x`` are zeros) for channels-last ``x``
    (samples, height, width, channels) and ``g`` (samples, out height, out width, channels): the per-sample
    weight gradients of a depthwise convolution, summed along the channels, which are contiguous, so that
    every multiply-add is a vector one; ``partial``: (kernel height, kernel width, channels) scratch;
    ``kept``: an array of its shape that receives sample ``kept_sample``'s gradients (none if negative)."""
    samples, height, width, channels = x.shape
    out_h, out_w = g.shape[1], g.shape[2]
    kernel_h, kernel_w = partial.shape[0], partial.shape[1]
    for s in range(samples):
        partial[:, :, :] = 0
        for p in range(out_h):
            for a in range(kernel_h):
                i = p * stride_h + a * dilation_h - padding_h
                if i < 0 or i >= height:
                    continue
                for q in range(out_w):
                    gs = g[s, p, q]
                    for b in range(kernel_w):
                        j = q * stride_w + b * dilation_w - padding_w
                        if j < 0 or j >= width:
                            continue
                        xs = x[s, i, j]
                        v = partial[a, b]
                        for c in range(channels):
                            v[c] += gs[c] * xs[c]
        if s == kept_sample:
            kept[:, :, :] = partial
        for a in range(kernel_h):
            for b in range(kernel_w):
                v = partial[a, b]
                t = signs[a, b]
                for c in range(channels):
                    t[c] += np.int32(v[c] > 0) - np.int32(v[c] < 0)


@numba.njit(cache=True, boundscheck=False, nogil=True, fastmath={"contract"})
def grouped_product_signs(a, b, counts, partial, signs):
    """``product_signs`` of each group g into counts[g]: ``a``: (groups, samples, rows, depth), ``b``:
    (groups, samples, depth, columns), ``counts``: (groups, rows, columns); one call for all groups (a
    call from Python costs more than a group's loop on 2x2 maps)."""
    for g in range(a.shape[0]):
        product_signs(a[g], b[g], counts[g], partial, signs, 0, a.shape[2])
