"""Conv2d layer quantities of the torch provider (KFC / EK-FAC) and its
memory-aware chunking, against plain torch autograd and dense definitions.

References never use the provider's hooks: per-sample gradients come from
``torch.autograd`` on one sample at a time, patches from explicit slicing, output
gradients from running the two halves of an ``nn.Sequential`` by hand.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import xinfluence as xi  # noqa: E402
from helpers import rel_err  # noqa: E402
from torch_helpers import ref_grads, ref_hessian, single_thread  # noqa: E402, F401
from xinfluence import Batch  # noqa: E402
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402
from xinfluence.backends.torch import derivatives as torch_backend  # noqa: E402
from xinfluence.backends.torch import sequential as _torch_conv  # noqa: E402

F64 = torch.float64


# conv keyword variants: stride, padding, dilation, no bias, "same" padding
VARIANTS = {
    "plain": dict(padding=1),
    "stride": dict(stride=2, padding=1),
    "dilation": dict(dilation=2, padding=2),
    "nobias": dict(padding=0, bias=False),
    "same": dict(padding="same"),
}


def small_cnn(variant: str, seed: int = 0) -> nn.Sequential:
    """Two Conv2d, ReLU, max pooling, a Linear head on (2, 7, 7) inputs."""
    torch.manual_seed(seed)
    kw = VARIANTS[variant]
    conv1 = nn.Conv2d(2, 3, 3, **kw)
    with torch.no_grad():
        h = conv1(torch.zeros(1, 2, 7, 7)).shape[-1]
    conv2 = nn.Conv2d(3, 4, 2, padding=1)
    with torch.no_grad():
        h2 = conv2(torch.zeros(1, 3, h, h)).shape[-1] // 2
    model = nn.Sequential(
        conv1,
        nn.Tanh(),
        conv2,
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * h2 * h2, 5),
    )
    return model.double().eval()


def data(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 7, 7, generator=gen, dtype=F64)
    y = torch.randint(0, 5, (n,), generator=gen)
    return x, y


def ref_patches(conv: nn.Conv2d, x):
    """Unfolded patches ``(N, T, C*kh*kw)`` by explicit slicing."""
    pad = conv._reversed_padding_repeated_twice if isinstance(conv.padding, str) else None
    if pad is not None:
        xp_ = F.pad(x, pad)
    else:
        ph, pw = conv.padding
        xp_ = F.pad(x, (pw, pw, ph, ph))
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ho = (xp_.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp_.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(ho):
        for j in range(wo):
            patch = xp_[:, :, i * sh : i * sh + dh * kh : dh, j * sw : j * sw + dw * kw : dw]
            rows.append(patch.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


def ref_output_grads(model: nn.Sequential, index: int, x, y):
    """``d l_n / d out_n`` of layer ``index`` as ``(N, T, O)``, by running the
    model's two halves by hand."""
    with torch.no_grad():
        inner = model[: index + 1](x)
    inner = inner.detach().requires_grad_(True)
    losses = torch.stack(
        [F.cross_entropy(model[index + 1 :](inner[i : i + 1]), y[i : i + 1]) for i in range(len(x))]
    )
    (g,) = torch.autograd.grad(losses.sum(), inner)
    return g.flatten(2).transpose(1, 2), inner.shape[2] * inner.shape[3]


# -- per-sample layer quantities -----------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conv_kfac_factors_match_autodiff(variant):
    model = small_cnn(variant)
    x, y = data(6)
    gp = TorchGradientProvider(model, F.cross_entropy)
    bias = VARIANTS[variant].get("bias", True)
    assert dict(gp.kfac_layers()) == {
        "0": ("0.weight", "0.bias" if bias else None),
        "2": ("2.weight", "2.bias"),
        "6": ("6.weight", "6.bias"),
    }
    batch = gp.prepare_batch(Batch(x, y))
    grads = ref_grads(model, F.cross_entropy, x, y)
    slices = gp.parameter_slices
    factors = gp.kfac_factors(batch)
    for layer, index in (("0", 0), ("2", 2)):
        a, s = factors[layer]
        conv = model[index]
        with torch.no_grad():
            conv_in = model[:index](x)
        assert rel_err(a, ref_patches(conv, conv_in)) < 1e-12
        s_ref, positions = ref_output_grads(model, index, x, y)
        assert s.shape == (6, positions, conv.out_channels)
        assert rel_err(s, s_ref) < 1e-12
        w, b = gp.kfac_layers()[layer]
        g_w = (s.transpose(1, 2) @ a).reshape(6, -1)
        assert rel_err(g_w, grads[:, slices[w]]) < 1e-12
        if b is not None:
            assert rel_err(s.sum(1), grads[:, slices[b]]) < 1e-12
    assert not any(m._forward_hooks for m in model.modules())


