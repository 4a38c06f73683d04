"""Dense layers on a token axis and tracked layers, jax (``layers=[...]``).

A small flax transformer-ish block (embedding and positions, a Dense-ReLU-Dense
residual MLP on ``(N, T, d)``, LayerNorm, a mean pool and a head; 477
parameters, 325 of them in the tracked dense layers) in float64.

Oracles never use the provider's taps: the same block written out by hand
(``ref_forward``), whose dense outputs take explicit perturbations, gives each
token's layer input ``a_t`` and output gradient ``s_t`` one sample at a time; the
Gauss-Newton layer blocks come from the hand model's Jacobians and the loss
Hessian; EK-FAC is rebuilt from those per-token quantities by ``numpy.linalg``;
the layer-wise Direct influences come from ``jax.hessian`` of the mean training
loss in each layer's parameters. Every new input shape compiles on jax, so the
tests share one data set, one batch split and module-scoped providers.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import xinfluence as xi  # noqa: E402
from helpers import rel_err  # noqa: E402
from xinfluence import Batch  # noqa: E402
from xinfluence.backends.jax import JaxGradientProvider  # noqa: E402

nn = pytest.importorskip("flax.linen")

F64 = jnp.float64
VOCAB, T, D, H, CLASSES, N = 11, 6, 8, 16, 5, 10
LAYERS = ["fc", "proj", "head"]
EPS_LN = 1e-5


class TinyLM(nn.Module):
    """Embedding + positions, ``x + proj(relu(fc(x)))`` on every token, LayerNorm,
    a mean over tokens, a dense head."""

    dtype: type = F64

    @nn.compact
    def __call__(self, ids):  # (N, T) token ids; the provider casts x to floats
        ids = jnp.round(ids).astype(jnp.int32)
        pos = self.param("pos", nn.initializers.normal(0.3), (T, D), self.dtype)
        z = nn.Embed(VOCAB, D, param_dtype=self.dtype, name="emb")(ids) + pos
        hid = nn.relu(nn.Dense(H, param_dtype=self.dtype, name="fc")(z))
        z = z + nn.Dense(D, param_dtype=self.dtype, name="proj")(hid)
        z = nn.LayerNorm(epsilon=EPS_LN, param_dtype=self.dtype, name="ln")(z)
        return nn.Dense(CLASSES, param_dtype=self.dtype, name="head")(jnp.mean(z, axis=1))


def apply_tiny(p, ids):  # module level: the provider pickles
    return TinyLM(dtype=jax.tree_util.tree_leaves(p)[0].dtype).apply({"params": p}, ids)


def cross_entropy(z, y):
    return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0])


def ref_forward(p, ids, deltas):
    """One sample by hand: logits ``(C,)`` and each dense layer's input, with
    ``deltas[layer]`` added to its output (``(T, O)``; the head's ``(O,)``)."""
    z = p["emb"]["embedding"][ids] + p["pos"]
    a = {"fc": z}
    hid = jnp.maximum(z @ p["fc"]["kernel"] + p["fc"]["bias"] + deltas["fc"], 0.0)
    a["proj"] = hid
    z = z + hid @ p["proj"]["kernel"] + p["proj"]["bias"] + deltas["proj"]
    mu = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean((z - mu) ** 2, axis=-1, keepdims=True)
    z = (z - mu) / jnp.sqrt(var + EPS_LN) * p["ln"]["scale"] + p["ln"]["bias"]
    a["head"] = jnp.mean(z, axis=0)
    return a["head"] @ p["head"]["kernel"] + p["head"]["bias"] + deltas["head"], a


def zero_deltas(dtype=F64):
    return {
        "fc": jnp.zeros((T, H), dtype),
        "proj": jnp.zeros((T, D), dtype),
        "head": jnp.zeros((CLASSES,), dtype),
    }


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def make_problem():
    """Float64 parameters (all perturbed off their init) and token ids: ``N``
    training sequences, 3 queries."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(N + 3, T))
    y = rng.integers(0, CLASSES, size=N + 3)
    params = TinyLM().init(jax.random.key(0), jnp.asarray(ids[:1]))["params"]
    # random biases, LayerNorm scale and shift: nothing at its zero / one init
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [v + 0.2 * jnp.asarray(rng.normal(size=v.shape)) for v in leaves]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    x, xt = jnp.asarray(ids[:N]), jnp.asarray(ids[N:])
    y, yt = jnp.asarray(y[:N]), jnp.asarray(y[N:])
    return params, x, y, xt, yt


@pytest.fixture(scope="module")
def gp(problem):
    return JaxGradientProvider(apply_tiny, problem[0], cross_entropy, layers=LAYERS)


def batches(x, y):
    return [(x[:4], y[:4]), (x[4:], y[4:])]  # uneven


def _ref_one(p, ids, y):
    def loss(deltas):
        out, a = ref_forward(p, ids, deltas)
        return jax.nn.logsumexp(out) - out[y], (out, a)

    s, (out, a) = jax.grad(loss, has_aux=True)(zero_deltas())
    return out, a, s


def _ref_ggn_one(p, ids, y):
    """One sample's Gauss-Newton block of each layer, ``J^T H J`` in the
    parameters ``[kernel^T, bias]`` ``(O, I + 1)`` raveled."""
    out = ref_forward(p, ids, zero_deltas())[0]
    jac = jax.jacrev(lambda q: ref_forward(q, ids, zero_deltas())[0])(p)
    hess = jax.hessian(lambda o: jax.nn.logsumexp(o) - o[y])(out)
    blocks = {}
    for layer in LAYERS:
        j = jac[layer]  # kernel (M, I, O), bias (M, O)
        j = jnp.concatenate([jnp.swapaxes(j["kernel"], 1, 2), j["bias"][:, :, None]], axis=2)
        j = jnp.reshape(j, (CLASSES, -1))
        blocks[layer] = j.T @ hess @ j
    return blocks


_ref_one_jit, _ref_ggn_one_jit = jax.jit(_ref_one), jax.jit(_ref_ggn_one)


def ref_tokens(p, x, y):
    """Per-token layer inputs and output gradients, one sample at a time:
    layer -> ``a`` ``(N, T, I)`` and ``s`` ``(N, T, O)`` (the head ``(N, I)``, ``(N, O)``),
    and the logits ``(N, C)``."""
    rows = [_ref_one_jit(p, jnp.asarray(x[n], jnp.int32), y[n]) for n in range(x.shape[0])]
    out = jnp.stack([r[0] for r in rows])
    a = {k: jnp.stack([r[1][k] for r in rows]) for k in LAYERS}
    s = {k: jnp.stack([r[2][k] for r in rows]) for k in LAYERS}
    return out, a, s


@pytest.fixture(scope="module")
def reference(problem):
    """The hand model's per-token quantities of the training set and of the
    queries, and the layers' Gauss-Newton blocks summed over the training set."""
    params, x, y, xt, yt = problem
    train, query = ref_tokens(params, x, y), ref_tokens(params, xt, yt)
    ggn = {k: 0.0 for k in LAYERS}
    for n in range(N):
        blocks = _ref_ggn_one_jit(params, jnp.asarray(x[n], jnp.int32), y[n])
        ggn = {k: ggn[k] + blocks[k] for k in LAYERS}
    return train, query, ggn


def aug_grad(a, s):
    """The layer's gradient as ``(N, O, I + 1)``: ``[sum_t s_t a_t^T, sum_t s_t]``."""
    if a.ndim == 2:
        a, s = a[:, None], s[:, None]
    g = jnp.einsum("nto,nti->noi", s, a)
    return jnp.concatenate([g, jnp.sum(s, axis=1)[:, :, None]], axis=2)


def test_tracked_layers_and_the_hand_model(problem, gp, reference):
    params, x, _, _, _ = problem
    assert gp.tracked_layers == ("fc", "proj", "head")
    assert gp.untracked_parameters == ("emb/embedding", "ln/bias", "ln/scale", "pos")
    assert tuple(gp.parameter_names) == (
        "fc/bias",
        "fc/kernel",
        "head/bias",
        "head/kernel",
        "proj/bias",
        "proj/kernel",
    )
    assert gp.n_parameters == 325 and "untracked_parameters=['emb/embedding'" in repr(gp)
    assert gp.kfac_layouts() == {"fc": "io", "head": "io", "proj": "io"}
    assert rel_err(reference[0][0], apply_tiny(params, x)) < 1e-13
    back = pickle.loads(pickle.dumps(gp))
    assert back.tracked_layers == gp.tracked_layers
    assert back.untracked_parameters == gp.untracked_parameters
    assert back.parameter_names == gp.parameter_names


def test_token_factors_equal_per_token_reference(problem, gp, reference):
    _, x, y, _, _ = problem
    _, a_ref, s_ref = reference[0]
    batch = gp.prepare_batch(Batch(x, y))
    factors = gp.kfac_factors(batch)
    for layer in LAYERS:
        a, s = factors[layer]
        assert a.shape == a_ref[layer].shape and s.shape == s_ref[layer].shape, layer
        assert rel_err(a, a_ref[layer]) < 1e-14, layer
        assert rel_err(s, s_ref[layer]) < 1e-12, layer
    # the gradients they give are the model's (the bias as sum_t s_t)
    grads, sl = gp.flat_grads(batch), gp.parameter_slices
    for layer in LAYERS:
        g = aug_grad(*factors[layer])
        kernel = jnp.reshape(grads[:, sl[f"{layer}/kernel"]], (N, g.shape[2] - 1, -1))
        assert rel_err(g[:, :, :-1], jnp.swapaxes(kernel, 1, 2)) < 1e-12, layer
        assert rel_err(g[:, :, -1], grads[:, sl[f"{layer}/bias"]]) < 1e-12, layer


def test_expand_factors_equal_dense_reference(problem, gp, reference):
    from xinfluence.influence.kronecker import _kfac_accumulate

    _, x, y, _, _ = problem
    _, a_ref, s_ref = reference[0]
    factors = gp.kfac_factors(gp.prepare_batch(Batch(x, y)))
    for layer in LAYERS:
        a_r, s_r = a_ref[layer], s_ref[layer]
        if a_r.ndim == 2:
            a_r, s_r = a_r[:, None], s_r[:, None]
        a_r = jnp.concatenate([a_r, jnp.ones((*a_r.shape[:2], 1), F64)], axis=2)
        t = a_r.shape[1]
        # expand: A = (1/N) sum_{n,t} a a^T, S = (1/(N T)) sum_{n,t} s s^T
        a_dense = jnp.einsum("nti,ntj->ij", a_r, a_r) / N
        s_dense = jnp.einsum("nti,ntj->ij", s_r, s_r) / (N * t)
        a, s = factors[layer]
        a_cov, s_cov = _kfac_accumulate(a, s[:, None], None, xp=jnp, bias=True)
        assert rel_err(a_cov / N, a_dense) < 1e-13, layer
        assert rel_err(s_cov / N, s_dense) < 1e-13, layer


def test_gauss_newton_factors_give_the_layer_blocks(problem, gp, reference):
    _, x, y, _, _ = problem
    factors = gp.kfac_ggn_factors(gp.prepare_batch(Batch(x, y)))
    for layer in LAYERS:
        a, s = factors[layer]  # s (N, M, [T,] O)
        assert s.shape[:2] == (N, CLASSES) and s.ndim == a.ndim + 1, layer
        pieces = jnp.stack([aug_grad(a, s[:, c]) for c in range(CLASSES)], axis=1)
        pieces = jnp.reshape(pieces, (N, CLASSES, -1))
        block = jnp.einsum("ncp,ncq->pq", pieces, pieces)
        assert rel_err(block, reference[2][layer]) < 1e-12, layer


def test_ekfac_empirical_fisher_equals_dense_reference(problem, gp, reference):
    _, x, y, xt, yt = problem
    reg = 1e-3
    infl = xi.EkfacInfluence(gp, regularization=reg, second_order="empirical_fisher")
    scores = infl.fit(batches(x, y)).influences(xt, yt, x, y)
    # expand factors, their eigenbases, corrected eigenvalues from the exact
    # per-sample gradients, in numpy from the per-token quantities
    (_, a_ref, s_ref), (_, a_q, s_q), _ = reference
    expected = np.zeros((xt.shape[0], N))
    for layer in LAYERS:
        a_r, s_r = np.asarray(a_ref[layer]), np.asarray(s_ref[layer])
        if a_r.ndim == 2:
            a_r, s_r = a_r[:, None], s_r[:, None]
        a_r = np.concatenate([a_r, np.ones((*a_r.shape[:2], 1))], axis=2)
        big_a = np.einsum("nti,ntj->ij", a_r, a_r) / N
        big_s = np.einsum("nti,ntj->ij", s_r, s_r) / (N * a_r.shape[1])
        q_a, q_s = np.linalg.eigh(big_a)[1], np.linalg.eigh(big_s)[1]
        rot = q_s.T @ np.asarray(aug_grad(a_ref[layer], s_ref[layer])) @ q_a  # (N, O, I + 1)
        rot_q = q_s.T @ np.asarray(aug_grad(a_q[layer], s_q[layer])) @ q_a
        lam = np.mean(rot**2, axis=0)
        expected += np.einsum("toi,noi->tn", rot_q / (lam + reg), rot)
    assert rel_err(scores, expected) < 1e-10


@pytest.fixture(scope="module")
def direct_gn(problem, gp):
    _, x, y, _, _ = problem
    kw = dict(regularization=1e-3, block_structure="layer", second_order="gauss_newton")
    return xi.DirectInfluence(gp, **kw).fit(batches(x, y))


def test_layerwise_direct_equals_dense_reference(problem, reference, direct_gn):
    _, x, y, xt, yt = problem
    (_, a_ref, s_ref), (_, a_q, s_q), ggn = reference
    expected = 0.0
    for layer in LAYERS:
        g = jnp.reshape(aug_grad(a_ref[layer], s_ref[layer]), (N, -1))
        gq = jnp.reshape(aug_grad(a_q[layer], s_q[layer]), (xt.shape[0], -1))
        curvature = ggn[layer] / N + 1e-3 * jnp.eye(g.shape[1])
        expected = expected + gq @ jnp.linalg.solve(curvature, g.T)
    assert rel_err(direct_gn.influences(xt, yt, x, y), expected) < 1e-10


def test_kronecker_projection_at_full_size_equals_layerwise_gauss_newton_direct(
    problem, gp, direct_gn
):
    _, x, y, xt, yt = problem
    kw = dict(regularization=1e-3, block_structure="layer", second_order="gauss_newton")
    # k = O * (I + 1) of the largest layer (fc: 16 * 9): every layer at full size
    proj = xi.ProjectedInfluence(
        gp, k=144, projection="kronecker", seed=5, regularization_space="parameter", **kw
    ).fit(batches(x, y))
    assert rel_err(proj.influences(xt, yt, x, y), direct_gn.influences(xt, yt, x, y)) < 1e-9


def test_float32_default_ekfac_close_to_float64(problem, gp):
    params, x, y, xt, yt = problem
    p32 = jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), params)
    gp32 = JaxGradientProvider(apply_tiny, p32, cross_entropy, layers=LAYERS)
    # one batch of all N: the float64 factors of that shape are compiled already
    s32 = xi.EkfacInfluence(gp32, regularization=1e-2).fit((x, y)).influences(xt, yt, x, y)
    s64 = xi.EkfacInfluence(gp, regularization=1e-2).fit((x, y)).influences(xt, yt, x, y)
    assert s32.dtype == jnp.float32
    assert rel_err(s32, s64) < 1e-3


