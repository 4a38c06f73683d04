"""ProjectedInfluence (TRAK / LoGra random projections), generic over the backend.

Oracles: DirectInfluence (exact) for an invertible map at k = P and lambda = 0,
where R^T (R C R^T)^-1 R = C^-1 exactly, and at lambda > 0 with the default damping
lambda R R^T, where R^T (R (C + lambda I) R^T)^-1 R = (C + lambda I)^-1; the same
dense formula with the map read back, for lambda > 0 and k < P; the map drawn
independently on the host with numpy's Philox generator; and errors against Direct
that fall with k.
"""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from helpers import rel_err, split
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import (
    FiniteDifferenceGradients,
    LinearRegressionGradients,
    SoftmaxRegressionGradients,
)
from xinfluence.projection import TILE_COLUMNS, DenseProjection, KroneckerProjection


@pytest.fixture(scope="module")
def linreg_data():
    """Multi-output least squares: P = 3 x (4 + 1) = 15, H and mean g g^T positive definite."""
    rng = np.random.default_rng(0)
    n, d, o = 60, 4, 3
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d, o)) + 0.5 * rng.normal(size=(n, o))
    w, b = rng.normal(size=(o, d)), rng.normal(size=o)
    return x, y, w, b


def _linreg(to_xp, linreg_data):
    x, y, w, b = linreg_data
    gp = LinearRegressionGradients(to_xp(w), to_xp(b))
    xx, yy = to_xp(x), to_xp(y)
    batches = [(xx[s, ...], yy[s, ...]) for s in split(len(x), [13, 29, 18])]
    return gp, batches, xx, yy


@pytest.mark.parametrize("second_order", ["empirical_fisher", "hessian"])
@pytest.mark.parametrize(
    "projection, distribution",
    [("dense", "gaussian"), ("dense", "rademacher"), ("kronecker", "gaussian")],
)
def test_full_dimension_invertible_map_equals_direct(
    xp, to_xp, linreg_data, second_order, projection, distribution
):
    gp, batches, x, y = _linreg(to_xp, linreg_data)
    p = gp.n_parameters
    direct = xi.DirectInfluence(gp, second_order=second_order).fit(batches)
    # The identity holds for any invertible R; rounding grows like cond(R)^2, and small
    # Gaussian matrices can be ill-conditioned (cond 2e3 for the Kronecker map of seed 0):
    # seed 5 gives cond(R) < 100 for all three maps (Rademacher 15 x 15 maps can be singular).
    model = xi.ProjectedInfluence(
        gp,
        k=p,
        projection=projection,
        distribution=distribution,
        second_order=second_order,
        seed=5,
        regularization_space="parameter",
    ).fit(batches)
    r = to_numpy(model.projections()["full"].base.matrix())  # R, before orthonormalizing
    assert r.shape == (p, p) and np.linalg.cond(r) < 100
    xt, yt = x[:7, ...], y[:7, ...]
    for mode in ("up", "perturbation"):
        expected = direct.influences(xt, yt, x, y, mode=mode)
        assert rel_err(model.influences(xt, yt, x, y, mode=mode), expected) <= 1e-10
    factors = model.influence_factors(xt, yt)
    assert rel_err(factors, direct.influence_factors(xt, yt)) <= 1e-10
    assert rel_err(model.influences_from_factors(factors, x, y), direct.influences(xt, yt, x, y))
    assert rel_err(model.influences(xt, yt), direct.influences(xt, yt)) <= 1e-10


@pytest.mark.parametrize("space", ["parameter", "projected"])
@pytest.mark.parametrize("projection", ["dense", "kronecker"])
def test_matches_dense_formula_with_damping(xp, to_xp, linreg_data, projection, space):
    """k < P, lambda > 0: (R g_t)^T (R C R^T + lambda D)^-1 (R g_j), C = mean g g^T, with
    D = R R^T (regularization_space="parameter") or I_k ("projected")."""
    gp, batches, x, y = _linreg(to_xp, linreg_data)
    lam, k = 0.3, 8 if projection == "dense" else (2, 4)
    kw = dict(k=k, projection=projection, regularization_space=space)
    model = xi.ProjectedInfluence(gp, regularization=lam, **kw)
    model.fit(batches)
    proj = model.projections()["full"]
    r = to_numpy(proj.base.matrix() if space == "parameter" else proj.matrix())
    g = to_numpy(gp.flat_grads(gp.prepare_batch(xi.Batch(x, y))))
    pg = g @ r.T
    c = pg.T @ pg / len(g)
    assert r.shape[0] == 8
    damping = r @ r.T if space == "parameter" else np.eye(len(c))
    assert rel_err(r @ r.T, np.eye(8)) > 0.1  # the two spaces differ here
    expected = pg[:5] @ np.linalg.solve(c + lam * damping, pg.T)
    assert rel_err(model.influences(x[:5, ...], y[:5, ...], x, y), expected) <= 1e-12
    q = to_numpy(proj.matrix())  # the map used: R, or R with orthonormalized rows
    assert rel_err(model.projected_curvatures()["full"], q @ g.T @ g @ q.T / len(g)) <= 1e-12
    # with_regularization refactorises without a new pass and equals a fresh fit
    fresh = xi.ProjectedInfluence(gp, regularization=0.05, **kw)
    fresh.fit(batches)
    model.with_regularization(0.05)
    assert (
        rel_err(
            model.influences(x[:5, ...], y[:5, ...], x, y),
            fresh.influences(x[:5, ...], y[:5, ...], x, y),
        )
        <= 1e-12
    )


