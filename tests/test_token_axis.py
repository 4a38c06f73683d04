"""Dense layers on a token axis (inputs ``(N, *S, d)``) and tracked layers, torch.

Oracles: per-sample gradients one sample at a time by plain autograd
(``torch_helpers.ref_grads``), the "expand" Kronecker factors and the corrected
eigenvalues written out from hooked activations and output gradients, and
``DirectInfluence`` (dense curvature) for the Kronecker projection at ``k = P``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import xinfluence as xi  # noqa: E402
from helpers import rel_err  # noqa: E402
from torch_helpers import ref_grads, single_thread  # noqa: E402, F401
from xinfluence import Batch  # noqa: E402
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402
from xinfluence.influence.kronecker import _kfac_accumulate  # noqa: E402

F64 = torch.float64


class TokenNet(nn.Module):
    """Two dense layers on every token, a mean pool over the token axes, a head."""

    def __init__(self, d=4, h=3, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h, bias=False)
        self.head = nn.Linear(h, classes)
        self.double()

    def forward(self, x):  # x (N, *S, d)
        z = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        return self.head(z.flatten(1, -2).mean(1))


def token_data(n=9, shape=(5,), d=4, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, d, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def hooked(model, x, y, layers):
    """Inputs ``(N, T, in)`` and per-sample output gradients ``(N, T, out)`` of
    ``layers`` (module names), by forward hooks and ``retain_grad``."""
    store = {}

    def make(name):
        def hook(module, inputs, output):
            output.retain_grad()
            store[name] = (inputs[0].detach(), output)

        return hook

    handles = [model.get_submodule(k).register_forward_hook(make(k)) for k in layers]
    try:
        # the sum of the per-sample losses: its output gradients are per-sample ones
        F.cross_entropy(model(x), y, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad()
    n = x.shape[0]
    return {
        k: (a.reshape(n, -1, a.shape[-1]), o.grad.reshape(n, -1, o.shape[-1]))
        for k, (a, o) in store.items()
    }


def layer_grads(gp, x, y):
    """Per-sample gradients ``(N, P)`` from ``kfac_factors``: ``sum_t s_nt a_nt^T``."""
    factors = gp.kfac_factors(Batch(x, y))
    slices = gp.parameter_slices
    out = torch.zeros(x.shape[0], gp.n_parameters, dtype=gp.dtype)
    for layer, (w, b) in gp.kfac_layers().items():
        a, s = factors[layer]
        if a.ndim == 2:
            a, s = a[:, None], s[:, None]
        out[:, slices[w]] = torch.einsum("nto,nti->noi", s, a).reshape(x.shape[0], -1)
        if b is not None:
            out[:, slices[b]] = s.sum(1)
    return out


@pytest.mark.parametrize("shape", [(5,), (2, 3)])
def test_layer_gradients_on_token_axis_equal_autograd(shape):
    model = TokenNet()
    x, y = token_data(shape=shape)
    gp = TorchGradientProvider(model, F.cross_entropy)
    ref = ref_grads(model, F.cross_entropy, x, y)
    assert rel_err(layer_grads(gp, x, y), ref) < 1e-12
    assert rel_err(gp.flat_grads(Batch(x, y)), ref) < 1e-12


def test_expand_factors_equal_dense_reference():
    model = TokenNet()
    x, y = token_data(n=7, shape=(2, 3))
    gp = TorchGradientProvider(model, F.cross_entropy)
    factors = gp.kfac_factors(Batch(x, y))
    ref = hooked(model, x, y, ["fc1", "fc2", "head"])
    n = x.shape[0]
    for layer, (_, b) in gp.kfac_layers().items():
        a_ref, s_ref = ref[layer]
        t = a_ref.shape[1]
        if b is not None:
            a_ref = torch.cat([a_ref, torch.ones(*a_ref.shape[:2], 1, dtype=F64)], dim=2)
        # expand: A = (1/N) sum_{n,t} a a^T, S = (1/(N T)) sum_{n,t} s s^T
        a_dense = torch.einsum("nti,ntj->ij", a_ref, a_ref) / n
        s_dense = torch.einsum("nti,ntj->ij", s_ref, s_ref) / (n * t)
        a, s = factors[layer]
        a_cov, s_cov = _kfac_accumulate(a, s[:, None], None, xp=gp.xp, bias=b is not None)
        assert rel_err(a_cov / n, a_dense) < 1e-12
        assert rel_err(s_cov / n, s_dense) < 1e-12


@pytest.mark.parametrize("second_order", ["empirical_fisher", "gauss_newton"])
def test_ekfac_corrected_eigenvalues_sum_tokens_before_squaring(second_order):
    model = TokenNet()
    x, y = token_data(n=10, shape=(4,))
    gp = TorchGradientProvider(model, F.cross_entropy)
    loader = [(x[:3], y[:3]), (x[3:4], y[3:4]), (x[4:], y[4:])]  # uneven batches
    infl = xi.EkfacInfluence(gp, regularization=1e-3, second_order=second_order).fit(loader)
    ops = {k: c.op for k, c in infl._mapper.composable_block_dict.items()}
    if second_order == "empirical_fisher":
        grads = ref_grads(model, F.cross_entropy, x, y)
        for layer, (w, b) in gp.kfac_layers().items():
            op = ops[layer]
            g = grads[:, gp.parameter_slices[w]].reshape(x.shape[0], op.n_out, -1)
            if b is not None:
                g = torch.cat([g, grads[:, gp.parameter_slices[b]][:, :, None]], dim=2)
            lam = ((op.q_s.T @ g @ op.q_a) ** 2).mean(0)
            assert rel_err(op.eigenvalues, lam) < 1e-12
    else:
        # Gauss-Newton: the exact diagonal of the layer's GGN block in the eigenbasis
        ggn = gp.ggn(Batch(x, y))
        for layer, (w, b) in gp.kfac_layers().items():
            op = ops[layer]
            idx = torch.arange(gp.n_parameters)
            ws = idx[gp.parameter_slices[w]].reshape(op.n_out, -1)
            cols = ws if b is None else torch.cat([ws, idx[gp.parameter_slices[b]][:, None]], 1)
            block = ggn[cols.reshape(-1)][:, cols.reshape(-1)]
            basis = torch.kron(op.q_s, op.q_a)
            lam = torch.diagonal(basis.T @ block @ basis).reshape(op.eigenvalues.shape)
            assert rel_err(op.eigenvalues, lam) < 1e-11


@pytest.mark.parametrize("second_order", ["empirical_fisher", "gauss_newton"])
def test_kronecker_projection_at_full_size_equals_direct(second_order):
    model = TokenNet(d=3, h=2)
    x, y = token_data(n=12, shape=(3,), d=3)
    gp = TorchGradientProvider(model, F.cross_entropy)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    kw = dict(regularization=1e-2, block_structure="layer", second_order=second_order)
    direct = xi.DirectInfluence(gp, **kw).fit(batches)
    # k = out * (in + 1) per layer: the largest layer's size, capped per layer
    proj = xi.ProjectedInfluence(
        gp, k=64, projection="kronecker", seed=5, regularization_space="parameter", **kw
    ).fit(batches)
    xt, yt = x[:4], y[:4]
    expected = direct.influences(xt, yt, x, y)
    assert rel_err(proj.influences(xt, yt, x, y), expected) < 1e-9


def test_single_token_equals_2d_model():
    model = TokenNet()
    x3, y = token_data(n=8, shape=(1,))
    x2 = x3[:, 0]

    class Flat(nn.Module):  # the same layers on 2-D inputs
        def __init__(self, net):
            super().__init__()
            self.fc1, self.fc2, self.head = net.fc1, net.fc2, net.head

        def forward(self, x):
            return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    gp3 = TorchGradientProvider(model, F.cross_entropy)
    gp2 = TorchGradientProvider(Flat(model), F.cross_entropy)
    f3, f2 = gp3.kfac_factors(Batch(x3, y)), gp2.kfac_factors(Batch(x2, y))
    for layer in ("fc1", "fc2"):  # the head sees the pooled (N, h)
        assert f3[layer][0].shape[1] == 1 and f2[layer][0].ndim == 2
        assert rel_err(f3[layer][0][:, 0], f2[layer][0]) < 1e-14
        assert rel_err(f3[layer][1][:, 0], f2[layer][1]) < 1e-14
    for method in (
        lambda gp: xi.EkfacInfluence(gp, regularization=1e-3),
        lambda gp: xi.EkfacInfluence(gp, regularization=1e-3, second_order="empirical_fisher"),
        lambda gp: xi.ProjectedInfluence(gp, k=6, projection="kronecker", regularization=1e-3),
    ):
        s3 = method(gp3).fit([(x3, y)]).influences(x3[:3], y[:3], x3, y)
        s2 = method(gp2).fit([(x2, y)]).influences(x2[:3], y[:3], x2, y)
        assert rel_err(s3, s2) < 1e-12


# -- tracked layers ---------------------------------------------------------------


class TinyLM(nn.Module):
    """Embedding + position, a residual MLP on the token axis, LayerNorm, a head."""

    def __init__(self, vocab=7, t=4, d=4, h=5, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(t, d))
        self.fc = nn.Linear(d, h)
        self.proj = nn.Linear(h, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.double()

    def forward(self, ids):  # (N, T) integer ids
        z = self.emb(ids) + self.pos
        z = z + self.proj(torch.tanh(self.fc(z)))
        return self.head(self.ln(z).mean(1))


def lm_data(n=9, t=4, vocab=7, classes=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    return ids, torch.randint(0, classes, (n,), generator=g)


def test_tracked_layers_ekfac_equals_restricted_provider():
    model = TinyLM().eval()
    x, y = lm_data()
    gp = TorchGradientProvider(model, F.cross_entropy, cast_inputs=False, layers=["fc", "proj"])
    by_type = TorchGradientProvider(model, F.cross_entropy, cast_inputs=False, layers=[nn.Linear])
    assert gp.tracked_layers == ("fc", "proj")
    assert list(gp.parameter_names) == ["fc.weight", "fc.bias", "proj.weight", "proj.bias"]
    assert set(gp.untracked_parameters) == {
        "pos",
        "emb.weight",
        "ln.weight",
        "ln.bias",
        "head.weight",
        "head.bias",
    }
    assert "untracked_parameters=" in repr(gp) and "'ln.bias'" in repr(gp)
    assert by_type.tracked_layers == ("fc", "proj", "head")
    full = TorchGradientProvider(model, F.cross_entropy, cast_inputs=False)
    with pytest.raises(ValueError, match="not covered"):
        xi.EkfacInfluence(full)
    by_hand = full.restrict(gp.parameter_names)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    for second_order in ("empirical_fisher", "gauss_newton"):
        kw = dict(regularization=1e-3, second_order=second_order)
        s = xi.EkfacInfluence(gp, **kw).fit(loader).influences(x[:3], y[:3], x, y)
        ref = xi.EkfacInfluence(by_hand, **kw).fit(loader).influences(x[:3], y[:3], x, y)
        assert torch.equal(s, ref)
    # the tracked layers' gradients are the model's gradients of those parameters
    grads = ref_grads(model, F.cross_entropy, x, y, gp.parameter_names)
    assert rel_err(layer_grads(gp, x, y), grads) < 1e-12
    proj = xi.ProjectedInfluence(gp, k=8, projection="kronecker", regularization=1e-3)
    assert proj.fit(loader).influences(x[:2], y[:2], x, y).shape == (2, 9)


def test_tracked_layers_errors():
    model = TinyLM()
    with pytest.raises(ValueError, match=r"unsupported: 'ln' \(LayerNorm\), 'emb' \(Embedding\)"):
        TorchGradientProvider(model, F.cross_entropy, layers=["fc", "ln", "emb"])
    model.head.weight = model.fc.weight  # tied: not one Kronecker product
    with pytest.raises(ValueError, match=r"'head' \(Linear: frozen, tied"):
        TorchGradientProvider(model, F.cross_entropy, layers=["fc", "head"])
    with pytest.raises(ValueError, match="not a module"):
        TorchGradientProvider(model, F.cross_entropy, layers=["nope"])
    with pytest.raises(ValueError, match="no module of type Conv2d"):
        TorchGradientProvider(model, F.cross_entropy, layers=[nn.Conv2d])
    with pytest.raises(TypeError, match="module names"):
        TorchGradientProvider(model, F.cross_entropy, layers=[3])


# -- Hugging Face Conv1D --------------------------------------------------------------


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # the same shape as transformers' class

        class Conv1D(nn.Module):
            def __init__(self, nf, nx):
                super().__init__()
                self.nf = nf
                self.weight = nn.Parameter(torch.empty(nx, nf))
                self.bias = nn.Parameter(torch.zeros(nf))
                nn.init.normal_(self.weight, std=0.02)

            def forward(self, x):
                size_out = x.size()[:-1] + (self.nf,)
                x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
                return x.view(size_out)

    return Conv1D


def test_hf_conv1d_is_a_dense_layer():
    conv1d = _conv1d_class()
    linear = TokenNet()
    model = TokenNet()
    # the same network with Conv1D layers (weights transposed)
    model.fc1, model.head = conv1d(3, 4).double(), conv1d(3, 3).double()
    with torch.no_grad():
        model.fc1.weight.copy_(linear.fc1.weight.T)
        model.fc1.bias.copy_(linear.fc1.bias)
        model.head.weight.copy_(linear.head.weight.T)
        model.head.bias.copy_(linear.head.bias)
        model.fc2.weight.copy_(linear.fc2.weight)
    x, y = token_data(n=8, shape=(3,))
    gp = TorchGradientProvider(model, F.cross_entropy, layers=["fc1", "fc2", "head"])
    gp_lin = TorchGradientProvider(linear, F.cross_entropy)
    assert gp.kfac_layouts() == {"fc1": "io", "fc2": "oi", "head": "io"}
    assert rel_err(layer_grads_io(gp, x, y), ref_grads(model, F.cross_entropy, x, y)) < 1e-12
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    for method in (
        lambda gp: xi.EkfacInfluence(gp, regularization=1e-3, second_order="empirical_fisher"),
        lambda gp: xi.EkfacInfluence(gp, regularization=1e-3),
        lambda gp: xi.ProjectedInfluence(gp, k=6, projection="kronecker", regularization=1e-3),
    ):
        s = method(gp).fit(loader).influences(x[:3], y[:3], x, y)
        ref = method(gp_lin).fit(loader).influences(x[:3], y[:3], x, y)
        assert rel_err(s, ref) < 1e-11


def layer_grads_io(gp, x, y):
    """:func:`layer_grads` with ``"io"`` weights (``sum_t a_nt s_nt^T``)."""
    factors = gp.kfac_factors(Batch(x, y))
    layouts, slices = gp.kfac_layouts(), gp.parameter_slices
    out = torch.zeros(x.shape[0], gp.n_parameters, dtype=gp.dtype)
    for layer, (w, b) in gp.kfac_layers().items():
        a, s = factors[layer]
        if a.ndim == 2:
            a, s = a[:, None], s[:, None]
        spec = "nto,nti->noi" if layouts[layer] == "oi" else "nto,nti->nio"
        out[:, slices[w]] = torch.einsum(spec, s, a).reshape(x.shape[0], -1)
        if b is not None:
            out[:, slices[b]] = s.sum(1)
    return out


def test_float32_token_axis_and_pickled_tracking():
    import pickle

    model = TinyLM()
    x, y = lm_data()
    gp64 = TorchGradientProvider(model, F.cross_entropy, cast_inputs=False, layers=[nn.Linear])
    model32 = TinyLM().float()
    gp32 = TorchGradientProvider(model32, F.cross_entropy, cast_inputs=False, layers=[nn.Linear])
    assert rel_err(layer_grads(gp32, x, y).double(), layer_grads(gp64, x, y)) < 1e-5
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    s64 = xi.EkfacInfluence(gp64, regularization=1e-2).fit(loader).influences(x[:3], y[:3], x, y)
    s32 = xi.EkfacInfluence(gp32, regularization=1e-2).fit(loader).influences(x[:3], y[:3], x, y)
    assert s32.dtype == torch.float32 and rel_err(s32.double(), s64) < 1e-3
    back = pickle.loads(pickle.dumps(gp64))
    assert back.tracked_layers == gp64.tracked_layers
    assert back.parameter_names == gp64.parameter_names
    assert back.untracked_parameters == gp64.untracked_parameters


# -- curvature products on a token axis ------------------------------------------------
def _dense_hessian(model, x, y):
    """The Hessian of the mean cross-entropy by autograd over the flat parameters."""
    params = dict(model.named_parameters())
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def loss(flat):
        parts = dict(zip(params, (t.reshape(s) for t, s in zip(flat.split(sizes), shapes))))
        return F.cross_entropy(torch.func.functional_call(model, parts, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    return torch.autograd.functional.hessian(loss, theta)


def test_hessian_products_of_dense_layers_on_a_token_axis_match_autograd():
    """The structured products: the nn.Linear formula (2-D inputs only) must hand
    token-axis models to autograd, and the sequential convolutional path must carry
    an nn.Linear applied to 3-D activations; both against a dense autograd Hessian."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 2, 3, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (7,), generator=g)
    model = TokenNet(seed=1).eval()
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    want = _dense_hessian(model, x, y)
    v = torch.randn(3, want.shape[0], generator=g, dtype=F64)
    assert rel_err(gp.hvp(batch, v), v @ want) < 1e-12
    assert rel_err(gp.hessian(batch), want) < 1e-12
    assert gp._linear_structure is False  # 3-D layer inputs: the general path

    xc = torch.randn(6, 2, 4, 4, generator=g, dtype=F64)
    yc = torch.randint(0, 3, (6,), generator=g)
    torch.manual_seed(2)
    conv = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(start_dim=2),  # (N, 3, 16): a dense layer on 3 positions
        nn.Linear(16, 5),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(15, 3),
    ).double()
    gp = TorchGradientProvider(conv.eval(), F.cross_entropy)
    batch = gp.prepare_batch(Batch(xc, yc))
    want = _dense_hessian(conv, xc, yc)
    v = torch.randn(4, want.shape[0], generator=g, dtype=F64)
    assert rel_err(gp.hvp(batch, v), v @ want) < 1e-12
    assert gp._conv_structure is True  # the structured path took it
    assert rel_err(gp.hessian(batch), want) < 1e-12


