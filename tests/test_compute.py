"""Chunked queries and the calculators of xinfluence.compute against the in-memory
models (the oracle: the unchunked query), on every backend.

Iterative solvers (CG, LiSSA) solve each test chunk separately; their results
agree with one joint solve only to the solver's tolerance, so for them the
test side is one chunk and the training side is chunked (uneven batches, a
short last chunk)."""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from compute_helpers import softmax_problem
from helpers import rel_err
from xinfluence._chunking import plan_chunks
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import SoftmaxRegressionGradients
from xinfluence.compute import (
    SequentialInfluenceCalculator,
    StoreMismatchError,
    self_influence,
    top_k,
    total_influence,
)

SIZES = [7, 13, 17]  # uneven source batches of the 37 training points
N_TEST = 11

MODELS = {
    "direct": (lambda gp: xi.DirectInfluence(gp, regularization=1e-3), False),
    "direct_blocks": (
        lambda gp: xi.DirectInfluence(gp, regularization=1e-3, block_structure="parameter"),
        False,
    ),
    "identity": (lambda gp: xi.IdentityInfluence(gp), False),
    "cg": (lambda gp: xi.CgInfluence(gp, regularization=1e-3, rtol=1e-10), True),
    "lissa": (lambda gp: xi.LissaInfluence(gp, regularization=1e-1, rtol=1e-8), True),
    "arnoldi": (lambda gp: xi.ArnoldiInfluence(gp, regularization=1e-3, rank=5), False),
    "nystroem": (
        lambda gp: xi.NystroemSketchInfluence(
            gp, regularization=1e-3, rank=6, second_order="empirical_fisher"
        ),
        False,
    ),
    "datainf": (lambda gp: xi.InverseHarmonicMeanInfluence(gp, regularization=1e-2), False),
    "ekfac": (lambda gp: xi.EkfacInfluence(gp, regularization=1e-3), False),
}


@pytest.fixture
def problem(to_xp):
    x, y, w, b = softmax_problem(np.random.default_rng(3))
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    xs, ys = to_xp(x), to_xp(y)
    batches, start = [], 0
    for s in SIZES:
        batches.append((xs[start : start + s, ...], ys[start : start + s, ...]))
        start += s
    return gp, xs, ys, batches


def _test_side(xs, ys):
    # uneven test batches too: 5 + 6
    return [(xs[:5, ...], ys[:5, ...]), (xs[5:N_TEST, ...], ys[5:N_TEST, ...])]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_sequential_equals_in_memory(problem, name, mode, tmp_path):
    gp, xs, ys, batches = problem
    make, iterative = MODELS[name]
    model = make(gp).fit(batches)
    expected = model.influences(xs[:N_TEST, ...], ys[:N_TEST, ...], xs, ys, mode=mode)
    calc = SequentialInfluenceCalculator(
        model, progress=False, test_chunk_size=N_TEST if iterative else 4, train_chunk_size=10
    )
    lazy = calc.influences(_test_side(xs, ys), batches, mode=mode)
    assert rel_err(lazy.compute(), expected) <= 1e-12
    assert lazy.blocks_computed == (1 if iterative else 3) * 4
    stored = lazy.to_zarr(str(tmp_path / "store"))
    assert tuple(stored.shape) == tuple(expected.shape)
    assert rel_err(np.asarray(stored[...]), expected) <= 1e-12
    if mode == "up":
        factors = model.influence_factors(xs[:N_TEST, ...], ys[:N_TEST, ...])
        from_f = calc.influences_from_factors(factors, batches).compute()
        assert rel_err(from_f, expected) <= 1e-12


def test_sequential_factors_and_results_namespace(problem, xp):
    gp, xs, ys, batches = problem
    model = xi.DirectInfluence(gp, regularization=1e-3).fit(batches)
    calc = SequentialInfluenceCalculator(model, progress=False, test_chunk_size=4)
    factors = calc.influence_factors(batches).compute()
    assert type(factors) is type(xs)
    assert rel_err(factors, model.influence_factors(xs, ys)) <= 1e-12


