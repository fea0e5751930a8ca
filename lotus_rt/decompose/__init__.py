"""Tensor decompositions of dense tensors and weights, to build tensorized layers from trained dense
ones, and to compare with tensorly (``python -m benchmarks decompose``).

Pure NumPy: every decomposition works in float64 and returns arrays of the input's dtype
(float64 for non-float input). Each has its rank helper and its ``reconstruct_*`` inverse:

- ``tucker(T, ranks, modes=None)`` (``hooi.py``) -- HOSVD + HOOI of an N-way tensor over any
  subset of its modes, stopping when the relative error changes by less than ``tol`` (1e-4, as
  tensorly). ``tucker2(W, ranks)`` is the Tucker-2 of a convolution weight W (O, I, kh, kw) over
  its two channel modes (Kim et al. 2016): ``W[o, i, h, w] = sum_{s, r} last[o, s] first[i, r]
  core[s, r, h, w]`` with ``first`` (I, R_in), ``last`` (O, R_out) of orthonormal columns and
  ``core`` (R_out, R_in, kh, kw). Ranks are always the pair ``(R_in, R_out)``.
- ``cp(W, rank)`` / ``cp_als(T, rank)`` (``als.py``) -- CP by alternating least squares with a
  Tikhonov term that vanishes as the fit converges and stays while components turn degenerate
  (the concern of Phan et al. 2020); HOSVD initialisation padded with seeded random columns.
  ``W[o, i, h, w] = sum_r A_o[o, r] A_i[i, r] A_h[h, r] A_w[w, r]``, the weights absorbed in A_o.
- ``tt(T, ranks)`` and ``tt_matrix(W, in_shape, out_shape, ranks)`` (``ttsvd.py``) -- TT-SVD of an
  N-way tensor, and of a Linear weight W (out, in) into a TT-matrix (MPO) whose core ``G_k`` has
  shape ``(r_{k-1}, in_k, out_k, r_k)``, r_0 = r_d = 1 (layout in ``ttsvd.py``).

Rank helpers turn a user's rank into concrete ranks: ``tucker_ranks`` (int or one per mode),
``tucker2_ranks`` (int, fraction of the dense parameter count, an (R_in, R_out) pair, or "vbmf":
Empirical Variational Bayesian Matrix Factorization of the unfoldings, Nakajima et al. 2013,
``vbmf.py``), ``cp_rank`` (int or fraction) and ``tt_ranks`` (int, fraction or a list of the d-1
internal ranks). An int counts as a rank, a float in (0, 1] as the fraction of the dense layer's
parameters to keep; anything else is a ValueError. ``_base.py`` holds what they share.

Example::

    >>> import numpy as np
    >>> from lotus_rt import decompose
    >>> w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    >>> core, first, last = decompose.tucker2(w, (8, 16))          # full ranks: exact
    >>> core.shape, first.shape, last.shape, core.dtype
    ((16, 8, 3, 3), (8, 8), (16, 16), dtype('float32'))
    >>> decompose.relative_error(decompose.reconstruct_tucker2(core, first, last), w) < 1e-5
    True
    >>> core, factors = decompose.tucker(w, (4, 2), modes=(1, 3))   # any modes of an N-way tensor
    >>> core.shape, [f.shape for f in factors]
    ((16, 4, 3, 2), [(8, 4), (3, 2)])
    >>> lin = np.random.default_rng(1).standard_normal((6, 8))     # Linear weight (out, in)
    >>> cores = decompose.tt_matrix(lin, in_shape=(2, 4), out_shape=(3, 2), ranks=4)
    >>> [c.shape for c in cores]                                   # (r_{k-1}, in_k, out_k, r_k)
    [(1, 2, 3, 4), (4, 4, 2, 1)]
"""
from __future__ import annotations

from ._base import RankSpec, relative_error
from .als import cp, cp_als, cp_rank, reconstruct_cp
from .ttsvd import reconstruct_tt, reconstruct_tt_matrix, tt, tt_matrix, tt_ranks
from .hooi import (reconstruct_tucker, reconstruct_tucker2, tucker, tucker2, tucker2_core, tucker2_ranks,
                     tucker_modes, tucker_ranks)
from .vbmf import _evb_tau, vbmf_noise_variance, vbmf_rank  # noqa: F401  (_evb_tau: tested directly)

__all__ = [
    "tucker", "tucker2", "cp", "cp_als", "tt", "tt_matrix",
    "tucker_ranks", "tucker_modes", "tucker2_ranks", "cp_rank", "tt_ranks", "vbmf_rank", "vbmf_noise_variance",
    "reconstruct_tucker", "reconstruct_tucker2", "tucker2_core", "reconstruct_cp", "reconstruct_tt",
    "reconstruct_tt_matrix", "relative_error", "RankSpec",
]
