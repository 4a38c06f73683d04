"""Oracle 4 (array-API part): numpy and array-api-strict give the same numbers,
and results come back in the namespace, dtype and device of the parameters."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from array_api_compat import array_namespace

import xinfluence as xi
from helpers import rel_err
from xinfluence._xp import from_numpy, namespace_name
from xinfluence.backends.numpy import (
    LinearRegressionGradients,
    LogisticRegressionGradients,
    SoftmaxRegressionGradients,
)


def _models(rng):
    x = rng.normal(size=(23, 4))
    w3, b3 = rng.normal(size=(3, 4)), rng.normal(size=3)
    return {
        "linear": (LinearRegressionGradients, w3, b3, x, rng.normal(size=(23, 3))),
        "logistic": (LogisticRegressionGradients, w3[:1], b3[:1], x, (rng.random(23) > 0.5) * 1.0),
        "softmax": (SoftmaxRegressionGradients, w3, None, x, rng.integers(0, 3, size=23)),
    }


def _run(xp, model, mode, structure, device=None):
    rng = np.random.default_rng(7)
    cls, w, b, x, y = _models(rng)[model]

    def conv(a):
        dtype = xp.int64 if a.dtype.kind == "i" else xp.float64
        return from_numpy(np.asarray(a), dtype=dtype, device=device, xp=xp)

    gp = cls(conv(w), None if b is None else conv(b))
    batches = [(conv(x[s]), conv(y[s])) for s in (slice(0, 7), slice(7, 20), slice(20, 23))]
    infl = xi.DirectInfluence(gp, regularization=1e-3, block_structure=structure).fit(batches)
    out = infl.influences(conv(x[:5]), conv(y[:5]), conv(x), conv(y), mode=mode)
    assert namespace_name(array_namespace(out)) == namespace_name(xp)
    assert out.dtype == xp.float64
    return out


@pytest.mark.parametrize("model", ["linear", "logistic", "softmax"])
@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_backend_matches_numpy(xp, device, model, mode):
    import array_api_compat.numpy as np_xp

    structure = "parameter" if model != "softmax" else "full"
    reference = _run(np_xp, model, mode, structure)
    assert rel_err(_run(xp, model, mode, structure, device), reference) <= 1e-12


def test_strict_matches_numpy():
    strict = pytest.importorskip("array_api_strict")
    import array_api_compat.numpy as np_xp

    for model in ("linear", "logistic", "softmax"):
        reference = _run(np_xp, model, "perturbation", "full")
        assert rel_err(_run(strict, model, "perturbation", "full"), reference) <= 1e-12


def test_float32_parameters_give_float32(xp, device):
    rng = np.random.default_rng(0)
    w = from_numpy(rng.normal(size=(2, 3)), dtype=xp.float32, device=device, xp=xp)
    gp = LinearRegressionGradients(w)
    x = from_numpy(rng.normal(size=(9, 3)), dtype=xp.float32, device=device, xp=xp)
    y = from_numpy(rng.normal(size=(9, 2)), dtype=xp.float32, device=device, xp=xp)
    out = xi.DirectInfluence(gp, regularization=1e-2).fit((x, y)).influences(x, y)
    assert out.dtype == xp.float32
    # a float64 input does not fit float32 parameters without losing precision
    x64 = from_numpy(rng.normal(size=(9, 3)), dtype=xp.float64, device=device, xp=xp)
    with pytest.raises(TypeError, match="does not fit the parameters' dtype"):
        xi.DirectInfluence(gp, regularization=1e-2).fit((x64, y))


def test_import_pulls_in_no_optional_framework():
    code = (
        "import sys, xinfluence, xinfluence.backends.numpy, xinfluence.linalg, xinfluence.compute;"
        "optional = ('torch', 'jax', 'cupy', 'dask', 'zarr', 'distributed', 'tqdm');"
        "bad = [m for m in optional if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
