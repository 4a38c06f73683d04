"""Softmax regression on scikit-learn's digits: Direct against a dense computation
written here, and finite differences against the analytic provider."""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from helpers import rel_err
from xinfluence.backends.numpy import FiniteDifferenceGradients, SoftmaxRegressionGradients
from xinfluence.types import Batch

sklearn_datasets = pytest.importorskip("sklearn.datasets")

K = 10
REG = 1e-3


@pytest.fixture(scope="module")
def digits():
    data = sklearn_datasets.load_digits()
    x = data.data / 16.0
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(3)
    w = 0.1 * rng.normal(size=(K, x.shape[1]))
    b = 0.1 * rng.normal(size=K)
    return x[:300], y[:300], x[300:340], y[300:340], w, b


def _probs(x, w, b):
    z = x @ w.T + b
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _jac(x_i):
    return np.hstack([np.kron(np.eye(K), x_i[None, :]), np.eye(K)])  # (K, P)


def _dense_reference(x, y, xt, yt, w, b):
    """g_i = J_i^T (p_i - e_y); H = mean J_i^T (diag p_i - p_i p_i^T) J_i."""
    p, pt = _probs(x, w, b), _probs(xt, w, b)
    g = np.stack([_jac(xi_).T @ (pi - np.eye(K)[yi]) for xi_, pi, yi in zip(x, p, y)])
    gt = np.stack([_jac(xi_).T @ (pi - np.eye(K)[yi]) for xi_, pi, yi in zip(xt, pt, yt)])
    h = np.mean(
        [_jac(xi_).T @ (np.diag(pi) - np.outer(pi, pi)) @ _jac(xi_) for xi_, pi in zip(x, p)],
        axis=0,
    )
    return gt @ np.linalg.solve(h + REG * np.eye(h.shape[0]), g.T)


def test_direct_equals_dense_computation(xp, to_xp, digits):
    x, y, xt, yt, w, b = digits
    expected = _dense_reference(x, y, xt, yt, w, b)
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    batches = [(to_xp(x[s]), to_xp(y[s])) for s in (slice(0, 97), slice(97, 260), slice(260, 300))]
    infl = xi.DirectInfluence(gp, regularization=REG).fit(batches)
    got = infl.influences(to_xp(xt), to_xp(yt), to_xp(x), to_xp(y))
    assert rel_err(got, expected) <= 1e-10


def _softmax_loss(params, x, y):
    from array_api_compat import array_namespace, device

    xp = array_namespace(x)
    z = x @ xp.matrix_transpose(params["weight"]) + params["bias"]
    m = xp.max(z, axis=1, keepdims=True)
    lse = xp.log(xp.sum(xp.exp(z - m), axis=1)) + m[:, 0]
    onehot = xp.astype(y[:, None] == xp.arange(z.shape[1], device=device(z))[None, :], z.dtype)
    return lse - xp.sum(z * onehot, axis=1)


def test_finite_differences_agree_with_analytic(xp, to_xp, digits):
    x, y, _, _, w, b = digits
    # gradients on the full 650-parameter model
    batch = Batch(to_xp(x[:20]), to_xp(y[:20]))
    analytic = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    fd = FiniteDifferenceGradients(_softmax_loss, {"weight": to_xp(w), "bias": to_xp(b)})
    assert rel_err(fd.flat_grads(batch), analytic.flat_grads(batch)) <= 1e-6

    # second derivatives (4 P D evaluations) on a smaller model: 12 features, 4 classes
    ws, bs = w[:4, :12], b[:4]
    ys = y[:15] % 4
    small = Batch(to_xp(x[:15, :12]), to_xp(ys))
    analytic = SoftmaxRegressionGradients(to_xp(ws), to_xp(bs))
    fd = FiniteDifferenceGradients(_softmax_loss, {"weight": to_xp(ws), "bias": to_xp(bs)})
    assert rel_err(fd.flat_mixed_grads(small), analytic.flat_mixed_grads(small)) <= 1e-6
    v = to_xp(np.random.default_rng(0).normal(size=(3, fd.n_parameters)))
    assert rel_err(fd.hvp(small, v), analytic.hvp(small, v)) <= 1e-6
    g = to_xp(np.random.default_rng(1).normal(size=(2, fd.n_parameters)))
    assert rel_err(fd.jacobian_prod(small, g), analytic.jacobian_prod(small, g)) <= 1e-6

    # the dense Hessians the influence models use (a solve then amplifies this
    # error by at most the condition number, which is why the comparison stops here)
    assert rel_err(fd.hessian(small), analytic.hessian(small)) <= 1e-6
