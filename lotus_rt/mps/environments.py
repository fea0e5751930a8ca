"""Per-sample environments of the training set, cached per cut and batch tile.

State. The samples are cut into T batch tiles (contiguous ranges). For each cut k = 0..N (cut
k lies between sites k-1 and k) and tile t, ``main[k][t]`` is a registered (n_t, 1, D) array
that holds *either* the left environment of cut k (sites 0..k-1 contracted with the tile's
features) *or* its right environment (sites k..N-1): a two-site update of bond (j, j+1) reads
left cut j and right cut j+2, and a sweep only ever needs, at each cut, the side that faces
the centre. Once a bond is updated and its SVD has moved the centre on, one environment is
recomputed from its neighbour (``submit_left`` / ``submit_right``, one O(n D^2 d) task per tile)
instead of contracting the chain again. Cuts 0 and N are the constant (1, 0, ..., 0).

``labelled_left[k][t]`` and ``labelled_right[k][t]``, (n_t, L, D), exist only for the real-space
parallel sweep: environments that carry (a copy of) the label index, see ``realspace``.

Every environment is normalised per sample (see ``lotus_rt.kernels.mps``); the arrays live here,
in NumPy, for the whole fit (one allocation of (N + 1) n D values; the labelled ones add about
N n L D), and the handles are views of them.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from lotus_rt.mps import codelets as cl
from lotus_rt.runtime import Handle, Runtime


def tile_ranges(n: int, ntiles: int) -> list[tuple[int, int]]:
    """``ntiles`` contiguous ranges covering 0..n as evenly as possible (no empty one)."""
    ntiles = max(1, min(int(ntiles), n))
    bounds = np.linspace(0, n, ntiles + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class TiledData:
    """Features (site-major, (N, n, d)) and labels of the training set, registered per site and tile."""

    def __init__(self, rt: Runtime, features: np.ndarray, labels: np.ndarray, ntiles: int):
        self.features, self.labels = features, labels
        self.n_sites, self.n_samples = features.shape[0], features.shape[1]
        self.tiles = tile_ranges(self.n_samples, ntiles)
        self.feat: list[list[Handle]] = [[rt.register(features[j, a:b]) for a, b in self.tiles]
                                         for j in range(self.n_sites)]
        self.label: list[Handle] = [rt.register(labels[a:b]) for a, b in self.tiles]

    @property
    def ntiles(self) -> int:
        return len(self.tiles)

    def handles(self) -> list[Handle]:
        return [h for row in self.feat for h in row] + self.label


class Environments:
    """``main[k][t]``, and for the real-space sweep ``labelled_left[k][t]`` / ``labelled_right[k][t]``
    (label-carrying left / right environments) at the cuts asked for."""

    def __init__(self, rt: Runtime, data: TiledData, bond_dim: int, n_labels: int, dtype: Any,
                 labelled_cuts: tuple[Sequence[int], Sequence[int]] = ((), ())):
        n_cuts = data.n_sites + 1
        self.array = np.zeros((n_cuts, data.n_samples, 1, bond_dim), dtype=dtype)
        self.array[0, :, 0, 0] = 1.0
        self.array[-1, :, 0, 0] = 1.0
        self.main: list[list[Handle]] = [[rt.register(self.array[k, a:b]) for a, b in data.tiles]
                                         for k in range(n_cuts)]
        left_cuts, right_cuts = (list(c) for c in labelled_cuts)
        shape = (len(left_cuts) + len(right_cuts), data.n_samples, n_labels, bond_dim)
        self.labelled_array = np.zeros(shape, dtype=dtype) if shape[0] else None
        self.labelled_left: dict[int, list[Handle]] = {}
        self.labelled_right: dict[int, list[Handle]] = {}
        for i, (store, k) in enumerate([(self.labelled_left, k) for k in left_cuts]
                                       + [(self.labelled_right, k) for k in right_cuts]):
            store[k] = [rt.register(self.labelled_array[i, a:b]) for a, b in data.tiles]

    def handles(self) -> list[Handle]:
        labelled = list(self.labelled_left.values()) + list(self.labelled_right.values())
        return [h for row in self.main + labelled for h in row]

    def nbytes(self) -> int:
        return self.array.nbytes + (0 if self.labelled_array is None else self.labelled_array.nbytes)


def submit_left(rt: Runtime, data: TiledData, src: list[Handle], site: Handle, out: list[Handle], j: int,
                name: str) -> None:
    """out[t] <- left environment one site further right: src[t] (cut j) through site j."""
    for t in range(data.ntiles):
        rt.submit(cl.ENV_LEFT, (src[t], "R"), (data.feat[j][t], "R"), (site, "R"), (out[t], "W"),
                  name=f"{name}.env[{t}]")


def submit_right(rt: Runtime, data: TiledData, src: list[Handle], site: Handle, out: list[Handle], j: int,
                 name: str) -> None:
    """out[t] <- right environment one site further left: src[t] (cut j+1) through site j."""
    for t in range(data.ntiles):
        rt.submit(cl.ENV_RIGHT, (src[t], "R"), (data.feat[j][t], "R"), (site, "R"), (out[t], "W"),
                  name=f"{name}.env[{t}]")


def submit_initial(rt: Runtime, data: TiledData, envs: Environments, sites: list[Handle], center_site: int) -> None:
    """Left environments of cuts 1..c and right environments of cuts N-1..c+1, from scratch."""
    for k in range(1, center_site + 1):
        submit_left(rt, data, envs.main[k - 1], sites[k - 1], envs.main[k], k - 1, "init")
    for k in range(data.n_sites - 1, center_site, -1):
        submit_right(rt, data, envs.main[k + 1], sites[k], envs.main[k], k, "init")
