"""Reliability of a fitted model's state (issue 9): stale fits, dropped
parameters, layer grouping of pytrees, non-finite losses, loose scalars."""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from helpers import rel_err
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import (
    FiniteDifferenceGradients,
    LogisticRegressionGradients,
    SoftmaxRegressionGradients,
)

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
    from torch_helpers import mlp

    model = mlp(n_in=4, hidden=6, n_out=3, seed=0)
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


@pytest.mark.parametrize("cls", [xi.DirectInfluence, xi.CgInfluence])
def test_torch_update_through_data_after_fit_raises(backend_name, cls):
    """``p.data`` updates bypass the version counters: the value checksum sees them."""
    if backend_name != "torch":
        pytest.skip("runs in the torch session")
    torch, model, x, y = _torch_mlp()
    from xinfluence.backends.torch import TorchGradientProvider

    model.float()  # float32: the checksum also sees a change of 1e-2 in one entry there
    x = x.float()
    gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
    infl = cls(gp, regularization=1.0).fit((x, y))
    before = infl.influences(x[:3], y[:3], x, y)
    weight = model[0].weight
    version = weight._version
    weight.data.add_(1e-2)
    assert weight._version == version  # the counter did not move
    with pytest.raises(xi.StaleFitError, match="changed after .*fit"):
        infl.influences(x[:3], y[:3], x, y)
    infl.fit((x, y))
    weight.data[2, 1] -= 1e-2  # one entry, a small step
    with pytest.raises(xi.StaleFitError):
        infl.influence_factors(x[:3], y[:3])
    after = infl.fit((x, y)).influences(x[:3], y[:3], x, y)
    assert float((after - before).abs().max()) > 1e-4  # the update did change the answer
    # the refit uses the new values: the same as a fresh provider's fit
    fresh = cls(TorchGradientProvider(model, torch.nn.functional.cross_entropy), regularization=1.0)
    expected = fresh.fit((x, y)).influences(x[:3], y[:3], x, y)
    assert rel_err(after, expected) < 1e-5


# -- dropped parameters ----------------------------------------------------------


def _softmax(to_xp, seed=1, n=29):
    rng = np.random.default_rng(seed)
    gp = SoftmaxRegressionGradients(to_xp(rng.normal(size=(3, 4))), to_xp(rng.normal(size=3)))
    return gp, to_xp(rng.normal(size=(n, 4))), to_xp(rng.integers(0, 3, size=n))


def test_block_dict_must_cover_every_parameter(xp, to_xp):
    gp, x, y = _softmax(to_xp)
    with pytest.raises(ValueError, match=r"leaves out the parameters \['bias'\].*'ignore'"):
        xi.DirectInfluence(gp, block_structure={"w": ["weight"]})
    with pytest.raises(ValueError, match="'weight' is twice in block 'w'"):
        xi.DirectInfluence(gp, block_structure={"w": ["weight", "weight"], "b": ["bias"]})
    with pytest.raises(ValueError, match="in two blocks"):
        xi.DirectInfluence(gp, block_structure={"w": ["weight"], "ignore": ["weight", "bias"]})
    with pytest.raises(ValueError, match="every parameter in 'ignore'"):
        xi.DirectInfluence(gp, block_structure={"ignore": ["weight", "bias"]})


def test_ignore_block_leaves_parameters_out(xp, to_xp):
    gp, x, y = _softmax(to_xp)
    infl = xi.DirectInfluence(
        gp, regularization=1e-3, block_structure={"w": ["weight"], "ignore": ["bias"]}
    ).fit((x, y))
    assert list(infl.blocks) == ["w"]
    # oracle: the provider restricted to the weight (the bias held fixed)
    ref = xi.DirectInfluence(gp.restrict(["weight"]), regularization=1e-3).fit((x, y))
    got = infl.influences(x[:5, ...], y[:5], x, y)
    assert rel_err(got, ref.influences(x[:5, ...], y[:5], x, y)) < 1e-12
    assert infl.influence_factors(x[:2, ...], y[:2]).shape == (2, 12)


# -- non-finite losses ---------------------------------------------------------------


