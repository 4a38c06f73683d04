"""CuPy entry point: the array-API providers on cupy arrays.

The generic machinery needs nothing cupy-specific: give the providers of
:mod:`xinfluence.backends.numpy` cupy parameters and every result (curvature,
solves, influences) stays on the GPU. Importing this module imports cupy and
checks that a CUDA device is present::

    import cupy as cp
    from xinfluence.backends.cupy import SoftmaxRegressionGradients

    gp = SoftmaxRegressionGradients(cp.asarray(w), cp.asarray(b))
    infl = xi.DirectInfluence(gp, regularization=1e-3).fit((cp.asarray(x), cp.asarray(y)))
"""

from __future__ import annotations

import cupy

from .numpy import (
    FiniteDifferenceGradients,
    LinearRegressionGradients,
    LogisticRegressionGradients,
    SoftmaxRegressionGradients,
)

__all__ = [
    "FiniteDifferenceGradients",
    "LinearRegressionGradients",
    "LogisticRegressionGradients",
    "SoftmaxRegressionGradients",
    "device_count",
]


def device_count() -> int:
    """Number of CUDA devices cupy sees (0 where there is no driver)."""
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0
