"""Local feature maps: each pixel x in [0, 1] becomes a unit vector phi(x) of length d = 2.

Stoudenmire & Schwab's map is ``"cos-sin"``: phi(x) = (cos(pi x / 2), sin(pi x / 2)), so a
white pixel (0) is (1, 0) and a black one (1) is (0, 1), and every sample's product state
phi(x_1) (x) ... (x) phi(x_N) has norm 1. ``"linear"`` is phi(x) = (1 - x, x) (TorchMPS's map,
not normalised).

    >>> import numpy as np
    >>> site_major(np.array([[0.0, 1.0]]), "cos-sin").round(3).tolist()
    [[[1.0, 0.0]], [[0.0, 1.0]]]

Two layouts: ``site_major`` (N, n, d), so that one site's features of a batch tile are one
contiguous block (the sweeps register one per site and tile), and ``sample_major`` (n, N, d)
for inference, where a task walks the whole chain for its samples.
"""
from __future__ import annotations

from typing import Any

import numpy as np

FEATURE_MAPS = ("cos-sin", "linear")
LOCAL_DIM = 2


def check_feature_map(name: Any) -> str:
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map={name!r} is not valid; valid values: {', '.join(FEATURE_MAPS)}")
    return name


def check_pixels(x: Any, n_sites: int, what: str = "X") -> np.ndarray:
    """(n, n_sites) float64 pixels in [0, 1] from an array of n samples of n_sites values each
    (images of any shape are flattened); raises one ValueError saying what is wrong."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a numeric array, got {type(x).__name__}: {exc}") from None
    if arr.ndim < 2 or arr.shape[0] < 1:
        raise ValueError(f"{what} must hold at least one sample as an array of shape (n, ...), "
                         f"got shape {arr.shape}")
    arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[1] != n_sites:
        raise ValueError(f"{what} has {arr.shape[1]} values per sample, but the MPS has n_sites={n_sites}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what} values must lie in [0, 1] (scale pixels first), got range [{lo:g}, {hi:g}]")
    return arr


def _phi(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "cos-sin":
        return np.cos(0.5 * np.pi * x), np.sin(0.5 * np.pi * x)
    return 1.0 - x, x


def site_major(x: np.ndarray, kind: str, dtype: Any = np.float64) -> np.ndarray:
    """phi of (n, N) pixels as a C-contiguous (N, n, d) array."""
    a, b = _phi(np.asarray(x, dtype=np.float64).T, check_feature_map(kind))
    return np.ascontiguousarray(np.stack([a, b], axis=-1), dtype=dtype)


def sample_major(x: np.ndarray, kind: str, dtype: Any = np.float64) -> np.ndarray:
    """phi of (n, N) pixels as a C-contiguous (n, N, d) array."""
    a, b = _phi(np.asarray(x, dtype=np.float64), check_feature_map(kind))
    return np.ascontiguousarray(np.stack([a, b], axis=-1), dtype=dtype)
