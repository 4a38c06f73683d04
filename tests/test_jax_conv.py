"""Convolution layers of the jax provider (KFC / EK-FAC factors found by tracing
the model), against plain jax autodiff and explicit patches.

References never use the taps: per-sample gradients come from
``JaxGradientProvider.flat_grads`` (``vmap(grad)`` of the whole model), the
Gauss-Newton matrix from ``ggn`` (per-sample Jacobians), patches from explicit
slicing of the padded input.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import xinfluence as xi  # noqa: E402
from helpers import rel_err  # noqa: E402
from xinfluence.backends.jax import JaxGradientProvider  # noqa: E402

nn = pytest.importorskip("flax.linen")
eqx = pytest.importorskip("equinox")

F64 = jnp.float64


def cross_entropy(z, y):
    return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0])


# flax nn.Conv keywords: stride, "SAME" padding, dilation, no bias, explicit padding
VARIANTS = {
    "plain": dict(padding=1),
    "stride": dict(strides=(2, 2), padding="SAME"),
    "dilation": dict(kernel_dilation=(2, 2), padding=2),
    "nobias": dict(padding="VALID", use_bias=False),
    "uneven": dict(padding=((1, 0), (0, 2)), strides=(1, 2)),
}


class FlaxCNN(nn.Module):
    """Two convolutions (tanh, relu, average pooling) and a dense head, NHWC."""

    conv: dict

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(3, (3, 3), param_dtype=F64, **self.conv)(x))
        x = nn.relu(nn.Conv(4, (2, 2), padding=1, param_dtype=F64)(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(5, param_dtype=F64)(jnp.reshape(x, (x.shape[0], -1)))


def flax_problem(variant: str, n: int = 11, seed: int = 0):
    model = FlaxCNN(VARIANTS[variant])
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, 7, 7, 2)))
    y = jnp.asarray(rng.integers(0, 5, size=n))
    params = model.init(jax.random.key(seed), x[:1])["params"]

    def apply(p, xb):
        return model.apply({"params": p}, xb)

    return apply, params, x, y


def layer_gradients(gp, layer, a, s):
    """Per-sample weight gradients ``(N, *kernel shape)`` from the factors."""
    w, _ = gp.kfac_layers()[layer]
    shape = gp.parameter_shapes[w]
    if gp.kfac_layouts()[layer] == "io":
        g = jnp.einsum("...ti,...to->...io", a, s)
    else:
        g = jnp.einsum("...to,...ti->...oi", s, a)
    return jnp.reshape(g, (*g.shape[:-2], *shape))


def ref_patches(x, kernel, strides, padding, dilation):
    """``(N, T, kh*kw*C)`` patches of an NHWC input by explicit slicing, in the
    order of a flax kernel's raveled ``(kh, kw, C)`` axes."""
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilation
    ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(ho):
        for j in range(wo):
            patch = xp[
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
                :,
            ]
            rows.append(jnp.reshape(patch, (x.shape[0], -1)))
    return jnp.stack(rows, axis=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flax_conv_factors_match_autodiff(variant):
    apply, params, x, y = flax_problem(variant)
    gp = JaxGradientProvider(apply, params, cross_entropy, conv_layers=["Conv_0", "Conv_1"])
    bias0 = "Conv_0/bias" if VARIANTS[variant].get("use_bias", True) else None
    assert gp.kfac_layers() == {
        "Conv_0": ("Conv_0/kernel", bias0),
        "Conv_1": ("Conv_1/kernel", "Conv_1/bias"),
    }
    assert gp.kfac_layouts() == {"Conv_0": "io", "Conv_1": "io"}
    batch = gp.prepare_batch(xi.Batch(x, y))
    grads = gp.flat_grads(batch)
    slices = gp.parameter_slices
    factors = gp.kfac_factors(batch)
    for layer, (w, b) in gp.kfac_layers().items():
        a, s = factors[layer]
        ref = jnp.reshape(grads[:, slices[w]], (len(x), *gp.parameter_shapes[w]))
        assert rel_err(layer_gradients(gp, layer, a, s), ref) < 1e-12, layer
        if b is not None:
            assert rel_err(jnp.sum(s, axis=1), grads[:, slices[b]]) < 1e-12, layer
    # the first layer's patches alone, against slicing the padded input
    kw = VARIANTS[variant]
    pad = kw["padding"]
    if pad == "SAME":  # 7 -> 4 with stride 2 and a 3x3 kernel: 2 padded, 1 before
        pad = ((1, 1), (1, 1))
    elif pad == "VALID":
        pad = ((0, 0), (0, 0))
    elif isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    ref_a = ref_patches(
        x, (3, 3), kw.get("strides", (1, 1)), pad, kw.get("kernel_dilation", (1, 1))
    )
    assert rel_err(factors["Conv_0"][0], ref_a) < 1e-15


@pytest.mark.parametrize("variant", ["plain", "stride", "nobias"])
def test_flax_conv_gauss_newton_factors_give_the_layer_block(variant):
    apply, params, x, y = flax_problem(variant, n=6)
    gp = JaxGradientProvider(apply, params, cross_entropy, conv_layers=["Conv_0", "Conv_1"])
    batch = gp.prepare_batch(xi.Batch(x, y))
    ggn = gp.ggn(batch)  # dense, from per-sample Jacobians
    slices = gp.parameter_slices
    factors = gp.kfac_ggn_factors(batch)
    for layer, (w, b) in gp.kfac_layers().items():
        a, s = factors[layer]
        assert s.shape[:2] == (len(x), 5) and s.ndim == 4
        # per sample and pseudo-gradient c: the layer's gradient pieces, in flat order
        pieces = {w: jnp.reshape(layer_gradients(gp, layer, a[:, None], s), (len(x), 5, -1))}
        if b is not None:
            pieces[b] = jnp.sum(s, axis=2)
        names = sorted(pieces, key=lambda k: slices[k].start)  # flax dicts: bias first
        g = jnp.concatenate([pieces[k] for k in names], axis=2)
        idx = np.concatenate([np.arange(slices[k].start, slices[k].stop) for k in names])
        block = jnp.einsum("ncp,ncq->pq", g, g) / len(x)
        assert rel_err(block, ggn[np.ix_(idx, idx)]) < 1e-12, layer


class EqxCNN(eqx.Module):
    """The torch layout: weights ``(O, C, kh, kw)``, biases ``(O, 1, 1)``, NCHW,
    one sample at a time (``jax.vmap`` over the batch)."""

    conv0: eqx.nn.Conv2d
    conv1: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k0, k1, k2 = jax.random.split(key, 3)
        self.conv0 = eqx.nn.Conv2d(2, 3, 3, stride=2, padding=1, key=k0, dtype=F64)
        self.conv1 = eqx.nn.Conv2d(3, 4, 2, padding=1, use_bias=False, key=k1, dtype=F64)
        self.head = eqx.nn.Linear(4 * 5 * 5, 5, key=k2, dtype=F64)

    def __call__(self, x):
        x = jnp.tanh(self.conv0(x))
        x = jax.nn.softplus(self.conv1(x))
        return self.head(jnp.ravel(x))


def eqx_problem(n=9, seed=3, jit=False):
    model = EqxCNN(jax.random.key(seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply(p, xb):
        return jax.vmap(eqx.combine(p, static))(xb)

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, 2, 7, 7)))
    y = jnp.asarray(rng.integers(0, 5, size=n))
    return (jax.jit(apply) if jit else apply), params, x, y


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jitted_model"])
def test_equinox_conv_factors_match_autodiff(jit):
    apply, params, x, y = eqx_problem(jit=jit)
    gp = JaxGradientProvider(apply, params, cross_entropy, conv_layers=["conv0", "conv1"])
    assert gp.kfac_layers() == {
        "conv0": ("conv0/weight", "conv0/bias"),
        "conv1": ("conv1/weight", None),
    }
    assert gp.kfac_layouts() == {"conv0": "oi", "conv1": "oi"}
    batch = gp.prepare_batch(xi.Batch(x, y))
    grads = gp.flat_grads(batch)
    slices = gp.parameter_slices
    factors = gp.kfac_factors(batch)
    a, s = factors["conv0"]
    assert a.shape == (len(x), 16, 2 * 3 * 3) and s.shape == (len(x), 16, 3)
    for layer, (w, b) in gp.kfac_layers().items():
        a, s = factors[layer]
        ref = jnp.reshape(grads[:, slices[w]], (len(x), *gp.parameter_shapes[w]))
        assert rel_err(layer_gradients(gp, layer, a, s), ref) < 1e-12, layer
        if b is not None:  # a bias of shape (O, 1, 1)
            assert rel_err(jnp.sum(s, axis=1), grads[:, slices[b]]) < 1e-12, layer


