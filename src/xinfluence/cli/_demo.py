"""The ``xinfluence demo`` computation: digits with flipped labels, one influence model.

Everything here is numbers; :mod:`xinfluence.cli._report` turns them into the
report. The data is scikit-learn's bundled digits (offline): 1797 images of
8x8 pixels, split into 1297 training and 500 test images, with a fraction of
the training labels replaced by another class at random.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import xinfluence as xi

from .. import _xp
from ..types import Batch, GradientProvider

METHODS = ("direct", "cg", "lissa", "arnoldi", "nystroem", "datainf", "ekfac", "identity")
BACKENDS = ("numpy", "torch", "jax")
N_TRAIN = 1297
N_SHOWN = 6  # misclassified test points shown with their training images
N_TOP = 8  # helpful and harmful training images per shown test point
N_QUERY = 60  # test points whose influences are compared with the exact ones


class DemoError(Exception):
    """A demo that cannot run as asked (a missing package, a bad option)."""


@dataclass(frozen=True)
class DigitsProblem:
    """Digits with noisy training labels; ``x`` scaled to ``[0, 1]``, float64."""

    x_train: np.ndarray  # (N, 64)
    y_train: np.ndarray  # (N,) the labels the model is trained on (some flipped)
    y_clean: np.ndarray  # (N,) the original labels
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def flipped(self) -> np.ndarray:
        return self.y_train != self.y_clean


def load_problem(seed: int, flip_fraction: float) -> DigitsProblem:
    """Shuffle the digits, split them and flip ``flip_fraction`` of the training labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DemoError(_missing("scikit-learn")) from exc
    if not 0.0 <= flip_fraction < 1.0:
        raise DemoError(f"--flip-fraction must be in [0, 1), got {flip_fraction}")
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = x[order] / 16.0, y[order].astype(np.int64)
    x_train, y_clean, x_test, y_test = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    y_train = y_clean.copy()
    n_flip = round(flip_fraction * N_TRAIN)
    idx = rng.choice(N_TRAIN, size=n_flip, replace=False)
    # another class, uniformly among the 9 others
    y_train[idx] = (y_clean[idx] + rng.integers(1, 10, size=n_flip)) % 10
    return DigitsProblem(x_train, y_train, y_clean, x_test, y_test)


def _missing(package: str) -> str:
    return (
        f"the demo needs {package}: install the demo extra from the clone, "
        "pip install -e '.[demo]' (see the README)"
    )


# -- trained models ------------------------------------------------------------
@dataclass
class TrainedModel:
    """A trained classifier and its gradient provider in one backend."""

    description: str
    provider: GradientProvider
    regularization: float  # damping: the L2 strength of training (twice it for MLPs)
    predict_proba: Callable[[np.ndarray], np.ndarray]
    to_backend: Callable[[np.ndarray], Any]
    train_seconds: float
    n_parameters: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_parameters = self.provider.n_parameters


def train(backend: str, problem: DigitsProblem, seed: int) -> TrainedModel:
    """Train to convergence with an L2 penalty ``lambda / 2 |theta|^2`` on the mean loss."""
    if backend == "numpy":
        return _train_numpy(problem)
    if backend == "torch":
        return _train_torch(problem, seed)
    if backend == "jax":
        return _train_jax(problem, seed)
    raise DemoError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def _train_numpy(problem: DigitsProblem) -> TrainedModel:
    from sklearn.linear_model import LogisticRegression

    from ..backends.numpy import SoftmaxRegressionGradients

    n = len(problem.y_train)
    c = 1.0
    start = time.perf_counter()
    # sklearn minimises |w|^2 / 2 + C sum_i l_i, i.e. mean_i l_i + |w|^2 / (2 C n)
    clf = LogisticRegression(C=c, tol=1e-10, max_iter=5000)
    clf.fit(problem.x_train, problem.y_train)
    seconds = time.perf_counter() - start
    gp = SoftmaxRegressionGradients(clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64))
    return TrainedModel(
        description="softmax regression (64 pixels -> 10 classes), scikit-learn L-BFGS",
        provider=gp,
        regularization=1.0 / (c * n),
        predict_proba=clf.predict_proba,
        to_backend=lambda a: a,
        train_seconds=seconds,
    )