@pytest.mark.parametrize("second_order", ["empirical_fisher", "hessian"])
@pytest.mark.parametrize("projection", ["dense", "kronecker"])
def test_full_dimension_with_damping_equals_direct(
    xp, to_xp, linreg_data, second_order, projection
):
    """k = P, lambda > 0: damping lambda R R^T (the default) reproduces Direct with the same
    curvature, R^T (R (C + lambda I) R^T)^-1 R = (C + lambda I)^-1; lambda I_k does not."""
    gp, batches, x, y = _linreg(to_xp, linreg_data)
    lam, p = 0.1, gp.n_parameters
    direct = xi.DirectInfluence(gp, regularization=lam, second_order=second_order).fit(batches)
    xt, yt = x[:7, ...], y[:7, ...]
    expected = direct.influences(xt, yt, x, y)
    got = {}
    for space in ("parameter", "projected"):
        model = xi.ProjectedInfluence(
            gp,
            k=p if projection == "dense" else (3, 5),
            projection=projection,
            second_order=second_order,
            regularization=lam,
            regularization_space=space,
            seed=5,
        ).fit(batches)
        assert model.projections()["full"].output_size == p
        got[space] = rel_err(model.influences(xt, yt, x, y), expected)
        if space == "parameter":
            assert (
                rel_err(model.influence_factors(xt, yt), direct.influence_factors(xt, yt)) <= 1e-10
            )
            perturbation = model.influences(xt, yt, x, y, mode="perturbation")
            assert (
                rel_err(perturbation, direct.influences(xt, yt, x, y, mode="perturbation")) <= 1e-10
            )
    print(projection, second_order, got)
    assert got["parameter"] <= 1e-10, got
    assert got["projected"] > 1e-2, got


@pytest.mark.parametrize("space", ["parameter", "projected"])
@pytest.mark.parametrize("projection", ["dense", "kronecker"])
def test_factors_scored_in_the_projected_space(xp, to_xp, linreg_data, projection, space):
    """influences_from_factors (the calculators' path) contracts R g_j with the factors'
    coordinates, never the provider's Jacobian products (nor, for Kronecker, per-sample
    gradients); factors outside the span of R^T take the exact generic path."""
    gp, batches, x, y = _linreg(to_xp, linreg_data)
    k = 8 if projection == "dense" else (2, 4)
    model = xi.ProjectedInfluence(
        gp, k=k, projection=projection, regularization=0.3, regularization_space=space
    ).fit(batches)
    proj = model.projections()["full"]
    assert rel_err(proj.gram(), to_numpy(proj.matrix()) @ to_numpy(proj.matrix()).T) <= 1e-13
    xt, yt = x[:5, ...], y[:5, ...]
    expected = to_numpy(model.influences(xt, yt, x, y))  # the bilinear form: both projected
    factors = model.influence_factors(xt, yt)
    g = to_numpy(gp.flat_grads(gp.prepare_batch(xi.Batch(x, y))))
    assert rel_err(to_numpy(factors) @ g.T, expected) <= 1e-12
    jacobian_prod, flat_grads = gp.jacobian_prod, gp.flat_grads

    def refused(*args):
        raise AssertionError("the projected path does not need this")

    gp.jacobian_prod = refused
    if projection == "kronecker":
        gp.flat_grads = refused
    try:
        got = model.influences_from_factors(factors, x, y)
    finally:
        gp.jacobian_prod, gp.flat_grads = jacobian_prod, flat_grads
    assert rel_err(got, expected) <= 1e-12
    other = np.random.default_rng(2).normal(size=(3, gp.n_parameters))
    assert rel_err(model.influences_from_factors(to_xp(other), x, y), other @ g.T) <= 1e-12


@pytest.fixture(scope="module")
def softmax_data():
    """Softmax regression with P = 10 x (150 + 1) = 1,510 parameters, 300 training points."""
    rng = np.random.default_rng(1)
    n, d, o = 300, 150, 10
    x = rng.normal(size=(n, d))
    y = rng.integers(0, o, size=n)
    return x, y, 0.1 * rng.normal(size=(o, d)), rng.normal(size=o)


