"""TorchGradientProvider against explicit torch.autograd references.

These tests are torch-specific and run whatever ``XINFLUENCE_BACKEND`` is. Every
model is built in float64 with ``.double()`` (the global default dtype is left
alone). References use plain ``torch.autograd`` (per-sample loops, full-batch
losses, ``torch.autograd.functional.hessian``), not the provider's code paths.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from helpers import rel_err  # noqa: E402
from torch_helpers import flat_loss, ref_grads, ref_hessian, single_thread  # noqa: E402, F401
from xinfluence import Batch, DirectInfluence  # noqa: E402
from xinfluence.backends.numpy import (  # noqa: E402
    LinearRegressionGradients,
    SoftmaxRegressionGradients,
)
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402
from xinfluence.backends.torch import linear as _torch_linear  # noqa: E402
from xinfluence.errors import NamespaceMismatchError  # noqa: E402

F64 = torch.float64
REG = 1e-3


# -- references (plain autograd) ---------------------------------------------------


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def ref_mixed_contracted(model, loss, x, y, names, f):
    """``f_k^T d/dx_j grad l(z_j)`` for rows f_k of f (K, P): (K, N, *D).

    Each l_j depends on x_j only, so d/dx_j of f^T grad(sum_j l_j) is the
    per-sample mixed derivative contracted with f.
    """
    x = x.detach().clone().requires_grad_(True)
    mean_loss, theta = flat_loss(model, loss, x, y, names)
    theta = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(mean_loss(theta) * x.shape[0], theta, create_graph=True)
    rows = [torch.autograd.grad(g @ fk, x, retain_graph=True)[0] for fk in f]
    return torch.stack(rows)


def ref_mixed(model, loss, x, y, names):
    """Per-sample mixed derivatives (N, *D, P)."""
    p = sum(dict(model.named_parameters())[n].numel() for n in names)
    cols = ref_mixed_contracted(model, loss, x, y, names, torch.eye(p, dtype=x.dtype))
    return cols.movedim(0, -1)


def ref_influences(model, loss, x_train, y_train, x_test, y_test, names, blocks=None, gn=False):
    """Dense up and perturbation influences: (N_test, N), (N_test, N, *D)."""
    g_train = ref_grads(model, loss, x_train, y_train, names)
    g_test = ref_grads(model, loss, x_test, y_test, names)
    if gn:
        curv = g_train.T @ g_train / x_train.shape[0]
    else:
        curv = ref_hessian(model, loss, x_train, y_train, names)
    p = curv.shape[0]
    blocks = blocks or [list(range(p))]
    factors = torch.zeros_like(g_test)
    for idx in blocks:
        idx = torch.as_tensor(idx)
        block = curv[idx][:, idx] + REG * torch.eye(len(idx), dtype=curv.dtype)
        factors[:, idx] = torch.linalg.solve(block, g_test[:, idx].T).T
    up = factors @ g_train.T
    pert = ref_mixed_contracted(model, loss, x_train, y_train, names, factors)
    return up, pert


def layer_index_blocks(gp):
    slices = gp.parameter_slices
    return [
        [i for n in members for i in range(slices[n].start, slices[n].stop)]
        for members in gp.layer_groups().values()
    ]


# -- models and data -----------------------------------------------------------------


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)
    ).double()


def fit_model(model, loss, x, y, weight_decay=1e-4, max_iter=300):
    """Train to near a minimum of loss + wd/2 |theta|^2, so that H >= -wd I."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params, max_iter=max_iter, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        value = loss(model(x), y) + weight_decay / 2 * sum((p**2).sum() for p in params)
        value.backward()
        return value

    opt.step(closure)
    return model.eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(46, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (46,), generator=g)
    return x[:40], y[:40], x[40:], y[40:]


@pytest.fixture(scope="module")
def trained_mlp(data):
    x, y, _, _ = data
    return fit_model(make_mlp(), F.cross_entropy, x, y)


def loader(x, y, batch_size=15):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# -- 1. derivatives of a small MLP ---------------------------------------------------


