"""Oracle 1: linear regression in closed form, written out here with np.kron.

Model z = W x + b with W (O, D), per-sample loss l = (1/O) |z - y|^2, flat
parameters theta = [W.ravel(), b]. With J_i = [kron(I_O, x_i^T), I_O] (O, P):
  g_i = (2/O) J_i^T r_i,            r_i = W x_i + b - y_i
  H   = (2/O) mean_i J_i^T J_i
  d/dx_m g_i = (2/O) (dJ_i/dx_m^T r_i + J_i^T W[:, m]),  dJ_i/dx_m = [kron(I_O, e_m^T), 0]
"""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from helpers import rel_err, split
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import LinearRegressionGradients

NO, D, N_TRAIN, N_TEST = 2, 5, 25, 6
REG = 1e-3


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(42)
    x = rng.normal(size=(N_TRAIN + N_TEST, D)) * rng.uniform(0.2, 3.0, size=D)
    w = rng.normal(size=(NO, D))
    b = rng.normal(size=NO)
    y = x @ w.T + b + 0.3 * rng.normal(size=(N_TRAIN + N_TEST, NO))
    w_fit = w + 0.1 * rng.normal(size=w.shape)  # away from the optimum on purpose
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], w_fit, b


def jac(x_i):
    return np.hstack([np.kron(np.eye(NO), x_i[None, :]), np.eye(NO)])


def grads(x, y, w, b):
    return np.stack([2 / NO * jac(xi_).T @ (w @ xi_ + b - yi) for xi_, yi in zip(x, y)])


def mixed(x, y, w, b):
    out = np.zeros((len(x), D, NO * D + NO))
    for i, (xi_, yi) in enumerate(zip(x, y)):
        r = w @ xi_ + b - yi
        for m in range(D):
            e = np.zeros(D)
            e[m] = 1.0
            dj = np.hstack([np.kron(np.eye(NO), e[None, :]), np.zeros((NO, NO))])
            out[i, m] = 2 / NO * (dj.T @ r + jac(xi_).T @ w[:, m])
    return out


def hessian(x):
    return 2 / NO * np.mean([jac(xi_).T @ jac(xi_) for xi_ in x], axis=0)


def block_inverse(h, blocks, regs):
    inv = np.zeros_like(h)
    for sl, reg in zip(blocks, regs):
        hb = h[sl, sl]
        inv[sl, sl] = np.linalg.inv(hb + reg * np.eye(hb.shape[0]))
    return inv


WEIGHT, BIAS = slice(0, NO * D), slice(NO * D, NO * D + NO)
CASES = {
    "full": ([slice(0, NO * D + NO)], [REG], "full", REG),
    "parameter": ([WEIGHT, BIAS], [REG, REG], "parameter", REG),
    "parameter-dict-reg": ([WEIGHT, BIAS], [REG, 0.05], "parameter", {"weight": REG, "bias": 0.05}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_direct_matches_closed_form(xp, to_xp, problem, case, mode):
    x, y, xt, yt, w, b = problem
    blocks, regs, structure, reg = CASES[case]
    inv = block_inverse(hessian(x), blocks, regs)
    gt = grads(xt, yt, w, b)
    if mode == "up":
        expected = gt @ inv @ grads(x, y, w, b).T
    else:
        expected = np.einsum("tp,pq,nmq->tnm", gt, inv, mixed(x, y, w, b))

    gp = LinearRegressionGradients(to_xp(w), to_xp(b))
    batches = [(to_xp(x[s]), to_xp(y[s])) for s in split(N_TRAIN, [7, 13, 5])]
    infl = xi.DirectInfluence(gp, regularization=reg, block_structure=structure).fit(batches)
    got = infl.influences(to_xp(xt), to_xp(yt), to_xp(x), to_xp(y), mode=mode)
    assert rel_err(got, expected) <= 1e-10

    # factors route and by-block sums give the same numbers
    factors = infl.influence_factors(to_xp(xt), to_xp(yt))
    assert rel_err(factors, gt @ inv) <= 1e-10
    from_factors = infl.influences_from_factors(factors, to_xp(x), to_xp(y), mode=mode)
    assert rel_err(from_factors, expected) <= 1e-10
    by_block = infl.influences_by_block(to_xp(xt), to_xp(yt), to_xp(x), to_xp(y), mode=mode)
    assert list(by_block) == (["full"] if structure == "full" else ["weight", "bias"])
    assert rel_err(sum(to_numpy(v) for v in by_block.values()), expected) <= 1e-10


def test_gauss_newton_and_self_influence(xp, to_xp, problem):
    x, y, xt, yt, w, b = problem
    g = grads(x, y, w, b)
    gn = g.T @ g / len(x)
    gt = grads(xt, yt, w, b)
    expected = gt @ np.linalg.inv(gn + REG * np.eye(gn.shape[0])) @ gt.T
    gp = LinearRegressionGradients(to_xp(w), to_xp(b))
    infl = xi.DirectInfluence(gp, regularization=REG, second_order="empirical_fisher")
    infl.fit([(to_xp(x[s]), to_xp(y[s])) for s in split(N_TRAIN, [7, 13, 5])])
    got = infl.influences(to_xp(xt), to_xp(yt))  # x=None: test points against themselves
    assert rel_err(got, expected) <= 1e-10


def test_more_test_than_training_points(xp, to_xp, problem):
    x, y, xt, yt, w, b = problem
    train, test = slice(0, 4), slice(0, 20)  # 4 training points, 20 test points
    inv = np.linalg.inv(hessian(x[train]) + 0.1 * np.eye(NO * D + NO))
    expected = np.einsum(
        "tp,pq,nmq->tnm", grads(x[test], y[test], w, b), inv, mixed(x[train], y[train], w, b)
    )
    gp = LinearRegressionGradients(to_xp(w), to_xp(b))
    infl = xi.DirectInfluence(gp, regularization=0.1).fit((to_xp(x[train]), to_xp(y[train])))
    got = infl.influences(
        to_xp(x[test]), to_xp(y[test]), to_xp(x[train]), to_xp(y[train]), mode="perturbation"
    )
    assert tuple(got.shape) == (20, 4, D)
    assert rel_err(got, expected) <= 1e-10


def test_with_regularization_refactorises(xp, to_xp, problem):
    x, y, xt, yt, w, b = problem
    gt, g = grads(xt, yt, w, b), grads(x, y, w, b)
    h = hessian(x)
    gp = LinearRegressionGradients(to_xp(w), to_xp(b))
    infl = xi.DirectInfluence(gp, regularization=REG).fit((to_xp(x), to_xp(y)))
    infl.with_regularization(0.5)
    expected = gt @ np.linalg.inv(h + 0.5 * np.eye(h.shape[0])) @ g.T
    assert rel_err(infl.influences(to_xp(xt), to_xp(yt), to_xp(x), to_xp(y)), expected) <= 1e-10


def test_identity_influence_is_gradient_similarity(xp, to_xp, problem):
    x, y, xt, yt, w, b = problem
    gp = LinearRegressionGradients(to_xp(w), to_xp(b))
    infl = xi.IdentityInfluence(gp, block_structure="parameter").fit((to_xp(x), to_xp(y)))
    expected = grads(xt, yt, w, b) @ grads(x, y, w, b).T
    assert rel_err(infl.influences(to_xp(xt), to_xp(yt), to_xp(x), to_xp(y)), expected) <= 1e-12