def _sqrt_loss(params, x, y):
    import array_api_compat

    xp = array_api_compat.array_namespace(x)
    return (xp.sqrt(x[:, 0]) * params["w"][0] - y) ** 2


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_losses_name_the_samples(xp, to_xp):
    gp = FiniteDifferenceGradients(_sqrt_loss, {"w": to_xp(np.array([0.5]))})
    x = to_xp(np.array([[1.0], [2.0], [3.0], [4.0]]))
    y = to_xp(np.array([1.0, 0.0, 2.0, 1.0]))
    infl = xi.DirectInfluence(gp, regularization=1e-3).fit((x, y))
    bad_x = to_xp(np.array([[1.0], [-1.0], [2.0], [-3.0]]))
    with pytest.raises(xi.NonFiniteError, match=r"test points.*sample\(s\) \[1, 3\]"):
        infl.influences(bad_x, y, x, y)
    with pytest.raises(xi.NonFiniteError, match=r"training points.*sample\(s\) \[1, 3\]"):
        infl.influences(x, y, bad_x, y)
    with pytest.raises(xi.NonFiniteError, match=r"sample\(s\) \[1, 3\]"):
        infl.influence_factors(bad_x, y)
    # in fit, indices count over all batches
    batches = [(x[:2, ...], y[:2]), (bad_x[2:, ...], y[2:])]
    with pytest.raises(xi.NonFiniteError, match=r"fit: the loss is NaN.*sample\(s\) \[3\]"):
        xi.CgInfluence(gp, regularization=1e-3).fit(batches)


def _jax_softmax(apply):
    """A jax provider of ``apply(p, x)`` with ``p = {"w": (4, 3)}`` and optax's
    integer-label cross-entropy (NaN beyond the classes), and the generator
    that drew ``w``."""
    import jax
    import jax.numpy as jnp

    from xinfluence.backends.jax import JaxGradientProvider

    def loss(out, t):
        logp = jax.nn.log_softmax(out)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, None], axis=-1))

    rng = np.random.default_rng(0)
    return JaxGradientProvider(apply, {"w": jnp.asarray(rng.normal(size=(4, 3)))}, loss), rng