def test_unsupported_convolutions_are_left_out():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1, padding_mode="circular"),
        nn.Flatten(),
        nn.Linear(27, 2),
    ).double()
    gp = TorchGradientProvider(model, F.cross_entropy)
    assert dict(gp.kfac_layers()) == {"4": ("4.weight", "4.bias")}
    with pytest.raises(ValueError, match="not covered"):
        xi.EkfacInfluence(gp)
    # the general path still gives the right gradients
    x, y = torch.randn(3, 2, 5, 5, dtype=F64), torch.randint(0, 2, (3,))
    g = gp.flat_grads(gp.prepare_batch(Batch(x, y)))
    assert rel_err(g, ref_grads(model, F.cross_entropy, x, y)) < 1e-12


# -- EK-FAC on convolutions ----------------------------------------------------------


def dense_kfac(model, gp, x, y, layer: str, index: int):
    """KFC factors and corrected eigenvalues from their definitions."""
    conv = model[index]
    with torch.no_grad():
        conv_in = model[:index](x)
    a = ref_patches(conv, conv_in)
    if conv.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=F64)], dim=2)
    s, positions = ref_output_grads(model, index, x, y)
    n = x.shape[0]
    a_cov = torch.einsum("nti,ntj->ij", a, a) / n
    s_cov = torch.einsum("nti,ntj->ij", s, s) / (n * positions)
    grads = ref_grads(model, F.cross_entropy, x, y)
    w, b = gp.kfac_layers()[layer]
    g = grads[:, gp.parameter_slices[w]].reshape(n, conv.out_channels, -1)
    if b is not None:
        g = torch.cat([g, grads[:, gp.parameter_slices[b]][:, :, None]], dim=2)
    return a_cov, s_cov, g


@pytest.mark.parametrize("variant", ["plain", "stride", "nobias"])
def test_conv_ekfac_matches_dense_definitions(variant):
    model = small_cnn(variant)
    x, y = data(11)
    gp = TorchGradientProvider(model, F.cross_entropy)
    # uneven batches: every mean is over samples
    loader = [(x[:4], y[:4]), (x[4:5], y[4:5]), (x[5:], y[5:])]
    reg = 1e-3
    # the dense oracle here is built from true gradients: the empirical Fisher
    infl = xi.EkfacInfluence(gp, regularization=reg, second_order="empirical_fisher").fit(loader)
    ops = {k: c.op for k, c in infl._mapper.composable_block_dict.items()}
    for layer, index in (("0", 0), ("2", 2)):
        a_cov, s_cov, g = dense_kfac(model, gp, x, y, layer, index)
        op = ops[layer]
        # the eigenbases diagonalise the dense factors
        for q, cov in ((op.q_a, a_cov), (op.q_s, s_cov)):
            d = q.T @ cov @ q
            off = d - torch.diag(torch.diagonal(d))
            assert float(off.abs().max() / cov.abs().max()) < 1e-12
            assert rel_err(q @ torch.diag(torch.diagonal(d)) @ q.T, cov) < 1e-12
        # corrected eigenvalues: mean_n (Q_S^T G_n Q_A)^2 of the exact gradients
        lam = ((op.q_s.T @ g @ op.q_a) ** 2).mean(0)
        assert rel_err(op.eigenvalues, lam) < 1e-12
    # plain K-FAC: the eigenvalues are products of the factors' eigenvalues
    kfac = xi.EkfacInfluence(
        gp, regularization=reg, update_diagonal=False, second_order="empirical_fisher"
    ).fit(loader)
    op = kfac._mapper.composable_block_dict["2"].op
    a_cov, s_cov, _ = dense_kfac(model, gp, x, y, "2", 2)
    lam_a = torch.diagonal(op.q_a.T @ a_cov @ op.q_a)
    lam_s = torch.diagonal(op.q_s.T @ s_cov @ op.q_s)
    assert rel_err(op.eigenvalues, lam_s[:, None] * lam_a[None, :]) < 1e-12


