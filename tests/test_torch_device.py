"""A torch model on a GPU: the same numbers as on the CPU, results on the GPU.

Skips where torch sees no CUDA device. ``XINFLUENCE_TORCH_DEVICE`` names the
device under test (default ``cuda``); ``cpu`` runs the same code paths on a
machine without a GPU, which checks the tests themselves, not the device.

The oracles are CPU float64 computations: ``torch.autograd.functional.hessian``
for the structured ``nn.Linear`` path, and each influence model run on a CPU
copy of the model with the same seeds (random draws come from numpy on the
host, so a seed means the same numbers on every device).
"""

from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import xinfluence as xi  # noqa: E402
from helpers import rel_err  # noqa: E402
from torch_helpers import ref_hessian  # noqa: E402
from xinfluence import Batch  # noqa: E402
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402

DEVICE = torch.device(os.environ.get("XINFLUENCE_TORCH_DEVICE", "cuda"))
F64 = torch.float64
REG = 3e-3

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
    ),
]


@pytest.fixture(scope="module")
def problem():
    """(CPU model, device model, x, y, x_test, y_test): 5-7-4-3 tanh MLP, 53 points."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(59, 5, generator=g, dtype=F64)
    y = torch.randint(0, 3, (59,), generator=g)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = F.cross_entropy(model(x[:53]), y[:53]) + 5e-4 * sum(
            (p**2).sum() for p in model.parameters()
        )
        value.backward()
        return value

    opt.step(closure)
    model.eval()
    on_device = copy.deepcopy(model).to(DEVICE)
    return model, on_device, x[:53], y[:53], x[53:], y[53:]


def batches(x, y, device, sizes=(17, 29, 7)):
    """Uneven batches of (x, y) on ``device``."""
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s].to(device), y[start : start + s].to(device)))
        start += s
    assert start == len(x)
    return out


def test_structured_hessian_and_products_on_device(problem):
    cpu_model, model, x, y, _, _ = problem
    gp = TorchGradientProvider(model, F.cross_entropy)
    assert gp.device.type == DEVICE.type
    batch = gp.prepare_batch(Batch(x[:23].to(DEVICE), y[:23].to(DEVICE)))
    ref = ref_hessian(cpu_model, F.cross_entropy, x[:23], y[:23])
    hess = gp.hessian(batch)
    assert hess.device.type == DEVICE.type and hess.dtype == F64
    assert rel_err(hess, ref) < 1e-12
    assert gp._linear_structure is True  # the nn.Linear fast path ran on the device
    # many vectors (factors computed), then one (the batch came back: cached factors)
    for k in (120, 1, 1):
        v = torch.randn(k, gp.n_parameters, generator=torch.Generator().manual_seed(k), dtype=F64)
        out = gp.hvp(batch, v.to(DEVICE))
        assert out.device.type == DEVICE.type
        assert rel_err(out, v @ ref) < 1e-12


METHODS = {
    "direct": (xi.DirectInfluence, {}),
    "direct_layers": (xi.DirectInfluence, {"block_structure": "layer"}),
    "cg_nystroem": (
        xi.CgInfluence,
        {"rtol": 1e-11, "preconditioner": "nystroem", "preconditioner_rank": 10},
    ),
    "cg_jacobi": (xi.CgInfluence, {"rtol": 1e-11, "preconditioner": "jacobi"}),
    "lissa": (xi.LissaInfluence, {"maxiter": 60, "scale": 8.0, "rtol": 0.0, "batch_size": 20}),
    "arnoldi": (xi.ArnoldiInfluence, {"rank": 12}),
    "nystroem_gn": (xi.NystroemSketchInfluence, {"rank": 12, "second_order": "empirical_fisher"}),
    "datainf": (xi.InverseHarmonicMeanInfluence, {}),
    "ekfac": (xi.EkfacInfluence, {"update_diagonal": True}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_influences_on_device_match_cpu(problem, method):
    cpu_model, model, x, y, xt, yt = problem
    cls, params = METHODS[method]

    def run(m, device):
        infl = cls(TorchGradientProvider(m, F.cross_entropy), regularization=REG, **params)
        infl.fit(batches(x, y, device))
        up = infl.influences(xt.to(device), yt.to(device), x.to(device), y.to(device))
        pert = infl.influences(xt.to(device), yt.to(device), x[:9].to(device), y[:9].to(device),
                               mode="perturbation")  # fmt: skip
        return up, pert

    ref_up, ref_pert = run(cpu_model, torch.device("cpu"))
    up, pert = run(model, DEVICE)
    for got, ref in ((up, ref_up), (pert, ref_pert)):
        assert got.device.type == DEVICE.type and got.dtype == F64
        assert got.shape == ref.shape
        # the same algorithm on two devices: equal to rounding (GPU sums run in
        # another order); CG's stopping test may end one iteration apart
        assert rel_err(got, ref) < (1e-9 if method.startswith("cg") else 1e-10)


def test_float32_model_stays_float32_on_device(problem):
    _, model, x, y, xt, yt = problem
    m32 = copy.deepcopy(model).float()
    gp = TorchGradientProvider(m32, F.cross_entropy)
    infl = xi.CgInfluence(gp, regularization=1e-2, rtol=1e-5).fit(
        [(a.float(), b) for a, b in batches(x, y, DEVICE)]
    )
    out = infl.influences(xt.float().to(DEVICE), yt.to(DEVICE), x.float().to(DEVICE), y.to(DEVICE))
    assert out.dtype == torch.float32 and out.device.type == DEVICE.type
    ref = (
        xi.DirectInfluence(TorchGradientProvider(model, F.cross_entropy), regularization=1e-2)
        .fit(batches(x, y, DEVICE))
        .influences(xt.to(DEVICE), yt.to(DEVICE), x.to(DEVICE), y.to(DEVICE))
    )
    assert rel_err(out.double(), ref) < 1e-3


def test_data_on_another_device_is_refused(problem):
    _, model, x, y, _, _ = problem
    if DEVICE.type == "cpu":
        pytest.skip("needs a device other than the CPU")
    gp = TorchGradientProvider(model, F.cross_entropy)
    with pytest.raises(ValueError, match=DEVICE.type):
        gp.prepare_batch(Batch(x, y))