def test_jax_label_out_of_range_is_an_error(backend_name):
    if backend_name != "jax":
        pytest.skip("runs in the jax session")
    import jax.numpy as jnp

    gp, rng = _jax_softmax(lambda p, x: x @ p["w"])
    x = jnp.asarray(rng.normal(size=(10, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=10))
    infl = xi.DirectInfluence(gp, regularization=1e-2).fit((x, y))
    y_bad = y.at[6].set(7)
    assert bool(jnp.isnan(gp.losses(gp.prepare_batch(xi.Batch(x, y_bad)))[6]))
    with pytest.raises(xi.NonFiniteError, match=r"sample\(s\) \[6\]"):
        infl.influences(x, y_bad, x, y)
    with pytest.raises(xi.NonFiniteError, match=r"sample\(s\) \[6\]"):
        xi.DirectInfluence(gp, regularization=1e-2).fit((x, y_bad))


def test_jax_nan_gradients_of_test_points_name_the_samples(backend_name):
    """The test side's losses are checked after its gradients are taken (from the
    same pass on jax): solvers that meet the NaN gradients first and raise must
    still name the samples, not the solver."""
    if backend_name != "jax":
        pytest.skip("runs in the jax session")
    import jax.numpy as jnp

    gp, rng = _jax_softmax(lambda p, x: jnp.sqrt(x) @ p["w"])  # NaN for x < 0
    x = jnp.asarray(rng.uniform(size=(10, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=10))
    x_bad = x.at[6, 0].set(-1.0)
    for model in (
        xi.DirectInfluence(gp, regularization=1e-2),
        xi.CgInfluence(gp, regularization=1e-2),  # block CG raises on the NaN residual
        xi.CgInfluence(gp, regularization=1e-2, solver="batched"),
        xi.LissaInfluence(gp, regularization=1e-2),  # raises on the NaN product
        xi.ArnoldiInfluence(gp, regularization=1e-2, rank=4),
    ):
        model.fit((x, y))
        with pytest.raises(xi.NonFiniteError, match=r"test points\): the loss is NaN.*\[6\]"):
            model.influences(x_bad, y, x, y)
        with pytest.raises(xi.NonFiniteError, match=r"influence_factors: the loss is NaN.*\[6\]"):
            model.influence_factors(x_bad, y)


def test_torch_nan_output_is_an_error(backend_name):
    if backend_name != "torch":
        pytest.skip("runs in the torch session")
    import torch

    from xinfluence.backends.torch import TorchGradientProvider

    class SqrtNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1).double()

        def forward(self, x):
            return self.lin(torch.sqrt(x))

    torch.manual_seed(0)
    gp = TorchGradientProvider(SqrtNet(), torch.nn.functional.mse_loss)
    x = torch.rand(8, 2, dtype=torch.float64)
    y = torch.rand(8, 1, dtype=torch.float64)
    infl = xi.DirectInfluence(gp, regularization=1e-2).fit((x, y))
    x_bad = x.clone()
    x_bad[5, 0] = -1.0
    with pytest.raises(xi.NonFiniteError, match=r"sample\(s\) \[5\]"):
        infl.influences(x_bad, y, x, y)


def test_torch_label_out_of_range_names_the_samples(backend_name):
    """torch's cross-entropy raises on a label out of range (``index 5 is out of
    bounds``): a NonFiniteError naming the samples, as a NaN loss gives."""
    if backend_name != "torch":
        pytest.skip("runs in the torch session")
    torch, model, x, y = _torch_mlp()  # 3 classes
    from xinfluence.backends.torch import TorchGradientProvider

    gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
    infl = xi.DirectInfluence(gp, regularization=1.0).fit((x, y))
    y_bad = y.clone()
    y_bad[4], y_bad[9] = 3, -2
    match = r"the loss cannot be computed at sample\(s\) \[4, 9\].*out of bounds.*label out of"
    with pytest.raises(xi.NonFiniteError, match=r"test points\): " + match):
        infl.influences(x, y_bad, x, y)
    with pytest.raises(xi.NonFiniteError, match="training points.*" + match):
        infl.influences(x[:2], y[:2], x, y_bad)
    # in fit, indices count over all batches (uneven)
    batches = [(x[:7], y[:7]), (x[7:20], y_bad[7:20]), (x[20:], y[20:])]
    with pytest.raises(xi.NonFiniteError, match=r"fit: .*sample\(s\) \[9\]"):
        xi.CgInfluence(gp, regularization=1.0).fit(batches)
    # an error that is not about samples propagates unchanged
    with pytest.raises(RuntimeError, match="out of bounds"):
        infl.influences(x[:3], torch.full((3,), 7), x, y)
    with pytest.raises(RuntimeError, match="out of bounds"):  # stops after 16 samples
        infl.influences(x[:30], torch.full((30,), 7), x, y)


# -- loose scalars and lists -----------------------------------------------------------


def test_regularization_accepts_any_real_scalar(xp, to_xp):
    gp, x, y = _softmax(to_xp)
    ref = xi.DirectInfluence(gp, regularization=0.5).fit((x, y)).influences(x[:3, ...], y[:3])
    for reg in (np.float32(0.5), np.float64(0.5), to_xp(np.array(0.5))):
        infl = xi.DirectInfluence(gp, regularization=reg).fit((x, y))
        assert infl.regularization["full"] == float(np.float32(0.5))
        assert rel_err(infl.influences(x[:3, ...], y[:3]), ref) < 1e-6
    assert xi.DirectInfluence(gp, regularization=np.int64(2)).regularization["full"] == 2.0
    assert xi.DirectInfluence(gp, regularization=1).regularization["full"] == 1.0


@pytest.mark.parametrize(
    ("reg", "error", "match"),
    [
        (True, TypeError, "boolean"),
        (np.bool_(False), TypeError, "boolean"),
        (1 + 2j, TypeError, "complex"),
        (np.complex128(1), TypeError, "complex"),
        (float("nan"), ValueError, "got NaN"),
        (float("inf"), ValueError, "finite float >= 0, got inf"),
        (-0.1, ValueError, "finite float >= 0, got -0.1"),
        (np.float32(-1), ValueError, "got -1.0"),
        (np.array([0.1, 0.2]), TypeError, r"array of shape \(2,\); pass a scalar"),
        ("0.1", TypeError, "got '0.1'"),
    ],
)
def test_regularization_rejects_non_real_scalars(xp, to_xp, reg, error, match):
    gp, _, _ = _softmax(to_xp)
    with pytest.raises(error, match=match):
        xi.DirectInfluence(gp, regularization=reg)


def test_targets_as_python_lists(xp, to_xp):
    gp, x, y = _softmax(to_xp, n=12)
    labels = [int(v) for v in np.asarray(to_numpy(y))]
    ref = xi.DirectInfluence(gp, regularization=1e-2).fit((x, y))
    infl = xi.DirectInfluence(gp, regularization=1e-2).fit((x, labels))
    expected = ref.influences(x[:3, ...], y[:3], x, y)
    assert rel_err(infl.influences(x[:3, ...], labels[:3], x, labels), expected) == 0.0
    with pytest.raises(TypeError, match="list of numbers"):
        infl.influences(x[:2, ...], ["a", "b"])
    with pytest.raises(ValueError, match="same number of samples"):
        infl.influences(x[:2, ...], [0])


# -- layer grouping of pytrees --------------------------------------------------------


def _jax_only(backend_name):
    if backend_name != "jax":
        pytest.skip("runs in the jax session")
    import jax

    jax.config.update("jax_enable_x64", True)
    return jax


def _mse(out, target):
    return ((out[:, 0] - target) ** 2).mean()


def _layer_blocks_match_explicit_layers(gp, expected, x, y):
    assert gp.layer_groups() == expected
    # oracle: the same blocks spelled out by hand
    kw = {"regularization": 1e-2, "second_order": "empirical_fisher"}
    by_layer = xi.DirectInfluence(gp, block_structure="layer", **kw).fit((x, y))
    by_hand = xi.DirectInfluence(gp, block_structure=dict(expected), **kw).fit((x, y))
    assert list(by_layer.blocks) == list(expected)
    assert (
        rel_err(by_layer.influences(x[:3], y[:3], x, y), by_hand.influences(x[:3], y[:3], x, y))
        == 0
    )


def test_flax_nnx_layers(backend_name):
    jax = _jax_only(backend_name)
    nnx = pytest.importorskip("flax.nnx")
    import jax.numpy as jnp

    from xinfluence.backends.jax import JaxGradientProvider

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, rngs=rngs, param_dtype=jnp.float64)
            self.l2 = nnx.Linear(4, 1, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    graph, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    gp = JaxGradientProvider(_NnxApply(graph), state, _mse)
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 3), dtype=jnp.float64)
    y = jnp.sin(x[:, 0])
    expected = {
        "l1": ["l1/bias/value", "l1/kernel/value"],
        "l2": ["l2/bias/value", "l2/kernel/value"],
    }
    _layer_blocks_match_explicit_layers(gp, expected, x, y)