@pytest.mark.parametrize("name", ["direct_blocks", "arnoldi", "ekfac", "identity"])
def test_chunked_in_memory_equals_unchunked(problem, name):
    gp, xs, ys, batches = problem
    model = MODELS[name][0](gp).fit(batches)
    xt, yt = xs[:N_TEST, ...], ys[:N_TEST, ...]
    plain = {
        "up": model.influences(xt, yt, xs, ys),
        "pert": model.influences(xt, yt, xs, ys, mode="perturbation"),
        "self": model.influences(xt, yt),
        "blocks": model.influences_by_block(xt, yt, xs, ys),
        "factors": model.influence_factors(xs, ys),
    }
    plain["from_factors"] = model.influences_from_factors(plain["factors"][:N_TEST, ...], xs, ys)
    # a budget of a few samples: many test and training chunks
    with xi.memory_budget_scope(3000):
        plan_rows = plan_chunks(gp, xi.Batch(xt, yt), xi.InfluenceMode.Up, budget=3000)
        assert plan_rows.test_rows < N_TEST and plan_rows.train_rows < 37
        chunked = {
            "up": model.influences(xt, yt, xs, ys),
            "pert": model.influences(xt, yt, xs, ys, mode="perturbation"),
            "self": model.influences(xt, yt),
            "blocks": model.influences_by_block(xt, yt, xs, ys),
            "factors": model.influence_factors(xs, ys),
        }
        chunked["from_factors"] = model.influences_from_factors(
            plain["factors"][:N_TEST, ...], xs, ys
        )
        loader_side = model.influences(xt, yt, batches)  # a DataLoader-like iterable
        loader_factors = model.influences_from_factors(plain["factors"][:N_TEST, ...], batches)
    for key in ("up", "pert", "self", "factors", "from_factors"):
        assert rel_err(chunked[key], plain[key]) <= 1e-12, key
    for block in plain["blocks"]:
        assert rel_err(chunked["blocks"][block], plain["blocks"][block]) <= 1e-12
    assert rel_err(loader_side, plain["up"]) <= 1e-12
    assert rel_err(loader_factors, plain["up"]) <= 1e-12
    # the per-model option wins over the global budget
    model.memory_budget = 3000
    assert rel_err(model.influences(xt, yt, xs, ys), plain["up"]) <= 1e-12


def test_loader_as_training_side_without_chunking(problem):
    gp, xs, ys, batches = problem
    model = xi.DirectInfluence(gp, regularization=1e-3).fit(batches)
    expected = model.influences(xs[:3, ...], ys[:3, ...], xs, ys)
    assert rel_err(model.influences(xs[:3, ...], ys[:3, ...], batches), expected) <= 1e-12
    assert rel_err(model.influences(xs[:3, ...], ys[:3, ...], xi.Batch(xs, ys)), expected) <= 1e-12
    with pytest.raises(ValueError, match="x and y must be given together"):
        model.influences(xs[:3, ...], ys[:3, ...], xs)


def _tied_problem(to_xp):
    # duplicated training points give identical columns: ties in every row
    x, y, w, b = softmax_problem(np.random.default_rng(5), n=20)
    x = np.concatenate([x, x[[3, 3, 7, 0]]])
    y = np.concatenate([y, y[[3, 3, 7, 0]]])
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    return gp, to_xp(x), to_xp(y)


