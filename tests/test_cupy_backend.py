"""CuPy: the array-API providers keep everything on the GPU (skips without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from helpers import rel_err

cupy = pytest.importorskip("cupy")
backend = pytest.importorskip("xinfluence.backends.cupy")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(backend.device_count() < 1, reason="no CUDA device"),
]


def test_softmax_direct_and_cg_stay_on_gpu_and_match_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 3, size=40)
    w, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    from xinfluence.backends.numpy import SoftmaxRegressionGradients

    ref = (
        xi.DirectInfluence(SoftmaxRegressionGradients(w, b), regularization=1e-3)
        .fit((x, y))
        .influences(x[:4], y[:4], x, y, mode="perturbation")
    )
    gp = backend.SoftmaxRegressionGradients(cupy.asarray(w), cupy.asarray(b))
    xc, yc = cupy.asarray(x), cupy.asarray(y)
    for model in (
        xi.DirectInfluence(gp, regularization=1e-3),
        xi.CgInfluence(gp, regularization=1e-3, rtol=1e-12, preconditioner="nystroem"),
    ):
        out = model.fit((xc, yc)).influences(xc[:4], yc[:4], xc, yc, mode="perturbation")
        assert isinstance(out, cupy.ndarray)
        assert rel_err(out, ref) <= 1e-9
