"""The pairwise contraction kernel (one stacked GEMM over strided views) against numpy.einsum.
"""
from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("a_idx, b_idx, out_idx", [
    ("ik", "kj", "ij"),          # plain GEMM
    ("ki", "kj", "ij"),          # a stored (contracted, free): transposed view
    ("ik", "jk", "ij"),          # b stored (free, contracted): transposed view
    ("ik", "kj", "ji"),          # output wanted as (free_b, free_a): product of the transposes
    ("rnpq", "rij", "rijnpq"),   # batched outer product written swapped (CP conv backward)
    ("bkmi", "bkj", "bjmi"),     # batch + swapped output with two free indices of a
    ("zab", "bca", "zc"),        # several contracted indices in another order: copies
    ("xyk", "kz", "zxy"),        # output permutation that is neither natural nor swapped
    ("os", "npqs", "nopq"),      # 1x1 conv: one GEMM per sample n, the weight broadcast
    ("nchw", "cr", "nrhw"),      # per-sample GEMM written swapped
    ("nopq", "os", "npqs"),      # per-sample GEMM reading a transposed view
    ("or", "rnpq", "nopq"),      # per-sample GEMM over a strided (non-contiguous) view
    ("bnik", "bkj", "bnji"),     # shared batch b, then one-sided n, then swapped output
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pair_kernel_layouts_match_numpy(a_idx, b_idx, out_idx, dtype, rng):
    from lotus_rt.kernels import contract
    sizes = dict(zip("abchijkmnopqrswxyz", rng.integers(2, 6, 18).tolist()))
    a = rng.standard_normal([sizes[i] for i in a_idx]).astype(dtype)
    b = rng.standard_normal([sizes[i] for i in b_idx]).astype(dtype)
    spec = contract.pair_spec(a_idx, b_idx, out_idx)
    out = np.empty([sizes[i] for i in out_idx], dtype)
    contract.pair_cpu(a, b, out, spec=spec)
    reference = np.einsum(f"{a_idx},{b_idx}->{out_idx}", a.astype(np.float64), b.astype(np.float64))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.allclose(out, reference, rtol=tol, atol=tol)


def _strided(rng, shape, dtype, kind):
    """A fresh random array of ``shape`` stored in an unusual way (``kind``), as kernels meet it."""
    if kind == "contiguous":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "reversed":  # stored with its axes in reverse order (a transposed view)
        return np.ascontiguousarray(rng.standard_normal(shape[::-1]).astype(dtype).transpose())
    if kind == "reversed_view":
        return rng.standard_normal(shape[::-1]).astype(dtype).transpose()
    # "sliced": every other row of a taller array, as a batch tile reads a slab
    return rng.standard_normal((2 * shape[0],) + tuple(shape[1:])).astype(dtype)[::2]


@pytest.mark.parametrize("a_idx, b_idx, out_idx", [
    ("nopq", "npqs", "os"),      # weight gradient: samples summed after per-sample GEMMs
    ("nchw", "cr", "nrhw"),      # 1x1 conv on NCHW: per-sample GEMMs, no copy
    ("os", "npqs", "nopq"),
    ("rnpq", "rij", "rijnpq"),   # nothing contracted: an outer product
    ("ab", "b", "a"),            # matrix-vector
    ("a", "ab", "b"),            # vector-matrix
    ("ia", "ja", "ij"),
    ("zab", "bca", "zc"),
    ("xyk", "kz", "zxy"),
])
@pytest.mark.parametrize("kind", ["reversed_view", "sliced"])
def test_pair_kernel_strided_operands_match_numpy(a_idx, b_idx, out_idx, kind, rng):
    """The layout search works on the arrays' real strides: views that are neither contiguous
    nor transposed-contiguous still give einsum's result (a copy where a view cannot be BLAS'd)."""
    from lotus_rt.kernels import contract
    sizes = dict(zip("abchijkmnopqrswxyz", rng.integers(2, 6, 18).tolist()))
    a = _strided(rng, [sizes[i] for i in a_idx], np.float32, kind)
    b = _strided(rng, [sizes[i] for i in b_idx], np.float32, "contiguous")
    out = _strided(rng, [sizes[i] for i in out_idx], np.float32, kind)
    contract.pair_cpu(a, b, out, spec=contract.pair_spec(a_idx, b_idx, out_idx))
    reference = np.einsum(f"{a_idx},{b_idx}->{out_idx}", a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
