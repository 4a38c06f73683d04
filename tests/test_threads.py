"""Concurrent queries give the numbers of serial ones (issue 9, item 1).

Oracle: the same fit and query run serially. Several threads (started together
by a barrier, each repeating its work) query influence models that share a
provider, wrap one model through separate providers, or share one fitted
model; every thread's result must equal the serial one to 1e-12.

The generic tests run on the backend under test (``XINFLUENCE_BACKEND``): the
analytic softmax-regression provider on numpy, array-api-strict and cupy, a
tanh MLP through ``TorchGradientProvider`` on torch and through
``JaxGradientProvider`` on jax. The torch-specific tests (separate modules,
whose forward-mode products share torch's global forward-AD levels) run
wherever torch is installed.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import xinfluence as xi
from helpers import rel_err

N_THREADS = 3
REPEATS = 2
N_TRAIN, N_TEST, D, C, H = 30, 5, 4, 3, 6
SIZES = (11, 19)  # uneven training batches
REG = 0.5  # the MLPs are untrained: their Hessians are indefinite


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N_TRAIN + N_TEST, D))
    y = rng.integers(0, C, size=N_TRAIN + N_TEST)
    w1, b1 = rng.normal(size=(H, D)) / 2, 0.1 * rng.normal(size=H)
    w2, b2 = rng.normal(size=(C, H)) / 2, 0.1 * rng.normal(size=C)
    return dict(x=x, y=y, w1=w1, b1=b1, w2=w2, b2=b2)


def _torch_setup(
    d: dict[str, np.ndarray], device: Any = None
) -> tuple[Callable[[], Any], Callable[..., Any], Any]:
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from torch import nn

    from xinfluence.backends.torch import TorchGradientProvider

    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C)).double().to(device)
    with torch.no_grad():
        for p, v in zip(model.parameters(), (d["w1"], d["b1"], d["w2"], d["b2"]), strict=True):
            p.copy_(torch.from_numpy(v))

    def convert(a: np.ndarray) -> Any:
        return torch.from_numpy(a).to(device)

    return lambda: TorchGradientProvider(model, F.cross_entropy), convert, model


def _problem(
    backend_name: str, to_xp: Callable[..., Any], device: Any = None
) -> tuple[Callable[[], Any], dict]:
    """A factory of providers over one shared model, and the converted data."""
    d = _data()
    if backend_name == "torch":
        make, convert, _ = _torch_setup(d, device)
    elif backend_name == "jax":
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp

        from xinfluence.backends.jax import JaxGradientProvider

        params = {
            "h": {"kernel": to_xp(d["w1"].T.copy()), "bias": to_xp(d["b1"])},
            "out": {"kernel": to_xp(d["w2"].T.copy()), "bias": to_xp(d["b2"])},
        }

        def mlp(p: Any, x: Any) -> Any:
            h = jnp.tanh(x @ p["h"]["kernel"] + p["h"]["bias"])
            return h @ p["out"]["kernel"] + p["out"]["bias"]

        def cross_entropy(logits: Any, labels: Any) -> Any:
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

        def make() -> Any:
            return JaxGradientProvider(mlp, params, cross_entropy)

        convert = to_xp
    else:
        from xinfluence.backends.numpy import SoftmaxRegressionGradients

        w, b = to_xp(d["w2"][:, :D]), to_xp(d["b2"])

        def make() -> Any:
            return SoftmaxRegressionGradients(w, b)

        convert = to_xp
    x, y = convert(d["x"]), convert(d["y"])
    cut = (0, SIZES[0], N_TRAIN)
    train = [(x[lo:hi, ...], y[lo:hi]) for lo, hi in zip(cut[:-1], cut[1:], strict=True)]
    data = dict(train=train, x=x[:N_TRAIN, ...], y=y[:N_TRAIN], xt=x[N_TRAIN:, ...], yt=y[N_TRAIN:])
    return make, data


@pytest.fixture(scope="module")
def problem(backend_name, xp, device):
    """Provider factory, one shared provider (compiled once on jax) and the data."""
    from xinfluence._xp import from_numpy

    def to_xp(a: np.ndarray) -> Any:
        dtype = xp.int64 if a.dtype.kind in "iu" else xp.float64
        return from_numpy(a, dtype=dtype, device=device, xp=xp)

    make, data = _problem(backend_name, to_xp, device)
    return make, make(), data


MODELS: dict[str, Callable[[Any], Any]] = {
    "direct": lambda gp: xi.DirectInfluence(gp, regularization=REG),
    "cg": lambda gp: xi.CgInfluence(gp, regularization=REG, rtol=1e-10),
    "arnoldi": lambda gp: xi.ArnoldiInfluence(gp, regularization=REG, rank=6),
    "ekfac": lambda gp: xi.EkfacInfluence(gp, regularization=REG),
}


def _query(model: Any, data: dict, perturbation: bool = False) -> list[Any]:
    out = [model.influences(data["xt"], data["yt"], data["x"], data["y"], mode="up")]
    if perturbation:  # forward-mode mixed derivatives on torch
        out.append(
            model.influences(data["xt"], data["yt"], data["xt"], data["yt"], mode="perturbation")
        )
    return out


def _concurrently(work: Callable[[int], list[Any]], n_threads: int = N_THREADS) -> list[list[Any]]:
    """Each thread's results of ``work(i)``, ``REPEATS`` times, all threads started
    together; an exception in a thread is raised here."""
    barrier = threading.Barrier(n_threads)

    def run(i: int) -> list[Any]:
        barrier.wait()
        out: list[Any] = []
        for _ in range(REPEATS):
            out.extend(work(i))
        return out

    with ThreadPoolExecutor(n_threads) as pool:
        futures = [pool.submit(run, i) for i in range(n_threads)]
        return [f.result() for f in futures]


def _assert_all_equal(results: list[list[Any]], expected: list[Any]) -> None:
    for thread, res in enumerate(results):
        assert len(res) == REPEATS * len(expected)
        for j, r in enumerate(res):
            err = rel_err(r, expected[j % len(expected)])
            assert err <= 1e-12, f"thread {thread}, result {j}: relative error {err:.3g}"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("sharing", ["shared_provider", "separate_providers", "shared_fitted"])
def test_concurrent_queries_equal_serial(problem, backend_name, name, sharing):
    make, gp, data = problem
    if name == "ekfac" and not gp.kfac_layers():
        pytest.skip("this provider declares no dense layers for EK-FAC")
    if backend_name == "jax" and sharing == "separate_providers" and name != "direct":
        # each jax provider compiles its own functions (the solvers' shapes take
        # long); Direct covers separate providers
        pytest.skip("jax: separate providers compile anew; covered by direct")
    pert = sharing == "shared_fitted"
    expected = _query(MODELS[name](gp).fit(data["train"]), data, pert)
    if sharing == "shared_fitted":
        fitted = MODELS[name](gp).fit(data["train"])
        results = _concurrently(lambda i: _query(fitted, data, pert))
    elif sharing == "shared_provider":
        results = _concurrently(lambda i: _query(MODELS[name](gp).fit(data["train"]), data))
    else:
        # jax: two threads, as each new provider compiles its functions
        results = _concurrently(
            lambda i: _query(MODELS[name](make()).fit(data["train"]), data),
            2 if backend_name == "jax" else N_THREADS,
        )
    _assert_all_equal(results, expected)


# -- torch-specific ------------------------------------------------------------


def test_torch_separate_modules_forward_mode():
    """Providers on separate modules (deep copies) in parallel: torch's forward-AD
    levels are global, so concurrent ``jvp`` calls break each other unless the
    provider serialises them."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from xinfluence import Batch
    from xinfluence.backends.torch import TorchGradientProvider

    d = _data()
    _, _, model = _torch_setup(d)
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    p = sum(t.numel() for t in model.parameters())
    v = torch.from_numpy(np.random.default_rng(1).normal(size=(3, p)))

    def derivatives(gp: Any) -> list[Any]:
        b = gp.prepare_batch(Batch(x, y))
        return [gp.jacobian_prod(b, v), gp.flat_mixed_grads(b), gp.hessian(b)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: OpenMP threads would only spin
    try:
        expected = derivatives(TorchGradientProvider(model, F.cross_entropy))
        providers = [
            TorchGradientProvider(copy.deepcopy(model), F.cross_entropy) for _ in range(N_THREADS)
        ]
        results = _concurrently(lambda i: derivatives(providers[i]))
    finally:
        torch.set_num_threads(threads)
    _assert_all_equal(results, expected)
