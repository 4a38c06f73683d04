"""The streaming top-k (TopKReducer, the dask path's per-block selection) equals
the documented stable sort: helpful ``argsort(-I, stable=True)[:, :k]``, harmful
``argsort(I, stable=True)[:, :k]``, ties by increasing index, NaN last.

Oracle: numpy's stable argsort of the whole matrix on the host. The scores are
mostly small integers, so that ties cross the k-th place and the block edges
(where a partition's choice is not the sort's and the exact fallback runs)."""

from __future__ import annotations

import numpy as np
import pytest

from xinfluence._xp import from_numpy, to_numpy
from xinfluence.compute._gradient_store_dask import _select
from xinfluence.compute._reductions import TopKReducer, smallest_columns

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _scores(seed: int, shape: tuple[int, int], spread: int, nan: bool, dtype) -> np.ndarray:
    """Integers in ``[-spread, spread]`` (spread 0: floats without ties), some NaN."""
    rng = np.random.default_rng(seed)
    if spread:
        out = rng.integers(-spread, spread + 1, size=shape).astype(dtype)
    else:
        out = rng.standard_normal(shape).astype(dtype)
    if nan:
        out[rng.random(shape) < 0.15] = np.nan
    return out


def _check(helpful, helpful_scores, harmful, harmful_scores, matrix: np.ndarray, k: int):
    ref_helpful = np.argsort(-matrix, axis=1, kind="stable")[:, :k]
    ref_harmful = np.argsort(matrix, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(to_numpy(helpful), ref_helpful)
    np.testing.assert_array_equal(to_numpy(harmful), ref_harmful)
    np.testing.assert_array_equal(
        to_numpy(helpful_scores), np.take_along_axis(matrix, ref_helpful, axis=1)
    )
    np.testing.assert_array_equal(
        to_numpy(harmful_scores), np.take_along_axis(matrix, ref_harmful, axis=1)
    )


problems = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "n": st.integers(1, 7),
        "n_train": st.integers(1, 90),
        "k": st.integers(1, 40),
        "cols": st.integers(1, 30),
        "rows": st.integers(1, 7),
        "spread": st.sampled_from([1, 3, 40, 0]),
        "nan": st.booleans(),
        "float32": st.booleans(),
    }
)


@given(problems)
def test_top_k_reducer_equals_stable_argsort(xp, device, p):
    dtype = np.float32 if p["float32"] else np.float64
    matrix = _scores(p["seed"], (p["n"], p["n_train"]), p["spread"], p["nan"], dtype)
    values = from_numpy(
        matrix, dtype=xp.float32 if p["float32"] else xp.float64, device=device, xp=xp
    )
    reducer = TopKReducer(p["k"], xp)
    # the calculators' order: row chunks, each with its column blocks in order
    for r0 in range(0, p["n"], p["rows"]):
        for c0 in range(0, p["n_train"], p["cols"]):
            r1, c1 = min(r0 + p["rows"], p["n"]), min(c0 + p["cols"], p["n_train"])
            reducer.update(r0, c0, values[r0:r1, c0:c1])  # strict: no stops past the end
    out = reducer.result()
    k = min(p["k"], p["n_train"])
    assert out.helpful_indices.dtype == xp.int64 and out.helpful_scores.dtype == values.dtype
    _check(
        out.helpful_indices,
        out.helpful_scores,
        out.harmful_indices,
        out.harmful_scores,
        matrix,
        k,
    )


def test_smallest_columns_mixes_partitioned_and_sorted_rows(xp, to_xp):
    nan = np.nan
    key = np.array(
        [
            [5.0, 1.0, 4.0, 2.0, 3.0, 0.0],  # no tie: the partition's candidates
            [2.0, 1.0, 2.0, 0.0, 2.0, 2.0],  # 2.0 ties across the 3rd place
            [nan, 3.0, nan, 1.0, 0.0, 2.0],  # NaN left out: still partitioned
            [nan, 1.0, nan, nan, 0.0, nan],  # fewer numbers than places: NaN kept
            [1.0, 0.0, 1.0, -0.0, 0.0, 1.0],  # -0.0 == 0.0: ties by column
        ]
    )
    for keep in (1, 3, 5, 6):
        got = to_numpy(smallest_columns(to_xp(key), keep, xp=xp))
        np.testing.assert_array_equal(got, np.argsort(key, axis=1, kind="stable")[:, :keep])


@given(problems)
def test_dask_per_block_selection_and_merge_equal_stable_argsort(p):
    # _top_k_task's selection per block of stored rows, then top_k's merge
    dtype = np.float32 if p["float32"] else np.float64
    matrix = _scores(p["seed"], (p["n"], p["n_train"]), p["spread"], p["nan"], dtype)
    parts = [
        _select(
            matrix[:, c0 : c0 + p["cols"]], np.arange(c0, min(c0 + p["cols"], p["n_train"])), p["k"]
        )
        for c0 in range(0, p["n_train"], p["cols"])
    ]
    hv, hi, lv, li = (np.concatenate([q[j] for q in parts], axis=1) for j in range(4))
    k = min(p["k"], p["n_train"])
    hv, hi, _, _ = _select(hv, hi, k)
    _, _, lv, li = _select(lv, li, k)
    _check(hi, hv, li, lv, matrix, k)


def test_top_k_reducer_on_jax():
    # jax-specific (the generic tests skip jax outside a few modules); two block
    # shapes only: eager jax compiles every operation per shape
    jnp = pytest.importorskip("jax.numpy")

    matrix = _scores(3, (6, 32), 2, True, np.float32)
    matrix[1] = np.arange(32) % 7  # ties across the k-th place, no NaN
    matrix[2] = np.arange(32) * 0.5  # no tie: the partitioned path
    reducer = TopKReducer(4, jnp)
    for c0 in (0, 16):
        reducer.update(0, c0, jnp.asarray(matrix[:, c0 : c0 + 16]))
    out = reducer.result()
    assert out.helpful_scores.dtype == jnp.float32
    _check(
        out.helpful_indices, out.helpful_scores, out.harmful_indices, out.harmful_scores, matrix, 4
    )
