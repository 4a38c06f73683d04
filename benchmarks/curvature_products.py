"""Cost of one curvature product per batch: Gauss-Newton against Hessian.

On the benchmark network of ``_problem.py`` (``small``: the 64-24-10 digits MLP,
1,810 parameters, batches of 250), times ``ggn_matmat`` (second_order
"gauss_newton") and ``hvp`` (the Hessian; the torch provider takes its nn.Linear
structured path there, with the batch's layer factors kept as for CG and
Lanczos) and the general autodiff Hessian product for ``K`` vectors at once,
and, as the alternative not taken, Gauss-Newton products from kept per-sample
output Jacobians; prints the ratios to ``hvp`` measured in the same run.

    python benchmarks/curvature_products.py [--case small] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from _problem import CASES, load_problem, make_problem  # noqa: E402

from xinfluence import Batch  # noqa: E402
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (and the structured factors' first computation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="small", choices=sorted(CASES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vectors", default="1,10,100")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "problem.npz")
        make_problem(args.case, path)
        prob = load_problem(path)
    gp = TorchGradientProvider(prob.model, torch.nn.functional.cross_entropy)
    x, y = next(iter(prob.loader))
    batch = gp.prepare_batch(Batch(x, y))
    gp.prepare_products(batch)  # what CG and Lanczos announce: keep the layer factors
    print(
        f"case {args.case}: P = {gp.n_parameters}, batch of {len(batch)}, torch threads "
        f"{torch.get_num_threads()}"
    )
    # The alternative the provider does not take: per-sample output Jacobians
    # J (n M, P) and loss Hessians H (n, M, M) kept for the batch, each product
    # then two matrix products with J.
    parts = list(gp._ggn_jacobians(batch))
    jac = torch.cat([j for j, _ in parts]).reshape(-1, gp.n_parameters)
    hess = torch.cat([h for _, h in parts])
    n, m = hess.shape[0], hess.shape[1]

    def kept_product(v: torch.Tensor) -> torch.Tensor:
        u = (v @ jac.T).reshape(v.shape[0], n, m).permute(1, 2, 0)
        return (torch.bmm(hess, u).reshape(n * m, -1).T @ jac) / n

    v0 = torch.randn(3, gp.n_parameters, dtype=gp.dtype)
    err = (kept_product(v0) - gp.ggn_matmat(batch, v0)).abs().max()
    print(f"kept-Jacobian product vs ggn_matmat: max abs difference {float(err):.1e}")
    print(
        f"{'K':>5} {'hvp (ms)':>10} {'general hvp':>12} {'ggn autodiff':>13} "
        f"{'ggn kept J':>11}   ratios to hvp"
    )
    gen = torch.Generator().manual_seed(0)
    for k in (int(s) for s in args.vectors.split(",")):
        v = torch.randn(k, gp.n_parameters, generator=gen, dtype=gp.dtype)
        t_h = best_of(lambda v=v: gp.hvp(batch, v), args.repeats)
        t_g = best_of(lambda v=v: gp._hvp(batch, v), args.repeats)

        t_a = best_of(lambda v=v: gp.ggn_matmat(batch, v), args.repeats)
        t_n = best_of(lambda v=v: kept_product(v), args.repeats)
        print(
            f"{k:>5} {1e3 * t_h:>10.2f} {1e3 * t_g:>12.2f} {1e3 * t_a:>13.2f} {1e3 * t_n:>11.2f}"
            f"   general {t_g / t_h:.2f}, ggn autodiff {t_a / t_h:.2f}, ggn kept {t_n / t_h:.2f}"
        )


if __name__ == "__main__":
    main()