def test_derivatives_match_autograd(trained_mlp, data):
    model = trained_mlp
    x, y = data[0][:9], data[1][:9]
    gp = TorchGradientProvider(model, F.cross_entropy)
    names = [n for n, _ in trainable(model)]
    assert list(gp.parameter_names) == names
    assert gp.n_parameters == 5 * 7 + 7 + 7 * 4 + 4 + 4 * 3 + 3
    batch = gp.prepare_batch(Batch(x, y))
    grads = ref_grads(model, F.cross_entropy, x, y, names)
    hess = ref_hessian(model, F.cross_entropy, x, y, names)
    mixed = ref_mixed(model, F.cross_entropy, x, y, names)
    g = torch.randn(4, gp.n_parameters, dtype=F64)

    assert rel_err(gp.flat_grads(batch), grads) < 1e-10
    out = gp.flat_mixed_grads(batch)
    assert out.shape == (9, 5, gp.n_parameters)
    assert rel_err(out, mixed) < 1e-10
    assert rel_err(gp.jacobian_prod(batch, g), grads @ g.T) < 1e-10
    assert rel_err(gp.hvp(batch, g), g @ hess) < 1e-10
    assert rel_err(gp.hessian(batch), hess) < 1e-10


def test_reverse_mode_matches_forward_mode(trained_mlp, data):
    x, y = data[0][:9], data[1][:9]
    fwd = TorchGradientProvider(trained_mlp, F.cross_entropy)
    rev = TorchGradientProvider(trained_mlp, F.cross_entropy, forward_ad=False, chunk_size=3)
    batch = fwd.prepare_batch(Batch(x, y))
    g = torch.randn(5, fwd.n_parameters, dtype=F64)
    assert rel_err(rev.flat_mixed_grads(batch), fwd.flat_mixed_grads(batch)) < 1e-12
    assert rel_err(rev.jacobian_prod(batch, g), fwd.jacobian_prod(batch, g)) < 1e-12
    # reverse mode has no nn.Linear fast path; the forward-mode provider takes it
    # once the batch comes back
    assert rev._linear_layout() is None
    general, fast = fwd.hvp(batch, g), fwd.hvp(batch, g)
    assert fwd._linear_structure is True
    assert rel_err(rev.hvp(batch, g), general) < 1e-12
    assert rel_err(fast, general) < 1e-12


def test_mse_loss_matches_autograd():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    x, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    gp = TorchGradientProvider(model, F.mse_loss)
    names = list(gp.parameter_names)
    batch = gp.prepare_batch(Batch(x, y))
    assert rel_err(gp.flat_grads(batch), ref_grads(model, F.mse_loss, x, y, names)) < 1e-10
    hess = ref_hessian(model, F.mse_loss, x, y, names)
    v = torch.randn(3, gp.n_parameters, dtype=F64)
    assert rel_err(gp.hessian(batch), hess) < 1e-10
    assert rel_err(gp.hvp(batch, v), v @ hess) < 1e-10
    grads = ref_grads(model, F.mse_loss, x, y, names)
    assert rel_err(gp.jacobian_prod(batch, v), grads @ v.T) < 1e-10
    mixed = ref_mixed(model, F.mse_loss, x, y, names)
    assert rel_err(gp.flat_mixed_grads(batch), mixed) < 1e-10


# -- 2. DirectInfluence against a dense computation ----------------------------------


@pytest.mark.parametrize(
    "block_structure, second_order",
    [("full", "hessian"), ("layer", "hessian"), ("full", "empirical_fisher")],
)
def test_direct_matches_dense(trained_mlp, data, block_structure, second_order):
    x, y, x_test, y_test = data
    model = trained_mlp
    gp = TorchGradientProvider(model, F.cross_entropy)
    infl = DirectInfluence(
        gp, regularization=REG, block_structure=block_structure, second_order=second_order
    ).fit(loader(x, y))  # batches of 15, 15, 10
    blocks = layer_index_blocks(gp) if block_structure == "layer" else None
    names = list(gp.parameter_names)
    up_ref, pert_ref = ref_influences(
        model, F.cross_entropy, x, y, x_test, y_test, names, blocks, gn=second_order != "hessian"
    )
    up = infl.influences(x_test, y_test, x, y, mode="up")
    pert = infl.influences(x_test, y_test, x, y, mode="perturbation")
    assert up.shape == (6, 40) and pert.shape == (6, 40, 5)
    assert rel_err(up, up_ref) < 1e-10
    assert rel_err(pert, pert_ref) < 1e-10
    factors = infl.influence_factors(x_test, y_test)
    assert rel_err(infl.influences_from_factors(factors, x, y), up_ref) < 1e-10


