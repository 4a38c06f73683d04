"""Bad input gets a specific exception whose message says what was expected."""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import FiniteDifferenceGradients, LinearRegressionGradients


@pytest.fixture
def data(to_xp):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 2))
    w, b = rng.normal(size=(2, 3)), rng.normal(size=2)
    return to_xp(x), to_xp(y), LinearRegressionGradients(to_xp(w), to_xp(b))


@pytest.fixture
def fitted(data):
    x, y, gp = data
    return xi.DirectInfluence(gp, regularization=1e-3).fit((x, y)), x, y


def test_lengths_differ(data):
    x, y, gp = data
    with pytest.raises(ValueError, match=r"same number of samples.*len\(x\)=12.*len\(y\)=5"):
        xi.Batch(x, y[:5, ...])
    with pytest.raises(ValueError, match="same number of samples"):
        xi.DirectInfluence(gp).fit((x, y[:5, ...]))


def test_x_without_y(fitted):
    infl, x, y = fitted
    with pytest.raises(ValueError, match="x and y must be given together"):
        infl.influences(x, y, x)
    with pytest.raises(ValueError, match="x and y must be given together"):
        infl.influences(x, y, None, y)


def test_wrong_feature_dimension(fitted, to_xp):
    infl, x, y = fitted
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 3\), got \(4, 5\)"):
        infl.influences(to_xp(np.ones((4, 5))), y[:4, ...])
    with pytest.raises(ValueError, match=r"expected y of shape \(N, 2\)"):
        infl.influences(x[:4, ...], to_xp(np.ones((4, 3))))


def test_mixed_namespaces(fitted, backend_name):
    infl, x, y = fitted
    other = __import__("array_api_strict") if backend_name == "numpy" else __import__("numpy")
    foreign = other.asarray(np.ones((4, 3)))
    with pytest.raises(xi.NamespaceMismatchError, match="expected x as .* arrays"):
        infl.influences(foreign, y[:4, ...])
    with pytest.raises(TypeError):  # NamespaceMismatchError is a TypeError
        infl.fit((foreign, other.asarray(np.ones((4, 2)))))


def test_nan_in_inputs(fitted, to_xp):
    infl, x, y = fitted
    bad = np.ones((4, 3))
    bad[1, 2] = np.nan
    with pytest.raises(xi.NonFiniteError, match="x contains NaN"):
        infl.influences(to_xp(bad), y[:4, ...])
    with pytest.raises(xi.NonFiniteError, match="x contains NaN"):
        xi.DirectInfluence(infl.gradient_provider).fit((to_xp(bad), y[:4, ...]))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_in_gradients(xp, to_xp):
    def loss(params, x, y):
        # sqrt of a negative feature: NaN gradients for such inputs
        return (xp.sqrt(x[:, 0]) * params["w"][0] - y) ** 2

    gp = FiniteDifferenceGradients(loss, {"w": to_xp(np.array([0.5]))})
    x_ok, y = to_xp(np.array([[1.0], [2.0], [3.0]])), to_xp(np.array([1.0, 0.0, 2.0]))
    infl = xi.DirectInfluence(gp, regularization=1e-3).fit((x_ok, y))
    with pytest.raises(xi.NonFiniteError, match="NaN"):
        infl.influences(to_xp(np.array([[-1.0]])), to_xp(np.array([0.0])))
    with pytest.raises(xi.NonFiniteError, match="curvature"):
        xi.DirectInfluence(gp, regularization=1e-3).fit((to_xp(np.array([[-1.0]])), y[:1, ...]))


def test_negative_regularization(data):
    _, _, gp = data
    with pytest.raises(ValueError, match="regularization must be a finite float >= 0, got -0.1"):
        xi.DirectInfluence(gp, regularization=-0.1)
    with pytest.raises(ValueError, match=r"regularization\['bias'\]"):
        xi.DirectInfluence(
            gp, block_structure="parameter", regularization={"weight": 1.0, "bias": -1}
        )
    with pytest.raises(ValueError, match=">= 0"):
        xi.DirectInfluence(gp, regularization=1e-3).with_regularization(-1.0)


def test_unknown_mode(fitted):
    infl, x, y = fitted
    with pytest.raises(ValueError, match="mode must be .*'up' or 'perturbation', got 'UP'"):
        infl.influences(x, y, mode="UP")
    assert xi.InfluenceMode.parse("perturbation") is xi.InfluenceMode.Perturbation


def test_unknown_block_structure(data):
    _, _, gp = data
    with pytest.raises(ValueError, match="block_structure must be one of"):
        xi.DirectInfluence(gp, block_structure="layers")
    with pytest.raises(ValueError, match="unknown parameter 'weights'"):
        xi.DirectInfluence(gp, block_structure={"a": ["weights"]})
    with pytest.raises(ValueError, match="in two blocks"):
        xi.DirectInfluence(gp, block_structure={"a": ["weight"], "b": ["weight", "bias"]})
    with pytest.raises(ValueError, match="second_order must be"):
        xi.DirectInfluence(gp, second_order="fisher")


def test_regularization_dict_names_unknown_block(data):
    _, _, gp = data
    with pytest.raises(ValueError, match=r"unknown blocks \['layer1'\]"):
        xi.DirectInfluence(gp, block_structure="parameter", regularization={"layer1": 1.0})
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        xi.DirectInfluence(gp, block_structure="parameter", regularization={"weight": 1.0})


