"""Influence functions against leave-one-out retraining (numpy, logistic regression).

Removing training point j (of n) changes the loss at test point t by about
I[t, j] / n, where I[t, j] = g_t^T (H + lambda I)^-1 g_j is the up-weighting
influence. This script checks that claim the honest way: it retrains the model
without each of 40 training points and compares the actual change of the test
losses with the prediction.

scikit-learn minimises |w|^2 / 2 + C sum_i l_i, which is n C times the mean loss
plus (lambda / 2) |w|^2 with lambda = 1 / (C n): the influence model uses the
same lambda. The intercept is a constant input column, so it is penalised too.

Run: python examples/numpy_logistic_loo.py   (needs scikit-learn)
"""

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression

import xinfluence as xi
from xinfluence.backends.numpy import LogisticRegressionGradients

x, y = load_breast_cancer(return_X_y=True)
x = (x - x.mean(0)) / x.std(0)
x = np.hstack([x, np.ones((len(x), 1))])  # the intercept, penalised like the weights
y = y.astype(np.float64)
x_train, y_train, x_test, y_test = x[:400], y[:400], x[400:], y[400:]
n, C = len(y_train), 0.5


def train(xs, ys):
    clf = LogisticRegression(C=C, fit_intercept=False, tol=1e-12, max_iter=10_000)
    return clf.fit(xs, ys).coef_  # (1, 31)


def test_losses(w):
    z = x_test @ w[0]
    return np.logaddexp(0.0, z) - y_test * z  # binary cross-entropy with logits


w = train(x_train, y_train)
gp = LogisticRegressionGradients(w)
infl = xi.DirectInfluence(gp, regularization=1.0 / (C * n)).fit((x_train, y_train))
scores = infl.influences(x_test, y_test, x_train, y_train)  # (N_test, N)

base = test_losses(w)
removed = np.random.default_rng(0).choice(n, size=40, replace=False)
actual, predicted = [], []
for j in removed:
    keep = np.arange(n) != j
    actual.append(test_losses(train(x_train[keep], y_train[keep])) - base)
    predicted.append(scores[:, j] / n)
actual, predicted = np.concatenate(actual), np.concatenate(predicted)

pearson = np.corrcoef(actual, predicted)[0, 1]
slope = (actual @ predicted) / (predicted @ predicted)
rel = np.linalg.norm(actual - predicted) / np.linalg.norm(actual)
print(f"{len(removed)} retrainings x {len(y_test)} test points")
print(f"Pearson correlation of predicted and actual loss changes: {pearson:.4f}")
print(f"slope actual / predicted: {slope:.3f}; relative error {rel:.3f}")
assert pearson > 0.95, "influence should predict leave-one-out retraining"
