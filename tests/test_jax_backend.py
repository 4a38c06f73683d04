"""The JAX gradient provider against explicit JAX references.

Jax-specific: runs whatever ``XINFLUENCE_BACKEND`` is (skipped without jax).
References are written independently of the provider: the flat vector comes
from :func:`jax.flatten_util.ravel_pytree`, the mean loss is evaluated on the
whole batch at once, per-sample derivatives are Python loops over samples and
the influences are dense solves.
"""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import xinfluence as xi  # noqa: E402
from helpers import rel_err  # noqa: E402
from xinfluence.backends.jax import JaxGradientProvider  # noqa: E402
from xinfluence.backends.numpy import SoftmaxRegressionGradients  # noqa: E402
from xinfluence.errors import NamespaceMismatchError  # noqa: E402

REG = 1e-3
SIZES = (7, 13, 5)  # uneven training batches
LAYERS = ("dense1", "dense2", "out")


def mlp(params, x):
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    h = jnp.tanh(h @ params["dense2"]["kernel"] + params["dense2"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def cross_entropy(logits, labels):
    """optax-style: mean over the batch of -log_softmax(z)[y]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


@pytest.fixture(scope="module")
def net():
    """A small tanh MLP trained (full-batch gradient descent) close to a minimum,
    so that its Hessian plus 1e-3 I is positive definite."""
    rng = np.random.default_rng(0)
    shapes = {"dense1": (4, 6), "dense2": (6, 5), "out": (5, 3)}
    params = {
        name: {
            "kernel": jnp.asarray(rng.normal(size=s) / np.sqrt(s[0])),
            "bias": jnp.asarray(0.1 * rng.normal(size=s[1])),
        }
        for name, s in shapes.items()
    }
    n_train, n_test = sum(SIZES), 5
    x = jnp.asarray(rng.normal(size=(n_train + n_test, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=n_train + n_test))
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]

    theta, unravel = ravel_pytree(params)

    def mean_loss(t, xb, yb):
        return cross_entropy(mlp(unravel(t), xb), yb)

    step = jax.grad(mean_loss)
    theta = jax.jit(
        lambda t: jax.lax.fori_loop(0, 3000, lambda _, t: t - 0.5 * step(t, x_train, y_train), t)
    )(theta)
    params = unravel(theta)

    hess = jax.jit(jax.hessian(mean_loss))
    h_train = hess(theta, x_train, y_train)
    assert float(jnp.linalg.eigvalsh(h_train)[0]) > -REG / 2

    # per-sample references, compiled once for one sample and looped over samples
    sample_grad = jax.jit(lambda xs, ys: jax.grad(mean_loss)(theta, xs[None], ys[None]))
    sample_mixed = jax.jit(jax.jacrev(sample_grad, argnums=0))  # reverse mode in x: (P, D)

    def grads_ref(xb, yb):
        return jnp.stack([sample_grad(xb[i], yb[i]) for i in range(len(xb))])

    def mixed_ref(xb, yb):  # (N, D, P)
        return jnp.stack([sample_mixed(xb[i], yb[i]).T for i in range(len(xb))])

    gp = JaxGradientProvider(mlp, params, cross_entropy)
    return dict(
        params=params,
        theta=theta,
        unravel=unravel,
        mean_loss=mean_loss,
        hess=hess,
        h_train=h_train,
        grads_ref=grads_ref,
        mixed_ref=mixed_ref,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        gp=gp,
    )


def _batches(net):
    out, start = [], 0
    for s in SIZES:
        out.append((net["x_train"][start : start + s], net["y_train"][start : start + s]))
        start += s
    return out


def _layer_slices(params):
    out, start = OrderedDict(), 0
    for name in sorted(params):
        size = ravel_pytree(params[name])[0].size
        out[name] = slice(start, start + size)
        start += size
    return out


# -- 1. derivatives ------------------------------------------------------------
def test_derivatives_match_references(net):
    gp = net["gp"]
    x, y = net["x_train"][:7], net["y_train"][:7]
    batch = gp.prepare_batch(xi.Batch(x, y))
    p = net["theta"].shape[0]
    assert gp.n_parameters == p

    g_ref = net["grads_ref"](x, y)
    h_ref = net["hess"](net["theta"], x, y)
    rng = np.random.default_rng(1)
    v = jnp.asarray(rng.normal(size=(3, p)))

    checks = {
        "flat_grads": (gp.flat_grads(batch), g_ref),
        "flat_mixed_grads": (gp.flat_mixed_grads(batch), net["mixed_ref"](x, y)),
        "jacobian_prod": (gp.jacobian_prod(batch, v), g_ref @ v.T),
        "hvp": (gp.hvp(batch, v), v @ h_ref),
        "hessian": (gp.hessian(batch), h_ref),
        "losses": (
            gp.losses(batch),
            jnp.stack(
                [cross_entropy(mlp(net["params"], x[i : i + 1]), y[i : i + 1]) for i in range(7)]
            ),
        ),
    }
    for name, (actual, expected) in checks.items():
        assert isinstance(actual, jax.Array), name
        assert actual.dtype == jnp.float64, name
        assert rel_err(actual, expected) < 1e-10, name
    assert gp.flat_mixed_grads(batch).shape == (7, 4, p)
    # the mean of the per-sample gradients is the gradient of the mean loss
    mean_grad = jax.grad(net["mean_loss"])(net["theta"], x, y)
    assert rel_err(jnp.mean(gp.flat_grads(batch), axis=0), mean_grad) < 1e-10


def test_products_in_chunks_of_tangents_match_references(net, monkeypatch):
    """On a CPU, large products push their tangents 8 at a time (lax.map); forced
    here on a small problem (21 rows, padded to 24: 3 chunks), on a new provider
    whose programs are traced with the forced threshold."""
    from xinfluence.backends.jax import model as jax_model
    from xinfluence.backends.jax import provider as jax_provider

    monkeypatch.setattr(jax_model, "_CPU_CHUNK_MIN_WORK", 0)
    monkeypatch.setattr(jax_provider, "_SMALL_GRADIENTS", 0)  # forward mode, not grads @ v^T
    old = net["gp"]
    gp = JaxGradientProvider._restricted(old._model, old._active)  # new jitted functions
    x, y = net["x_train"][:7], net["y_train"][:7]
    batch = gp.prepare_batch(xi.Batch(x, y))
    v = jnp.asarray(np.random.default_rng(2).normal(size=(21, gp.n_parameters)))
    g_ref = net["grads_ref"](x, y)
    h_ref = net["hess"](net["theta"], x, y)
    assert rel_err(gp.jacobian_prod(batch, v), g_ref @ v.T) < 1e-10
    assert rel_err(gp.hvp(batch, v), v @ h_ref) < 1e-10
    assert gp._jit_hvp is not old._jit_hvp


def _mlp_dense_layers():
    def hidden1(p, x):
        return jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])

    def hidden2(p, x):
        return jnp.tanh(hidden1(p, x) @ p["dense2"]["kernel"] + p["dense2"]["bias"])

    return {"dense1": lambda p, x: x, "dense2": hidden1, "out": hidden2}


@pytest.mark.parametrize("pass_", ["flat_grads", "jacobian_prod", "kfac_factors"])
def test_loss_check_takes_the_losses_of_the_gradient_pass(net, monkeypatch, pass_):
    """A batch whose gradients (or their products, or the layer factors) were
    taken has its losses checked from that pass: a query runs (and compiles) the
    losses program for no batch but the fit's. (Forced past the small-gradient
    path, where the fit's check is a gradient pass too: the next test.)"""
    from xinfluence.backends.jax import provider as jax_provider

    monkeypatch.setattr(jax_provider, "_SMALL_GRADIENTS", 0)
    gp = JaxGradientProvider(mlp, net["params"], cross_entropy, dense_layers=_mlp_dense_layers())
    batch = gp.prepare_batch(xi.Batch(net["x_train"][:9], net["y_train"][:9]))
    other = gp.prepare_batch(xi.Batch(net["x_train"][:9] + 0, net["y_train"][:9] + 0))
    ref = np.array(
        [
            float(net["mean_loss"](net["theta"], batch.x[i : i + 1], batch.y[i : i + 1]))
            for i in range(9)
        ]
    )
    calls = []
    sub = gp.restrict(["out/kernel"])
    for provider in (gp, sub):
        jitted = provider._jit_losses
        monkeypatch.setattr(
            provider, "_jit_losses", lambda *a, f=jitted: calls.append(a[2].shape) or f(*a)
        )
    g_ref = net["grads_ref"](batch.x, batch.y)
    if pass_ == "flat_grads":
        assert rel_err(gp.flat_grads(batch), g_ref) < 1e-12
    elif pass_ == "jacobian_prod":
        v = jnp.asarray(np.random.default_rng(1).normal(size=(3, gp.n_parameters)))
        assert rel_err(gp.jacobian_prod(batch, v), g_ref @ v.T) < 1e-12
    else:
        a, s = gp.kfac_factors(batch)["out"]  # the output layer's bias gradient is s
        assert rel_err(s, g_ref[:, gp.parameter_slices["out/bias"]]) < 1e-12
    assert rel_err(gp.per_sample_losses(batch), ref) < 1e-12
    # restricted providers share them: every one computes the same loss
    assert rel_err(sub.per_sample_losses(batch), ref) < 1e-12
    assert calls == []
    assert rel_err(gp.per_sample_losses(other), ref) < 1e-12  # equal values, new arrays
    assert calls == [(9, 4)]
    if pass_ != "flat_grads":
        return
    # the last four batches' are kept, no more
    more = [
        gp.prepare_batch(xi.Batch(net["x_train"][i : i + 3] + 0, net["y_train"][i : i + 3] + 0))
        for i in range(4)
    ]
    for b in more:
        gp.flat_grads(b)
    calls.clear()
    for b in more:
        gp.per_sample_losses(b)
    assert calls == []
    gp.per_sample_losses(batch)
    assert calls == [(9, 4)]
    calls.clear()
    model = xi.CgInfluence(gp, regularization=REG, solver="batched").fit(
        (net["x_train"], net["y_train"])
    )
    assert calls == [tuple(net["x_train"].shape)]
    model.influences(net["x_test"], net["y_test"], net["x_train"], net["y_train"])
    model.influence_factors(net["x_test"], net["y_test"])
    assert calls == [tuple(net["x_train"].shape)]


def test_small_gradients_serve_the_loss_check_and_products(net, monkeypatch):
    """Where a batch's per-sample gradients are small, its loss check and
    jacobian_prod come from the gradient pass: a cold fit and query run no
    forward or forward-mode program (one program per batch shape, not three)."""
    gp = JaxGradientProvider(mlp, net["params"], cross_entropy)
    calls = []
    for name in ("_jit_losses", "_jit_jac_prod"):
        jitted = getattr(gp, name)
        monkeypatch.setattr(gp, name, lambda *a, f=jitted, n=name: calls.append(n) or f(*a))
    x, y = net["x_train"][:9], net["y_train"][:9]
    batch = gp.prepare_batch(xi.Batch(x, y))
    v = jnp.asarray(np.random.default_rng(3).normal(size=(5, gp.n_parameters)))
    assert rel_err(gp.jacobian_prod(batch, v), net["grads_ref"](x, y) @ v.T) < 1e-12
    other = gp.prepare_batch(xi.Batch(x + 0, y + 0))
    ref = [float(net["mean_loss"](net["theta"], x[i : i + 1], y[i : i + 1])) for i in range(9)]
    assert rel_err(gp.per_sample_losses(other), np.array(ref)) < 1e-12
    train, test = (net["x_train"], net["y_train"]), (net["x_test"], net["y_test"])
    for model in (
        xi.CgInfluence(gp, regularization=REG, solver="batched"),
        xi.ArnoldiInfluence(gp, regularization=REG, rank=5),
    ):
        model.fit(train).influences(*test, *train)
    assert calls == []


def test_small_batches_reuse_a_larger_batchs_gradient_program(net):
    """A small batch is padded to the row count of a compiled gradient program
    (copies of its first sample), and the padding dropped: values as its own."""
    from xinfluence.backends.jax import provider as jax_provider

    gp = JaxGradientProvider(mlp, net["params"], cross_entropy)
    if not hasattr(gp._jit_grads, "_cache_size"):
        pytest.skip("this jax version does not expose the jit cache size")
    x, y = net["x_train"], net["y_train"]
    gp.flat_grads(gp.prepare_batch(xi.Batch(x[:13], y[:13])))
    assert gp._jit_grads._cache_size() == 1
    small = gp.prepare_batch(xi.Batch(x[13:18], y[13:18]))
    assert rel_err(gp.flat_grads(small), net["grads_ref"](small.x, small.y)) < 1e-12
    ref = [float(net["mean_loss"](net["theta"], x[i : i + 1], y[i : i + 1])) for i in range(13, 18)]
    assert rel_err(gp.per_sample_losses(small), np.array(ref)) < 1e-12
    v = jnp.asarray(np.random.default_rng(4).normal(size=(2, gp.n_parameters)))
    assert rel_err(gp.jacobian_prod(small, v), net["grads_ref"](small.x, small.y) @ v.T) < 1e-12
    assert gp._jit_grads._cache_size() == 1  # no program of 5 rows
    gp.flat_grads(gp.prepare_batch(xi.Batch(x[:17], y[:17])))  # larger: its own
    assert gp._jit_grads._cache_size() == 2
    # padding wastes work: after a few batches of 5 rows, 5 rows get their own
    for _ in range(jax_provider._PADDED_USES - 2):  # 2 so far: flat_grads, jacobian_prod
        gp.flat_grads(small)
    assert gp._jit_grads._cache_size() == 2
    assert rel_err(gp.flat_grads(small), net["grads_ref"](small.x, small.y)) < 1e-12
    assert gp._jit_grads._cache_size() == 3


def test_jitted_once_per_shape(net):
    gp = net["gp"]
    fn = gp._jit_grads
    if not hasattr(fn, "_cache_size"):
        pytest.skip("this jax version does not expose the jit cache size")
    batch = gp.prepare_batch(xi.Batch(net["x_train"][:7], net["y_train"][:7]))
    gp.flat_grads(batch)
    size = fn._cache_size()
    other = gp.prepare_batch(xi.Batch(net["x_train"][7:14], net["y_train"][7:14]))
    gp.flat_grads(other)
    assert gp._jit_grads is fn
    assert fn._cache_size() == size


# -- 2. Direct influence against a dense computation ---------------------------
def _reference_influences(net, curvature_blocks, gn=False):
    """Up (N_test, N) and perturbation (N_test, N, D) with a block-diagonal solve."""
    g_train = net["grads_ref"](net["x_train"], net["y_train"])
    g_test = net["grads_ref"](net["x_test"], net["y_test"])
    m_train = net["mixed_ref"](net["x_train"], net["y_train"])
    curv = g_train.T @ g_train / g_train.shape[0] if gn else net["h_train"]
    factors = jnp.zeros_like(g_test)
    for sl in curvature_blocks:
        block = curv[sl, sl] + REG * jnp.eye(sl.stop - sl.start)
        factors = factors.at[:, sl].set(jnp.linalg.solve(block, g_test[:, sl].T).T)
    up = factors @ g_train.T
    pert = jnp.einsum("tp,ndp->tnd", factors, m_train)
    return up, pert


@pytest.mark.parametrize(
    "block_structure, second_order",
    [("full", "hessian"), ("layer", "hessian"), ("full", "empirical_fisher")],
)
def test_direct_influence_matches_dense(net, block_structure, second_order):
    gp = net["gp"]
    p = net["theta"].shape[0]
    blocks = (
        [slice(0, p)] if block_structure == "full" else list(_layer_slices(net["params"]).values())
    )
    up_ref, pert_ref = _reference_influences(net, blocks, gn=second_order == "empirical_fisher")

    infl = xi.DirectInfluence(
        gp, regularization=REG, block_structure=block_structure, second_order=second_order
    ).fit(_batches(net))
    args = (net["x_test"], net["y_test"], net["x_train"], net["y_train"])
    up = infl.influences(*args, mode="up")
    pert = infl.influences(*args, mode="perturbation")
    assert up.shape == (5, sum(SIZES)) and pert.shape == (5, sum(SIZES), 4)
    assert isinstance(up, jax.Array) and up.dtype == jnp.float64
    assert rel_err(up, up_ref) < 1e-10
    assert rel_err(pert, pert_ref) < 1e-10
    if block_structure == "layer":
        assert list(infl.blocks) == list(LAYERS)
    else:  # from factors: the same numbers (jacobian_prod path)
        factors = infl.influence_factors(net["x_test"], net["y_test"])
        up_f = infl.influences_from_factors(factors, net["x_train"], net["y_train"], mode="up")
        assert rel_err(up_f, up_ref) < 1e-10


# -- 3. the same GLM as the numpy backend --------------------------------------
def test_softmax_regression_matches_numpy_provider():
    rng = np.random.default_rng(2)
    n_in, n_out, n = 4, 3, 20
    weight = jnp.asarray(rng.normal(size=(n_out, n_in)))
    bias = jnp.asarray(rng.normal(size=n_out))
    x = jnp.asarray(rng.normal(size=(n, n_in)))
    y = jnp.asarray(rng.integers(0, n_out, size=n))

    def linear(params, xb):
        return xb @ params["weight"].T + params["bias"]

    gp_jax = JaxGradientProvider(linear, {"weight": weight, "bias": bias}, cross_entropy)
    gp_np = SoftmaxRegressionGradients(weight, bias)
    results = []
    for gp in (gp_jax, gp_np):
        infl = xi.DirectInfluence(gp, regularization=1e-2).fit((x, y))
        # the points against themselves (few distinct shapes keep jax compiles down)
        results.append((infl.influences(x, y), infl.influences(x, y, mode="perturbation")))
    (up_j, pert_j), (up_n, pert_n) = results
    assert isinstance(up_j, jax.Array) and up_j.dtype == jnp.float64
    assert rel_err(up_j, up_n) < 1e-9
    assert rel_err(pert_j, pert_n) < 1e-9
    # the per-parameter derivatives agree too (names coincide)
    bj, bn = gp_jax.prepare_batch(xi.Batch(x, y)), gp_np.prepare_batch(xi.Batch(x, y))
    gj, gn = gp_jax.flat_grads(bj), gp_np.flat_grads(bn)
    sj, sn = gp_jax.parameter_slices, gp_np.parameter_slices
    assert list(sj) == ["bias", "weight"]  # sorted dict keys
    for name in ("weight", "bias"):
        assert rel_err(gj[:, sj[name]], gn[:, sn[name]]) < 1e-12


# -- 4. restriction, names, namespaces, shapes ---------------------------------
def test_restrict_equals_slices(net):
    gp = net["gp"]
    x, y = net["x_train"][:7], net["y_train"][:7]
    batch = gp.prepare_batch(xi.Batch(x, y))
    names = ["out/bias", "dense2/kernel"]
    sub = gp.restrict(names)
    assert isinstance(sub, JaxGradientProvider)
    assert sub.parameter_names == ("dense2/kernel", "out/bias")
    assert gp.restrict(list(reversed(names))) is sub  # cached, order-insensitive
    assert sub.layer_groups() == OrderedDict(dense2=["dense2/kernel"], out=["out/bias"])
    assert gp.restrict(list(gp.parameter_names)) is gp

    sl = gp.parameter_slices
    idx = jnp.concatenate([jnp.arange(sl[n].start, sl[n].stop) for n in sub.parameter_names])
    assert sub.n_parameters == idx.shape[0] == 6 * 5 + 3

    full_g = gp.flat_grads(batch)
    h = gp.hessian(batch)
    rng = np.random.default_rng(3)
    v = jnp.asarray(rng.normal(size=(4, sub.n_parameters)))
    assert rel_err(sub.flat_grads(batch), full_g[:, idx]) < 1e-12
    assert rel_err(sub.flat_mixed_grads(batch), gp.flat_mixed_grads(batch)[..., idx]) < 1e-12
    assert rel_err(sub.jacobian_prod(batch, v), full_g[:, idx] @ v.T) < 1e-12
    assert rel_err(sub.hvp(batch, v), v @ h[idx][:, idx]) < 1e-10
    assert rel_err(sub.hessian(batch), h[idx][:, idx]) < 1e-10
    # a restriction of a restriction
    assert sub.restrict(["out/bias"]) is gp.restrict(["out/bias"])
    with pytest.raises(ValueError, match="unknown parameters"):
        sub.restrict(["dense1/kernel"])


def test_names_and_layer_groups_follow_paths():
    params = {
        "blocks": [{"w": jnp.ones((2, 3))}, {"w": jnp.ones((3,))}],
        "scale": jnp.ones(()),
        "head": {"dense": {"kernel": jnp.ones((3, 1))}},
    }

    def apply(p, x):
        return x

    gp = JaxGradientProvider(apply, params, cross_entropy)
    assert gp.parameter_names == ("blocks/0/w", "blocks/1/w", "head/dense/kernel", "scale")
    assert gp.parameter_shapes["blocks/0/w"] == (2, 3)
    assert gp.parameter_shapes["scale"] == ()
    assert gp.layer_groups() == OrderedDict(
        [
            ("blocks/0", ["blocks/0/w"]),
            ("blocks/1", ["blocks/1/w"]),
            ("head/dense", ["head/dense/kernel"]),
            ("root", ["scale"]),
        ]
    )
    assert gp.n_parameters == 6 + 3 + 3 + 1
    assert gp.dtype == jnp.float64
    split = gp.unravel(gp.flat_params)
    assert list(split) == list(gp.parameter_names) and split["blocks/0/w"].shape == (2, 3)


def test_inputs_are_checked(net):
    gp = net["gp"]
    x, y = net["x_train"][:7], net["y_train"][:7]
    with pytest.raises(NamespaceMismatchError):
        gp.prepare_batch(xi.Batch(np.asarray(x), y))
    with pytest.raises(NamespaceMismatchError):
        gp.prepare_batch(xi.Batch(x, np.asarray(y)))
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 4\)"):
        gp.prepare_batch(xi.Batch(jnp.ones((7, 5)), y))
    infl = xi.DirectInfluence(gp, regularization=REG).fit(_batches(net))
    with pytest.raises(NamespaceMismatchError):
        infl.influences(np.asarray(net["x_test"]), np.asarray(net["y_test"]))
    with pytest.raises(ValueError, match="expected x of shape"):
        infl.influences(jnp.ones((5, 3)), net["y_test"])
    # integer features are cast to the parameters' dtype
    batch = gp.prepare_batch(xi.Batch(jnp.ones((7, 4), dtype=jnp.int32), y))
    assert batch.x.dtype == jnp.float64
    assert gp.flat_grads(batch).dtype == jnp.float64
    # an explicit input shape is checked before tracing
    strict = JaxGradientProvider(mlp, net["params"], cross_entropy, input_shape=(4,))
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 4\)"):
        strict.prepare_batch(xi.Batch(jnp.ones((7, 4, 1)), y))
    # a loss that does not reduce over the batch
    per_sample = JaxGradientProvider(mlp, net["params"], lambda z, t: jnp.sum(z, axis=1))
    with pytest.raises(ValueError, match="scalar"):
        per_sample.prepare_batch(xi.Batch(x, y))