# -- 3. the same GLMs as the array-API providers -------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_glm_matches_numpy_provider(kind):
    rng = np.random.default_rng(5)
    n_in, n_out, n = 4, 3, 30
    x = rng.standard_normal((n, n_in))
    x_test = rng.standard_normal((5, n_in))
    if kind == "softmax":
        y, y_test = rng.integers(0, n_out, n), rng.integers(0, n_out, 5)
        loss, np_cls = F.cross_entropy, SoftmaxRegressionGradients
    else:
        y, y_test = rng.standard_normal((n, n_out)), rng.standard_normal((5, n_out))
        loss, np_cls = F.mse_loss, LinearRegressionGradients
    torch.manual_seed(5)
    layer = nn.Linear(n_in, n_out).double()
    np_gp = np_cls(layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy())
    t_gp = TorchGradientProvider(layer, loss)
    assert list(t_gp.parameter_names) == list(np_gp.parameter_names) == ["weight", "bias"]

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    np_infl = DirectInfluence(np_gp, regularization=REG).fit([(x[:13], y[:13]), (x[13:], y[13:])])
    t_infl = DirectInfluence(t_gp, regularization=REG).fit(loader(t(x), t(y), batch_size=13))
    for mode in ("up", "perturbation"):
        ref = np_infl.influences(x_test, y_test, x, y, mode=mode)
        out = t_infl.influences(t(x_test), t(y_test), t(x), t(y), mode=mode)
        assert rel_err(out, ref) < 1e-9


# -- 4. frozen layers, convolutions, BatchNorm -----------------------------------


def test_frozen_layer_is_excluded(trained_mlp, data):
    x, y, x_test, y_test = data
    model = copy.deepcopy(trained_mlp)
    model[0].requires_grad_(False)
    gp = TorchGradientProvider(model, F.cross_entropy)
    assert list(gp.parameter_names) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    assert list(gp.layer_groups()) == ["2", "4"]
    infl = DirectInfluence(gp, regularization=REG).fit(loader(x, y))
    up_ref, pert_ref = ref_influences(
        model, F.cross_entropy, x, y, x_test, y_test, list(gp.parameter_names)
    )
    assert rel_err(infl.influences(x_test, y_test, x, y), up_ref) < 1e-10
    assert rel_err(infl.influences(x_test, y_test, x, y, mode="perturbation"), pert_ref) < 1e-10


def test_conv_net_direct_matches_dense():
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(30, 1, 6, 6, generator=g, dtype=F64)
    y = torch.randint(0, 3, (30,), generator=g)
    x_test, y_test = x[:4] + 0.1, y[:4]
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double()
    fit_model(model, F.cross_entropy, x, y, weight_decay=1e-3)
    gp = TorchGradientProvider(model, F.cross_entropy, input_shape=(1, 6, 6))
    assert list(gp.layer_groups()) == ["0", "3"]
    infl = DirectInfluence(gp, regularization=REG).fit(loader(x, y, batch_size=12))
    up_ref, pert_ref = ref_influences(
        model, F.cross_entropy, x, y, x_test, y_test, list(gp.parameter_names)
    )
    pert = infl.influences(x_test, y_test, x, y, mode="perturbation")
    assert pert.shape == (4, 30, 1, 6, 6)
    assert rel_err(infl.influences(x_test, y_test, x, y), up_ref) < 1e-10
    assert rel_err(pert, pert_ref) < 1e-10


def test_batchnorm_uses_running_stats():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, dtype=F64))
        bn.running_var.copy_(torch.rand(6, dtype=F64) + 0.5)
        bn.weight.copy_(torch.randn(6, dtype=F64))
        bn.bias.copy_(torch.randn(6, dtype=F64))
    model.eval()
    before = bn.running_mean.clone(), bn.running_var.clone()
    x, y = torch.randn(8, 5, dtype=F64), torch.randint(0, 3, (8,))
    gp = TorchGradientProvider(model, F.cross_entropy)
    names = list(gp.parameter_names)
    assert "1.running_mean" not in names and "1.weight" in names
    batch = gp.prepare_batch(Batch(x, y))
    assert rel_err(gp.flat_grads(batch), ref_grads(model, F.cross_entropy, x, y, names)) < 1e-10
    assert rel_err(gp.hessian(batch), ref_hessian(model, F.cross_entropy, x, y, names)) < 1e-10
    assert (
        rel_err(gp.flat_mixed_grads(batch), ref_mixed(model, F.cross_entropy, x, y, names)) < 1e-10
    )
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


