"""Torch provider reliability (issue 9, items 8, 9, 10, 13 and 14).

Oracles: plain ``torch.autograd`` (per-sample gradients one sample at a time,
dense Hessians with ``torch.autograd.functional.hessian``), dense solves in
float64, and the provider's general autodiff path against its ``nn.Linear``
structured path.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import xinfluence as xi  # noqa: E402
from helpers import rel_err  # noqa: E402
from torch_helpers import mlp, ref_grads, ref_hessian, single_thread  # noqa: E402, F401
from xinfluence import Batch  # noqa: E402
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402

F64 = torch.float64


# -- oracles ---------------------------------------------------------------------


def ref_influences(h, reg, g_test, g_train):
    """g_test (H + reg I)^-1 g_train^T, dense in float64: (N_test, N)."""
    h = h.numpy()
    solved = np.linalg.solve(h + reg * np.eye(h.shape[0]), g_train.numpy().T)
    return g_test.numpy() @ solved


def _xy(n=9, d=4, classes=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=F64), torch.randint(
        0, classes, (n,), generator=gen
    )


# -- 8. errors that name the real cause -------------------------------------------


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(12, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).flatten(1))


def test_token_ids_need_cast_inputs_false():
    model = _Tokens().double().eval()
    gen = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 10, (7, 3), generator=gen), torch.randint(0, 3, (7,), generator=gen)
    gp = TorchGradientProvider(model, F.cross_entropy)
    with pytest.raises(ValueError, match="cast_inputs=False") as info:
        gp.prepare_batch(Batch(ids, y))
    # the model's own exception is reported and chained
    assert "embedding" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    gp = TorchGradientProvider(model, F.cross_entropy, cast_inputs=False)
    grads = gp.flat_grads(gp.prepare_batch(Batch(ids, y)))
    assert rel_err(grads, ref_grads(model, F.cross_entropy, ids, y)) < 1e-12


def test_shape_error_reports_the_models_exception():
    gp = TorchGradientProvider(mlp().eval(), F.cross_entropy)
    x, y = _xy(d=5)
    with pytest.raises(
        ValueError, match=r"expected x of shape \(N, \.\.\., 4\).*RuntimeError.*mat1 and mat2"
    ):
        gp.prepare_batch(Batch(x, y))


def _bn_model():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_batchnorm_in_training_mode_is_refused():
    model = _bn_model()
    with pytest.warns(UserWarning, match="eval"):
        gp = TorchGradientProvider(model, F.cross_entropy)
    x, y = _xy()
    with pytest.raises(ValueError, match=r"training mode.*'1' \(BatchNorm1d\).*model\.eval\(\)"):
        gp.prepare_batch(Batch(x, y))
    model.eval()
    batch = gp.prepare_batch(Batch(x, y))
    assert rel_err(gp.flat_grads(batch), ref_grads(model, F.cross_entropy, x, y)) < 1e-12


def test_train_mode_is_checked_at_every_query():
    """Dropout switched on after the provider and a fitted model were built:
    every query refuses, instead of random derivatives or a vmap error."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3))
    model = model.double().eval()
    x, y = _xy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval mode: no warning at construction
        gp = TorchGradientProvider(model, F.cross_entropy)
    cg = xi.CgInfluence(gp, regularization=1.0, rtol=1e-10).fit((x, y))
    before = cg.influences(x[:3], y[:3], x, y)
    batch = gp.prepare_batch(Batch(x, y))
    model.train()
    v = torch.ones(2, gp.n_parameters, dtype=F64)
    calls = {
        "flat_grads": lambda: gp.flat_grads(batch),
        "hvp": lambda: gp.hvp(batch, v),
        "jacobian_prod": lambda: gp.jacobian_prod(batch, v),
        "hessian": lambda: gp.hessian(batch),
        "influences": lambda: cg.influences(x[:3], y[:3], x, y),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"'2' \(Dropout\).*model\.eval\(\)"):
            call()
        assert name
    model.eval()
    assert rel_err(cg.influences(x[:3], y[:3], x, y), before) < 1e-12


class _Tuple(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x), x.sum(1)