class _NnxApply:
    def __init__(self, graph):
        self.graph = graph

    def __call__(self, state, x):
        from flax import nnx

        return nnx.merge(self.graph, state)(x)


def test_flax_linen_layers(backend_name):
    jax = _jax_only(backend_name)
    nn = pytest.importorskip("flax.linen")
    import jax.numpy as jnp

    from xinfluence.backends.jax import JaxGradientProvider

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Dense(4, param_dtype=jnp.float64)(x))
            return nn.Dense(1, param_dtype=jnp.float64)(h)

    net = Net()
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 3), dtype=jnp.float64)
    params = net.init(jax.random.PRNGKey(0), x)["params"]
    gp = JaxGradientProvider(lambda p, x: net.apply({"params": p}, x), params, _mse)
    expected = {
        "Dense_0": ["Dense_0/bias", "Dense_0/kernel"],
        "Dense_1": ["Dense_1/bias", "Dense_1/kernel"],
    }
    _layer_blocks_match_explicit_layers(gp, expected, x, jnp.sin(x[:, 0]))


def test_equinox_layers(backend_name):
    jax = _jax_only(backend_name)
    eqx = pytest.importorskip("equinox")
    import jax.numpy as jnp

    from xinfluence.backends.jax import JaxGradientProvider

    mlp = eqx.nn.MLP(3, 1, 4, 1, key=jax.random.PRNGKey(0), dtype=jnp.float64)
    params, static = eqx.partition(mlp, eqx.is_inexact_array)

    def apply(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    gp = JaxGradientProvider(apply, params, _mse)
    x = jax.random.normal(jax.random.PRNGKey(1), (12, 3), dtype=jnp.float64)
    expected = {
        "layers/0": ["layers/0/weight", "layers/0/bias"],
        "layers/1": ["layers/1/weight", "layers/1/bias"],
    }
    _layer_blocks_match_explicit_layers(gp, expected, x, jnp.sin(x[:, 0]))
