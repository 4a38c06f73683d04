"""Backend selection for the generic tests.

The generic tests take the ``xp`` fixture. Which namespace it is comes from the
environment variable ``XINFLUENCE_BACKEND`` (``numpy`` by default; the nox
sessions set it): ``numpy``, ``array_api_strict``, ``torch``, ``jax`` or
``cupy``. A backend that is not installed, or ``cupy`` without a CUDA device,
skips the generic tests instead of failing them.

``XINFLUENCE_DEVICE`` puts the test arrays on another device of that namespace
(the ``device`` fixture): ``cuda`` for torch on a GPU, ``gpu`` for jax, or
``device1`` for array-api-strict, whose second "device" refuses to mix with the
default one and so checks on a CPU that nothing silently moves to the default.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy")
BACKEND = os.environ.get("XINFLUENCE_BACKEND", "numpy")
if BACKEND not in BACKENDS:
    raise ValueError(f"XINFLUENCE_BACKEND must be one of {BACKENDS}, got {BACKEND!r}")
DEVICE = os.environ.get("XINFLUENCE_DEVICE") or None

# The test problems are tiny: on jax, compiling their programs costs far more than
# running them, and XLA's optimisation passes are most of a compilation
# (test_jax_conv's declared-layer tests: 35-40% less time without them). Set
# before jax is imported, so that it also reaches the examples' and the CLI's
# subprocesses; JAX_DISABLE_MOST_OPTIMIZATIONS=0 tests the optimised programs.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


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


def _device(name: str, xp):
    if BACKEND == "torch":
        import torch

        if name.startswith("cuda") and not torch.cuda.is_available():
            pytest.skip(f"torch: no device {name!r}")
        return torch.device(name)
    if BACKEND == "jax":
        import jax

        try:
            return jax.devices(name)[0]
        except RuntimeError as exc:
            pytest.skip(f"jax: no device {name!r} ({exc})")
    if BACKEND == "array_api_strict":
        return xp.Device(name)
    if BACKEND == "cupy":
        import cupy

        return cupy.cuda.Device(int(name))
    raise ValueError(f"XINFLUENCE_DEVICE is not supported with XINFLUENCE_BACKEND={BACKEND!r}")


@pytest.fixture(scope="session")
def device(xp):
    """Device of the test arrays: ``XINFLUENCE_DEVICE``, or None (the default)."""
    return None if DEVICE is None else _device(DEVICE, xp)


@pytest.fixture
def to_xp(xp, device):
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
        return from_numpy(a, dtype=dtype, device=device, xp=xp)

    return convert


# On jax, every eager operation and every jitted provider function is compiled
# anew for each new shape (about 50 ms each on a CPU), so a generic test costs
# 5 to 60 s there against well under a second on numpy. The jax session runs
# every jax-specific test (the jax provider, flax / equinox, the examples, the
# jax parts of the thread and serialization tests) and the first case of each
# generic test in JAX_GENERIC_MODULES (results equal to numpy's, the
# error messages, concurrent queries) on jax arrays, whose
# immutability and dtype rules catch what numpy lets pass. The other generic
# tests run in the numpy, array_api_strict and torch sessions;
# XINFLUENCE_FULL_MATRIX=1 runs all of them on jax too.
JAX_GENERIC_MODULES = frozenset(
    {
        "tests/test_namespaces.py",
        "tests/test_errors.py",
        "tests/test_threads.py",
    }
)


def pytest_collection_modifyitems(config, items):
    if BACKEND != "jax" or os.environ.get("XINFLUENCE_FULL_MATRIX"):
        return
    seen: set[tuple[str, str]] = set()
    reason = (
        "generic test: runs on numpy, array_api_strict and torch; on jax only with "
        "XINFLUENCE_FULL_MATRIX=1 (see tests/conftest.py)"
    )
    for item in items:
        if "xp" not in getattr(item, "fixturenames", ()):
            continue  # jax-specific, or no namespace at all
        module = item.nodeid.split("::")[0]
        key = (module, getattr(item, "originalname", item.name))
        if module not in JAX_GENERIC_MODULES or key in seen:
            item.add_marker(pytest.mark.skip(reason=reason))
        seen.add(key)


# Property-based tests (hypothesis): few examples, the same ones on every run
# (derandomized, no example database), no per-example deadline (the first
# example pays for imports). array-api-strict wraps every operation in Python:
# fewer examples there. HYPOTHESIS_PROFILE=explore draws many random ones.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test dependency; the tests importorskip it
    pass
else:
    settings.register_profile(
        "xinfluence",
        max_examples=6 if BACKEND == "array_api_strict" else 10,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "explore",
        max_examples=300,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "xinfluence"))
