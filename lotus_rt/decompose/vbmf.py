"""Empirical Variational Bayesian Matrix Factorization (Nakajima et al. 2013): the rank of a noisy
low-rank matrix, and its noise variance; used by the "vbmf" rank forms of Tucker-2 and TT."""
from __future__ import annotations

import math

import numpy as np

from ._base import _as_float64


def _evb_tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """Solution tau of x = (1 + tau)(1 + alpha / tau), the larger root."""
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2: float, s: np.ndarray, m: int, alpha: float, xubar: float) -> float:
    """EVB free energy as a function of the noise variance (Nakajima et al. 2013), full SVD (H = L)."""
    x = s ** 2 / (m * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau_z1 = _evb_tau(z1, alpha)
    return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - tau_z1) + np.sum(np.log((tau_z1 + 1) / z1))
                 + alpha * np.sum(np.log(tau_z1 / alpha + 1)))


def _minimize_bounded(func, lo: float, hi: float, grid: int = 200, iters: int = 80) -> float:
    """Minimise a 1-D function on [lo, hi]: log-spaced grid, then golden-section around the best."""
    xs = np.geomspace(lo, hi, grid)
    k = int(np.argmin([func(x) for x in xs]))
    a, b = np.log(xs[max(k - 1, 0)]), np.log(xs[min(k + 1, grid - 1)])
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = func(math.exp(c)), func(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = func(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = func(math.exp(d))
    best = math.exp((a + b) / 2)
    return best if func(best) <= func(xs[k]) else float(xs[k])


def _evb_noise_variance(s: np.ndarray, l: int, m: int, xubar: float) -> float:
    """Noise variance minimising the EVB free energy between the paper's lower and upper bounds."""
    alpha = l / m
    eh_ub = int(min(math.ceil(l / (1 + alpha)) - 1, l)) - 1
    upper = float(np.sum(s ** 2)) / (l * m)
    lower = max(s[eh_ub + 1] ** 2 / (m * xubar), float(np.mean(s[eh_ub + 1:] ** 2)) / m)
    if not lower < upper:
        return upper
    return _minimize_bounded(lambda v: _evb_objective(v, s, m, alpha, xubar), lower, upper)


def _evb_spectrum(matrix, name: str) -> tuple[np.ndarray, int, int, float]:
    """Singular values of the matrix (made L <= M), L, M and the threshold factor (1 + tau)(1 + alpha / tau)."""
    y, _ = _as_float64(matrix, 2, name)
    l, m = sorted(y.shape)
    s = np.linalg.svd(y, compute_uv=False)
    alpha = l / m
    tau_bar = 2.5129 * math.sqrt(alpha)
    return s, l, m, (1 + tau_bar) * (1 + alpha / tau_bar)


def vbmf_noise_variance(matrix) -> float:
    """Noise variance (per entry) of a noisy low-rank matrix that minimises the EVB free energy.

    The search runs between the bounds of Nakajima et al. (2013): the mean energy per entry above,
    and what the trailing singular values (beyond the largest rank EVBMF can keep) imply below.
    """
    s, l, m, xubar = _evb_spectrum(matrix, "vbmf_noise_variance")
    return _evb_noise_variance(s, l, m, xubar)


def vbmf_rank(matrix, sigma2: float | None = None) -> int:
    """Rank chosen by analytic Empirical VBMF (Nakajima et al. 2013) for a noisy low-rank matrix.

    Singular values above ``sqrt(M * sigma2 * (1 + tau)(1 + alpha / tau))`` are kept (L <= M the
    matrix's sizes, alpha = L / M, tau = 2.5129 sqrt(alpha)); the noise variance ``sigma2``, when
    not given, is ``vbmf_noise_variance(matrix)``. A numerically rank-deficient matrix (no noise)
    gets its numerical rank. May return 0 (all noise).
    """
    s, l, m, xubar = _evb_spectrum(matrix, "vbmf_rank")
    if s[0] == 0:
        return 0
    numerical_rank = int(np.sum(s > s[0] * m * np.finfo(np.float64).eps))
    if numerical_rank < l and sigma2 is None:
        return numerical_rank
    if sigma2 is None:
        sigma2 = _evb_noise_variance(s, l, m, xubar)
    return int(np.sum(s > math.sqrt(m * sigma2 * xubar)))