# -- equinox, errors ----------------------------------------------------------------


def test_equinox_linear_on_a_token_axis():
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        l1: eqx.nn.Linear
        l2: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.l1 = eqx.nn.Linear(3, 4, key=k1, dtype=F64)
            self.l2 = eqx.nn.Linear(4, 2, use_bias=False, key=k2, dtype=F64)

        def __call__(self, x):  # one sample (T, 3): every token through both layers
            return jnp.mean(jax.vmap(lambda t: self.l2(jnp.tanh(self.l1(t))))(x), axis=0)

    params, static = eqx.partition(Net(jax.random.key(1)), eqx.is_inexact_array)

    def apply(p, xb):
        return jax.vmap(eqx.combine(p, static))(xb)

    rng = np.random.default_rng(4)
    x, y = jnp.asarray(rng.normal(size=(7, 5, 3))), jnp.asarray(rng.integers(0, 2, size=7))
    gp = JaxGradientProvider(apply, params, cross_entropy, layers=["l1", "l2"])
    assert gp.kfac_layers() == {"l1": ("l1/weight", "l1/bias"), "l2": ("l2/weight", None)}
    assert gp.kfac_layouts() == {"l1": "oi", "l2": "oi"}
    batch = gp.prepare_batch(Batch(x, y))
    factors, grads, sl = gp.kfac_factors(batch), gp.flat_grads(batch), gp.parameter_slices
    a, s = factors["l1"]
    assert a.shape == (7, 5, 3) and s.shape == (7, 5, 4)
    for layer, (w, b) in gp.kfac_layers().items():
        a, s = factors[layer]
        g = jnp.einsum("nto,nti->noi", s, a)
        assert rel_err(jnp.reshape(g, (7, -1)), grads[:, sl[w]]) < 1e-12, layer
        if b is not None:
            assert rel_err(jnp.sum(s, axis=1), grads[:, sl[b]]) < 1e-12


