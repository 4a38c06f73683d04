"""Backend selection for the generic tests.

The generic tests take the ``xp`` fixture. Which namespace it is comes from the
environment variable ``XINFLUENCE_BACKEND`` (``numpy`` by default; the nox
sessions set it): ``numpy``, ``array_api_strict``, ``torch``, ``jax`` or
``cupy``. A backend that is not installed, or ``cupy`` without a CUDA device,
skips the generic tests instead of failing them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy")
BACKEND = os.environ.get("XINFLUENCE_BACKEND", "numpy")
if BACKEND not in BACKENDS:
    raise ValueError(f"XINFLUENCE_BACKEND must be one of {BACKENDS}, got {BACKEND!r}")


def _load(name: str):
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "array_api_strict":
        xp = pytest.importorskip("array_api_strict")
        return xp
    if name == "torch":
        torch = pytest.importorskip("torch")
        # the test models are tiny: OpenMP threads only spin against each other
        torch.set_num_threads(1)
        import array_api_compat.torch as xp

        return xp
    if name == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as xp

        return xp
    if name == "cupy":
        cupy = pytest.importorskip("cupy")
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                pytest.skip("cupy: no CUDA device")
        except Exception as exc:  # no driver at all
            pytest.skip(f"cupy: no CUDA device ({exc})")
        import array_api_compat.cupy as xp

        return xp
    raise AssertionError(name)


@pytest.fixture(scope="session")
def backend_name() -> str:
    return BACKEND


@pytest.fixture(scope="session")
def xp():
    """The array namespace under test (see the module docstring)."""
    return _load(BACKEND)


@pytest.fixture
def to_xp(xp):
    """Convert a numpy array to the backend under test (float64 stays float64)."""
    from xinfluence._xp import from_numpy

    def convert(a, dtype=None):
        a = np.asarray(a)
        if dtype is None:
            dtype = {
                "f": xp.float64,
                "i": xp.int64,
                "u": xp.int64,
                "b": xp.bool,
            }[a.dtype.kind]
        return from_numpy(a, dtype=dtype, device=None, xp=xp)

    return convert
