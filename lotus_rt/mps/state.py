"""The MPS classifier's parameters: site tensors, the labelled centre, and where it sits.

State. ``sites`` is one (N, D, d, D) array: site j's tensor A_j[a, s, b], padded with zeros
beyond the current ranks of its two bonds (D = ``bond_dim``, the cap), so that every task of a
sweep has a fixed shape whatever the SVD truncation keeps. ``center`` (D, d, D, L) is the site
tensor at ``center_site`` with the label index attached; ``sites[center_site]`` is stale while
it is there. The model is

    f_l(x) = sum A_0[s_0] ... A_{c-1}[s_{c-1}] C[s_c, l] A_{c+1}[s_{c+1}] ... A_{N-1}[s_{N-1}]
             phi(x_0)_{s_0} ... phi(x_{N-1})_{s_{N-1}},

and a sample's class is the arg-max of f over l. ``ranks`` holds each bond's current rank
(N + 1 entries, the two outer bonds of rank 1).

``random`` starts from left-orthonormal sites left of the centre and right-orthonormal sites
right of it (random isometries from QR), ranks min(D, d^k, d^(N-k)), and a small random centre.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class MPSState:
    sites: np.ndarray     # (N, D, d, D)
    center: np.ndarray    # (D, d, D, L)
    center_site: int
    ranks: list[int]      # N + 1 bond ranks

    @property
    def n_sites(self) -> int:
        return self.sites.shape[0]

    @property
    def bond_dim(self) -> int:
        return self.sites.shape[1]

    @property
    def n_labels(self) -> int:
        return self.center.shape[3]

    @property
    def dtype(self) -> np.dtype:
        return self.sites.dtype

    def n_parameters(self) -> int:
        """Parameters at the current ranks (the padding excluded)."""
        d, r = self.sites.shape[2], self.ranks
        return sum(r[j] * d * r[j + 1] * (self.n_labels if j == self.center_site else 1)
                   for j in range(self.n_sites))

    def dense_sites(self) -> list[np.ndarray]:
        """Every site at its true ranks, the centre (with its label axis last) in its place."""
        r = self.ranks
        out = [self.sites[j, :r[j], :, :r[j + 1]].copy() for j in range(self.n_sites)]
        c = self.center_site
        out[c] = self.center[:r[c], :, :r[c + 1], :].copy()
        return out


def initial_ranks(n_sites: int, bond_dim: int, d: int) -> list[int]:
    return [int(min(bond_dim, d ** min(k, 62), d ** min(n_sites - k, 62))) for k in range(n_sites + 1)]


def random(n_sites: int, bond_dim: int, d: int, n_labels: int, center_site: int, seed: Any,
           dtype: Any = np.float64, center_scale: float = 1e-2) -> MPSState:
    rng = np.random.default_rng(seed)
    ranks = initial_ranks(n_sites, bond_dim, d)
    sites = np.zeros((n_sites, bond_dim, d, bond_dim), dtype=dtype)
    for j in range(n_sites):
        rl, rr = ranks[j], ranks[j + 1]
        if j < center_site:    # left-orthonormal: sum_{a,s} A[a,s,b] A[a,s,b'] = delta
            q, _ = np.linalg.qr(rng.standard_normal((rl * d, rr)))
            sites[j, :rl, :, :rr] = q.reshape(rl, d, rr)
        elif j > center_site:  # right-orthonormal
            q, _ = np.linalg.qr(rng.standard_normal((d * rr, rl)))
            sites[j, :rl, :, :rr] = q.T.reshape(rl, d, rr)
    center = np.zeros((bond_dim, d, bond_dim, n_labels), dtype=dtype)
    rl, rr = ranks[center_site], ranks[center_site + 1]
    center[:rl, :, :rr] = center_scale * rng.standard_normal((rl, d, rr, n_labels))
    return MPSState(sites, center, center_site, ranks)