def test_training_mode_batchnorm_warns():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double()
    with pytest.warns(UserWarning, match="eval"):
        TorchGradientProvider(model, F.mse_loss)


# -- 5. restriction ------------------------------------------------------------------


def test_restrict_equals_slices(trained_mlp, data):
    x, y = data[0][:9], data[1][:9]
    gp = TorchGradientProvider(trained_mlp, F.cross_entropy)
    sub = gp.restrict(["2.weight", "0.bias", "4.bias"])
    assert isinstance(sub, TorchGradientProvider)
    assert list(sub.parameter_names) == ["0.bias", "2.weight", "4.bias"]
    assert list(sub.layer_groups()) == ["0", "2", "4"]
    assert set(sub._active) == set(sub.parameter_names)  # only the block is differentiated
    slices = gp.parameter_slices
    idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in sub.parameter_names])
    batch = gp.prepare_batch(Batch(x, y))
    v = torch.randn(3, sub.n_parameters, dtype=F64)
    v_full = torch.zeros(3, gp.n_parameters, dtype=F64)
    v_full[:, idx] = v

    assert rel_err(sub.flat_grads(batch), gp.flat_grads(batch)[:, idx]) < 1e-12
    assert rel_err(sub.flat_mixed_grads(batch), gp.flat_mixed_grads(batch)[..., idx]) < 1e-12
    assert rel_err(sub.jacobian_prod(batch, v), gp.jacobian_prod(batch, v_full)) < 1e-12
    assert rel_err(sub.hvp(batch, v), gp.hvp(batch, v_full)[:, idx]) < 1e-12
    assert rel_err(sub.hessian(batch), gp.hessian(batch)[idx][:, idx]) < 1e-12
    subsub = sub.restrict(["4.bias"])
    assert rel_err(subsub.flat_grads(batch), gp.flat_grads(batch)[:, slices["4.bias"]]) < 1e-12
    with pytest.raises(ValueError, match="unknown parameters"):
        subsub.restrict(["0.bias"])


# -- 5b. the Hessian assembled from nn.Linear layer quantities ------------------------


class _TiedOutside(nn.Module):
    """fc's weight is also read outside fc: the layer hooks cannot see that use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) + 0.3 * torch.sin(x @ self.fc.weight.T)
        return self.out(h)


class _Reordered(nn.Module):
    """Layers registered in another order than they run."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(4, 3)
        self.hidden = nn.Linear(5, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


class _CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def _softplus_mlp():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(5, 6), nn.Softplus(), nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)
    ).double()


def _frozen(model, names):
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "case, structured",
    [
        ("mlp", True),
        ("softplus_no_bias_mse", True),
        ("frozen_biases", True),  # weights only
        ("frozen_weight_0", True),  # layer 0 contributes its bias only
        ("square_layers", True),  # a square, non-diagonal d a_4 / d s_0
        ("reordered", True),
        ("tied_outside", False),
        ("called_twice", False),
    ],
)
def test_structured_hessian_matches_autograd(trained_mlp, data, case, structured, monkeypatch):
    x, y = data[0][:23], data[1][:23]  # an odd batch size
    loss = F.cross_entropy
    if case == "mlp":
        model = trained_mlp
    elif case == "softplus_no_bias_mse":
        model, loss = _softplus_mlp(), F.mse_loss
        y = torch.randn(23, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    elif case == "frozen_biases":
        model = _frozen(copy.deepcopy(trained_mlp), {"0.bias", "2.bias", "4.bias"})
    elif case == "frozen_weight_0":
        model = _frozen(copy.deepcopy(trained_mlp), {"0.weight"})
    elif case == "square_layers":
        torch.manual_seed(6)
        model = nn.Sequential(
            nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
        ).double()
    elif case == "reordered":
        torch.manual_seed(5)
        model = _Reordered().double()
    elif case == "tied_outside":
        torch.manual_seed(4)
        model = _TiedOutside().double()
    else:
        torch.manual_seed(4)
        model = _CalledTwice().double()
    gp = TorchGradientProvider(model, loss)
    batch = gp.prepare_batch(Batch(x, y))
    ref = ref_hessian(model, loss, x, y, list(gp.parameter_names))
    assert rel_err(gp.hessian(batch), ref) < 1e-12
    assert gp._linear_structure is structured  # which path ran
    # the same when the samples are summed in several uneven chunks
    if structured:
        chunked = TorchGradientProvider(model, loss)
        monkeypatch.setattr(_torch_linear, "CHUNK_ELEMENTS", 700)  # a few samples per chunk
        assert rel_err(chunked.hessian(batch), ref) < 1e-12
        assert chunked._linear_structure is True
    # products with many vectors (factors computed) and with one (general path
    # first, structured once the batch comes back)
    for k in (40, 1, 1):
        v = torch.randn(k, gp.n_parameters, generator=torch.Generator().manual_seed(k), dtype=F64)
        assert rel_err(gp.hvp(batch, v), v @ ref) < 1e-12
    assert gp._linear_structure is structured


def test_linear_layers_on_sequences_take_the_general_path():
    """A Linear applied to (N, T, features) inputs is not the 2-D structure."""
    torch.manual_seed(9)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(13, 3, 5, generator=g, dtype=F64)
    y = torch.randint(0, 2, (13,), generator=g)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)).double()
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    ref = ref_hessian(model, F.cross_entropy, x, y, list(gp.parameter_names))
    assert rel_err(gp.hessian(batch), ref) < 1e-12
    assert gp._linear_structure is False
    v = torch.randn(300, gp.n_parameters, generator=g, dtype=F64)
    assert rel_err(gp.hvp(batch, v), v @ ref) < 1e-12


