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
# (influences against the last batch: the same shape as the test points)
REG = 1e-3
# float32 against float64 on the same parameters and data: float32 rounds the
# factors to about 1e-7 relative, and the solve with EK-FAC eigenvalues + 1e-3
# amplifies that by its conditioning (measured: 1.5e-6 to 6.4e-6 on the two
# backends, so the bound leaves a factor of 8); a failed float32 fit or a
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
    return model.influences(xt[N:], yt[N:], *train[-1])


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
    return model.influences(xj[N:], yj[N:], *train[-1])  # one shape: jax compiles per shape


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


# -- torch: operations without forward-mode rules ------------------------------
def _torch_reference(net, x_test, y_test, x, y, reg):
    """``G_test (H + reg I)^-1 G^T`` from per-sample gradients (a loop of plain
    autograd calls) and the dense Hessian of the mean loss over a flat parameter
    vector (``torch.autograd.functional.hessian``)."""
    import torch
    from torch.func import functional_call

    f = torch.nn.functional
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    names = [n for n, _ in params]
    shapes = [p.shape for _, p in params]
    sizes = [p.numel() for _, p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in params])

    def unflat(flat):
        return {
            n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes, strict=True)
        }

    def grads(xs, ys):
        rows = []
        for i in range(len(xs)):
            loss = f.cross_entropy(net(xs[i : i + 1]), ys[i : i + 1])
            found = torch.autograd.grad(loss, [p for _, p in params])
            rows.append(torch.cat([g.reshape(-1) for g in found]))
        return torch.stack(rows)

    def mean_loss(flat):
        return f.cross_entropy(functional_call(net, unflat(flat), (x,)), y)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no second derivative
        h = torch.autograd.functional.hessian(mean_loss, flat0, vectorize=True)
    h = (h + h.T) / 2
    lowest = float(torch.linalg.eigvalsh(h)[0])
    reg = reg + max(-lowest, 0.0)  # positive definite whatever the random init gives
    solved = torch.linalg.solve(h + reg * torch.eye(len(flat0), dtype=h.dtype), grads(x, y).T)
    return grads(x_test, y_test) @ solved, reg


def test_torch_transformer_encoder_calculator_matches_dense_reference(tmp_path):
    """An eval-mode ``nn.TransformerEncoder`` through the chunked calculator: its
    fused fast path (``aten::_transformer_encoder_layer_fwd``) has no forward-mode
    rule, and the calculator's ``jacobian_prod`` runs forward mode; ``to_zarr``
    raised NotImplementedError while ``model.influences`` worked. Both now equal
    a dense reference built here."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("zarr")
    from xinfluence.backends.torch import TorchGradientProvider
    from xinfluence.compute import SequentialInfluenceCalculator

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(
                8, 2, dim_feedforward=8, dropout=0.0, batch_first=True
            )
            self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.encoder(x).mean(1))

    torch.manual_seed(3)
    net = Net().double().eval()
    for name, p in net.named_parameters():  # attention and head: 315 parameters
        p.requires_grad_(name.startswith(("head", "encoder.layers.0.self_attn")))
    x = torch.randn(10, 3, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    x_test, y_test, x_train, y_train = x[:3], y[:3], x[3:], y[3:]
    expected, reg = _torch_reference(net, x_test, y_test, x_train, y_train, 1e-2)

    gp = TorchGradientProvider(net, torch.nn.functional.cross_entropy)
    model = xi.DirectInfluence(gp, regularization=reg).fit(
        [(x_train[:4], y_train[:4]), (x_train[4:], y_train[4:])]
    )
    assert rel_err(model.influences(x_test, y_test, x_train, y_train), expected) <= 1e-8
    calc = SequentialInfluenceCalculator(
        model, progress=False, test_chunk_size=2, train_chunk_size=3
    )
    lazy = calc.influences(
        (x_test, y_test), [(x_train[:5], y_train[:5]), (x_train[5:], y_train[5:])]
    )
    stored = lazy.to_zarr(str(tmp_path / "store"))
    assert rel_err(np.asarray(stored[...]), expected) <= 1e-8
    assert rel_err(lazy.compute(), expected) <= 1e-8
    assert gp.forward_ad  # the fast path was off; forward mode itself worked


def test_torch_forward_ad_fallback_to_reverse_mode():
    """An operation without a forward-mode rule (a custom autograd.Function with
    no jvp): the provider warns once, goes on in reverse mode, and its products
    equal per-sample gradients from plain autograd."""
    torch = pytest.importorskip("torch")
    from xinfluence.backends.torch import TorchGradientProvider

    class Square(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(z):
            return z * z

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            return 2 * z * g

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.b(Square.apply(self.a(x)))

    torch.manual_seed(0)
    net = Net().double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    gp = TorchGradientProvider(net, torch.nn.functional.cross_entropy)
    rows = []
    for i in range(7):
        loss = torch.nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1])
        rows.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])
        )
    grads = torch.stack(rows)
    v = torch.randn(3, gp.n_parameters, dtype=torch.float64)
    with pytest.warns(UserWarning, match="without forward-mode derivatives"):
        first = gp.jacobian_prod(xi.Batch(x, y), v)
    assert not gp.forward_ad
    assert rel_err(first, grads @ v.T) <= 1e-12
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        again = gp.jacobian_prod(xi.Batch(x, y), v)
    assert rel_err(again, grads @ v.T) <= 1e-12
