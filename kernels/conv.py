"""Convolution codelet bodies: unfold (im2col), its adjoint fold (col2im), and bias add/sum.

``unfold``: ``cols[c, i, j, n, p, q] = x_padded[n, c, p*s_h + i*d_h, q*s_w + j*d_w]``, the
(kernel offset x output position) view of every sliding window, so a convolution becomes a
contraction of ``cols`` with the kernel. Channel-major like the classic im2col matrix
(C*kh*kw, N*Ho*Wo): contracting (c, i, j) with a kernel is then a GEMM on ``cols`` as stored. ``fold`` is its adjoint: it scatters-adds ``cols``
back into an image (the input gradient of a convolution). Both loop over the kh*kw kernel
offsets and move whole strided slabs, so the work is a few large copies, not a per-pixel loop.

The same code serves NumPy (CPU) and CuPy (GPU) through the array module ``xp``.
"""
from __future__ import annotations

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


def _windows(kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair):
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out_hw
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            yield i, j, rows, cols


def _unfold(xp: Any, x: Any, cols: Any, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> None:
    ph, pw = padding
    padded = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    out_hw = cols.shape[4:]
    for i, j, rows, columns in _windows(kernel, stride, dilation, out_hw):
        cols[:, i, j] = padded[:, :, rows, columns].swapaxes(0, 1)


def _fold(xp: Any, cols: Any, x: Any, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> None:
    ph, pw = padding
    n, c, h, w = x.shape
    padded = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    for i, j, rows, columns in _windows(kernel, stride, dilation, cols.shape[4:]):
        padded[:, :, rows, columns] += cols[:, i, j].swapaxes(0, 1)
    x[...] = padded[:, :, ph:ph + h, pw:pw + w]


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