def test_structured_hessian_of_restricted_layers(trained_mlp, data):
    x, y = data[0][:17], data[1][:17]
    gp = TorchGradientProvider(trained_mlp, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    full = ref_hessian(trained_mlp, F.cross_entropy, x, y, list(gp.parameter_names))
    slices = gp.parameter_slices
    for names in (["2.weight", "2.bias"], ["4.bias", "0.weight"], ["0.bias"]):
        sub = gp.restrict(names)
        idx = torch.cat(
            [torch.arange(slices[n].start, slices[n].stop) for n in sub.parameter_names]
        )
        assert rel_err(sub.hessian(batch), full[idx][:, idx]) < 1e-12
        assert sub._linear_structure is True
        v = torch.randn(30, sub.n_parameters, dtype=F64)
        assert rel_err(sub.hvp(batch, v), v @ full[idx][:, idx]) < 1e-12


def test_structured_products_follow_parameter_updates(data):
    """Factors kept for a batch are recomputed after an in-place parameter update."""
    x, y = data[0][:19], data[1][:19]
    model = make_mlp(5)
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    v = torch.randn(50, gp.n_parameters, dtype=F64)
    names = list(gp.parameter_names)
    before = gp.hvp(batch, v)
    assert rel_err(before, v @ ref_hessian(model, F.cross_entropy, x, y, names)) < 1e-12
    with torch.no_grad():
        model[2].weight.mul_(1.5)
    after = gp.hvp(batch, v)
    assert rel_err(after, v @ ref_hessian(model, F.cross_entropy, x, y, names)) < 1e-12
    assert rel_err(after, before) > 1e-3


def test_structured_factor_cache_is_bounded(data, monkeypatch):
    """With no room to keep layer factors, products take the general path for few
    vectors and use transient factors for many; the numbers are the same."""
    x, y = data[0][:21], data[1][:21]
    model = make_mlp(8)
    ref = ref_hessian(model, F.cross_entropy, x, y, [n for n, _ in trainable(model)])
    monkeypatch.setattr(_torch_linear, "FACTOR_CACHE_BYTES", 0)
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    for k in (2, 2, 200):  # 200 >= 8 S (S = 7 + 4 + 3)
        v = torch.randn(k, gp.n_parameters, generator=torch.Generator().manual_seed(k), dtype=F64)
        assert rel_err(gp.hvp(batch, v), v @ ref) < 1e-12
    assert all(entry[3] is None for entry in gp._factor_cache.values())
    assert gp._linear_structure is True  # the transient factors were checked and used


def test_prepare_products_makes_the_first_product_structured(trained_mlp, data, monkeypatch):
    """The reuse hint computes the factors up front: the first product, even of
    one vector, is then structured (no autodiff call) with the same numbers;
    with no room to keep them the hint does nothing."""
    x, y = data[0][:17], data[1][:17]
    names = [n for n, _ in trainable(trained_mlp)]
    ref = ref_hessian(trained_mlp, F.cross_entropy, x, y, names)
    v = torch.randn(1, len(ref), generator=torch.Generator().manual_seed(3), dtype=F64)
    # a restriction to some layers keeps its own factors
    sub = TorchGradientProvider(trained_mlp, F.cross_entropy).restrict(["2.weight", "2.bias"])
    batch = sub.prepare_batch(Batch(x, y))
    sub.prepare_products(batch)
    assert sub._factor_cache[id(batch.x)][3] is not None
    idx = torch.as_tensor(
        layer_index_blocks(TorchGradientProvider(trained_mlp, F.cross_entropy))[1]
    )
    assert rel_err(sub.hvp(batch, v[:, idx]), v[:, idx] @ ref[idx][:, idx]) < 1e-12

    gp = TorchGradientProvider(trained_mlp, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    gp.prepare_products(batch)
    assert gp._factor_cache[id(batch.x)][3] is not None
    monkeypatch.setattr(gp, "_hvp", lambda *a: pytest.fail("took the autodiff path"))
    assert rel_err(gp.hvp(batch, v), v @ ref) < 1e-12
    # no room: nothing is computed, products still right
    monkeypatch.setattr(_torch_linear, "FACTOR_CACHE_BYTES", 0)
    fresh = TorchGradientProvider(trained_mlp, F.cross_entropy)
    fresh.prepare_products(batch)
    assert all(entry[3] is None for entry in fresh._factor_cache.values())
    assert rel_err(fresh.hvp(batch, v), v @ ref) < 1e-12


def test_general_path_keeps_the_graph_of_announced_batches(data, monkeypatch):
    """A model outside the nn.Linear structure (LayerNorm) keeps the second-order
    graph of a batch announced by prepare_products: products reuse it with the
    same numbers, rebuild it after an in-place parameter update, and nothing is
    kept without room."""
    x, y = data[0][:23], data[1][:23]
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(x.shape[1], 6, dtype=F64),
        nn.LayerNorm(6, dtype=F64),
        nn.Tanh(),
        nn.Linear(6, 3, dtype=F64),
    )
    gp = TorchGradientProvider(model, F.cross_entropy)
    names = list(gp.parameter_names)
    batch = gp.prepare_batch(Batch(x, y))
    gp.prepare_products(batch)
    v = torch.randn(5, gp.n_parameters, generator=torch.Generator().manual_seed(1), dtype=F64)
    before = gp.hvp(batch, v)
    assert rel_err(before, v @ ref_hessian(model, F.cross_entropy, x, y, names)) < 1e-12
    kept = gp._pullback_cache[id(batch.x)][3]
    assert kept is not None
    assert rel_err(gp.hvp(batch, v[:1]), before[:1]) < 1e-14
    assert gp._pullback_cache[id(batch.x)][3] is kept  # reused, not rebuilt
    with torch.no_grad():
        model[3].weight.mul_(1.5)
    after = gp.hvp(batch, v)
    assert rel_err(after, v @ ref_hessian(model, F.cross_entropy, x, y, names)) < 1e-12
    assert rel_err(after, before) > 1e-3
    monkeypatch.setattr(_torch_linear, "FACTOR_CACHE_BYTES", 0)
    fresh = TorchGradientProvider(model, F.cross_entropy)
    fresh.prepare_products(batch)
    assert rel_err(fresh.hvp(batch, v), after) < 1e-12
    assert all(entry[3] is None for entry in fresh._pullback_cache.values())


# -- 6. K-FAC factors ----------------------------------------------------------------


def test_kfac_factors_give_per_sample_gradients(trained_mlp, data):
    x, y = data[0][:9], data[1][:9]
    gp = TorchGradientProvider(trained_mlp, F.cross_entropy)
    layers = gp.kfac_layers()
    assert dict(layers) == {
        "0": ("0.weight", "0.bias"),
        "2": ("2.weight", "2.bias"),
        "4": ("4.weight", "4.bias"),
    }
    batch = gp.prepare_batch(Batch(x, y))
    grads = gp.flat_grads(batch)
    slices = gp.parameter_slices
    factors = gp.kfac_factors(batch)
    assert list(factors) == list(layers)
    for layer, (w, b) in layers.items():
        a, s = factors[layer]
        assert a.shape == (9, trained_mlp[int(layer)].in_features)
        assert s.shape == (9, trained_mlp[int(layer)].out_features)
        outer = (s[:, :, None] * a[:, None, :]).reshape(9, -1)
        assert rel_err(outer, grads[:, slices[w]]) < 1e-12
        assert rel_err(s, grads[:, slices[b]]) < 1e-12
    assert not any(m._forward_hooks for m in trained_mlp.modules())


def test_kfac_layers_follow_trainable_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False)).double()
    model[0].bias.requires_grad_(False)
    gp = TorchGradientProvider(model, F.cross_entropy)
    assert dict(gp.kfac_layers()) == {"0": ("0.weight", None), "2": ("2.weight", None)}
    assert dict(gp.restrict(["2.weight"]).kfac_layers()) == {"2": ("2.weight", None)}
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double().eval()
    tied[2].weight = tied[0].weight
    gp = TorchGradientProvider(tied, F.cross_entropy)
    assert list(gp.parameter_names) == ["0.weight", "0.bias", "2.bias"]
    assert dict(gp.kfac_layers()) == {}  # a tied weight is no single Kronecker product
    x, y = torch.randn(4, 3, dtype=F64), torch.randint(0, 3, (4,))
    ref = ref_grads(tied, F.cross_entropy, x, y, list(gp.parameter_names))
    assert rel_err(gp.flat_grads(gp.prepare_batch(Batch(x, y))), ref) < 1e-12
    root = TorchGradientProvider(nn.Linear(3, 2).double(), F.cross_entropy)
    assert dict(root.kfac_layers()) == {"root": ("weight", "bias")}
    assert dict(root.layer_groups()) == {"root": ["weight", "bias"]}


