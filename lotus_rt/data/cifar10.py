"""CIFAR-10 from the standard python pickle folder ``cifar-10-batches-py``, where the user has it.

``cifar10(data_dir=None)`` returns ``(x_train, y_train, x_test, y_test)``: float32 arrays
(N, 3, 32, 32) scaled to [0, 1] and int64 labels, read from ``data_batch_1`` .. ``data_batch_5``
(50 000 training images) and ``test_batch`` (10 000). Each file is a pickle of a dict whose
``b"data"`` is a (10000, 3072) uint8 array (1024 red, then 1024 green, then 1024 blue values
per row, each plane row-major) and ``b"labels"`` a list of ints in 0..9; ``batches.meta`` holds
``b"label_names"`` (``class_names()``). Nothing is downloaded: ``data_dir`` (the folder itself
or the folder that contains it) comes from the argument, else from ``LOTUS_DATA_DIR`` (read
through ``lotus_rt.runtime.settings``); when neither holds the files, one FileNotFoundError
names every place that was looked at.
"""
from __future__ import annotations

import pathlib
import pickle
from typing import Any

import numpy as np

from lotus_rt.runtime.settings import read_settings

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
FILES = TRAIN_FILES + (TEST_FILE, META_FILE)


def _candidates(data_dir: str | pathlib.Path | None) -> list[pathlib.Path]:
    roots = [data_dir] if data_dir is not None else [read_settings().data_dir]
    paths = []
    for root in roots:
        if root is None or str(root) == "":
            continue
        root = pathlib.Path(root).expanduser()
        paths += [root] if root.name == FOLDER else [root / FOLDER, root]
    return paths


def find(data_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """The cifar-10-batches-py folder under ``data_dir`` (or LOTUS_DATA_DIR) that has every file."""
    candidates = _candidates(data_dir)
    for path in candidates:
        if all((path / name).is_file() for name in FILES):
            return path
    if not candidates:
        raise FileNotFoundError("CIFAR-10: no data folder given: pass --data-dir (data_dir=) or set "
                                f"LOTUS_DATA_DIR to the folder holding {FOLDER} (lotus_rt downloads nothing)")
    details = []
    for path in candidates:
        missing = [name for name in FILES if not (path / name).is_file()]
        details.append(f"{path} ({'missing' if not path.is_dir() else 'lacks ' + ', '.join(missing)})")
    raise FileNotFoundError(f"CIFAR-10 not found: looked in {'; '.join(details)}; expected the python "
                            f"pickle folder {FOLDER} with {', '.join(FILES)} (lotus_rt downloads nothing)")


def _load_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    try:
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"CIFAR-10: {path} is not a CIFAR-10 batch (a dict with b'data' and b'labels')") from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"CIFAR-10: {path}: expected uint8 data of shape (N, 3072) and N labels, got "
                         f"{data.dtype} {data.shape} and {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10: {path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def class_names(data_dir: str | pathlib.Path | None = None) -> list[str]:
    """The ten class names of ``batches.meta``."""
    with open(find(data_dir) / META_FILE, "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]


def cifar10(data_dir: str | pathlib.Path | None = None, as_torch: bool = False) -> tuple[Any, ...]:
    """(x_train, y_train, x_test, y_test); see the module docstring."""
    folder = find(data_dir)
    train = [_load_batch(folder / name) for name in TRAIN_FILES]
    x_test, y_test = _load_batch(folder / TEST_FILE)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    parts = (x_train.astype(np.float32) / 255.0, y_train, x_test.astype(np.float32) / 255.0, y_test)
    if as_torch:
        import torch
        return tuple(torch.from_numpy(np.ascontiguousarray(p)) for p in parts)
    return tuple(np.ascontiguousarray(p) for p in parts)


def write_synthetic(folder: str | pathlib.Path, per_batch: int = 20, seed: int = 0) -> pathlib.Path:
    """Write a small CIFAR-10 folder in the exact format (random images, ``per_batch`` per file):
    for tests and for trying a pipeline without the real data set. Returns the folder."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in TRAIN_FILES + (TEST_FILE,):
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{k}.png".encode() for k in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / META_FILE, "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f)
    return folder
