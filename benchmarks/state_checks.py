"""Cost of the per-query state checks (stale parameters, non-finite losses)
relative to one query, on the ~99k-parameter MLP of ``_problem.py``.

Every public query of a fitted model compares the provider's parameter
version with the one recorded at fit (torch: the tensors' version counters,
then a checksum of the values: a float64 sum and norm per tensor, for updates
through ``p.data``) and checks the per-sample losses of its batches for NaN or inf (one forward
pass per batch). Run: ``python benchmarks/state_checks.py``.
"""

from __future__ import annotations

import time

import torch
from _problem import CASES, build_model, n_parameters

import xinfluence as xi
from xinfluence.backends.torch import TorchGradientProvider


def best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(n_test: int = 50, n_train: int = 250) -> None:
    torch.manual_seed(0)
    model = build_model(CASES["large"]).eval()
    x = torch.rand(n_train, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (n_train,))
    gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
    infl = xi.EkfacInfluence(gp, regularization=1e-2).fit((x, y))
    xt, yt = x[:n_test], y[:n_test]
    infl.influences(xt, yt, x, y)  # warm up

    query = best_of(lambda: infl.influences(xt, yt, x, y))
    version = best_of(lambda: infl._check_fresh(), repeat=50)
    test_batch = gp.prepare_batch(xi.Batch(xt, yt))
    train_batch = gp.prepare_batch(xi.Batch(x, y))

    def losses():
        infl._check_losses(test_batch, "test")
        infl._check_losses(train_batch, "train")

    loss_check = best_of(losses)
    print(f"model: {n_parameters(model)} parameters; query: EK-FAC influences {n_test} x {n_train}")
    print(f"query                   {query * 1e3:9.3f} ms")
    print(f"stale check             {version * 1e3:9.4f} ms  ({version / query:.2e} of a query)")
    ratio = loss_check / query
    print(f"loss check (2 batches)  {loss_check * 1e3:9.3f} ms  ({ratio:.2e} of a query)")


def large(hidden=(1024, 960), n_train: int = 100, n_test: int = 5) -> None:
    """The stale check on a ~1M-parameter MLP, against a small EK-FAC query."""
    torch.manual_seed(0)
    model = build_model(hidden).eval()
    x = torch.rand(n_train, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (n_train,))
    gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
    infl = xi.EkfacInfluence(gp, regularization=1e-2).fit((x, y))
    xt, yt = x[:n_test], y[:n_test]
    infl.influences(xt, yt, x, y)
    query = best_of(lambda: infl.influences(xt, yt, x, y), repeat=3)
    version = best_of(lambda: gp.parameter_version(), repeat=50)
    checksum = best_of(lambda: gp.parameter_checksum(), repeat=50)
    check = best_of(lambda: infl._check_fresh(), repeat=50)
    print(f"model: {n_parameters(model)} parameters; query: EK-FAC influences {n_test} x {n_train}")
    print(f"query                   {query * 1e3:9.3f} ms")
    for name, t in (("versions", version), ("checksum", checksum), ("stale check", check)):
        print(f"{name:23s} {t * 1e3:9.4f} ms  ({t / query:.2e} of a query)")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    large()