# -- 7. dtypes, devices, namespaces, shapes -------------------------------------------


def test_float32_model_returns_float32():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    gp = TorchGradientProvider(model, F.cross_entropy)
    assert gp.dtype == torch.float32 and gp.device == model[0].weight.device
    assert gp.xp.__name__.endswith("torch")
    x = torch.randint(-2, 3, (6, 5))  # integer inputs are cast
    batch = gp.prepare_batch(Batch(x, torch.randint(0, 3, (6,))))
    assert batch.x.dtype == torch.float32 and batch.y.dtype == torch.int64
    v = torch.randn(2, gp.n_parameters)
    for out in (
        gp.flat_grads(batch),
        gp.flat_mixed_grads(batch),
        gp.jacobian_prod(batch, v),
        gp.hvp(batch, v),
        gp.hessian(batch),
    ):
        assert isinstance(out, torch.Tensor)
        assert out.dtype == torch.float32 and out.device == gp.device
    infl = DirectInfluence(gp, regularization=0.1, second_order="empirical_fisher").fit(batch)
    assert infl.influences(batch.x, batch.y).dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        gp.prepare_batch(Batch(torch.randn(6, 5, dtype=F64), batch.y))


def test_input_validation(trained_mlp):
    gp = TorchGradientProvider(trained_mlp, F.cross_entropy)
    y = torch.randint(0, 3, (4,))
    with pytest.raises(NamespaceMismatchError, match="torch"):
        gp.prepare_batch(Batch(np.zeros((4, 5)), y))
    with pytest.raises(NamespaceMismatchError, match="torch"):
        DirectInfluence(gp).fit((np.zeros((4, 5)), np.zeros(4, dtype=int)))
    with pytest.raises(ValueError, match=r"expected x of shape \(N, \.\.\., 5\)"):
        gp.prepare_batch(Batch(torch.randn(4, 6, dtype=F64), y))
    shaped = TorchGradientProvider(trained_mlp, F.cross_entropy, input_shape=(5,))
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 5\)"):
        shaped.prepare_batch(Batch(torch.randn(4, 6, dtype=F64), y))
    with pytest.raises(ValueError, match="loss rejects targets"):
        gp.prepare_batch(Batch(torch.randn(4, 5, dtype=F64), torch.randn(4, 7, dtype=F64)))
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    batch = gp.prepare_batch(Batch(x, y))
    assert not batch.x.requires_grad
    assert not gp.flat_grads(batch).requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model():
    model = make_mlp().cuda().eval()
    gp = TorchGradientProvider(model, F.cross_entropy)
    x, y = torch.randn(4, 5, dtype=F64), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="cuda"):
        gp.prepare_batch(Batch(x, y))
    batch = gp.prepare_batch(Batch(x.cuda(), y.cuda()))
    assert gp.flat_grads(batch).device == gp.device
    assert gp.hessian(batch).device == gp.device


def test_import_xinfluence_does_not_import_torch():
    code = "import sys, xinfluence; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