@pytest.mark.parametrize("projection", ["dense", "kronecker"])
def test_error_against_direct_falls_with_k(xp, to_xp, softmax_data, projection):
    x, y, w, b = softmax_data
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    xx, yy = to_xp(x), to_xp(y)
    batches = [(xx[s, ...], yy[s]) for s in split(len(x), [97, 203])]
    lam = 1e-3
    xt, yt = xx[:10, ...], yy[:10]
    reference = (
        xi.DirectInfluence(gp, regularization=lam, second_order="empirical_fisher")
        .fit(batches)
        .influences(xt, yt, xx, yy)
    )
    errors = []
    for k in (64, 256, 1024):
        model = xi.ProjectedInfluence(gp, k=k, projection=projection, regularization=lam)
        errors.append(rel_err(model.fit(batches).influences(xt, yt, xx, yy), reference))
    print(projection, errors)
    # k = 1024 exceeds the rank of the 300 training gradients: nearly exact. A wrong
    # map or transpose stays at an error of order 1 for every k.
    assert errors[0] > 1.2 * errors[1] > 1.2 * errors[2], errors
    assert errors[2] < (0.01 if projection == "dense" else 0.1), errors


def test_dense_map_is_the_seeded_philox_draw(xp, to_xp, softmax_data):
    """Tile t of the map is Philox(key=seed, counter=(0, 0, t, stream)) / sqrt(k), whatever
    the memory budget (cached whole, or drawn again chunk by chunk)."""
    x, y, w, b = softmax_data
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    p, k, seed = gp.n_parameters, 5, 123
    assert p > TILE_COLUMNS
    proj = DenseProjection(p, k, seed=seed, stream=7, xp=xp, dtype=gp.dtype, device=gp.device)
    tiles = []
    for t, start in enumerate(range(0, p, TILE_COLUMNS)):
        rng = np.random.Generator(np.random.Philox(key=seed, counter=[0, 0, t, 7]))
        tiles.append(rng.standard_normal((k, min(TILE_COLUMNS, p - start))))
    expected = np.concatenate(tiles, axis=1) / np.sqrt(k)
    drawn = []
    block = proj._block

    def recording(start, stop):
        drawn.append(stop - start)
        return block(start, stop)

    proj._block = recording
    with xi.memory_budget_scope(1024):  # far too small to cache: drawn tile by tile
        chunked = to_numpy(proj.matrix())
    assert proj._full is None and drawn == [TILE_COLUMNS, p - TILE_COLUMNS]  # O(k x chunk)
    assert rel_err(chunked, expected) <= 1e-15
    assert rel_err(proj.matrix(), expected) <= 1e-15  # now cached whole
    v = np.random.default_rng(0).normal(size=(3, p))
    assert rel_err(proj.project(to_xp(v)), v @ expected.T) <= 1e-13
    assert rel_err(proj.transpose(to_xp(v[:, :k])), v[:, :k] @ expected) <= 1e-13


def test_same_seed_same_scores_under_any_budget_and_batching(xp, to_xp, softmax_data):
    x, y, w, b = softmax_data
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    xx, yy = to_xp(x), to_xp(y)
    xt, yt = xx[:4, ...], yy[:4]

    def scores(batch_sizes, **kw):
        batches = [(xx[s, ...], yy[s]) for s in split(len(x), batch_sizes)]
        model = xi.ProjectedInfluence(gp, k=40, regularization=1e-2, **kw).fit(batches)
        return to_numpy(model.influences(xt, yt, xx, yy))

    base = scores([300])
    with xi.memory_budget_scope(50_000):
        assert rel_err(scores([11, 200, 89]), base) <= 1e-12
    assert rel_err(scores([300], seed=0), base) == 0.0
    assert rel_err(scores([300], seed=1), base) > 0.1  # another seed, another map


def test_kronecker_projection_never_forms_gradients_but_equals_them(xp, to_xp, softmax_data):
    """project_grads (from kfac_factors) = R applied to the per-sample gradients; R^T is
    the adjoint of R; with biases the layer's matrix is [dW, db]."""
    x, y, w, b = softmax_data
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    batch = gp.prepare_batch(xi.Batch(to_xp(x[:20]), to_xp(y[:20])))
    proj = KroneckerProjection(gp, ["linear"], gp, (6, 9), seed=3)
    assert proj.output_size == 54 and proj.layer_dims["linear"] == (6, 9)
    direct = proj.project(gp.flat_grads(batch))
    assert rel_err(proj.project_grads(gp, batch), direct) <= 1e-12
    rng = np.random.default_rng(4)
    v, u = rng.normal(size=(3, gp.n_parameters)), rng.normal(size=(3, 54))
    lhs = np.sum(to_numpy(proj.project(to_xp(v))) * u)
    rhs = np.sum(v * to_numpy(proj.transpose(to_xp(u))))
    assert abs(lhs - rhs) <= 1e-10 * abs(lhs)