_MLP_HIDDEN = 32
_MLP_L2 = 1e-2  # weight decay
# Damping of the MLPs' influences: H + L2 I is PD only at an exact minimum, and
# L-BFGS stops near one, where the smallest eigenvalue can dip just below -L2.
_MLP_DAMPING = 2 * _MLP_L2


def _minimize(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray) -> np.ndarray:
    from scipy.optimize import minimize

    res = minimize(
        fun, x0, jac=True, method="L-BFGS-B", options={"maxiter": 3000, "gtol": 1e-9, "ftol": 1e-15}
    )
    return np.asarray(res.x)


def _train_torch(problem: DigitsProblem, seed: int) -> TrainedModel:
    try:
        import torch
    except ImportError as exc:
        raise DemoError(
            "--backend torch needs PyTorch: pip install -e '.[demo,torch]' (CPU build: see the "
            "README)"
        ) from exc
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from ..backends.torch import TorchGradientProvider

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, _MLP_HIDDEN), torch.nn.Tanh(), torch.nn.Linear(_MLP_HIDDEN, 10)
    ).double()
    x = torch.from_numpy(problem.x_train)
    y = torch.from_numpy(problem.y_train)
    params = list(model.parameters())

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        vector_to_parameters(torch.from_numpy(theta), params)
        for p in params:
            p.grad = None
        flat = parameters_to_vector(params)
        loss = torch.nn.functional.cross_entropy(model(x), y) + 0.5 * _MLP_L2 * flat @ flat
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        return float(loss.detach()), grad.numpy().copy()

    start = time.perf_counter()
    theta = _minimize(fun, parameters_to_vector(params).detach().numpy().copy())
    with torch.no_grad():
        vector_to_parameters(torch.from_numpy(theta), params)
    seconds = time.perf_counter() - start
    model.eval()

    def predict_proba(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(a)), dim=1).numpy()

    return TrainedModel(
        description=f"MLP 64-{_MLP_HIDDEN}-10 (tanh) in PyTorch, float64, L-BFGS",
        provider=TorchGradientProvider(model, torch.nn.functional.cross_entropy),
        regularization=_MLP_DAMPING,
        predict_proba=predict_proba,
        to_backend=torch.from_numpy,
        train_seconds=seconds,
    )


def _train_jax(problem: DigitsProblem, seed: int) -> TrainedModel:
    try:
        import jax
    except ImportError as exc:
        raise DemoError("--backend jax needs JAX: pip install -e '.[demo,jax]'") from exc
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from ..backends.jax import JaxGradientProvider

    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "dense1": {
            "kernel": jax.random.normal(k1, (64, _MLP_HIDDEN), jnp.float64) / 8.0,
            "bias": jnp.zeros(_MLP_HIDDEN, jnp.float64),
        },
        "dense2": {
            "kernel": jax.random.normal(k2, (_MLP_HIDDEN, 10), jnp.float64) / _MLP_HIDDEN**0.5,
            "bias": jnp.zeros(10, jnp.float64),
        },
    }

    def hidden(p: Any, a: Any) -> Any:
        return jnp.tanh(a @ p["dense1"]["kernel"] + p["dense1"]["bias"])

    def apply(p: Any, a: Any) -> Any:
        return hidden(p, a) @ p["dense2"]["kernel"] + p["dense2"]["bias"]

    def loss(out: Any, t: Any) -> Any:
        return jnp.mean(
            jax.nn.logsumexp(out, axis=1) - jnp.take_along_axis(out, t[:, None], 1)[:, 0]
        )

    flat0, unravel = ravel_pytree(params)
    x, y = jnp.asarray(problem.x_train), jnp.asarray(problem.y_train)

    @jax.jit
    def objective(theta: Any) -> Any:
        return loss(apply(unravel(theta), x), y) + 0.5 * _MLP_L2 * theta @ theta

    value_and_grad = jax.jit(jax.value_and_grad(objective))

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = value_and_grad(jnp.asarray(theta))
        return float(v), np.asarray(g, dtype=np.float64)

    start = time.perf_counter()
    trained = unravel(jnp.asarray(_minimize(fun, np.asarray(flat0, dtype=np.float64))))
    seconds = time.perf_counter() - start

    def predict_proba(a: np.ndarray) -> np.ndarray:
        return np.asarray(jax.nn.softmax(apply(trained, jnp.asarray(a)), axis=1))

    gp = JaxGradientProvider(
        apply,
        trained,
        loss,
        # declared dense layers: what EK-FAC needs (their inputs for a batch)
        dense_layers={"dense1": lambda p, a: a, "dense2": hidden},
    )
    return TrainedModel(
        description=f"MLP 64-{_MLP_HIDDEN}-10 (tanh) in JAX, float64, L-BFGS",
        provider=gp,
        regularization=_MLP_DAMPING,
        predict_proba=predict_proba,
        to_backend=jnp.asarray,
        train_seconds=seconds,
    )


