"""Convolution codelet bodies: unfold (im2col), its adjoint fold (col2im), and bias add/sum.

``unfold``: ``cols[c, i, j, n, p, q] = x_padded[n, c, p*s_h + i*d_h, q*s_w + j*d_w]``, the
(kernel offset x output position) view of every sliding window, so a convolution becomes a
contraction of ``cols`` with the kernel. Channel-major like the classic im2col matrix
(C*kh*kw, N*Ho*Wo): contracting (c, i, j) with a kernel is then a GEMM on ``cols`` as stored. ``fold`` is its adjoint: it scatters-adds ``cols``
back into an image (the input gradient of a convolution). Both loop over the kh*kw kernel
offsets and move whole strided slabs, so the work is a few large copies, not a per-pixel loop;
each offset touches only the window that falls inside the image (no padded copy is made).

Flat shifts. When the convolution has stride 1 and keeps the image size ("same": e.g. 3x3 with
padding 1), kernel offset (i, j) is a shift of the whole channel-major image (n, h, w) flattened
to one axis, by ``(i*d_h - p_h) * w + (j*d_w - p_w)`` elements: unfold and fold then move each
channel as one long contiguous run instead of n*h short rows of w (at 16x16 images on one
thread: fold about 2.2x, unfold about 1.3x faster; benchmarks/RESULTS.md). The elements a shift
carries across a row or sample border are the ones that fall in the padding; a 0/1 mask over
(h, w) zeroes them (exact, no subtraction).

The same code serves NumPy (CPU) and CuPy (GPU) through the array module ``xp``.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

Pair = tuple[int, int]


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def columns_shape(x_shape: tuple[int, ...], kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> tuple[int, ...]:
    """The shape of ``unfold``'s columns for an (n, c, h, w) input: (c, kh, kw, n, ho, wo)."""
    n, c, h, w = x_shape
    return (c,) + tuple(kernel) + (n,) + tuple(output_size(size, k, s, p, d) for size, k, s, p, d in
                                               zip((h, w), kernel, stride, padding, dilation))