def test_tracked_layer_errors(problem):
    params = problem[0]
    with pytest.raises(ValueError, match=r"unsupported: 'ln' \(holds bias, scale\), 'emb'"):
        JaxGradientProvider(apply_tiny, params, cross_entropy, layers=["fc", "ln", "emb"])
    with pytest.raises(ValueError, match=r"not nodes of the parameter tree"):
        JaxGradientProvider(apply_tiny, params, cross_entropy, layers=["fc", "nope"])
    with pytest.raises(ValueError, match="replaces dense_layers and conv_layers"):
        JaxGradientProvider(
            apply_tiny, params, cross_entropy, layers=["fc"], dense_layers={"head": lambda p, x: x}
        )
    with pytest.raises(TypeError, match="layer names"):
        JaxGradientProvider(apply_tiny, params, cross_entropy, layers=[3])

    # a bias added after the activation: its gradient is not sum_t s_t
    def apply(p, xb):
        return jnp.mean(jnp.tanh(xb @ p["d"]["kernel"]) + p["d"]["bias"], axis=1)

    rng = np.random.default_rng(2)
    p = {"d": {"kernel": jnp.asarray(rng.normal(size=(3, 2))), "bias": jnp.ones(2, F64)}}
    x, y = jnp.asarray(rng.normal(size=(4, 5, 3))), jnp.asarray(rng.integers(0, 2, size=4))
    gp = JaxGradientProvider(apply, p, cross_entropy, layers=["d"])
    with pytest.raises(ValueError, match=r"layer 'd': the gradient of 'd/bias' is not the sum"):
        gp.kfac_factors(gp.prepare_batch(Batch(x, y)))

    # a kernel used three times (once transposed) is no dense layer
    def twice(p, xb):
        return jnp.mean(jnp.tanh(xb @ p["d"]["kernel"]) @ p["d"]["kernel"].T @ p["d"]["kernel"], 1)

    gp = JaxGradientProvider(twice, {"d": {"kernel": p["d"]["kernel"]}}, cross_entropy, layers="d")
    with pytest.raises(ValueError, match=r"dense layer 'd' \('d/kernel'\): .* it feeds 3"):
        gp.kfac_factors(gp.prepare_batch(Batch(x, y)))

    def scaled(p, xb):  # the kernel scaled before the product: not sum_t s_t a_t^T
        return jnp.mean(xb @ (2.0 * p["d"]["kernel"]), axis=1)

    gp = JaxGradientProvider(scaled, {"d": {"kernel": p["d"]["kernel"]}}, cross_entropy, layers="d")
    with pytest.raises(ValueError, match=r"the kernel enters computations other than .*\(mul\)"):
        gp.kfac_factors(gp.prepare_batch(Batch(x, y)))


