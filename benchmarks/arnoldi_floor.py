"""ArnoldiInfluence.fit time as a ratio to "the floor" (issue #12, item 2).

The floor is the time of computing every per-sample gradient once:
``flat_grads`` over all training batches. The problems are those of
``run_influence.py`` (``_problem.py``): the digits MLPs with 1,810 (``small``)
and 99,126 (``large``) parameters, float64, on the CPU.

    python benchmarks/arnoldi_floor.py [--cases small large] [--ranks 10 30 50]
        [--products] [--threads 2] [--workdir DIR]

``--products`` also prints the cost of one curvature product with K vectors
(K = 1, 10, 30, 100) in floors, which is why block Lanczos pays off. The ratios
of the same run are comparable; to compare two versions of the library run the
script once with each on the path (``PYTHONPATH=src``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["small", "large"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[10, 30, 50])
    parser.add_argument("--products", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join("benchmarks", "_work"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import _problem

    import xinfluence as xi
    from xinfluence.backends.torch import TorchGradientProvider
    from xinfluence.curvature import Dataset, make_curvature
    from xinfluence.types import Batch, iter_batches

    os.makedirs(args.workdir, exist_ok=True)
    print(f"xinfluence from {os.path.dirname(xi.__file__)}; torch threads {args.threads}")
    for case in args.cases:
        path = os.path.join(args.workdir, f"digits_{case}.npz")
        if not os.path.exists(path):
            _problem.make_problem(case, path)
        prob = _problem.load_problem(path)
        gp = TorchGradientProvider(prob.model, torch.nn.functional.cross_entropy)
        batches = [Batch(x, y) for x, y in prob.loader]

        def floor(gp=gp, batches=batches) -> float:
            start = time.perf_counter()
            for b in batches:
                gp.flat_grads(b)
            return time.perf_counter() - start

        floor()  # warm-up
        floor_s = min(floor() for _ in range(args.repeat + 1))
        print(f"\n{case}: P = {gp.n_parameters}, N = {len(prob.x_train)}, floor {floor_s:.3f} s")
        if args.products:
            data = Dataset(iter_batches(batches), gp)
            curvature = make_curvature("hessian", gp, data)
            curvature.prepare_products()
            for k in (1, 10, 30, 100):
                v = torch.randn(k, gp.n_parameters, dtype=torch.float64)
                curvature.matmat(v)
                start = time.perf_counter()
                curvature.matmat(v)
                s = time.perf_counter() - start
                print(
                    f"  product with K={k:3d}: {s / floor_s:6.2f} floors "
                    f"({s / floor_s / k:.3f} per vector)"
                )
        for rank in args.ranks:
            times, info = [], ""
            for _ in range(args.repeat):
                model = xi.ArnoldiInfluence(gp, regularization=_problem.REGULARIZATION, rank=rank)
                with warnings.catch_warnings(record=True) as record:
                    warnings.simplefilter("always")
                    start = time.perf_counter()
                    model.fit(prob.loader)
                    times.append(time.perf_counter() - start)
                op = next(iter(model._fitted_mapper().composable_block_dict.values())).op
                eig = getattr(op, "eigen_result", None)
                info = (
                    ""
                    if eig is None or eig.krylov_dimension is None
                    else f"(Krylov dimension {eig.krylov_dimension}, {eig.matmat_calls} products)"
                )
                if record:
                    info += f" [{len(record)} warning(s): {str(record[0].message)[:80]}]"
            fit_s = min(times)
            ratio = fit_s / floor_s
            print(f"  Arnoldi rank {rank:3d}: fit {fit_s:.3f} s = {ratio:6.2f} floors {info}")
    print()


if __name__ == "__main__":
    main()