def _valid_range(size: int, out_size: int, offset: int, stride: int) -> tuple[int, int, slice]:
    """For one kernel offset along one axis: the output positions [lo, hi) whose input position
    ``o * stride + offset`` (offset = kernel index * dilation - padding) falls inside the image,
    and the slice of input positions they read."""
    lo = min(out_size, -(offset // stride) if offset < 0 else 0)  # ceil(-offset / stride)
    hi = min(out_size, (size - 1 - offset) // stride + 1) if size - 1 - offset >= 0 else 0
    if hi <= lo:
        return lo, lo, slice(0, 0)
    first = lo * stride + offset
    return lo, hi, slice(first, first + stride * (hi - lo - 1) + 1, stride)


def _windows(shape_hw: Pair, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair, out_hw: Pair):
    """Per kernel offset (i, j): the valid output window (rows, cols slices of cols[..., p, q])
    and the input window it reads (strided slices of the unpadded image)."""
    (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = shape_hw, kernel, stride, padding, dilation, out_hw
    for i in range(kh):
        p0, p1, in_rows = _valid_range(h, ho, i * dh - ph, sh)
        for j in range(kw):
            q0, q1, in_columns = _valid_range(w, wo, j * dw - pw, sw)
            yield i, j, (slice(p0, p1), slice(q0, q1)), (in_rows, in_columns)


def _flat_shifts(shape_hw: Pair, out_hw: Pair, kernel: Pair, stride: Pair, padding: Pair,
                 dilation: Pair) -> list[tuple[int, int, int, int]] | None:
    """Per kernel offset: (i, j, oy, ox), the input position minus the output position, when the
    flat-shift path applies (stride 1, output size == input size); else None."""
    if tuple(stride) != (1, 1) or tuple(out_hw) != tuple(shape_hw):
        return None
    return [(i, j, i * dilation[0] - padding[0], j * dilation[1] - padding[1])
            for i in range(kernel[0]) for j in range(kernel[1])]


@functools.lru_cache(maxsize=256)
def _valid_mask(xp: Any, hw: Pair, oy: int, ox: int, dtype: Any) -> Any | None:
    """(h*w,) 0/1 mask of the output positions whose input position (p+oy, q+ox) is inside the
    image; None when all are. Cached: callers only read it."""
    h, w = hw
    p0, p1, q0, q1 = max(0, -oy), min(h, h - oy), max(0, -ox), min(w, w - ox)
    if (p0, p1, q0, q1) == (0, h, 0, w):
        return None
    mask = xp.zeros((h, w), dtype)
    mask[p0:p1, q0:q1] = 1
    return mask.reshape(h * w)


def _padded_flat(xp: Any, image_shape: tuple[int, ...], shifts: list[tuple[int, int, int, int]],
                 dtype: Any) -> tuple[Any, Any, int]:
    """For an (n, c, h, w) image: a (c, n*h*w + 2*margin) buffer with zeroed margins wide enough
    for every shift, its (c, n*h*w) middle (not initialised), and the margin."""
    n, c, h, w = image_shape
    length = n * h * w
    margin = max(abs(oy * w + ox) for _, _, oy, ox in shifts)
    big = xp.empty((c, length + 2 * margin), dtype)
    big[:, :margin] = 0
    big[:, margin + length:] = 0
    return big, big[:, margin:margin + length], margin


def _flat_unfold(xp: Any, x: Any, cols: Any, shifts: list[tuple[int, int, int, int]]) -> None:
    n, c, h, w = x.shape
    length = n * h * w
    big, middle, margin = _padded_flat(xp, x.shape, shifts, x.dtype)
    middle.reshape(c, n, h, w)[...] = x.swapaxes(0, 1)  # channel-major copy between zero margins
    for i, j, oy, ox in shifts:
        start = margin + oy * w + ox
        source = big[:, start:start + length].reshape(c, n, h * w)
        dst = cols[:, i, j].reshape(c, n, h * w)
        mask = _valid_mask(xp, (h, w), oy, ox, x.dtype)
        if mask is None:
            dst[...] = source
        else:
            xp.multiply(source, mask, out=dst)


def _flat_fold(xp: Any, cols: Any, x: Any, shifts: list[tuple[int, int, int, int]]) -> None:
    n, c, h, w = x.shape
    length = n * h * w
    big, middle, margin = _padded_flat(xp, x.shape, shifts, x.dtype)
    middle[...] = 0
    masked = xp.empty((c, n, h * w), x.dtype)
    for i, j, oy, ox in shifts:
        start = margin + oy * w + ox
        source = cols[:, i, j].reshape(c, n, h * w)
        mask = _valid_mask(xp, (h, w), oy, ox, x.dtype)
        if mask is not None:
            source = xp.multiply(source, mask, out=masked)
        big[:, start:start + length] += source.reshape(c, length)
    x[...] = middle.reshape(c, n, h, w).swapaxes(0, 1)


def _unfold(xp: Any, x: Any, cols: Any, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> None:
    shifts = _flat_shifts(x.shape[2:], cols.shape[4:], kernel, stride, padding, dilation)
    if shifts is not None:
        _flat_unfold(xp, x, cols, shifts)
        return
    # Each kernel offset copies the part of the image it sees and zeroes the strips that fall in
    # the padding: no padded copy of the image is made.
    channels_first = x.swapaxes(0, 1)  # (c, n, h, w) view, cols' own order
    ho, wo = cols.shape[4:]
    for i, j, (rows, columns), (in_rows, in_columns) in _windows(x.shape[2:], kernel, stride, padding, dilation, (ho, wo)):
        dst = cols[:, i, j]
        dst[:, :, rows, columns] = channels_first[:, :, in_rows, in_columns]
        if rows.start > 0:
            dst[:, :, :rows.start] = 0
        if rows.stop < ho:
            dst[:, :, rows.stop:] = 0
        if columns.start > 0:
            dst[:, :, rows, :columns.start] = 0
        if columns.stop < wo:
            dst[:, :, rows, columns.stop:] = 0


def _fold(xp: Any, cols: Any, x: Any, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> None:
    # Accumulate in cols' channel-major order (contiguous slabs), then transpose once into x.
    n, c, h, w = x.shape
    shifts = _flat_shifts((h, w), cols.shape[4:], kernel, stride, padding, dilation)
    if shifts is not None:
        _flat_fold(xp, cols, x, shifts)
        return
    acc = xp.zeros((c, n, h, w), dtype=x.dtype)
    for i, j, (rows, columns), (in_rows, in_columns) in _windows((h, w), kernel, stride, padding, dilation, cols.shape[4:]):
        acc[:, :, in_rows, in_columns] += cols[:, i, j, :, rows, columns]
    x[...] = acc.swapaxes(0, 1)


def unfold_cpu(x, cols, *, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> None:
    _unfold(np, x, cols, kernel, stride, padding, dilation)


def unfold_gpu(x, cols, *, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> None:
    import cupy
    _unfold(cupy, x, cols, kernel, stride, padding, dilation)


def fold_cpu(cols, x, *, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> None:
    _fold(np, cols, x, kernel, stride, padding, dilation)


def fold_gpu(cols, x, *, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> None:
    import cupy
    _fold(cupy, cols, x, kernel, stride, padding, dilation)


def _bias_shape(y_shape: tuple[int, ...], axis: int, span: int) -> list[int]:
    return [1] * axis + list(y_shape[axis:axis + span]) + [1] * (len(y_shape) - axis - span)


def bias_add_cpu(bias, y, *, axis: int, span: int = 1) -> None:
    """``y += bias`` where the (flat) bias runs along y's axes axis .. axis+span-1."""
    y += bias.reshape(_bias_shape(y.shape, axis, span))


bias_add_gpu = bias_add_cpu  # the same array expression works on CuPy arrays


def bias_grad_cpu(grad, out, *, axis: int, span: int = 1) -> None:
    axes = tuple(k for k in range(grad.ndim) if not axis <= k < axis + span)
    out[...] = grad.sum(axis=axes).reshape(out.shape)


bias_grad_gpu = bias_grad_cpu