def test_reductions_equal_numpy_on_the_full_matrix(to_xp):
    gp, xs, ys = _tied_problem(to_xp)
    model = xi.DirectInfluence(gp, regularization=1e-3).fit((xs, ys))
    xt, yt = xs[:9, ...], ys[:9, ...]
    calc = SequentialInfluenceCalculator(
        model, progress=False, test_chunk_size=4, train_chunk_size=5
    )
    lazy = calc.influences((xt, yt), (xs, ys))
    # the oracle is numpy on the full matrix of the same computation (chunked
    # contractions round differently from one matmul, which would move ties)
    full = to_numpy(lazy.compute())
    default = SequentialInfluenceCalculator(model, progress=False).influences((xt, yt), (xs, ys))
    full_default = to_numpy(default.compute())
    assert rel_err(full, model.influences(xt, yt, xs, ys)) <= 1e-12
    for k in (1, 6, 30):  # 30 > N: capped
        for result, matrix in (
            (lazy.top_k(k), full),
            (top_k(model, xt, yt, xs, ys, k=k), full_default),
        ):
            helpful = np.argsort(-matrix, axis=1, kind="stable")[:, :k]
            harmful = np.argsort(matrix, axis=1, kind="stable")[:, :k]
            np.testing.assert_array_equal(to_numpy(result.helpful_indices), helpful)
            np.testing.assert_array_equal(to_numpy(result.harmful_indices), harmful)
            np.testing.assert_array_equal(
                to_numpy(result.helpful_scores), np.take_along_axis(matrix, helpful, axis=1)
            )
            np.testing.assert_array_equal(
                to_numpy(result.harmful_scores), np.take_along_axis(matrix, harmful, axis=1)
            )
    assert np.all(full[:, 3] == full[:, 20]) and np.all(full[:, 3] == full[:, 21])  # real ties
    np.testing.assert_allclose(to_numpy(lazy.sum()), full.sum(axis=0), rtol=1e-12, atol=0)
    np.testing.assert_allclose(to_numpy(lazy.mean()), full.mean(axis=0), rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        to_numpy(total_influence(model, xt, yt, xs, ys, reduce="mean")),
        full.mean(axis=0),
        rtol=1e-12,
    )
    diag = np.diag(to_numpy(model.influences(xs, ys)))
    for si in (calc.self_influence((xs, ys)), self_influence(model, xs, ys)):
        assert rel_err(si, diag) <= 1e-12


def test_clear_errors(problem):
    gp, xs, ys, batches = problem
    model = xi.DirectInfluence(gp, regularization=1e-3).fit(batches)
    calc = SequentialInfluenceCalculator(model, progress=False, test_chunk_size=4)
    test = _test_side(xs, ys)
    with pytest.raises(ValueError, match="no batches"):
        calc.influences(test, []).compute()
    # a test chunk with another trailing shape
    bad = [test[0], (xs[5:N_TEST, :3], ys[5:N_TEST, ...])]
    with pytest.raises(ValueError, match="shape"):
        calc.influences(bad, batches).compute()
    # a one-shot generator where several passes are needed
    with pytest.raises(ValueError, match="one-shot generator"):
        calc.influences(test, (b for b in batches)).compute()
    # one pass is fine, once
    one = SequentialInfluenceCalculator(model, progress=False, test_chunk_size=N_TEST)
    lazy = one.influences(test, (b for b in batches))
    expected = model.influences(xs[:N_TEST, ...], ys[:N_TEST, ...], xs, ys)
    assert rel_err(lazy.compute(), expected) <= 1e-12
    with pytest.raises(ValueError, match="one-shot generator"):
        lazy.compute()
    # a re-iterable that yields other batches on every pass (a shuffling DataLoader)

    class Shuffling:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter(batches if self.calls % 2 else batches[::-1])

    with pytest.raises(ValueError, match="changed between passes"):
        calc.influences(test, Shuffling()).compute()
    with (
        xi.memory_budget_scope(3000),
        pytest.raises(ValueError, match="changed between passes"),
    ):
        model.influences(xs[:N_TEST, ...], ys[:N_TEST, ...], Shuffling())
    with pytest.raises(xi.NotFittedError):
        SequentialInfluenceCalculator(xi.DirectInfluence(gp))
    with pytest.raises(ValueError, match="up-mode"):
        calc.influences(test, batches, mode="perturbation").top_k(3)


