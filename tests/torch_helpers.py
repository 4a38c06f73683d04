"""Shared torch references of the torch-specific tests (plain ``torch.autograd``,
never the provider's code paths).

Import in a torch test module after ``torch = pytest.importorskip("torch")``;
importing ``single_thread`` makes that module's tests run on one thread.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from torch.func import functional_call  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP
    spinning makes them slower by orders of magnitude; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _names(model, names):
    if names is None:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    return list(names)


def flat_loss(model, loss, x, y, names=None, *, output_fn=None):
    """``(mean_loss, theta)``: ``loss(model(x), y)`` as a function of the flat vector
    ``theta`` of the parameters ``names`` (default: those that require grad, in
    ``named_parameters`` order), and that vector's current value."""
    names = _names(model, names)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [math.prod(s) for s in shapes]

    def mean_loss(t):
        parts = t.split(sizes)
        override = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        out = functional_call(model, override, (x,))
        return loss(out if output_fn is None else output_fn(out), y)

    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    return mean_loss, theta


def ref_grads(model, loss, x, y, names=None, *, output_fn=None):
    """Per-sample gradients, one sample at a time: ``(N, P)``."""
    rows = []
    for i in range(x.shape[0]):
        f, theta = flat_loss(model, loss, x[i : i + 1], y[i : i + 1], names, output_fn=output_fn)
        theta = theta.clone().requires_grad_(True)
        rows.append(torch.autograd.grad(f(theta), theta)[0])
    return torch.stack(rows)


def ref_hessian(model, loss, x, y, names=None, *, output_fn=None):
    """Hessian of the batch's mean loss by ``torch.autograd.functional.hessian``: ``(P, P)``."""
    f, theta = flat_loss(model, loss, x, y, names, output_fn=output_fn)
    return torch.autograd.functional.hessian(f, theta)


def mlp(n_in=4, hidden=5, n_out=3, seed=0):
    """``Linear -> Tanh -> Linear`` in float64, initialised after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_out)
    ).double()
