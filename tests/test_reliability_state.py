"""Reliability of a fitted model's state (issue 9): stale fits, dropped
parameters, layer grouping of pytrees, non-finite losses, loose scalars."""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from xinfluence.backends.numpy import LogisticRegressionGradients

# -- stale fits ----------------------------------------------------------------


def _logistic(to_xp, seed=0, n=31):
    rng = np.random.default_rng(seed)
    w = to_xp(rng.normal(size=(1, 3)))
    b = to_xp(np.zeros(1))
    x = to_xp(rng.normal(size=(n, 3)))
    y = to_xp((rng.random(n) > 0.5).astype(float))
    return LogisticRegressionGradients(w, b), w, x, y


@pytest.mark.parametrize("cls", [xi.DirectInfluence, xi.CgInfluence, xi.ArnoldiInfluence])
def test_parameters_changed_in_place_after_fit_raise(xp, to_xp, backend_name, cls):
    if backend_name == "jax":
        pytest.skip("jax arrays are immutable: parameters cannot change under a provider")
    gp, w, x, y = _logistic(to_xp)
    kwargs = {"rank": 2} if cls is xi.ArnoldiInfluence else {}
    infl = cls(gp, regularization=1e-2, **kwargs).fit((x, y))
    infl.influences(x[:2, ...], y[:2], x, y)  # unchanged: fine, twice
    infl.influences(x[:2, ...], y[:2], x, y)
    w[0, 0] = w[0, 0] + 0.5  # an in-place update, as an optimizer makes
    with pytest.raises(xi.StaleFitError, match="changed after .*fit.*Call fit"):
        infl.influences(x[:2, ...], y[:2], x, y)
    with pytest.raises(xi.StaleFitError):
        infl.influence_factors(x[:2, ...], y[:2])
    infl.fit((x, y))  # refitting accepts the new parameters
    infl.influences(x[:2, ...], y[:2], x, y)


def test_jax_provider_version_is_constant(backend_name):
    if backend_name != "jax":
        pytest.skip("runs in the jax session")
    import jax.numpy as jnp

    from xinfluence.backends.jax import JaxGradientProvider

    def apply(p, x):
        return x @ p["w"]

    def loss(out, t):
        return jnp.mean((out[:, 0] - t) ** 2)

    gp = JaxGradientProvider(apply, {"w": jnp.ones((3, 1))}, loss)
    assert gp.parameter_version() == gp.parameter_version()
    assert len(gp.parameter_fingerprint()) == 64


def _torch_mlp():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return torch, model, x, y


@pytest.mark.parametrize("cls", [xi.DirectInfluence, xi.CgInfluence])
def test_torch_optimizer_step_after_fit_raises(backend_name, cls):
    if backend_name != "torch":
        pytest.skip("runs in the torch session")
    torch, model, x, y = _torch_mlp()
    from xinfluence.backends.torch import TorchGradientProvider

    gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
    infl = cls(gp, regularization=1.0).fit((x, y))
    before = infl.influences(x[:3], y[:3], x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(xi.StaleFitError, match="refit|fit\\(data\\) again"):
        infl.influences(x[:3], y[:3], x, y)
    after = infl.fit((x, y)).influences(x[:3], y[:3], x, y)
    assert float((after - before).abs().max()) > 1e-3  # the step did change the answer
