"""Resumption of a zarr run killed with SIGKILL (numpy backend: the store logic
does not depend on the namespace)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xinfluence
from compute_helpers import RESUME_CHILD, resume_problem
from xinfluence.compute import SequentialInfluenceCalculator

pytestmark = pytest.mark.skipif(
    os.environ.get("XINFLUENCE_BACKEND", "numpy") != "numpy", reason="numpy backend only"
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_run_resumes_without_recomputing(tmp_path):
    pytest.importorskip("zarr")
    path = str(tmp_path / "killed")
    tests = str(Path(__file__).parent)
    src = str(Path(xinfluence.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, tests])}
    code = RESUME_CHILD.format(tests=tests, kill_after=10, path=path)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr

    model, test, batches = resume_problem()
    calc = SequentialInfluenceCalculator(
        model, progress=False, test_chunk_size=4, train_chunk_size=5
    )
    computed = []
    lazy = calc.influences(test, batches)
    resumed = lazy.to_zarr(path, on_block=lambda i, j: computed.append((i, j)))
    assert len(computed) == 24 - 10 and lazy.blocks_computed == 14
    # the first 10 blocks (row 0: 8 blocks, row 1: 2 blocks) were not recomputed
    assert min(computed) == (1, 2)

    fresh = calc.influences(test, batches).to_zarr(str(tmp_path / "fresh"))
    np.testing.assert_array_equal(np.asarray(resumed[...]), np.asarray(fresh[...]))
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    expected = model.influences(x[:11], y[:11], x, y)
    np.testing.assert_allclose(np.asarray(resumed[...]), expected, rtol=1e-12, atol=1e-12)

    # a finished store: nothing to compute
    again = calc.influences(test, batches)
    again.to_zarr(path)
    assert again.blocks_computed == 0
