"""Pickling, copying, and saving / loading fitted models.

Oracle: the model before the round trip. Every reload must reproduce its
influences bit for bit (same operations on the same numbers).
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest

import xinfluence as xi
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import (
    FiniteDifferenceGradients,
    LinearRegressionGradients,
    LogisticRegressionGradients,
    SoftmaxRegressionGradients,
)


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


ROUND_TRIPS = {"pickle": _pickled, "deepcopy": copy.deepcopy}


def _same(a, b) -> bool:
    a, b = to_numpy(a), to_numpy(b)
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _softmax_problem(to_xp, n=37, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.integers(0, k, size=n)
    gp = SoftmaxRegressionGradients(to_xp(rng.normal(size=(k, d))), to_xp(rng.normal(size=k)))
    return gp, to_xp(x), to_xp(y)


def _batches(x, y, sizes=(13, 7, 17)):
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s, ...], y[start : start + s]))
        start += s
    return out


def _fd_loss(params, x, y):  # module level: picklable by name
    z = x @ params["w"][:, None] + params["b"]
    return (z[:, 0] - y) ** 2


MODELS = {
    "direct": lambda gp: xi.DirectInfluence(gp, regularization=1e-3),
    "direct-blocks": lambda gp: xi.DirectInfluence(
        gp, regularization={"weight": 1e-3, "bias": 1e-2}, block_structure="parameter"
    ),
    "cg": lambda gp: xi.CgInfluence(gp, regularization=1e-3, rtol=1e-10),
    "arnoldi": lambda gp: xi.ArnoldiInfluence(gp, regularization=1e-3, rank=5),
    "nystroem": lambda gp: xi.NystroemSketchInfluence(
        gp, regularization=1e-3, rank=5, second_order="empirical_fisher"
    ),
    "ekfac": lambda gp: xi.EkfacInfluence(gp, regularization=1e-3),
    "datainf": lambda gp: xi.InverseHarmonicMeanInfluence(gp, regularization=1e-2),
    "lissa": lambda gp: xi.LissaInfluence(gp, regularization=0.1, maxiter=50, rtol=1e-3),
}


# -- pickling and deep copies -------------------------------------------------


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
@pytest.mark.parametrize(
    "cls", [LinearRegressionGradients, LogisticRegressionGradients, SoftmaxRegressionGradients]
)
def test_glm_providers_round_trip(xp, to_xp, cls, trip):
    rng = np.random.default_rng(1)
    k = 1 if cls is LogisticRegressionGradients else 2
    gp = cls(to_xp(rng.normal(size=(k, 3))), to_xp(rng.normal(size=k)))
    x = to_xp(rng.normal(size=(6, 3)))
    y = to_xp(
        rng.integers(0, 2, size=6)
        if cls is not LinearRegressionGradients
        else rng.normal(size=(6, 2))
    )
    batch = gp.prepare_batch(xi.Batch(x, y))
    back = ROUND_TRIPS[trip](gp)
    assert back.xp is gp.xp  # the namespace is re-resolved, not a copy of a module
    assert back.dtype == gp.dtype
    assert _same(back.flat_grads(back.prepare_batch(xi.Batch(x, y))), gp.flat_grads(batch))


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
def test_finite_difference_provider_round_trip(xp, to_xp, trip):
    rng = np.random.default_rng(2)
    gp = FiniteDifferenceGradients(
        _fd_loss, {"w": to_xp(rng.normal(size=3)), "b": to_xp(0.5 * np.ones(1))}
    )
    batch = xi.Batch(to_xp(rng.normal(size=(5, 3))), to_xp(rng.normal(size=5)))
    back = ROUND_TRIPS[trip](gp)
    assert _same(back.flat_grads(back.prepare_batch(batch)), gp.flat_grads(gp.prepare_batch(batch)))


def test_lambda_loss_names_the_fix(xp, to_xp):
    gp = FiniteDifferenceGradients(
        lambda p, x, y: _fd_loss(p, x, y), {"w": to_xp(np.ones(3)), "b": to_xp(np.ones(1))}
    )
    copy.deepcopy(gp)  # copies keep the function itself
    with pytest.raises(pickle.PicklingError, match="loss_fn.*lambda.*module level.*cloudpickle"):
        pickle.dumps(gp)
    cloudpickle = pytest.importorskip("cloudpickle")
    back = pickle.loads(cloudpickle.dumps(gp))
    assert back.n_parameters == 4


@pytest.mark.parametrize("name", list(MODELS))
def test_fitted_models_round_trip(xp, to_xp, name):
    gp, x, y = _softmax_problem(to_xp)
    infl = MODELS[name](gp).fit(_batches(x, y))
    expected = infl.influences(x[:4, ...], y[:4], x, y)
    factors = infl.influence_factors(x[:3, ...], y[:3])
    for trip in ROUND_TRIPS.values():
        back = trip(infl)
        assert back.is_fitted and back.gradient_provider is not gp
        assert _same(back.influences(x[:4, ...], y[:4], x, y), expected)
        assert _same(back.influence_factors(x[:3, ...], y[:3]), factors)


# -- torch and jax providers ----------------------------------------------------


def _only_on(backend_name, wanted):
    if backend_name != wanted:
        pytest.skip(f"runs in the {wanted} session")


def _torch_problem():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=(29, 4)))
    y = torch.tensor(rng.integers(0, 3, size=29))
    return torch, model, x, y


def test_torch_fitted_model_survives_pickle_deepcopy_and_torch_save(backend_name):
    _only_on(backend_name, "torch")
    torch, model, x, y = _torch_problem()
    from xinfluence.backends.torch import TorchGradientProvider

    gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
    infl = xi.DirectInfluence(gp, regularization=1.0, block_structure="layer").fit(
        _batches(x, y, (11, 18))
    )
    expected = infl.influences(x[:4], y[:4], x, y)

    def saved(obj):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    for trip in (_pickled, copy.deepcopy, saved):
        back = trip(infl)
        back_gp = back.gradient_provider
        assert back_gp.model is not model
        assert torch.equal(back.influences(x[:4], y[:4], x, y), expected)
        # the copy's provider reads the copy's parameters (views, not snapshots)
        before = back_gp.flat_grads(back_gp.prepare_batch(xi.Batch(x[:2], y[:2])))
        with torch.no_grad():
            back_gp.model[0].bias.add_(1.0)
        after = back_gp.flat_grads(back_gp.prepare_batch(xi.Batch(x[:2], y[:2])))
        assert not torch.equal(before, after)
    assert torch.equal(infl.influences(x[:4], y[:4], x, y), expected)  # original untouched


def _jax_apply(params, x):
    import jax.numpy as jnp

    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def _jax_loss(out, target):
    import jax
    import jax.numpy as jnp

    return jnp.mean(-jax.nn.log_softmax(out)[jnp.arange(target.shape[0]), target])


def _jax_provider(apply_fn=_jax_apply):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from xinfluence.backends.jax import JaxGradientProvider

    rng = np.random.default_rng(4)
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 5))),
        "w2": jnp.asarray(rng.normal(size=(5, 3))),
    }
    x = jnp.asarray(rng.normal(size=(23, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=23))
    return JaxGradientProvider(apply_fn, params, _jax_loss), x, y


def test_jax_fitted_model_round_trips(backend_name):
    _only_on(backend_name, "jax")
    gp, x, y = _jax_provider()
    infl = xi.DirectInfluence(gp, regularization=2.0, block_structure="parameter").fit(
        _batches(x, y, (9, 14))
    )
    expected = infl.influences(x[:4], y[:4], x, y)
    for trip in ROUND_TRIPS.values():
        assert _same(trip(infl).influences(x[:4], y[:4], x, y), expected)


def test_jax_lambda_apply_fn_names_the_fix(backend_name):
    _only_on(backend_name, "jax")
    gp, x, y = _jax_provider(lambda p, x: _jax_apply(p, x))
    copy.deepcopy(gp)
    with pytest.raises(pickle.PicklingError, match="apply_fn.*lambda.*cloudpickle"):
        pickle.dumps(gp)
    cloudpickle = pytest.importorskip("cloudpickle")
    back = pickle.loads(cloudpickle.dumps(gp))
    batch = gp.prepare_batch(xi.Batch(x, y))
    assert _same(back.flat_grads(batch), gp.flat_grads(batch))