def test_declared_features_on_a_token_axis_point_to_tracked_layers():
    def apply(p, xb):
        return jnp.mean(xb @ p["d"]["kernel"] + p["d"]["bias"], axis=1)

    rng = np.random.default_rng(5)
    p = {"d": {"kernel": jnp.asarray(rng.normal(size=(3, 2))), "bias": jnp.ones(2, F64)}}
    x, y = jnp.asarray(rng.normal(size=(4, 5, 3))), jnp.asarray(rng.integers(0, 2, size=4))
    gp = JaxGradientProvider(apply, p, cross_entropy, dense_layers={"d": lambda q, xb: xb})
    with pytest.raises(ValueError, match=r"must have shape \(4, 3\), got \(4, 5, 3\).*layers="):
        gp.kfac_factors(gp.prepare_batch(Batch(x, y)))
    tracked = JaxGradientProvider(apply, p, cross_entropy, layers=["d"])
    a, s = tracked.kfac_factors(tracked.prepare_batch(Batch(x, y)))["d"]
    assert a.shape == (4, 5, 3) and s.shape == (4, 5, 2)


def test_tokens_folded_into_the_batch_axis_keep_their_positions():
    # the model flattens (1, T, d) to (T, d) before the dense layer: one sample's
    # operand is 2-D but holds T positions, which must not be dropped
    def apply(p, xb):
        z = jnp.reshape(xb, (-1, xb.shape[-1])) @ p["d"]["kernel"] + p["d"]["bias"]
        return jnp.mean(jnp.reshape(jnp.tanh(z), (xb.shape[0], -1, 2)), axis=1)

    rng = np.random.default_rng(6)
    p = {"d": {"kernel": jnp.asarray(rng.normal(size=(3, 2))), "bias": jnp.ones(2, F64)}}
    x, y = jnp.asarray(rng.normal(size=(4, 5, 3))), jnp.asarray(rng.integers(0, 2, size=4))
    gp = JaxGradientProvider(apply, p, cross_entropy, layers=["d"])
    batch = gp.prepare_batch(Batch(x, y))
    a, s = gp.kfac_factors(batch)["d"]
    assert a.shape == (4, 5, 3) and s.shape == (4, 5, 2)
    assert rel_err(a, x) < 1e-15
    grads, sl = gp.flat_grads(batch), gp.parameter_slices
    g = jnp.reshape(jnp.einsum("nti,nto->nio", a, s), (4, -1))
    assert rel_err(g, grads[:, sl["d/kernel"]]) < 1e-12


