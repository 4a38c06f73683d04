"""float32 defaults and fallbacks, against references built here.

* EK-FAC's default curvature (``second_order="gauss_newton"``) on a float32
  cross-entropy network, torch and jax: the same network in float64 is the
  reference. The softmax Hessian ``diag(p) - p p^T`` has an exact zero
  eigenvalue that float32 returns as about ``+-eps``; it must not be taken for
  a non-convex loss, while a genuinely indefinite loss Hessian still is, in
  both precisions.

Torch- and jax-specific: runs whatever ``XINFLUENCE_BACKEND`` is (skipped
without the framework).
"""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from helpers import rel_err, split

N, N_TEST, D_IN, HIDDEN, N_OUT = 31, 6, 4, 6, 3
SIZES = [19, 6, 6]  # uneven; the second batch is all confidently classified
REG = 1e-3
# float32 against float64 on the same parameters and data: the influences
# solve with EK-FAC eigenvalues + 1e-3, whose spread here (about 1e3) turns the
# float32 rounding of the factors (about 1e-7 relative) into about 1e-5 at worst
# (measured: 1e-6 to 3e-6 on both backends); a failed float32 fit or a
# mis-clipped eigenvalue is off by O(1).
F32_RTOL = 5e-5


def _data():
    """Inputs, labels and the weights of a tanh MLP 4 -> 6 -> 3 whose output
    layer is scaled so that the second batch has margins of 8 or more (softmax
    Hessians near zero, where float32 eigenvalue solvers misbehave)."""
    rng = np.random.default_rng(7)
    w1, b1 = rng.normal(size=(HIDDEN, D_IN)), 0.1 * rng.normal(size=HIDDEN)
    w2, b2 = 3.0 * rng.normal(size=(N_OUT, HIDDEN)), 0.1 * rng.normal(size=N_OUT)
    x = rng.normal(size=(N + N_TEST, D_IN))
    y = rng.integers(0, N_OUT, size=N + N_TEST)
    # the second batch: inputs from a wider pool whose logit margin exceeds 8
    pool = 4.0 * rng.normal(size=(400, D_IN))
    top2 = np.sort(np.tanh(pool @ w1.T + b1) @ w2.T + b2, axis=1)[:, -2:]
    pool = pool[top2[:, 1] - top2[:, 0] > 8]
    confident = slice(SIZES[0], SIZES[0] + SIZES[1])
    x[confident] = pool[: SIZES[1]]
    y[confident] = np.argmax(np.tanh(x[confident] @ w1.T + b1) @ w2.T + b2, axis=1)
    return x, y, (w1, b1, w2, b2)


def _torch_scores(dtype, loss=None):
    torch = pytest.importorskip("torch")
    from xinfluence.backends.torch import TorchGradientProvider

    x, y, (w1, b1, w2, b2) = _data()
    net = torch.nn.Sequential(
        torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, N_OUT)
    ).to(dtype)
    with torch.no_grad():
        for p, v in zip(net.parameters(), (w1, b1, w2, b2), strict=True):
            p.copy_(torch.as_tensor(v))
    gp = TorchGradientProvider(net, loss or torch.nn.functional.cross_entropy)
    xt, yt = torch.as_tensor(x, dtype=dtype), torch.as_tensor(y)
    train = [(xt[s], yt[s]) for s in split(N, SIZES)]
    model = xi.EkfacInfluence(gp, regularization=REG).fit(train)
    return model.influences(xt[N:], yt[N:], xt[:N], yt[:N])


def _jax_scores(dtype, loss=None):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from xinfluence.backends.jax import JaxGradientProvider

    x, y, (w1, b1, w2, b2) = _data()
    params = {
        "dense1": {"kernel": jnp.asarray(w1.T, dtype), "bias": jnp.asarray(b1, dtype)},
        "out": {"kernel": jnp.asarray(w2.T, dtype), "bias": jnp.asarray(b2, dtype)},
    }

    def hidden(p, xb):
        return jnp.tanh(xb @ p["dense1"]["kernel"] + p["dense1"]["bias"])

    def apply(p, xb):
        return hidden(p, xb) @ p["out"]["kernel"] + p["out"]["bias"]

    def cross_entropy(o, t):
        logp = jax.nn.log_softmax(o, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=-1))

    gp = JaxGradientProvider(
        apply,
        params,
        loss or cross_entropy,
        dense_layers={"dense1": lambda p, xb: xb, "out": hidden},
    )
    xj, yj = jnp.asarray(x, dtype), jnp.asarray(y)
    train = [(xj[s], yj[s]) for s in split(N, SIZES)]
    model = xi.EkfacInfluence(gp, regularization=REG).fit(train)
    return model.influences(xj[N:], yj[N:], xj[:N], yj[:N])


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_ekfac_default_float32_cross_entropy_matches_float64(framework):
    """EK-FAC's default in float32 fits (it refused: "negative eigenvalues
    (smallest -3.6e-08)") and gives the float64 numbers to float32 accuracy."""
    if framework == "torch":
        import_name, scores = "torch", _torch_scores
    else:
        import_name, scores = "jax", _jax_scores
    fw = pytest.importorskip(import_name)
    f32 = scores(fw.numpy.float32 if framework == "jax" else fw.float32)
    f64 = scores(fw.numpy.float64 if framework == "jax" else fw.float64)
    assert str(f32.dtype).endswith("float32") and str(f64.dtype).endswith("float64")
    assert np.all(np.isfinite(np.asarray(f32)))
    assert rel_err(f32, f64) <= F32_RTOL


def _indefinite_losses(framework):
    """Losses whose Hessian on the output has a clearly negative eigenvalue: minus
    the squared error (all of them), and cross-entropy less 0.2 |o|^2 / 2 per
    sample (softmax curvature is at most 1/2, so -0.2 in the direction (1, 1, 1))."""
    if framework == "torch":
        import torch

        f = torch.nn.functional

        def neg_mse(o, t):
            return -((o - o.detach().round()) ** 2).mean()

        def ce_less_square(o, t):
            return f.cross_entropy(o, t) - 0.1 * (o**2).sum(1).mean()

        return neg_mse, ce_less_square
    import jax
    import jax.numpy as jnp

    def neg_mse(o, t):
        return -jnp.mean((o - jax.lax.stop_gradient(jnp.round(o))) ** 2)

    def ce_less_square(o, t):
        logp = jax.nn.log_softmax(o, axis=-1)
        ce = -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=-1))
        return ce - 0.1 * jnp.mean(jnp.sum(o**2, axis=1))

    return neg_mse, ce_less_square


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_ekfac_gauss_newton_still_refuses_an_indefinite_loss(framework, precision):
    fw = pytest.importorskip(framework)
    dtype = getattr(fw.numpy if framework == "jax" else fw, precision)
    scores = _torch_scores if framework == "torch" else _jax_scores
    for loss in _indefinite_losses(framework):
        with pytest.raises(ValueError, match="not convex in the output"):
            scores(dtype, loss)
