"""Every script in ``examples/`` runs as is (each asserts its own result).

Each example runs in one backend session only, so that CI runs it once: the
numpy ones in the numpy session, the torch and jax ones in theirs. Examples
whose packages are missing are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BACKEND = os.environ.get("XINFLUENCE_BACKEND", "numpy")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# script -> (session, packages it needs)
CASES = {
    "numpy_logistic_loo.py": ("numpy", ["sklearn"]),
    "large_data_zarr_dask.py": ("numpy", ["sklearn", "zarr", "dask", "distributed"]),
    "torch_mlp_digits.py": ("torch", ["torch", "sklearn"]),
    "torch_cnn.py": ("torch", ["torch", "sklearn"]),
    "jax_flax_equinox.py": ("jax", ["jax", "flax", "equinox", "sklearn", "scipy"]),
    "text_gpt2_facts.py": ("torch", ["torch", "transformers"]),
}


def test_every_example_is_listed():
    if not EXAMPLES.exists():
        pytest.skip("examples/ not found (installed package)")
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


THREADED = ["torch_mlp_digits.py", "torch_cnn.py", "text_gpt2_facts.py"]
QUICK = ["text_gpt2_facts.py"]  # a smaller run with --quick (the full one takes minutes)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script):
    session, needs = CASES[script]
    if BACKEND != session:
        pytest.skip(f"runs in the {session} session")
    if not EXAMPLES.exists():
        pytest.skip("examples/ not found (installed package)")
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    env = dict(os.environ)  # the same xinfluence as the tests (installed or PYTHONPATH)
    env.setdefault("OMP_NUM_THREADS", "1")  # small models: threads only contend
    # the torch examples take --threads, as xinfluence demo, and print what they use
    extra = ["--threads", "1"] if script in THREADED else []
    extra += ["--quick"] if script in QUICK else []
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if script in THREADED:
        assert "torch threads: 1\n" in proc.stdout