def test_torch_layout_weight_used_transposed():
    # plain jax with a torch-layout weight (O, I): x @ w.T + b on a token axis
    def apply(p, xb):
        return jnp.mean(jnp.tanh(xb @ p["d"]["weight"].T + p["d"]["bias"]), axis=1)

    rng = np.random.default_rng(7)
    p = {"d": {"weight": jnp.asarray(rng.normal(size=(2, 3))), "bias": jnp.ones(2, F64)}}
    x, y = jnp.asarray(rng.normal(size=(4, 5, 3))), jnp.asarray(rng.integers(0, 2, size=4))
    gp = JaxGradientProvider(apply, p, cross_entropy, layers=["d"])
    assert gp.kfac_layouts() == {"d": "oi"}
    batch = gp.prepare_batch(Batch(x, y))
    a, s = gp.kfac_factors(batch)["d"]
    assert a.shape == (4, 5, 3) and s.shape == (4, 5, 2)
    grads, sl = gp.flat_grads(batch), gp.parameter_slices
    g = jnp.reshape(jnp.einsum("nto,nti->noi", s, a), (4, -1))
    assert rel_err(g, grads[:, sl["d/weight"]]) < 1e-12
    assert rel_err(jnp.sum(s, axis=1), grads[:, sl["d/bias"]]) < 1e-12


