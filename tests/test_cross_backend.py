"""Oracle 4: the same model in two frameworks gives the same numbers.

A two-hidden-layer tanh network with identical float64 weights in torch and jax,
and one softmax regression in numpy (analytic), torch and jax. Run by the
``cross`` nox session, which installs both frameworks; skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from helpers import rel_err, split
from xinfluence._xp import to_numpy

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from xinfluence.backends.jax import JaxGradientProvider  # noqa: E402
from xinfluence.backends.numpy import SoftmaxRegressionGradients  # noqa: E402
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402

pytestmark = pytest.mark.cross

D_IN, HIDDEN, N_CLASSES, N_TRAIN, N_TEST = 5, (6, 4), 3, 50, 7
SIZES = [13, 29, 8]
REG = 1e-3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N_TRAIN + N_TEST, D_IN))
    y = np.argmax(x @ rng.normal(size=(D_IN, N_CLASSES)) + rng.gumbel(size=(len(x), 3)), axis=1)
    return x, y.astype(np.int64)


def _train(model, x, y):
    """Full-batch L-BFGS on mean cross-entropy + 1e-4/2 |theta|^2 (so H >= -1e-4 I)."""
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.LBFGS(
        model.parameters(), max_iter=2000, tolerance_grad=1e-11, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        flat = torch.cat([p.reshape(-1) for p in model.parameters()])
        loss = torch.nn.functional.cross_entropy(model(xt), yt) + 0.5e-4 * flat @ flat
        loss.backward()
        return loss

    opt.step(closure)
    return model


@pytest.fixture(scope="module")
def networks(data):
    x, y = data
    torch.manual_seed(0)
    sizes = (D_IN, *HIDDEN, N_CLASSES)
    layers = []
    for i in range(3):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < 2:
            layers.append(torch.nn.Tanh())
    model = _train(torch.nn.Sequential(*layers).double(), x[:N_TRAIN], y[:N_TRAIN])
    torch_gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)

    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    params = {
        f"l{i}": {
            "weight": jnp.asarray(m.weight.detach().numpy()),
            "bias": jnp.asarray(m.bias.detach().numpy()),
        }
        for i, m in enumerate(linears)
    }

    def apply(p, xb):
        h = jnp.tanh(xb @ p["l0"]["weight"].T + p["l0"]["bias"])
        h = jnp.tanh(h @ p["l1"]["weight"].T + p["l1"]["bias"])
        return h @ p["l2"]["weight"].T + p["l2"]["bias"]

    def loss(out, target):
        logp = jax.nn.log_softmax(out)
        return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=1))

    return torch_gp, JaxGradientProvider(apply, params, loss)


def _influences(gp, conv, x, y, **kw):
    mode = kw.pop("mode")
    xtr, ytr = conv(x[:N_TRAIN]), conv(y[:N_TRAIN])
    batches = [(xtr[s, ...], ytr[s]) for s in split(N_TRAIN, SIZES)]
    model = xi.DirectInfluence(gp, regularization=REG, **kw).fit(batches)
    return to_numpy(model.influences(conv(x[N_TRAIN:]), conv(y[N_TRAIN:]), xtr, ytr, mode=mode))


def _torch_conv(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _jax_conv(a):
    return jnp.asarray(a)


@pytest.mark.parametrize("mode", ["up", "perturbation"])
@pytest.mark.parametrize("structure", ["full", "layer"])
@pytest.mark.parametrize("second_order", ["hessian", "empirical_fisher"])
def test_network_torch_equals_jax(data, networks, mode, structure, second_order):
    x, y = data
    torch_gp, jax_gp = networks
    assert torch_gp.n_parameters == jax_gp.n_parameters
    assert len(torch_gp.layer_groups()) == len(jax_gp.layer_groups()) == 3
    kw = dict(mode=mode, block_structure=structure, second_order=second_order)
    ours_torch = _influences(torch_gp, _torch_conv, x, y, **kw)
    ours_jax = _influences(jax_gp, _jax_conv, x, y, **kw)
    assert rel_err(ours_jax, ours_torch) <= 1e-9


@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_softmax_regression_numpy_torch_jax(data, mode):
    x, y = data
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(N_CLASSES, D_IN)), rng.normal(size=N_CLASSES)
    reference = _influences(SoftmaxRegressionGradients(w, b), np.asarray, x, y, mode=mode)

    linear = torch.nn.Linear(D_IN, N_CLASSES).double()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(w))
        linear.bias.copy_(torch.from_numpy(b))
    torch_gp = TorchGradientProvider(linear, torch.nn.functional.cross_entropy)
    assert rel_err(_influences(torch_gp, _torch_conv, x, y, mode=mode), reference) <= 1e-9

    def loss(out, target):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), target[:, None], axis=1))

    jax_gp = JaxGradientProvider(
        lambda p, xb: xb @ p["weight"].T + p["bias"],
        {"weight": jnp.asarray(w), "bias": jnp.asarray(b)},
        loss,
    )
    assert rel_err(_influences(jax_gp, _jax_conv, x, y, mode=mode), reference) <= 1e-9
    # the array-API provider runs on torch and jax arrays too
    for conv in (_torch_conv, _jax_conv):
        gp = SoftmaxRegressionGradients(conv(w), conv(b))
        assert rel_err(_influences(gp, conv, x, y, mode=mode), reference) <= 1e-9


# -- ProjectedInfluence: one seed, one map on every framework ------------------


def _projected(gp, conv, x, y, **kw):
    xtr, ytr = conv(x[:N_TRAIN]), conv(y[:N_TRAIN])
    batches = [(xtr[s, ...], ytr[s]) for s in split(N_TRAIN, SIZES)]
    model = xi.ProjectedInfluence(gp, regularization=REG, seed=11, **kw).fit(batches)
    return to_numpy(model.influences(conv(x[N_TRAIN:]), conv(y[N_TRAIN:]), xtr, ytr))


@pytest.fixture(scope="module")
def projected_networks(networks):
    """The torch network, and jax versions of it: parameters as a list of
    (weight, bias) pairs (the flat order of torch, for dense maps) and as a dict of
    declared dense layers (Kronecker factors, for LoGra maps)."""
    torch_gp = networks[0]
    linears = [m for m in torch_gp.model if isinstance(m, torch.nn.Linear)]
    wb = [
        (jnp.asarray(m.weight.detach().numpy()), jnp.asarray(m.bias.detach().numpy()))
        for m in linears
    ]

    def loss(out, target):
        logp = jax.nn.log_softmax(out)
        return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=1))

    def apply_list(q, xb):
        h = jnp.tanh(xb @ q[0][0].T + q[0][1])
        h = jnp.tanh(h @ q[1][0].T + q[1][1])
        return h @ q[2][0].T + q[2][1]

    def h1(q, xb):
        return jnp.tanh(xb @ q["l0"]["weight"].T + q["l0"]["bias"])

    def h2(q, xb):
        return jnp.tanh(h1(q, xb) @ q["l1"]["weight"].T + q["l1"]["bias"])

    def apply_dict(q, xb):
        return h2(q, xb) @ q["l2"]["weight"].T + q["l2"]["bias"]

    as_list = JaxGradientProvider(apply_list, wb, loss)
    as_dict = JaxGradientProvider(
        apply_dict,
        {f"l{i}": {"weight": w, "bias": b} for i, (w, b) in enumerate(wb)},
        loss,
        dense_layers={"l0": lambda q, xb: xb, "l1": h1, "l2": h2},
    )
    return torch_gp, as_list, as_dict


@pytest.mark.parametrize(
    "kw",
    [
        dict(k=9, projection="dense"),
        dict(k=9, projection="dense", distribution="rademacher", block_structure="layer"),
        dict(k=(2, 3), projection="kronecker"),
        dict(k=6, projection="kronecker", block_structure="layer"),
    ],
)
def test_projected_network_torch_equals_jax(data, projected_networks, kw):
    """One seed, one map: the dense map follows the flat parameter order (the same
    here), the Kronecker maps the positions of the dense layers."""
    x, y = data
    torch_gp, as_list, as_dict = projected_networks
    jax_gp = as_list if kw["projection"] == "dense" else as_dict
    ours_torch = _projected(torch_gp, _torch_conv, x, y, **kw)
    ours_jax = _projected(jax_gp, _jax_conv, x, y, **kw)
    assert np.max(np.abs(ours_torch)) > 0
    assert rel_err(ours_jax, ours_torch) <= 1e-10


@pytest.mark.parametrize("projection", ["dense", "kronecker"])
def test_projected_softmax_numpy_torch_jax(data, projection):
    x, y = data
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(N_CLASSES, D_IN)), rng.normal(size=N_CLASSES)
    kw = dict(k=10, projection=projection)
    reference = _projected(SoftmaxRegressionGradients(w, b), np.asarray, x, y, **kw)
    on_torch = _projected(
        SoftmaxRegressionGradients(_torch_conv(w), _torch_conv(b)), _torch_conv, x, y, **kw
    )
    on_jax = _projected(
        SoftmaxRegressionGradients(_jax_conv(w), _jax_conv(b)), _jax_conv, x, y, **kw
    )
    assert rel_err(on_torch, reference) <= 1e-10
    assert rel_err(on_jax, reference) <= 1e-10


def _conv_pair():
    """A CNN in torch (nn.Conv2d) and in jax (lax.conv_general_dilated, the same
    float64 weights in torch layout), for the convolutional EK-FAC."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, stride=2, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(3, 4, 2, padding=1, bias=False),
        torch.nn.Softplus(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3),
    ).double()
    p = {k: jnp.asarray(v.detach().numpy()) for k, v in model.state_dict().items()}
    params = {
        "c0": {"weight": p["0.weight"], "bias": p["0.bias"]},
        "c1": {"weight": p["2.weight"]},
        "head": {"weight": p["5.weight"], "bias": p["5.bias"]},
    }

    def features(q, xb):
        h = jax.lax.conv_general_dilated(xb, q["c0"]["weight"], (2, 2), ((1, 1), (1, 1)))
        h = jnp.tanh(h + q["c0"]["bias"][None, :, None, None])
        h = jax.nn.softplus(
            jax.lax.conv_general_dilated(h, q["c1"]["weight"], (1, 1), ((1, 1), (1, 1)))
        )
        return jnp.reshape(h, (xb.shape[0], -1))

    def apply(q, xb):
        return features(q, xb) @ q["head"]["weight"].T + q["head"]["bias"]

    def loss(out, target):
        logp = jax.nn.log_softmax(out)
        return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=1))

    jax_gp = JaxGradientProvider(
        apply, params, loss, conv_layers=["c0", "c1"], dense_layers={"head": features}
    )
    return TorchGradientProvider(model.eval(), torch.nn.functional.cross_entropy), jax_gp


