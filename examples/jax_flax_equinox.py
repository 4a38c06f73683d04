"""Influence functions for JAX models written with flax (linen) and equinox.

Both networks are 64-16-10 MLPs on scikit-learn's digits, trained to a minimum
of the mean cross-entropy plus (lambda / 2)|theta|^2 (scipy's L-BFGS on the
flattened parameters). ``JaxGradientProvider(apply_fn, params, loss)`` wraps
any pure ``apply_fn(params, x)``:

* flax linen: ``params = model.init(key, x)["params"]`` and
  ``apply_fn = lambda p, x: model.apply({"params": p}, x)``;
* equinox: split the module with ``eqx.partition(model, eqx.is_inexact_array)``
  and ``apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)``.

EK-FAC needs the dense layers declared: ``dense_layers={name: features}`` where
``name`` is the pytree node holding the layer's ``kernel`` (flax, ``(I, O)``)
or ``weight`` (equinox/torch layout, ``(O, I)``) and ``bias``, and
``features(params, x)`` returns the layer's inputs ``(N, I)`` for a batch.

Run: python examples/jax_flax_equinox.py   (needs jax, flax, equinox, scikit-learn)
"""

import jax

jax.config.update("jax_enable_x64", True)  # float64 before any array is created

import equinox as eqx  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from scipy.optimize import minimize  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import xinfluence as xi  # noqa: E402
from xinfluence.backends.jax import JaxGradientProvider  # noqa: E402

x, y = load_digits(return_X_y=True)
x, y = jnp.asarray(x / 16.0), jnp.asarray(y)
x_train, y_train, x_test, y_test = x[:300], y[:300], x[1000:1010], y[1000:1010]
lam = 1e-3


def cross_entropy(logits, labels):  # mean over the batch, like torch's default
    picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


def train(apply_fn, params):
    """Minimise mean loss + (lam / 2)|theta|^2 with L-BFGS; return trained params."""
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def objective(theta):
        return cross_entropy(apply_fn(unravel(theta), x_train), y_train) + 0.5 * lam * theta @ theta

    vg = jax.jit(jax.value_and_grad(objective))

    def fun(theta):
        v, g = vg(jnp.asarray(theta))
        return float(v), np.asarray(g)

    res = minimize(
        fun, np.asarray(flat), jac=True, method="L-BFGS-B", options={"maxiter": 3000, "gtol": 1e-9}
    )
    return unravel(jnp.asarray(res.x))


def compare(name, gp, ekfac=False):
    data = (x_train, y_train)
    exact = xi.DirectInfluence(gp, regularization=lam).fit(data)
    ref = exact.influences(x_test, y_test, x_train, y_train)  # (10, 300)
    cg = xi.CgInfluence(gp, regularization=lam, rtol=1e-9).fit(data)
    got = cg.influences(x_test, y_test, x_train, y_train)
    err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    print(f"{name}: {gp.n_parameters} parameters; CG vs exact: {err:.1e}")
    if ekfac:
        # EK-FAC approximates the per-layer empirical Fisher mean g g^T, not the Hessian
        approx = xi.EkfacInfluence(gp, regularization=lam).fit(data)
        a = approx.influences(x_test, y_test, x_train, y_train)
        corr = float(jnp.corrcoef(a.ravel(), ref.ravel())[0, 1])
        print(f"{name}: EK-FAC vs exact Hessian influences: correlation {corr:.3f}")
    return err


# -- flax linen ---------------------------------------------------------------
class MLP(nn.Module):
    @nn.compact
    def __call__(self, a):
        a = jnp.tanh(nn.Dense(16, param_dtype=jnp.float64, name="hidden")(a))
        return nn.Dense(10, param_dtype=jnp.float64, name="out")(a)


mlp = MLP()
params = mlp.init(jax.random.key(0), x_train[:1])["params"]


def flax_apply(p, a):
    return mlp.apply({"params": p}, a)


params = train(flax_apply, params)
gp_flax = JaxGradientProvider(
    flax_apply,
    params,
    cross_entropy,
    dense_layers={
        "hidden": lambda p, a: a,  # the first layer's inputs are the pixels
        "out": lambda p, a: jnp.tanh(a @ p["hidden"]["kernel"] + p["hidden"]["bias"]),
    },
)
print("flax parameter names:", gp_flax.parameter_names)
assert compare("flax", gp_flax, ekfac=True) < 1e-6

# -- equinox --------------------------------------------------------------------
model = eqx.nn.MLP(
    64, 10, width_size=16, depth=1, activation=jnp.tanh, key=jax.random.key(1), dtype=jnp.float64
)
eq_params, static = eqx.partition(model, eqx.is_inexact_array)


def eqx_apply(p, a):
    return jax.vmap(eqx.combine(p, static))(a)  # equinox modules act on one sample


eq_params = train(eqx_apply, eq_params)
# EK-FAC would declare the layers as for flax, with the torch layout "weight" (O, I):
# dense_layers={"layers/0": lambda p, a: a,
#               "layers/1": lambda p, a: jnp.tanh(a @ p.layers[0].weight.T + p.layers[0].bias)}
gp_eqx = JaxGradientProvider(eqx_apply, eq_params, cross_entropy)
print("equinox parameter names:", gp_eqx.parameter_names)
assert compare("equinox", gp_eqx) < 1e-6