class EmbedLM(nn.Module):
    """:class:`TinyLM` on integer token ids as a flax user writes it (no rounding:
    ``nn.Embed`` refuses floating ids)."""

    @nn.compact
    def __call__(self, ids):
        pos = self.param("pos", nn.initializers.normal(0.3), (T, D), F64)
        z = nn.Embed(VOCAB, D, param_dtype=F64, name="emb")(ids) + pos
        hid = nn.relu(nn.Dense(H, param_dtype=F64, name="fc")(z))
        z = z + nn.Dense(D, param_dtype=F64, name="proj")(hid)
        z = nn.LayerNorm(epsilon=EPS_LN, param_dtype=F64, name="ln")(z)
        return nn.Dense(CLASSES, param_dtype=F64, name="head")(jnp.mean(z, axis=1))


def apply_embed(p, ids):
    return EmbedLM().apply({"params": p}, ids)


def test_integer_token_ids_with_cast_inputs_false(problem, gp):
    """``cast_inputs=False`` keeps token ids integer: EK-FAC over the tracked layers
    equals that of the same block fed rounded floats (the default cast), and the
    default's failure on ``nn.Embed`` says what to pass."""
    params, x, y, xt, yt = problem
    ints = JaxGradientProvider(apply_embed, params, cross_entropy, layers=LAYERS, cast_inputs=False)
    assert ints.cast_inputs is False and gp.cast_inputs is True
    assert ints.prepare_batch(Batch(x, y)).x.dtype == x.dtype
    kw = dict(regularization=1e-3, second_order="empirical_fisher")
    ref = xi.EkfacInfluence(gp, **kw).fit(batches(x, y))
    got = xi.EkfacInfluence(ints, **kw).fit(batches(x, y))
    assert rel_err(got.influences(xt, yt, x, y), ref.influences(xt, yt, x, y)) < 1e-12
    with pytest.raises(TypeError, match="floating inputs"):
        ints.flat_mixed_grads(Batch(x[:2], y[:2]))
    cast = JaxGradientProvider(apply_embed, params, cross_entropy, layers=LAYERS)
    with pytest.raises(ValueError, match="cast_inputs=False"):
        cast.prepare_batch(Batch(x, y))