def test_query_before_fit(data):
    x, y, gp = data
    infl = xi.DirectInfluence(gp)
    for call in (
        lambda: infl.influences(x, y),
        lambda: infl.influence_factors(x, y),
        lambda: infl.influences_from_factors(x, x, y),
    ):
        with pytest.raises(xi.NotFittedError, match="call fit"):
            call()


def test_singular_curvature_without_regularization(to_xp):
    rng = np.random.default_rng(1)
    # 3 samples, 6 features: the Gram matrix has rank <= 3 < 7 parameters
    gp = LinearRegressionGradients(to_xp(rng.normal(size=(1, 6))), to_xp(np.zeros(1)))
    x, y = to_xp(rng.normal(size=(3, 6))), to_xp(rng.normal(size=(3, 1)))
    with pytest.raises(xi.NotPositiveDefiniteError, match="smallest eigenvalue .* regularization"):
        xi.DirectInfluence(gp, regularization=0.0).fit((x, y))
    # a regularization makes it well posed
    xi.DirectInfluence(gp, regularization=1e-3).fit((x, y))


def test_indefinite_hessian_reports_eigenvalue(to_xp):
    # loss -x*w^2: Hessian -2 mean(x) < 0
    def loss(params, x, y):
        return -x[:, 0] * params["w"][0] ** 2

    gp = FiniteDifferenceGradients(loss, {"w": to_xp(np.array([1.0]))})
    x, y = to_xp(np.array([[1.0], [3.0]])), to_xp(np.array([0.0, 0.0]))
    with pytest.raises(xi.NotPositiveDefiniteError, match=r"smallest eigenvalue is -4"):
        xi.DirectInfluence(gp, regularization=1.0).fit((x, y))


def test_bad_data_container(data):
    _, _, gp = data
    with pytest.raises(TypeError, match="expected a Batch"):
        xi.DirectInfluence(gp).fit(3.0)
    with pytest.raises(ValueError, match="no batches"):
        xi.DirectInfluence(gp).fit([])


def test_finite_check_is_exact_near_overflow(xp, to_xp):
    """The finiteness check sums first; a sum that overflows must not be taken
    for a non-finite entry, and a single NaN or inf must be found."""
    from xinfluence import _xp

    big = to_xp(np.full((3, 4), 1e308))
    assert not _xp.any_nonfinite(big, xp=xp)
    for bad in (np.nan, np.inf, -np.inf):
        a = np.ones((3, 4))
        a[2, 1] = bad
        assert _xp.any_nonfinite(to_xp(a), xp=xp)


def test_plus_diagonal_copies(xp, to_xp):
    from xinfluence import _xp

    a = np.arange(9.0).reshape(3, 3)
    x = to_xp(a)
    out = _xp.plus_diagonal(x, 0.5, xp=xp)
    np.testing.assert_array_equal(_xp.to_numpy(out), a + 0.5 * np.eye(3))
    np.testing.assert_array_equal(_xp.to_numpy(x), a)  # the input is untouched


@pytest.mark.parametrize("n", [7, 1100])  # 1100: the tiled path of torch and numpy
def test_symmetrize_is_the_scaled_symmetric_part(xp, to_xp, n):
    from xinfluence import _xp

    a = np.random.default_rng(n).normal(size=(n, n))
    out = _xp.to_numpy(_xp.symmetrize(to_xp(a), xp=xp, scale=3.0))
    np.testing.assert_allclose(out, (a + a.T) * 1.5, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out, out.T)


def _saddle_loss(params, x, y):  # Hessian diag(-2 mean x0, 2 mean x1)
    w = params["w"]
    return -x[:, 0] * w[0] ** 2 + x[:, 1] * w[1] ** 2 + 0 * y


def test_lissa_on_indefinite_curvature_names_the_regularization(to_xp):
    """No scale makes LiSSA converge on a negative eigenvalue of H + lambda I: the
    error says so, with the regularization that suffices (as Direct and CG do)."""
    gp = FiniteDifferenceGradients(_saddle_loss, {"w": to_xp(np.array([1.0, 0.5]))})
    x = to_xp(np.array([[1.0, 2.0], [3.0, 1.0], [2.0, 0.5]]))  # H = diag(-4, 7/3)
    y = to_xp(np.zeros(3))
    model = xi.LissaInfluence(gp, regularization=1.0, maxiter=500).fit((x, y))
    with pytest.raises(xi.DivergenceError, match="negative eigenvalue") as info:
        model.influences(x, y)
    message = str(info.value)
    assert "raise scale" not in message and "regularization to at least" in message
    assert abs(info.value.smallest_eigenvalue - (-3.0)) < 0.1  # -4 + 1
    suggested = info.value.suggested_regularization
    assert 4.0 < suggested <= 10.0  # enough (> |-4|), not absurd
    # with it, LiSSA converges to the dense solve
    h = np.diag([-4.0, 7.0 / 3.0]) + suggested * np.eye(2)
    g = np.array([[-2.0, 2.0], [-6.0, 1.0], [-4.0, 0.5]])  # (-2 x0 w0, 2 x1 w1)
    expected = g @ np.linalg.solve(h, g.T)
    got = xi.LissaInfluence(gp, regularization=suggested, rtol=1e-8, maxiter=1000).fit((x, y))
    got = to_numpy(got.influences(x, y))
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))