@pytest.mark.parametrize("second_order", ["gauss_newton", "empirical_fisher"])
def test_conv_ekfac_torch_equals_jax(second_order):
    """nn.Conv2d hooked in torch and the convolutions found by tracing in jax give
    the same EK-FAC influences (uneven batches, small regularization)."""
    torch_gp, jax_gp = _conv_pair()
    assert list(jax_gp.kfac_layers()) == ["c0", "c1", "head"]
    rng = np.random.default_rng(6)
    x = rng.normal(size=(19, 2, 7, 7))
    y = rng.integers(0, 3, size=19)
    scores = []
    for gp, conv in ((torch_gp, _torch_conv), (jax_gp, _jax_conv)):
        xs, ys = conv(x), conv(y)
        infl = xi.EkfacInfluence(gp, regularization=1e-4, second_order=second_order)
        infl.fit([(xs[:5], ys[:5]), (xs[5:6], ys[5:6]), (xs[6:], ys[6:])])
        scores.append(to_numpy(infl.influences(xs[:4], ys[:4], xs, ys)))
    assert np.max(np.abs(scores[0])) > 0
    assert rel_err(scores[1], scores[0]) <= 1e-10


def test_token_axis_tracked_ekfac_torch_equals_jax():
    """The flax block of test_jax_token_axis (embedding, a residual Dense-ReLU-Dense
    on the token axis, LayerNorm, a head) and the same block in torch, both with
    their dense layers tracked: the same EK-FAC influences ("expand" factors) and
    the same per-token Kronecker projections."""
    tok = pytest.importorskip("test_jax_token_axis")
    params, x, y, xt, yt = tok.make_problem()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(tok.VOCAB, tok.D)
            self.pos = torch.nn.Parameter(torch.zeros(tok.T, tok.D))
            self.fc, self.proj = torch.nn.Linear(tok.D, tok.H), torch.nn.Linear(tok.H, tok.D)
            self.ln = torch.nn.LayerNorm(tok.D, eps=tok.EPS_LN)
            self.head = torch.nn.Linear(tok.D, tok.CLASSES)

        def forward(self, ids):
            z = self.emb(ids) + self.pos
            z = self.ln(z + self.proj(torch.relu(self.fc(z))))
            return self.head(z.mean(1))

    def t(a, transpose=False):
        a = torch.from_numpy(np.array(a))
        return a.T.contiguous() if transpose else a

    model = Block().double()
    with torch.no_grad():
        model.emb.weight.copy_(t(params["emb"]["embedding"]))
        model.pos.copy_(t(params["pos"]))
        model.ln.weight.copy_(t(params["ln"]["scale"]))
        model.ln.bias.copy_(t(params["ln"]["bias"]))
        for layer in tok.LAYERS:
            getattr(model, layer).weight.copy_(t(params[layer]["kernel"], transpose=True))
            getattr(model, layer).bias.copy_(t(params[layer]["bias"]))
    torch_gp = TorchGradientProvider(
        model.eval(), torch.nn.functional.cross_entropy, cast_inputs=False, layers=tok.LAYERS
    )
    jax_gp = JaxGradientProvider(tok.apply_tiny, params, tok.cross_entropy, layers=tok.LAYERS)
    # the tracked layers in the torch module's order: the same Kronecker maps
    assert list(jax_gp.kfac_layers()) == list(torch_gp.kfac_layers()) == tok.LAYERS
    for second_order in ("gauss_newton", "empirical_fisher"):  # one pair of providers
        scores, projected = [], []
        for gp, conv in ((torch_gp, t), (jax_gp, jnp.asarray)):
            xs, ys, qx, qy = conv(x), conv(y), conv(xt), conv(yt)
            infl = xi.EkfacInfluence(gp, regularization=1e-3, second_order=second_order)
            infl.fit(tok.batches(xs, ys))
            scores.append(to_numpy(infl.influences(qx, qy, xs, ys)))
            proj = xi.ProjectedInfluence(
                gp,
                k=20,
                projection="kronecker",
                seed=3,
                regularization=1e-3,
                second_order=second_order,
            )
            projected.append(to_numpy(proj.fit(tok.batches(xs, ys)).influences(qx, qy, xs, ys)))
        assert np.max(np.abs(scores[0])) > 0
        assert rel_err(scores[1], scores[0]) <= 1e-10, second_order
        assert rel_err(projected[1], projected[0]) <= 1e-10, second_order