def test_import_xinfluence_does_not_import_jax():
    code = "import sys, xinfluence; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- 5. Kronecker factors --------------------------------------------------------
def test_kfac_factors_reproduce_weight_gradients():
    rng = np.random.default_rng(4)
    params = {
        # flax layout with a bias
        "dense1": {
            "kernel": jnp.asarray(rng.normal(size=(4, 6))),
            "bias": jnp.asarray(rng.normal(size=6)),
        },
        # torch layout without a bias: s from least squares
        "dense2": {"weight": jnp.asarray(rng.normal(size=(5, 6)))},
        # torch layout with a bias
        "out": {
            "weight": jnp.asarray(rng.normal(size=(3, 5))),
            "bias": jnp.asarray(rng.normal(size=3)),
        },
    }

    def hidden1(p, x):
        return jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])

    def hidden2(p, x):
        return jnp.tanh(hidden1(p, x) @ p["dense2"]["weight"].T)

    def apply(p, x):
        return hidden2(p, x) @ p["out"]["weight"].T + p["out"]["bias"]

    dense = {"dense1": lambda p, x: x, "dense2": hidden1, "out": hidden2}
    gp = JaxGradientProvider(apply, params, cross_entropy, dense_layers=dense)
    assert gp.kfac_layers() == OrderedDict(
        dense1=("dense1/kernel", "dense1/bias"),
        dense2=("dense2/weight", None),
        out=("out/weight", "out/bias"),
    )
    assert gp.kfac_layouts() == OrderedDict(dense1="io", dense2="oi", out="oi")

    n = 9
    x = jnp.asarray(rng.normal(size=(n, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=n))
    batch = gp.prepare_batch(xi.Batch(x, y))
    grads = gp.flat_grads(batch)
    per_param = {name: grads[:, sl] for name, sl in gp.parameter_slices.items()}
    factors = gp.kfac_factors(batch)
    assert list(factors) == list(LAYERS)
    for layer, (wname, bname) in gp.kfac_layers().items():
        a, s = factors[layer]
        shape = gp.parameter_shapes[wname]
        n_in, n_out = shape if gp.kfac_layouts()[layer] == "io" else shape[::-1]
        assert a.shape == (n, n_in) and s.shape == (n, n_out)
        gw = per_param[wname].reshape(n, *shape)
        if gp.kfac_layouts()[layer] == "io":
            gw = jnp.swapaxes(gw, 1, 2)  # (N, O, I)
        assert rel_err(jnp.einsum("no,ni->noi", s, a), gw) < 1e-12, layer
        if bname is not None:
            assert rel_err(s, per_param[bname]) < 1e-12, layer

    # a restriction keeps the layers it differentiates
    sub = gp.restrict(["dense2/weight", "out/weight"])
    assert sub.kfac_layers() == OrderedDict(
        dense2=("dense2/weight", None), out=("out/weight", None)
    )
    sub_factors = sub.kfac_factors(batch)
    assert rel_err(sub_factors["out"][1], factors["out"][1]) < 1e-15
    # no declared layers: no factors
    assert JaxGradientProvider(apply, params, cross_entropy).kfac_layers() == OrderedDict()
    with pytest.raises(ValueError, match="needs a 2-D leaf"):
        JaxGradientProvider(apply, params, cross_entropy, dense_layers={"nope": hidden1})