def test_mismatched_store_is_refused(problem, xp, to_xp, tmp_path):
    pytest.importorskip("zarr")
    gp, xs, ys, batches = problem
    model = xi.DirectInfluence(gp, regularization=1e-3).fit(batches)
    test = _test_side(xs, ys)
    path = str(tmp_path / "s")
    calc = SequentialInfluenceCalculator(
        model, progress=False, test_chunk_size=4, train_chunk_size=10
    )
    calc.influences(test, batches).to_zarr(path)
    # other options
    other = xi.DirectInfluence(gp, regularization=1e-2).fit(batches)
    with pytest.raises(StoreMismatchError, match="regularization"):
        SequentialInfluenceCalculator(
            other, progress=False, test_chunk_size=4, train_chunk_size=10
        ).influences(test, batches).to_zarr(path)
    # another chunk layout
    with pytest.raises(StoreMismatchError, match="train_rows"):
        SequentialInfluenceCalculator(
            model, progress=False, test_chunk_size=4, train_chunk_size=9
        ).influences(test, batches).to_zarr(path)
    # other training data
    rx, ry = xp.flip(xs, axis=0), xp.flip(ys, axis=0)
    shuffled = [(rx, ry)]
    with pytest.raises(StoreMismatchError, match="training data"):
        calc.influences(test, shuffled).to_zarr(path)
    # another mode
    with pytest.raises(StoreMismatchError, match="mode"):
        calc.influences(test, batches, mode="perturbation").to_zarr(path)
    # parameters moved by far less than the probe's 1e-6 tolerance
    _, _, w, b = softmax_problem(np.random.default_rng(3))
    moved = SoftmaxRegressionGradients(to_xp(w * (1 + 1e-12)), to_xp(b))
    refit = xi.DirectInfluence(moved, regularization=1e-3).fit(batches)
    with pytest.raises(StoreMismatchError, match="parameters"):
        SequentialInfluenceCalculator(
            refit, progress=False, test_chunk_size=4, train_chunk_size=10
        ).influences(test, batches).to_zarr(path)
    # overwrite starts afresh
    z = calc.influences(test, shuffled).to_zarr(path, overwrite=True)
    expected = model.influences(xs[:N_TEST, ...], ys[:N_TEST, ...], rx, ry)
    assert rel_err(np.asarray(z[...]), expected) <= 1e-12


def test_fit_progress_is_reported(problem, monkeypatch, caplog):
    import logging

    from xinfluence import _progress

    gp, xs, ys, batches = problem
    monkeypatch.setattr(_progress, "AFTER", 0.0)
    monkeypatch.setattr(_progress, "EVERY", 0.0)
    with caplog.at_level(logging.INFO, logger="xinfluence"):
        xi.CgInfluence(gp, regularization=1e-3).fit(batches).influences(xs[:3, ...], ys[:3, ...])
        xi.LissaInfluence(gp, regularization=1e-1, maxiter=3, on_failure="ignore").fit(
            batches
        ).influences(xs[:3, ...], ys[:3, ...])
    text = caplog.text
    assert "block CG: iteration 1" in text and "largest residual" in text
    assert "LiSSA: iteration 2/3" in text
    assert "curvature products: pass over the data" in text


def test_progress_bar_over_blocks(problem, capsys):
    pytest.importorskip("tqdm")
    gp, xs, ys, batches = problem
    model = xi.DirectInfluence(gp, regularization=1e-3).fit(batches)
    expected = model.influences(xs[:N_TEST, ...], ys[:N_TEST, ...], xs, ys)
    calc = SequentialInfluenceCalculator(
        model, progress=True, test_chunk_size=4, train_chunk_size=10
    )
    assert rel_err(calc.influences(_test_side(xs, ys), batches).compute(), expected) <= 1e-12
    assert "/12 [" in capsys.readouterr().err  # a bar over 3 x 4 blocks (total from the lists)
