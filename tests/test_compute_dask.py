"""DaskInfluenceCalculator against the in-memory models: dask's local scheduler
on every backend, a 2-worker LocalCluster (with a worker killed mid-run) on
numpy."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from compute_helpers import SlowSoftmaxGradients, softmax_problem
from helpers import rel_err
from test_compute import MODELS
from xinfluence.backends.numpy import SoftmaxRegressionGradients

da = pytest.importorskip("dask.array")

from xinfluence.compute import DaskInfluenceCalculator  # noqa: E402

TRAIN_CHUNKS = (7, 13, 17)


def _dask_side(x, y, chunks):
    return (
        da.from_array(x, chunks=(chunks, x.shape[1:])),
        da.from_array(y, chunks=(chunks,)),
    )


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_dask_equals_in_memory(to_xp, name, mode):
    x, y, w, b = softmax_problem(np.random.default_rng(3))
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    make, iterative = MODELS[name]
    xs, ys = to_xp(x), to_xp(y)
    model = make(gp).fit([(xs[:7, ...], ys[:7, ...]), (xs[7:, ...], ys[7:, ...])])
    expected = model.influences(xs[:11, ...], ys[:11, ...], xs, ys, mode=mode)
    test_chunks = (11,) if iterative else (5, 6)
    xt, yt = _dask_side(x[:11], y[:11], test_chunks)
    dx, dy = _dask_side(x, y, TRAIN_CHUNKS)
    lazy = DaskInfluenceCalculator(model).influences(xt, yt, dx, dy, mode=mode)
    assert lazy.chunks[:2] == (test_chunks, TRAIN_CHUNKS)
    assert rel_err(lazy.compute(scheduler="threads"), expected) <= 1e-12
    if name == "direct" and mode == "up":
        factors = DaskInfluenceCalculator(model).influence_factors(xt, yt).compute()
        assert rel_err(factors, model.influence_factors(xs[:11, ...], ys[:11, ...])) <= 1e-12


def test_dask_clear_errors():
    x, y, w, b = softmax_problem(np.random.default_rng(3))
    import xinfluence as xi

    model = xi.DirectInfluence(SoftmaxRegressionGradients(w, b), regularization=1e-3).fit((x, y))
    calc = DaskInfluenceCalculator(model)
    xt, yt = _dask_side(x[:11], y[:11], (5, 6))
    dx = da.from_array(x, chunks=(TRAIN_CHUNKS, (4,)))
    with pytest.raises(ValueError, match="same chunks along samples"):
        calc.influences(xt, yt, dx, da.from_array(y, chunks=((10, 27),)))
    with pytest.raises(ValueError, match="chunked along samples only"):
        calc.influences(xt, yt, da.from_array(x, chunks=(TRAIN_CHUNKS, (2, 2))), dx[:, 0])
    with pytest.raises(TypeError, match="dask array"):
        calc.influences(xt, yt, x, y)


@pytest.mark.skipif(
    os.environ.get("XINFLUENCE_BACKEND", "numpy") != "numpy", reason="numpy backend only"
)
def test_local_cluster_survives_a_killed_worker(tmp_path):
    distributed = pytest.importorskip("distributed")
    import xinfluence as xi

    x, y, w, b = softmax_problem(np.random.default_rng(3))
    gp = SlowSoftmaxGradients(w, b)
    model = xi.DirectInfluence(gp, regularization=1e-3).fit((x, y))
    xt, yt = _dask_side(x[:11], y[:11], (5, 6))
    dx, dy = _dask_side(x, y, (10, 10, 10, 7))
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            local_directory=str(tmp_path),
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        lazy = DaskInfluenceCalculator(model, client=client).influences(xt, yt, dx, dy)
        future = client.compute(lazy)
        pids = client.run(os.getpid)
        # kill a worker while it runs a block (each takes 0.3 s)
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline:
            for addr, keys in client.processing().items():
                if any("block_task" in str(k) for k in keys):
                    victim = addr
                    break
            time.sleep(0.02)
        assert victim is not None, "no block ever ran"
        os.kill(pids[victim], 9)
        result = future.result(timeout=180)
    expected = model.influences(x[:11], y[:11], x, y)
    assert rel_err(result, expected) <= 1e-12