def test_kronecker_dimension_split(xp, to_xp, softmax_data):
    x, y, w, b = softmax_data
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))  # O = 10, I + 1 = 151
    dims = {
        k: KroneckerProjection(gp, ["linear"], gp, k, seed=0).layer_dims["linear"]
        for k in (64, 1024, 10**6)
    }
    assert dims == {64: (8, 8), 1024: (10, 102), 10**6: (10, 151)}


def test_blocks_and_bad_input(xp, to_xp, linreg_data):
    gp, batches, x, y = _linreg(to_xp, linreg_data)
    # per-parameter blocks: exact per block at k = P_b (dense), the sum of the blocks
    direct = xi.DirectInfluence(gp, block_structure="parameter", second_order="hessian")
    model = xi.ProjectedInfluence(
        gp, k=12, block_structure="parameter", second_order="hessian"
    )  # the weight has 12 entries; the bias block's k is capped at its 3
    direct.fit(batches)
    model.fit(batches)
    got = model.influences_by_block(x[:3, ...], y[:3, ...], x, y)
    want = direct.influences_by_block(x[:3, ...], y[:3, ...], x, y)
    assert list(got) == list(want) == ["weight", "bias"]
    assert [p.output_size for p in model.projections().values()] == [12, 3]
    for name in got:
        assert rel_err(got[name], want[name]) <= 1e-10
    with pytest.raises(xi.NotFittedError):
        xi.ProjectedInfluence(gp, k=4).influences(x, y)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            xi.ProjectedInfluence(gp, k=bad)
    with pytest.raises(ValueError, match="only with projection='kronecker'"):
        xi.ProjectedInfluence(gp, k=(2, 2))
    with pytest.raises(ValueError, match="projection must be"):
        xi.ProjectedInfluence(gp, k=4, projection="sparse")
    with pytest.raises(ValueError, match="distribution must be"):
        xi.ProjectedInfluence(gp, k=4, distribution="uniform")
    with pytest.raises(ValueError, match="seed must be"):
        xi.ProjectedInfluence(gp, k=4, seed=-1)
    with pytest.raises(ValueError, match="same block"):
        xi.ProjectedInfluence(gp, k=4, projection="kronecker", block_structure="parameter")
    fd = FiniteDifferenceGradients(
        lambda params, xb, yb: xp.sum((xb @ params["w"] - yb) ** 2, axis=1),
        {"w": to_xp(np.ones((4, 3)))},
    )
    with pytest.raises(TypeError, match="kfac_factors"):
        xi.ProjectedInfluence(fd, k=4, projection="kronecker")


@pytest.mark.parametrize("projection", ["dense", "kronecker"])
def test_default_damping_in_float32(xp, to_xp, softmax_data, projection):
    """The orthonormalization (a Cholesky factor of R R^T, or of the small Kronecker
    factors) keeps float32 scores at float32 accuracy against the float64 model."""
    x, y, w, b = softmax_data
    scores = {}
    for dtype in (xp.float32, xp.float64):
        gp = SoftmaxRegressionGradients(to_xp(w, dtype), to_xp(b, dtype))
        xx, yy = to_xp(x, dtype), to_xp(y)
        batches = [(xx[s, ...], yy[s]) for s in split(len(x), [97, 203])]
        model = xi.ProjectedInfluence(gp, k=64, projection=projection, regularization=1e-2)
        out = model.fit(batches).influences(xx[:6, ...], yy[:6], xx, yy)
        assert out.dtype == dtype
        scores[dtype] = to_numpy(out).astype(np.float64)
    err = rel_err(scores[xp.float32], scores[xp.float64])
    print(projection, err)
    assert err <= 1e-5, err


@pytest.mark.parametrize("projection", ["dense", "kronecker"])
@pytest.mark.parametrize("space", ["projected", "parameter"])
def test_fitted_model_pickles(xp, to_xp, softmax_data, projection, space):
    # dask ships fitted models to its workers: the maps held their namespace (a module)
    import pickle

    x, y, w, b = softmax_data
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    xx, yy = to_xp(x), to_xp(y)
    model = xi.ProjectedInfluence(
        gp, k=12, projection=projection, regularization=1e-2, regularization_space=space
    ).fit((xx, yy))
    expected = to_numpy(model.influences(xx[:3, ...], yy[:3], xx, yy))
    factors = model.influence_factors(xx[:3, ...], yy[:3])
    model.influences_from_factors(factors, xx, yy)  # fills the scoring caches
    clone = pickle.loads(pickle.dumps(model))
    assert rel_err(to_numpy(clone.influences(xx[:3, ...], yy[:3], xx, yy)), expected) == 0.0