def _head_features(p, xb):
    m = eqx.combine(p, _STATIC)
    return jax.vmap(lambda xi: jnp.ravel(jax.nn.softplus(m.conv1(jnp.tanh(m.conv0(xi))))))(xb)


def eqx_ekfac_provider(params, features=_head_features):
    """The equinox CNN with every parameter in a declared layer (two convolutions
    found by tracing, the head a dense layer with ``features`` as its inputs)."""
    return JaxGradientProvider(
        _eqx_apply,
        params,
        cross_entropy,
        conv_layers=["conv0", "conv1"],
        dense_layers={"head": features},
    )


class FlaxTwin(nn.Module):
    """EqxCNN in flax: NHWC, kernels (kh, kw, C, O), flattened in NCHW order."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(3, (3, 3), strides=(2, 2), padding=1, param_dtype=F64)(x))
        x = jax.nn.softplus(nn.Conv(4, (2, 2), padding=1, use_bias=False, param_dtype=F64)(x))
        x = jnp.reshape(jnp.transpose(x, (0, 3, 1, 2)), (x.shape[0], -1))
        return nn.Dense(5, param_dtype=F64)(x)


@pytest.mark.parametrize("second_order", ["empirical_fisher", "gauss_newton"])
def test_ekfac_flax_layout_equals_torch_layout(second_order):
    """The same CNN as an equinox model (weights (O, C, kh, kw), NCHW) and as a
    flax model (kernels (kh, kw, C, O), NHWC) gives the same EK-FAC influences:
    the patches are ordered to match each layout."""
    _, params, x, y = eqx_problem(n=17)
    eqx_gp = eqx_ekfac_provider(params)
    twin = FlaxTwin()

    def flax_apply(p, xb):
        return twin.apply({"params": p}, xb)

    fparams = {
        "Conv_0": {
            "kernel": jnp.transpose(params.conv0.weight, (2, 3, 1, 0)),
            "bias": jnp.ravel(params.conv0.bias),
        },
        "Conv_1": {"kernel": jnp.transpose(params.conv1.weight, (2, 3, 1, 0))},
        "Dense_0": {"kernel": params.head.weight.T, "bias": params.head.bias},
    }

    def flax_features(p, xb):  # the network up to the head's input
        h = jnp.tanh(
            nn.Conv(3, (3, 3), strides=(2, 2), padding=1).apply({"params": p["Conv_0"]}, xb)
        )
        h = jax.nn.softplus(
            nn.Conv(4, (2, 2), padding=1, use_bias=False).apply({"params": p["Conv_1"]}, h)
        )
        return jnp.reshape(jnp.transpose(h, (0, 3, 1, 2)), (xb.shape[0], -1))

    flax_gp = JaxGradientProvider(
        flax_apply,
        fparams,
        cross_entropy,
        conv_layers=["Conv_0", "Conv_1"],
        dense_layers={"Dense_0": flax_features},
    )
    x_nhwc = jnp.transpose(x, (0, 2, 3, 1))
    assert rel_err(flax_apply(fparams, x_nhwc), _eqx_apply(params, x)) < 1e-14
    scores = []
    for gp, xs in ((eqx_gp, x), (flax_gp, x_nhwc)):
        infl = xi.EkfacInfluence(gp, regularization=1e-3, second_order=second_order)
        infl.fit([(xs[:6], y[:6]), (xs[6:], y[6:])])
        scores.append(infl.influences(xs[:4], y[:4], xs, y))
    assert rel_err(scores[1], scores[0]) < 1e-10


def test_conv_declarations_are_checked():
    apply, params, x, y = flax_problem("plain", n=4)
    with pytest.raises(ValueError, match="needs a leaf 'nope/kernel'"):
        JaxGradientProvider(apply, params, cross_entropy, conv_layers=["nope"])
    with pytest.raises(TypeError, match="sequence of layer names"):
        JaxGradientProvider(apply, params, cross_entropy, conv_layers="Conv_0")
    with pytest.raises(ValueError, match="3 or more axes"):
        JaxGradientProvider(apply, params, cross_entropy, conv_layers=["Dense_0"])

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(3, 2, 2, 2)))
    w4 = jnp.asarray(rng.normal(size=(4, 1, 2, 2)))
    head = jnp.asarray(rng.normal(size=(3, 5)))

    def conv(xb, k, groups=1):
        return lax.conv_general_dilated(xb, k, (1, 1), "SAME", feature_group_count=groups)

    def shared(p, xb):  # one kernel, two convolutions
        h = jnp.tanh(conv(jnp.tanh(conv(xb, p["c"]["weight"]))[:, :2], p["c"]["weight"]))
        return jnp.mean(h, axis=(2, 3)) @ p["head"]

    def reused(p, xb):  # the kernel also enters the loss elsewhere
        h = conv(xb, p["c"]["weight"])
        return jnp.mean(h, axis=(2, 3)) @ p["head"] + jnp.sum(p["c"]["weight"])

    def looped(p, xb):
        def body(carry, _):
            return carry, conv(xb, p["c"]["weight"])

        _, hs = lax.scan(body, 0.0, None, length=1)
        return jnp.mean(hs[0], axis=(2, 3)) @ p["head"]

    def transposed(p, xb):  # a "weight" used in (kh, kw, C, O) order
        k = jnp.transpose(p["c"]["weight"], (2, 3, 1, 0))
        h = lax.conv_general_dilated(
            xb, k, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW")
        )
        return jnp.mean(h, axis=(2, 3)) @ p["head"]

    def grouped(p, xb):
        h = conv(xb, p["c"]["weight"], groups=2)  # (4, 1, 2, 2): two groups of one channel
        return jnp.mean(h, axis=(2, 3))[:, :3] @ p["head"]

    xs = jnp.asarray(rng.normal(size=(4, 2, 5, 5)))
    ys = jnp.asarray(rng.integers(0, 5, size=4))
    cases = {
        shared: "feed exactly one",
        reused: "other than one convolution",
        looped: "loops and branches cannot be tapped",
        transposed: "other than one convolution",
        grouped: "grouped convolutions",
    }
    for fn, match in cases.items():
        params = {"c": {"weight": w if fn is not grouped else w4}, "head": head}
        gp = JaxGradientProvider(fn, params, cross_entropy, conv_layers=["c"])
        batch = gp.prepare_batch(xi.Batch(xs, ys))
        with pytest.raises(ValueError, match=match):
            gp.kfac_factors(batch)


_FLAX = FlaxCNN(VARIANTS["stride"])


def _flax_apply(p, xb):
    return _FLAX.apply({"params": p}, xb)


def test_conv_provider_pickles():
    """The traced functions are not pickled; they are rebuilt on first use."""
    _, params, x, y = flax_problem("stride", n=5)
    gp = JaxGradientProvider(_flax_apply, params, cross_entropy, conv_layers=["Conv_0", "Conv_1"])
    before = gp.kfac_factors(gp.prepare_batch(xi.Batch(x, y)))
    clone = pickle.loads(pickle.dumps(gp))
    after = clone.kfac_factors(clone.prepare_batch(xi.Batch(x, y)))
    for layer in before:
        assert rel_err(after[layer][1], before[layer][1]) == 0.0
        assert rel_err(after[layer][0], before[layer][0]) == 0.0


_STATIC = eqx.partition(EqxCNN(jax.random.key(3)), eqx.is_inexact_array)[1]


def _eqx_apply(p, xb):
    return jax.vmap(eqx.combine(p, _STATIC))(xb)


@pytest.mark.parametrize("variant", ["stride", "nobias"])
def test_kronecker_projection_of_conv_layers_equals_projected_gradients(variant):
    """LoGra on traced convolutions, flax kernel layout (kh, kw, C, O)."""
    from xinfluence.projection import KroneckerProjection

    apply, params, x, y = flax_problem(variant, n=8)
    gp = JaxGradientProvider(apply, params, cross_entropy, conv_layers=["Conv_0", "Conv_1"])
    sub = gp.restrict([n for n in gp.parameter_names if not n.startswith("Dense")])
    proj = KroneckerProjection(sub, list(sub.kfac_layers()), sub, (2, 5), seed=1)
    batch = sub.prepare_batch(xi.Batch(x, y))
    assert rel_err(proj.project_grads(sub, batch), proj.project(sub.flat_grads(batch))) < 1e-12


def test_flat_grads_from_declared_layers_equal_reverse_mode():
    """With every leaf in a declared layer, flat_grads comes from the factors (one
    product per layer); it equals vmapped reverse mode, also on a restriction."""
    _, params, x, y = eqx_problem(n=11)
    gp = eqx_ekfac_provider(params)
    assert gp._structured_layers() is not None
    for lo, hi in ((0, 7), (7, 8), (8, 11)):  # uneven batches, one of a single sample
        batch = gp.prepare_batch(xi.Batch(x[lo:hi], y[lo:hi]))
        ref = gp._jit_grads(gp._theta, gp._fixed, batch.x, batch.y)[0]
        assert rel_err(gp.flat_grads(batch), ref) < 1e-12
    sub = gp.restrict(["conv1/weight", "head/weight", "head/bias"])
    batch = sub.prepare_batch(xi.Batch(x, y))
    ref = sub._jit_grads(sub._theta, sub._fixed, batch.x, batch.y)[0]
    assert rel_err(sub.flat_grads(batch), ref) < 1e-12
    # a bias alone is in no layer of the restriction: reverse mode
    bias_only = gp.restrict(["conv0/bias"])
    assert bias_only._structured_layers() is None


def test_a_wrong_features_function_is_caught_by_flat_grads():
    _, params, x, y = eqx_problem(n=6)

    def wrong(p, xb):  # the head's input without the softplus
        m = eqx.combine(p, _STATIC)
        return jax.vmap(lambda xi_: jnp.ravel(m.conv1(jnp.tanh(m.conv0(xi_)))))(xb)

    gp = eqx_ekfac_provider(params, features=wrong)
    with pytest.raises(ValueError, match="do not reproduce the model's per-sample gradients"):
        gp.flat_grads(gp.prepare_batch(xi.Batch(x, y)))


def test_jacobian_prod_from_declared_layers_equals_forward_mode(monkeypatch):
    """Structured per-sample gradients times g^T, in budget-sized sample chunks,
    equal forward mode along each row of g; one layer's restriction too."""
    _, params, x, y = eqx_problem(n=10)
    gp = eqx_ekfac_provider(params)
    batch = gp.prepare_batch(xi.Batch(x, y))
    g = jnp.asarray(np.random.default_rng(7).normal(size=(3, gp.n_parameters)))
    ref = gp._jit_jac_prod(gp._theta, gp._fixed, batch.x, batch.y, g)[0]
    # room for 4 samples' gradients (3 copies of P float64 each): chunks 4, 4, 2
    monkeypatch.setenv("XINFLUENCE_MEMORY_BUDGET", str(4 * 3 * gp.n_parameters * 8))
    sizes = []
    structured = gp.flat_grads

    def spy(b):
        sizes.append(b.x.shape[0])
        return structured(b)

    monkeypatch.setattr(gp, "flat_grads", spy)
    assert rel_err(gp.jacobian_prod(batch, g), ref) < 1e-12
    assert sizes == [4, 4, 2]
    sub = gp.restrict(["conv1/weight"])
    gs = g[:, gp.parameter_slices["conv1/weight"]]
    ref = sub._jit_jac_prod(sub._theta, sub._fixed, batch.x, batch.y, gs[:2])[0]
    assert rel_err(sub.jacobian_prod(batch, gs[:2]), ref) < 1e-12
