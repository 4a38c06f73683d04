"""Oracle 2: leave-one-out retraining of L2-regularised logistic regression.

Objective ``mean_i l_i(theta) + lam/2 |theta|^2`` on scikit-learn's
breast_cancer (standardised), all parameters regularised, fitted by Newton's
method to a gradient norm below 1e-10. Removing point j keeps the 1/n
normalisation: ``theta_-j = argmin (1/n) sum_{i != j} l_i + lam/2 |theta|^2``.
First order: ``l_t(theta_-j) - l_t(theta) ~ I[t, j] / n`` with regularization lam.
"""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from helpers import logistic_losses, sigmoid
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import LogisticRegressionGradients

sklearn_datasets = pytest.importorskip("sklearn.datasets")

LAM = 0.1
N_TRAIN = 400


def _newton(xa, y, weights, n, theta0, tol=1e-12):
    """argmin (1/n) sum_i w_i l_i + lam/2 |theta|^2 (w_i in {0, 1})."""
    theta = theta0.copy()
    for _ in range(100):
        p = sigmoid(xa @ theta)
        grad = xa.T @ (weights * (p - y)) / n + LAM * theta
        if np.linalg.norm(grad) < tol:
            return theta
        hess = (xa * (weights * p * (1 - p))[:, None]).T @ xa / n + LAM * np.eye(len(theta))
        theta = theta - np.linalg.solve(hess, grad)
    raise AssertionError("Newton did not converge")


@pytest.fixture(scope="module")
def fitted():
    data = sklearn_datasets.load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    y = data.target.astype(np.float64)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    xa = np.hstack([x, np.ones((len(x), 1))])
    xtr, ytr = xa[:N_TRAIN], y[:N_TRAIN]
    theta = _newton(xtr, ytr, np.ones(N_TRAIN), N_TRAIN, np.zeros(xa.shape[1]))
    p = sigmoid(xtr @ theta)
    assert np.linalg.norm(xtr.T @ (p - ytr) / N_TRAIN + LAM * theta) < 1e-10
    return x, y, theta


def test_leave_one_out_matches_influence(xp, to_xp, fitted):
    x, y, theta = fitted
    d = x.shape[1]
    xa = np.hstack([x, np.ones((len(x), 1))])
    xtr, ytr, xte, yte = xa[:N_TRAIN], y[:N_TRAIN], xa[N_TRAIN:], y[N_TRAIN:]
    test_losses = logistic_losses(theta, xte, yte)
    worst = np.argsort(test_losses)[-3:]

    gp = LogisticRegressionGradients(to_xp(theta[None, :d]), to_xp(theta[d:]))
    infl = xi.DirectInfluence(gp, regularization=LAM)
    infl.fit(
        [(to_xp(x[s]), to_xp(y[s])) for s in (slice(0, 123), slice(123, 350), slice(350, 400))]
    )
    scores = to_numpy(
        infl.influences(
            to_xp(x[N_TRAIN:][worst]), to_xp(yte[worst]), to_xp(x[:N_TRAIN]), to_xp(ytr)
        )
    )
    assert scores.shape == (3, N_TRAIN)
    predicted = scores / N_TRAIN

    rng = np.random.default_rng(1)
    report = []
    for row, t in enumerate(worst):
        top = np.argsort(-np.abs(predicted[row]))[:30]
        rest = np.setdiff1d(np.arange(N_TRAIN), top)
        chosen = np.concatenate([top, rng.choice(rest, size=30, replace=False)])
        actual = np.empty(len(chosen))
        for k, j in enumerate(chosen):
            w = np.ones(N_TRAIN)
            w[j] = 0.0
            theta_j = _newton(xtr, ytr, w, N_TRAIN, theta)
            actual[k] = logistic_losses(theta_j, xte[t : t + 1], yte[t : t + 1])[0] - test_losses[t]
        pred = predicted[row, chosen]
        pearson = np.corrcoef(pred, actual)[0, 1]
        slope = float(pred @ actual / (pred @ pred))  # least squares actual ~ slope * pred
        report.append((int(t), pearson, slope))
        assert pearson >= 0.995, report
        assert 0.95 <= slope <= 1.10, report
    print("LOO (test point, pearson, slope):", report)
