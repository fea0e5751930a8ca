"""Matrix-product-state classifiers trained by DMRG sweeps, run as task graphs on the runtime.

    >>> from lotus_rt.mps import MPSClassifier
    >>> clf = MPSClassifier(n_sites=196, bond_dim=20, sweep="realspace")   # doctest: +SKIP
    >>> clf.fit(x_train, y_train).score(x_test, y_test)                    # doctest: +SKIP

The model (Stoudenmire & Schwab, NeurIPS 2016): each pixel x becomes phi(x) = (cos, sin)(pi x / 2)
(``features``), and class scores are an MPS contracted with the product of the phi's, one site
per pixel, the label index on one site (the centre, ``state``). Training sweeps the centre
along the chain; at each bond two sites are merged, fitted to the labels by a local
least-squares solve over per-sample environments (``environments``, ``local``) and split back
by a truncated SVD that sets the bond's rank. Sweep engines: ``serial`` (one chain of tasks),
``batch`` (every gradient over batch tiles) and ``realspace`` (two segments concurrently,
joined at their boundary: Stoudenmire & White 2013). Codelet bodies: ``lotus_rt.kernels.mps``.
"""
from lotus_rt.mps.batch import BatchParallelSweep
from lotus_rt.mps.classifier import MPSClassifier, SweepReport
from lotus_rt.mps.realspace import RealSpaceSweep
from lotus_rt.mps.serial import SerialSweep

__all__ = ["MPSClassifier", "SweepReport", "SerialSweep", "BatchParallelSweep", "RealSpaceSweep"]
