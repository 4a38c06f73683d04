"""Data handling: uneven batches, re-iteration, and the cache of prepared batches."""

from __future__ import annotations

import numpy as np

import xinfluence as xi
from helpers import rel_err
from xinfluence.backends.numpy import LinearRegressionGradients
from xinfluence.curvature import Dataset
from xinfluence.types import iter_batches


class CountingLoader:
    """A re-iterable source (like a DataLoader) that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def _problem(to_xp):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 2))
    gp = LinearRegressionGradients(to_xp(rng.normal(size=(2, 4))), to_xp(rng.normal(size=2)))
    batches = [(to_xp(x[s]), to_xp(y[s])) for s in (slice(0, 11), slice(11, 13), slice(13, 30))]
    return gp, batches, to_xp(x), to_xp(y)


def test_small_data_is_read_once_large_data_is_streamed(to_xp):
    gp, batches, *_ = _problem(to_xp)
    loader = CountingLoader(batches)
    data = Dataset(iter_batches(loader), gp)
    for _ in range(4):
        assert sum(len(b) for b in data) == 30
    assert loader.passes == 1 and data.n_samples == 30
    streamed = CountingLoader(batches)
    data = Dataset(iter_batches(streamed), gp, cache_bytes=0)
    for _ in range(4):
        assert sum(len(b) for b in data) == 30
    assert streamed.passes == 4


def test_iterative_model_from_a_generator_matches_a_list(to_xp):
    gp, batches, x, y = _problem(to_xp)
    expected = xi.DirectInfluence(gp, regularization=1e-3).fit(batches).influences(x, y)
    # a one-shot generator: CG passes over it many times
    model = xi.CgInfluence(gp, regularization=1e-3, rtol=1e-12).fit(b for b in batches)
    assert rel_err(model.influences(x, y), expected) <= 1e-9