@pytest.mark.parametrize("second_order", ["empirical_fisher", "gauss_newton"])
def test_conv_ekfac_influences_from_dense_curvature(second_order):
    """The influences equal g_t^T C^-1 g_j with the EK-FAC curvature built densely
    from the layer's eigenbases and corrected eigenvalues, summed over layers; and
    they approximate the exact layer-wise influences of the same curvature."""
    model = small_cnn("plain")
    x, y = data(20)
    xt, yt = data(4, seed=5)
    gp = TorchGradientProvider(model, F.cross_entropy)
    reg = 1e-2
    infl = xi.EkfacInfluence(gp, regularization=reg, second_order=second_order).fit(
        [(x[:7], y[:7]), (x[7:], y[7:])]
    )
    scores = infl.influences(xt, yt, x, y)
    g_train, g_test = (
        ref_grads(model, F.cross_entropy, x, y),
        ref_grads(model, F.cross_entropy, xt, yt),
    )
    expected = torch.zeros(4, 20, dtype=F64)
    for layer, comp in infl._mapper.composable_block_dict.items():
        op = comp.op
        sl = [gp.parameter_slices[n] for n in gp.kfac_layers()[layer] if n is not None]
        idx = torch.cat([torch.arange(s.start, s.stop) for s in sl])
        c = op.dense_curvature()
        expected += g_test[:, idx] @ torch.linalg.solve(
            c + reg * torch.eye(len(idx), dtype=F64), g_train[:, idx].T
        )
    assert rel_err(scores, expected) < 1e-10
    # exact layer-wise Direct of the same curvature: EK-FAC is an approximation
    blocks = {k: [n for n in v if n is not None] for k, v in gp.kfac_layers().items()}
    direct = xi.DirectInfluence(
        gp, regularization=reg, block_structure=blocks, second_order=second_order
    ).fit((x, y))
    exact = direct.influences(xt, yt, x, y)
    corr = torch.corrcoef(torch.stack([scores.ravel(), exact.ravel()]))[0, 1]
    print(
        f"EK-FAC vs layer-wise Direct: corr {float(corr):.4f}, rel err {rel_err(scores, exact):.3g}"
    )
    assert corr > 0.9