class _Dict(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return {"logits": self.body(x), "hidden": x}


@pytest.mark.parametrize(
    ("wrapper", "select"),
    [(_Tuple, lambda out: out[0]), (_Dict, lambda out: out["logits"])],
    ids=["tuple", "dict"],
)
def test_tuple_and_dict_outputs_with_output_fn(wrapper, select):
    body = mlp(seed=6).eval()
    model = wrapper(body).eval()
    x, y = _xy(n=11)
    with pytest.raises(TypeError, match=r"not a tensor; pass output_fn="):
        TorchGradientProvider(model, F.cross_entropy).prepare_batch(Batch(x, y))
    gp = TorchGradientProvider(model, F.cross_entropy, output_fn=select)
    batch = gp.prepare_batch(Batch(x, y))
    assert rel_err(gp.flat_grads(batch), ref_grads(body, F.cross_entropy, x, y)) < 1e-12
    h = ref_hessian(body, F.cross_entropy, x, y)
    assert rel_err(gp.hessian(batch), h) < 1e-10
    assert gp._linear_structure is True  # the structured path ran through output_fn
    g = ref_grads(body, F.cross_entropy, x, y)
    expected = ref_influences(h, 1.0, g[:4], g)
    direct = xi.DirectInfluence(gp, regularization=1.0).fit([(x[:4], y[:4]), (x[4:], y[4:])])
    assert rel_err(direct.influences(x[:4], y[:4], x, y), expected) < 1e-10
    # EK-FAC hooks the layers inside the wrapper: same numbers as on the bare body
    plain = TorchGradientProvider(body, F.cross_entropy)
    ek = xi.EkfacInfluence(gp, regularization=0.1).fit((x, y)).influences(x[:4], y[:4], x, y)
    ek_ref = xi.EkfacInfluence(plain, regularization=0.1).fit((x, y)).influences(x[:4], y[:4], x, y)
    assert rel_err(ek, ek_ref) < 1e-12


def test_output_fn_must_be_callable_and_return_a_tensor():
    with pytest.raises(TypeError, match="output_fn must be callable"):
        TorchGradientProvider(mlp(), F.cross_entropy, output_fn="logits")
    gp = TorchGradientProvider(mlp(), F.cross_entropy, output_fn=lambda out: [out])
    with pytest.raises(TypeError, match="output_fn must return a tensor, got a list"):
        gp.prepare_batch(Batch(*_xy()))


# -- 9. cast_inputs=False on the nn.Linear structured path ------------------------


class _Casting(nn.Module):
    """An MLP that casts its (integer or float32) input itself."""

    def __init__(self):
        super().__init__()
        self.body = mlp(seed=7)

    def forward(self, x):
        return self.body(x.to(torch.float64))


@pytest.mark.parametrize("x_dtype", [torch.int64, torch.float32])
def test_cast_inputs_false_structured_path(x_dtype):
    model = _Casting().eval()
    x, y = _xy(n=13)
    x = (3 * x).to(x_dtype)
    gp = TorchGradientProvider(model, F.cross_entropy, cast_inputs=False)
    batch = gp.prepare_batch(Batch(x, y))
    assert batch.x.dtype == x_dtype
    h = ref_hessian(model, F.cross_entropy, x, y)
    assert rel_err(gp.hessian(batch), h) < 1e-10
    assert gp._linear_structure is True
    v = torch.randn(3, gp.n_parameters, generator=torch.Generator().manual_seed(0), dtype=F64)
    gp.prepare_products(batch)  # structured factors for the products
    assert rel_err(gp.hvp(batch, v), v @ h) < 1e-10
    reg = float(max(0.0, -torch.linalg.eigvalsh(h)[0])) + 0.1
    g = ref_grads(model, F.cross_entropy, x, y)
    expected = ref_influences(h, reg, g[:4], g)
    for cls in (xi.DirectInfluence, xi.CgInfluence):
        kw = {"rtol": 1e-12} if cls is xi.CgInfluence else {}
        infl = cls(gp, regularization=reg, **kw).fit([(x[:5], y[:5]), (x[5:], y[5:])])
        assert rel_err(infl.influences(x[:4], y[:4], x, y), expected) < 1e-8


# -- 10. attention ------------------------------------------------------------------


class _TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def test_transformer_classifier_matches_autograd():
    model = _TinyTransformer().double().eval()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(8, 3, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (8,), generator=gen)
    gp = TorchGradientProvider(model, F.cross_entropy)
    batch = gp.prepare_batch(Batch(x, y))
    g = ref_grads(model, F.cross_entropy, x, y)
    assert rel_err(gp.flat_grads(batch), g) < 1e-10
    with sdpa_kernel(SDPBackend.MATH):  # the oracle needs the math kernel too
        h = ref_hessian(model, F.cross_entropy, x, y)
    assert rel_err(gp.hessian(batch), h) < 1e-10
    reg = float(max(0.0, -torch.linalg.eigvalsh(h)[0])) + 0.05
    expected = ref_influences(h, reg, g[:3], g)
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    direct = xi.DirectInfluence(gp, regularization=reg).fit(data)
    assert rel_err(direct.influences(x[:3], y[:3], x, y), expected) < 1e-9
    cg = xi.CgInfluence(gp, regularization=reg, rtol=1e-12).fit(data)
    assert rel_err(cg.influences(x[:3], y[:3], x, y), expected) < 1e-7
    # the caller's attention settings are restored after the queries
    assert torch.backends.cuda.flash_sdp_enabled()


class _FunctionalAttention(nn.Module):
    """Attention through F.scaled_dot_product_attention, no nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.qkv = nn.Linear(4, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        n, length = x.shape[:2]
        # (N, heads, L, head dim), as nn.MultiheadAttention calls it
        q, k, v = (t.reshape(n, length, 2, 2).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, 4)
        return self.head(out.mean(1))


def test_functional_attention_falls_back_to_the_math_kernel():
    model = _FunctionalAttention().double().eval()
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(6, 3, 4, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (6,), generator=gen)
    gp = TorchGradientProvider(model, F.cross_entropy)
    assert not gp._math_attention  # no nn.MultiheadAttention: found out at the first failure
    batch = gp.prepare_batch(Batch(x, y))
    with sdpa_kernel(SDPBackend.MATH):
        h = ref_hessian(model, F.cross_entropy, x, y)
    assert rel_err(gp.hessian(batch), h) < 1e-10
    assert gp._math_attention
    assert torch.backends.cuda.flash_sdp_enabled()


# -- 13. nn.Linear whose weight was replaced ----------------------------------------


def test_replaced_linear_weight_takes_the_general_path():
    """Layer 0 declares 5 outputs but holds a (6, 4) weight; layer 2 a (3, 6) one."""
    model = mlp(seed=10).eval()
    torch.manual_seed(11)
    model[0].weight = nn.Parameter(0.5 * torch.randn(6, 4, dtype=F64))
    model[0].bias = nn.Parameter(0.1 * torch.randn(6, dtype=F64))
    model[2].weight = nn.Parameter(0.5 * torch.randn(3, 6, dtype=F64))
    x, y = _xy(n=10)
    gp = TorchGradientProvider(model, F.cross_entropy)
    h = ref_hessian(model, F.cross_entropy, x, y)
    assert rel_err(gp.hessian(gp.prepare_batch(Batch(x, y))), h) < 1e-10
    assert not gp.kfac_layers()  # neither layer's declared shape can be trusted
    reg = float(max(0.0, -torch.linalg.eigvalsh(h)[0])) + 0.1
    g = ref_grads(model, F.cross_entropy, x, y)
    direct = xi.DirectInfluence(gp, regularization=reg).fit([(x[:3], y[:3]), (x[3:], y[3:])])
    assert rel_err(direct.influences(x[:4], y[:4], x, y), ref_influences(h, reg, g[:4], g)) < 1e-9


# -- 14. half precision ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused(dtype):
    with pytest.raises(TypeError, match=r"float32 or float64.*model\.float\(\)"):
        TorchGradientProvider(mlp().to(dtype), F.cross_entropy)