# -- influence models ----------------------------------------------------------
def make_influence(method: str, gp: GradientProvider, regularization: float) -> Any:
    """The demo's influence model for ``method``, with the options it uses."""
    if method == "direct":
        return xi.DirectInfluence(gp, regularization=regularization)
    if method == "cg":
        return xi.CgInfluence(gp, regularization=regularization, rtol=1e-8)
    if method == "lissa":
        # one curvature product per iteration for all right-hand sides; at the demo's
        # small damping LiSSA is far from converged after 200 (the report shows how far)
        return xi.LissaInfluence(gp, regularization=regularization, maxiter=200, rtol=1e-6)
    if method == "arnoldi":
        return xi.ArnoldiInfluence(gp, regularization=regularization, rank=60)
    if method == "nystroem":
        return xi.NystroemSketchInfluence(gp, regularization=regularization, rank=120)
    if method == "datainf":
        return xi.InverseHarmonicMeanInfluence(gp, regularization=regularization)
    if method == "ekfac":
        return xi.EkfacInfluence(gp, regularization=regularization)
    if method == "identity":
        return xi.IdentityInfluence(gp)
    raise DemoError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")


@dataclass
class MethodRun:
    """One influence model's results on the demo's queries."""

    name: str
    query: np.ndarray  # (N_query, N_train) up-weighting influences
    self_influence: np.ndarray  # (N_train,)
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)  # distinct warning messages


def run_method(
    method: str, model: TrainedModel, problem: DigitsProblem, query_idx: np.ndarray
) -> MethodRun:
    """Fit, then the influences of the query test points and the self-influences."""
    gp, conv = model.provider, model.to_backend
    x_tr, y_tr = conv(problem.x_train), conv(problem.y_train)
    x_q, y_q = conv(problem.x_test[query_idx]), conv(problem.y_test[query_idx])
    infl = make_influence(method, gp, model.regularization)
    seconds: dict[str, float] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        query, self_infl = _queries(infl, gp, x_tr, y_tr, x_q, y_q, seconds)
    # one line per kind of warning (their figures differ from solve to solve)
    messages = list(dict.fromkeys(str(w.message).split(" (")[0].split(";")[0] for w in caught))
    return MethodRun(method, query, self_infl, seconds, messages)