def _count_forwards(model):
    calls = [0]

    def hook(module, inputs):
        calls[0] += 1

    return calls, model.register_forward_pre_hook(hook)


def test_layer_blocks_share_one_pass_of_the_model_per_batch():
    """EK-FAC and Kronecker projections with a block per layer: one forward (and
    backward) pass per batch serves every block, the losses checked from it; the
    per-sample gradients from the layer factors equal autograd's; chunked queries
    give the numbers of the unchunked one."""
    model = TokenNet()
    x, y = token_data(n=11, shape=(2, 3))
    xt, yt = x[:3], y[:3]
    gp = TorchGradientProvider(model, F.cross_entropy)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    full = gp.prepare_batch(Batch(x, y))  # the provider's first-use probe: not counted
    calls, handle = _count_forwards(model)
    try:
        ekfac = xi.EkfacInfluence(gp, regularization=1e-3, second_order="empirical_fisher")
        ekfac.fit(batches)
        assert calls[0] == 4  # two passes (factors, corrected eigenvalues) over 2 batches
        want = ekfac.influences(xt, yt, x, y)  # warm-up: the activation estimate
        calls[0] = 0
        assert rel_err(ekfac.influences(xt, yt, x, y), want) == 0
        assert calls[0] == 3  # test losses, test factors, training factors (and losses)
        grads = ref_grads(model, F.cross_entropy, x, y)
        for comp in ekfac._mapper.composable_block_dict.values():
            cols = torch.cat([grads[:, gp.parameter_slices[n]] for n in comp.gp.parameter_names], 1)
            assert rel_err(comp.gp.flat_grads(full), cols) < 1e-13
        with xi.memory_budget_scope(20_000):  # several training chunks
            calls[0] = 0
            chunked = ekfac.influences(xt, yt, batches)
            assert calls[0] >= 4  # at least two training chunks
        assert rel_err(chunked, want) < 1e-12

        proj = xi.ProjectedInfluence(
            gp, k=(2, 3), projection="kronecker", block_structure="layer", regularization=1e-3
        )
        calls[0] = 0
        proj.fit(batches)
        assert calls[0] == 2  # every layer block from one pass per batch, losses included
    finally:
        handle.remove()
