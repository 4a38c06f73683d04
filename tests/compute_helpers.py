"""Shared pieces of the compute tests (importable by dask workers)."""

from __future__ import annotations

import time

import numpy as np

from xinfluence.backends.numpy import SoftmaxRegressionGradients


def softmax_problem(rng: np.random.Generator, n: int = 37, d: int = 4, k: int = 3):
    x = rng.normal(size=(n, d))
    y = rng.integers(0, k, size=n)
    w, b = rng.normal(size=(k, d)), rng.normal(size=k)
    return x, y, w, b


class SlowSoftmaxGradients(SoftmaxRegressionGradients):
    """The softmax provider, but every Jacobian product takes ``delay`` seconds
    (so that a worker can be killed while blocks are running)."""

    delay = 0.3

    def jacobian_prod(self, batch, g):
        time.sleep(self.delay)
        return super().jacobian_prod(batch, g)


def resume_problem():
    """A fitted model (numpy), test batches and training batches for the
    resumption test: 3 test chunks of 4 x 8 training chunks of 5 = 24 blocks."""
    import xinfluence as xi

    x, y, w, b = softmax_problem(np.random.default_rng(11))
    gp = SoftmaxRegressionGradients(w, b)
    batches = [(x[:7], y[:7]), (x[7:20], y[7:20]), (x[20:], y[20:])]
    model = xi.DirectInfluence(gp, regularization=1e-3, block_structure="parameter").fit(batches)
    test = [(x[:5], y[:5]), (x[5:11], y[5:11])]
    return model, test, batches


RESUME_CHILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from compute_helpers import resume_problem
from xinfluence.compute import SequentialInfluenceCalculator

model, test, batches = resume_problem()
calc = SequentialInfluenceCalculator(model, progress=False, test_chunk_size=4, train_chunk_size=5)
done = 0

def on_block(i, j):
    global done
    done += 1
    if done == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)

calc.influences(test, batches).to_zarr({path!r}, on_block=on_block)
"""