def _queries(
    infl: Any, gp: GradientProvider, x_tr: Any, y_tr: Any, x_q: Any, y_q: Any, seconds: dict
) -> tuple[np.ndarray, np.ndarray]:
    t0 = time.perf_counter()
    infl.fit((x_tr, y_tr))
    seconds["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    query = _xp.to_numpy(infl.influences(x_q, y_q, x_tr, y_tr))
    seconds["influences"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # I[j, j] = g_j^T (H + lambda I)^-1 g_j without the (N, N) matrix
    factors = _xp.to_numpy(infl.influence_factors(x_tr, y_tr))
    grads = _xp.to_numpy(gp.flat_grads(gp.prepare_batch(Batch(x_tr, y_tr))))
    self_infl = np.einsum("np,np->n", factors, grads)
    seconds["self-influence"] = time.perf_counter() - t0
    return np.asarray(query, np.float64), self_infl


# -- the whole demo ------------------------------------------------------------
@dataclass
class DemoResult:
    backend: str
    method: str
    problem: DigitsProblem
    model: TrainedModel
    train_accuracy: float
    test_accuracy: float
    train_loss: np.ndarray  # (N_train,) per-sample loss at the given labels
    query_idx: np.ndarray  # test indices of the compared queries
    shown: np.ndarray  # positions in query_idx of the shown misclassified points
    predicted: np.ndarray  # (N_test,) predicted classes
    run: MethodRun
    exact: MethodRun | None  # DirectInfluence, when the method is not direct
    seconds: dict[str, float]


def run_demo(backend: str, method: str, seed: int = 0, flip_fraction: float = 0.1) -> DemoResult:
    """Train, fit ``method`` (and the exact solve to compare with) and collect the numbers."""
    if method not in METHODS:
        raise DemoError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    problem = load_problem(seed, flip_fraction)
    seconds["data"] = time.perf_counter() - t0
    model = train(backend, problem, seed)
    seconds["train"] = model.train_seconds
    proba_train = model.predict_proba(problem.x_train)
    proba_test = model.predict_proba(problem.x_test)
    predicted = np.argmax(proba_test, axis=1)
    n = len(problem.y_train)
    train_loss = -np.log(np.maximum(proba_train[np.arange(n), problem.y_train], 1e-300))
    wrong = np.flatnonzero(predicted != problem.y_test)
    if len(wrong) == 0:
        raise DemoError("the model classifies every test point correctly: nothing to show")
    shown_test = wrong[:N_SHOWN]
    others = np.setdiff1d(np.arange(len(problem.y_test)), shown_test)[: N_QUERY - len(shown_test)]
    query_idx = np.concatenate([shown_test, others])
    run = run_method(method, model, problem, query_idx)
    exact = None if method == "direct" else run_method("direct", model, problem, query_idx)
    return DemoResult(
        backend=backend,
        method=method,
        problem=problem,
        model=model,
        train_accuracy=float(np.mean(np.argmax(proba_train, 1) == problem.y_train)),
        test_accuracy=float(np.mean(predicted == problem.y_test)),
        train_loss=train_loss,
        query_idx=query_idx,
        shown=np.arange(len(shown_test)),
        predicted=predicted,
        run=run,
        exact=exact,
        seconds=seconds,
    )


# -- mislabel detection ----------------------------------------------------------
def detection_curve(scores: np.ndarray, flipped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after inspecting the ``k`` highest scores, ``k = 1..N``."""
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(flipped[order])
    k = np.arange(1, len(scores) + 1)
    return hits / k, hits / max(int(flipped.sum()), 1)


def average_precision(scores: np.ndarray, flipped: np.ndarray) -> float:
    """Mean of the precision at the rank of each flipped label (area under the PR curve)."""
    precision, _ = detection_curve(scores, flipped)
    order = np.argsort(-scores, kind="stable")
    hit = flipped[order]
    return float(precision[hit].mean()) if hit.any() else 0.0


def recall_at(scores: np.ndarray, flipped: np.ndarray, fraction: float) -> float:
    """Share of the flipped labels among the top ``fraction`` of the ranking."""
    _, recall = detection_curve(scores, flipped)
    return float(recall[max(int(round(fraction * len(scores))) - 1, 0)])


def relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """``|approx - exact|_F / |exact|_F``."""
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