@pytest.mark.parametrize("second_order", ["empirical_fisher", "gauss_newton"])
def test_conv_covering_the_image_equals_a_linear_layer(second_order):
    """A Conv2d whose kernel covers the whole input has one output position: its
    EK-FAC must equal that of the same weights in an nn.Linear."""
    torch.manual_seed(3)
    conv = nn.Sequential(nn.Conv2d(2, 6, 4), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)).double()
    lin = nn.Sequential(nn.Flatten(), nn.Linear(32, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        lin[1].weight.copy_(conv[0].weight.reshape(6, -1))
        lin[1].bias.copy_(conv[0].bias)
        lin[3].load_state_dict(conv[3].state_dict())
    x = torch.randn(9, 2, 4, 4, dtype=F64)
    y = torch.randint(0, 3, (9,))
    scores = []
    for model in (conv, lin):
        gp = TorchGradientProvider(model.eval(), F.cross_entropy)
        infl = xi.EkfacInfluence(gp, regularization=1e-3, second_order=second_order).fit(
            [(x[:5], y[:5]), (x[5:], y[5:])]
        )
        scores.append(infl.influences(x[:3], y[:3], x, y))
    assert rel_err(scores[0], scores[1]) < 1e-10


@pytest.mark.parametrize("variant", ["plain", "stride", "nobias"])
def test_conv_gauss_newton_factors_give_the_layer_block(variant):
    """kfac_ggn_factors of a Conv2d layer: the pseudo-gradients sum_t s_nct a_nt^T
    give the layer's exact Gauss-Newton block, mean_n sum_c vec(G_nc) vec(G_nc)^T,
    checked against the provider's dense GGN (jvp/vjp through the model)."""
    model = small_cnn(variant)
    x, y = data(7)
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    dense = gp.ggn(batch)
    factors = gp.kfac_ggn_factors(batch)
    for layer, (w, b) in gp.kfac_layers().items():
        a, s = factors[layer]  # conv: (N, T, I), (N, C, T, O); dense: (N, I), (N, C, O)
        if a.ndim == 2:
            g = torch.einsum("nco,ni->ncoi", s, a)
            bias = s
        else:
            g = torch.einsum("ncto,nti->ncoi", s, a)
            bias = s.sum(2)
        vec = g.reshape(*g.shape[:2], -1)
        if b is not None:
            vec = torch.cat([vec, bias], dim=2)
        block = torch.einsum("ncp,ncq->pq", vec, vec) / x.shape[0]
        idx = torch.cat(
            [
                torch.arange(gp.parameter_slices[n].start, gp.parameter_slices[n].stop)
                for n in (w, b)
                if n is not None
            ]
        )
        assert rel_err(block, dense[idx][:, idx]) < 1e-12


# -- memory-aware chunking -----------------------------------------------------------


def activation_bytes(model: nn.Sequential, x) -> int:
    """One sample's input and every layer's output, in bytes, layer by layer."""
    h, total = x[:1], x[:1].numel()
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            total += h.numel()
    return total * 8


def test_chunks_follow_the_memory_budget(monkeypatch):
    model = small_cnn("stride")
    x, y = data(10)
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    v = torch.randn(13, gp.n_parameters, dtype=F64)
    ref_h = gp.hvp(batch, v)
    ref_j = gp.jacobian_prod(batch, v)
    ref_g = gp.flat_grads(batch)

    calls: list[int | None] = []
    real_vmap = torch_backend.vmap
    real_chunk = _torch_conv._sequential_hvp_chunk

    def counting_vmap(fn, *args, chunk_size=None, **kwargs):
        if chunk_size is not None:  # the per-sample loss over outputs is not chunked
            calls.append(chunk_size)
        return real_vmap(fn, *args, chunk_size=chunk_size, **kwargs)

    samples: list[int] = []

    def counting_chunk(layout, losses, zs, gs, rules, y, v, out):
        calls.append(v.shape[0])
        samples.append(zs[0].shape[0])
        return real_chunk(layout, losses, zs, gs, rules, y, v, out)

    monkeypatch.setattr(torch_backend, "vmap", counting_vmap)
    monkeypatch.setattr(_torch_conv, "_sequential_hvp_chunk", counting_chunk)
    act, p = activation_bytes(model, x), gp.n_parameters
    assert gp._activation_bytes(x) == act
    # the structured products: per vector and per sample, the input and the
    # layer outputs twice (patches live in blocks of samples, outside the
    # count); as much again per sample for the batch's values and cotangents
    seq_vector = 10 * 8 * (x[:1].numel() + 2 * (act // 8 - x[:1].numel()))
    seq_fixed = seq_vector  # ten samples
    with xi.memory_budget_scope(5 * seq_vector + seq_fixed + 3):
        assert rel_err(gp.hvp(batch, v), ref_h) < 1e-12
        assert calls == [5, 5, 3]
    per_vector = 10 * act * torch_backend._PRODUCT_ACTIVATION_COPIES + 2 * p * 8
    per_sample = act * torch_backend._GRAD_ACTIVATION_COPIES + 2 * p * 8
    with xi.memory_budget_scope(4 * per_vector + 7):
        calls.clear()
        # forward-mode products (13 vectors x weight reuse 11 would take the
        # per-sample gradients: the test below)
        monkeypatch.setattr(torch_backend, "_JVP_PER_SAMPLE_GRADS", 10**6)
        assert rel_err(gp.jacobian_prod(batch, v), ref_j) < 1e-12
        assert calls == [4]  # 13 vectors in 4 vmap chunks
        calls.clear()
        assert rel_err(gp._hvp(batch, v), ref_h) < 1e-12  # the general path
        assert calls == [4, 4, 4, 4]  # each chunk written into the result in turn
    with xi.memory_budget_scope(3 * per_sample + 1):
        calls.clear()
        assert rel_err(gp.flat_grads(batch), ref_g) < 1e-12
        assert calls == [3]  # 10 samples in 4 chunks
    # one vector over the whole batch exceeds the budget: sub-batches of the
    # samples (3 per pass here), one vector at a time, their Hessians averaged
    with xi.memory_budget_scope((seq_vector + seq_fixed) // 10 * 3 + 5):
        calls.clear()
        samples.clear()
        assert rel_err(gp.hvp(batch, v), ref_h) < 1e-12
        assert calls == [1] * 52 and samples == [3] * 39 + [1] * 13
    with xi.memory_budget_scope(1):  # below one vector of one sample: still right
        calls.clear()
        assert rel_err(gp.hvp(batch, v), ref_h) < 1e-12
        assert calls == [1] * 130


def test_jacobian_prod_of_many_vectors_through_per_sample_gradients(monkeypatch):
    """Many vectors through a CNN (weight reuse about 11 here) take per-sample
    gradients in sample chunks sized by the budget; the numbers are those of
    autograd's per-sample gradients and of the forward-mode path."""
    model = small_cnn("stride")
    x, y = data(11)
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    assert 9 < gp._weight_reuse(x) < 13
    v = torch.randn(40, gp.n_parameters, dtype=F64, generator=torch.Generator().manual_seed(5))
    ref = ref_grads(model, F.cross_entropy, x, y) @ v.T
    sizes: list[int] = []
    real = TorchGradientProvider.flat_grads

    def counting(self, b):
        sizes.append(len(b))
        return real(self, b)

    monkeypatch.setattr(TorchGradientProvider, "flat_grads", counting)
    act = activation_bytes(model, x)
    per_sample = act * torch_backend._GRAD_ACTIVATION_COPIES + 2 * gp.n_parameters * 8
    with xi.memory_budget_scope(4 * per_sample + 3):
        assert rel_err(gp.jacobian_prod(batch, v), ref) < 1e-12
    assert sizes == [4, 4, 3]
    sizes.clear()
    few = gp.jacobian_prod(batch, v[:5])  # 5 x 11 < 100: forward mode
    assert sizes == [] and rel_err(few, ref[:, :5]) < 1e-12


# -- exact Hessian products of sequential CNNs -----------------------------------------


def products_match_autodiff(model, n: int, k: int, seed: int):
    """The structured products of ``model`` on ``n`` samples against ``k``
    vectors times the autodiff Hessian; returns the provider, batch and Hessian."""
    x, y = data(n)
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    ref = ref_hessian(model, F.cross_entropy, x, y)
    v = torch.randn(k, gp.n_parameters, dtype=F64, generator=torch.Generator().manual_seed(seed))
    assert rel_err(gp.hvp(batch, v), v @ ref) < 1e-12
    assert gp._conv_structure is True  # the structured path ran
    with xi.memory_budget_scope(1):  # one sample and one vector per pass
        assert rel_err(gp.hvp(batch, v), v @ ref) < 1e-12
    return gp, batch, v, ref


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cnn_hessian_products_match_autodiff(variant):
    gp, batch, _, ref = products_match_autodiff(small_cnn(variant), 7, 5, seed=2)
    assert rel_err(gp.hessian(batch), ref) < 1e-12


# a convolution after the first (it has an input tangent and passes cotangents
# back): stride, dilation, rectangular kernels, uneven and over-wide padding
INNER_CONVS = {
    "stride2": dict(kernel_size=3, stride=2, padding=1),
    "dilated": dict(kernel_size=(3, 2), dilation=(1, 2), padding=(2, 1)),
    "wide_pad": dict(kernel_size=2, padding=2),  # padding past the kernel's reach
    "stride_uncovered": dict(kernel_size=2, stride=3),  # inputs no window reaches
}


@pytest.mark.parametrize("inner", list(INNER_CONVS))
def test_cnn_hessian_products_through_an_inner_convolution(inner, monkeypatch):
    torch.manual_seed(4)
    conv2 = nn.Conv2d(3, 4, **INNER_CONVS[inner])
    with torch.no_grad():
        out = conv2(torch.zeros(1, 3, 7, 7)).shape
    layers = [nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), conv2, nn.Tanh(), nn.Flatten()]
    model = nn.Sequential(*layers, nn.Linear(out[1] * out[2] * out[3], 5)).double().eval()
    gp, batch, v, ref = products_match_autodiff(model, 5, 3, seed=6)
    # scratch blocks of two samples: 2, 2, 1 (the last smaller than the buffers)
    monkeypatch.setattr(
        _torch_conv,
        "_blocks",
        lambda n, per, cap: [slice(i, min(n, i + 2)) for i in range(0, n, 2)],
    )
    assert rel_err(gp.hvp(batch, v), v @ ref) < 1e-12


def test_cnn_hessian_products_with_frozen_layers():
    model = small_cnn("plain")
    model[0].weight.requires_grad_(False)
    model[6].bias.requires_grad_(False)
    x, y = data(5)
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    ref = ref_hessian(model, F.cross_entropy, x, y)
    v = torch.randn(3, gp.n_parameters, dtype=F64)
    assert rel_err(gp.hvp(batch, v), v @ ref) < 1e-12
    assert gp._conv_structure is True
    sub = gp.restrict(["2.weight"])
    idx = gp.parameter_slices["2.weight"]
    w = torch.randn(2, sub.n_parameters, dtype=F64)
    assert rel_err(sub.hvp(sub.prepare_batch(Batch(x, y)), w), w @ ref[idx, idx]) < 1e-12


def test_kronecker_projection_of_conv_layers_equals_projected_gradients():
    """LoGra on Conv2d layers: sum_t outer(R_s s_nt, R_a [a_nt, 1]) from the
    factors = the map applied to the autograd per-sample gradients."""
    from xinfluence.projection import KroneckerProjection

    model = small_cnn("stride")
    x, y = data(9)
    gp = TorchGradientProvider(model, F.cross_entropy)
    layers = list(gp.kfac_layers())
    proj = KroneckerProjection(gp, layers, gp, (3, 7), seed=2)
    batch = gp.prepare_batch(Batch(x, y))
    direct = proj.project(ref_grads(model, F.cross_entropy, x, y))
    assert rel_err(proj.project_grads(gp, batch), direct) < 1e-12
    # and the influence model runs on them
    infl = xi.ProjectedInfluence(gp, k=(3, 7), projection="kronecker", regularization=1e-3)
    scores = infl.fit([(x[:4], y[:4]), (x[4:], y[4:])]).influences(x[:2], y[:2], x, y)
    assert scores.shape == (2, 9) and bool(torch.isfinite(scores).all())


def test_cnn_hessian_products_through_every_specialised_layer():
    """Sigmoid, LeakyReLU, eval Dropout, overlapping max pooling (windows share
    inputs: the transpose accumulates), Identity and Flatten take specialised
    rules, ELU the general path; the products equal the autodiff Hessian."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(3, 4, 2),
        nn.LeakyReLU(0.1),
        nn.Dropout(0.5),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.ELU(),
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    )
    model = model.double().eval()
    x, y = data(6)
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    # the rule each layer gets, on its own input and output
    names, h = [], x
    with torch.no_grad():
        for m in model:
            out = m(h)
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                names.append(type(_torch_conv._rule(m, h, out)).__name__)
            h = out
    assert names == [
        "_Pointwise",
        "_Pointwise",
        "_Reshape",
        "_MaxPool",
        "NoneType",  # ELU: the general path
        "_Reshape",
        "_Reshape",
    ]
    ref = ref_hessian(model, F.cross_entropy, x, y)
    v = torch.randn(4, gp.n_parameters, dtype=F64, generator=torch.Generator().manual_seed(3))
    assert rel_err(gp.hvp(batch, v), v @ ref) < 1e-12
    assert gp._conv_structure is True
