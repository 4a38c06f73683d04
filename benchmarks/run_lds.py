"""Linear datamodeling score (LDS) of every influence model on the digits MLP.

    python benchmarks/run_lds.py                       # 40 subsets, 20 test points
    python benchmarks/run_lds.py --subsets 10 --test 5 # quick
    python benchmarks/run_lds.py --methods projected --k 64   # ProjectedInfluence: every
                                       # curvature and damping at k = 64, with references

The problem is benchmarks/_problem.py's ``small`` case (64-24-10 tanh MLP,
1,810 parameters, 1,000 training points of scikit-learn's digits, float64,
trained with L-BFGS on the mean cross-entropy plus ``WEIGHT_DECAY / 2 |theta|^2``).

Ground truth (:func:`xinfluence.evaluate.lds`): ``--subsets`` random halves of
the training set (seeded); on each, the model is retrained by full-batch
L-BFGS on ``(1/n) sum_{i in S} l_i + WEIGHT_DECAY / 2 |theta|^2`` (the ``1/n`` of
the full set kept, as the influence convention assumes), warm-started from the
trained weights (so that every retraining lands in the basin the influence
functions linearise); the test losses of the first ``--test`` test points are
compared, by Spearman correlation across subsets, with the summed scores of
the left-out points. All methods are scored against the same retrainings.

Every method uses ``regularization = REGULARIZATION`` (1e-2) of _problem.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import _problem  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import xinfluence as xi  # noqa: E402
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402
from xinfluence.evaluate import lds  # noqa: E402

REG = _problem.REGULARIZATION


def methods():
    """name -> (class, options). Second order: the Hessian where the method allows,
    else the empirical Fisher (EF)."""
    ef = dict(second_order="empirical_fisher")
    return {
        "Direct (Hessian)": (xi.DirectInfluence, {}),
        "Direct (EF)": (xi.DirectInfluence, ef),
        "CG (Hessian, rtol 1e-8)": (xi.CgInfluence, dict(rtol=1e-8)),
        "LiSSA (Hessian, 1000 it.)": (xi.LissaInfluence, dict(maxiter=1000, rtol=1e-8)),
        "Arnoldi (Hessian, rank 50)": (xi.ArnoldiInfluence, dict(rank=50)),
        "Nyström (EF, rank 50)": (xi.NystroemSketchInfluence, dict(rank=50, **ef)),
        "DataInf (EF)": (xi.InverseHarmonicMeanInfluence, ef),
        "EK-FAC (EF)": (xi.EkfacInfluence, {}),
        "Identity (gradient similarity)": (xi.IdentityInfluence, {}),
        "Projected (EF, dense k=256)": (xi.ProjectedInfluence, dict(k=256)),
        "Projected (EF, Kronecker k=256/layer)": (
            xi.ProjectedInfluence,
            dict(k=256, projection="kronecker"),
        ),
    }


def projected_methods(k, p):
    """ProjectedInfluence at ``k`` (dense) for every curvature and both damping spaces,
    with Direct (Hessian, EF) and gradient similarity as references; and the
    ``λ RRᵀ`` damping at ``λ k / P``, which ``λ I_k`` approximates (``E[RRᵀ] = P/k I``)."""
    out = {
        "Direct (Hessian)": (xi.DirectInfluence, {}),
        "Direct (EF)": (xi.DirectInfluence, dict(second_order="empirical_fisher")),
        "Identity (gradient similarity)": (xi.IdentityInfluence, {}),
    }
    for second_order, label in (
        ("empirical_fisher", "EF"),
        ("gauss_newton", "GGN"),
        ("hessian", "Hessian"),
    ):
        for space in ("parameter", "projected"):
            damping = "λ RRᵀ" if space == "parameter" else "λ I_k"
            out[f"Projected ({label}, dense k={k}, {damping})"] = (
                xi.ProjectedInfluence,
                dict(k=k, second_order=second_order, regularization_space=space),
            )
        out[f"Projected ({label}, dense k={k}, λ k/P RRᵀ)"] = (
            xi.ProjectedInfluence,
            dict(k=k, second_order=second_order, regularization=REG * k / p),
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--subsets", type=int, default=40)
    ap.add_argument("--test", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model)")
    ap.add_argument(
        "--methods",
        choices=["all", "projected"],
        default="all",
        help="all: every model; projected: ProjectedInfluence per curvature and damping",
    )
    ap.add_argument("--k", type=int, default=64, help="k of --methods projected")
    ap.add_argument("--output", default=None, help="default results/lds.md (lds_projected.md)")
    args = ap.parse_args()
    if args.output is None:
        name = "lds.md" if args.methods == "all" else "lds_projected.md"
        args.output = str(HERE / "results" / name)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "small.npz")
        summary = _problem.make_problem("small", path)
        prob = _problem.load_problem(path)
    print("problem:", summary)
    model = prob.model
    n = len(prob.x_train)
    trained = [p.detach().clone() for p in model.parameters()]
    x_test, y_test = prob.x_test[: args.test], prob.y_test[: args.test]

    calls = []

    def retrain(indices):
        calls.append(time.perf_counter())
        print(f"retraining {len(calls)} / {args.subsets}", flush=True)
        net = _problem.build_model(_problem.CASES["small"])
        with torch.no_grad():
            for p, q in zip(net.parameters(), trained):
                p.copy_(q)
        xs, ys = prob.x_train[indices], prob.y_train[indices]
        opt = torch.optim.LBFGS(
            net.parameters(),
            lr=1.0,
            max_iter=500,
            history_size=20,
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xs), ys, reduction="sum") / n
            loss = loss + 0.5 * _problem.WEIGHT_DECAY * sum((p * p).sum() for p in net.parameters())
            loss.backward()
            return loss

        opt.step(closure)
        return net.eval()

    def test_loss(net, xt, yt):
        with torch.no_grad():
            return nn.functional.cross_entropy(net(xt), yt, reduction="none")

    gp = TorchGradientProvider(model, nn.functional.cross_entropy)
    scores, seconds = {}, {}
    p = sum(q.numel() for q in model.parameters())
    chosen = methods() if args.methods == "all" else projected_methods(args.k, p)
    for name, (cls, options) in chosen.items():
        start = time.perf_counter()
        options = {"regularization": REG, **options}
        infl = cls(gp, **options).fit(prob.loader)
        scores[name] = infl.influences(x_test, y_test, prob.x_train, prob.y_train)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: scores in {seconds[name]:.2f} s", flush=True)

    start = time.perf_counter()
    results = lds(
        retrain,
        test_loss,
        x_test,
        y_test,
        scores,
        n_subsets=args.subsets,
        fraction=args.fraction,
        seed=args.seed,
    )
    retrain_s = time.perf_counter() - start
    lines = [
        f"LDS on the digits MLP (64-24-10, 1,810 parameters, n = {n}): {args.subsets} random "
        f"subsets of {args.fraction:.0%} of the training points (seed {args.seed}), "
        f"{args.test} test points, warm-started L-BFGS retraining ({retrain_s:.0f} s for all "
        f"retrainings); regularization {REG:g}. LDS = mean over test points of the Spearman "
        "correlation across subsets; ± is the standard error over test points.",
        "",
        "| method | LDS | ± | mean Pearson | fit + scores (s) |",
        "|---|---|---|---|---|",
    ]
    raw = {}
    for name, res in results.items():
        sp = res.spearman[np.isfinite(res.spearman)]
        se = float(np.std(sp, ddof=1) / np.sqrt(len(sp))) if len(sp) > 1 else float("nan")
        lines.append(
            f"| {name} | {res.lds:.3f} | {se:.3f} | {res.summary()['mean_pearson']:.3f} | "
            f"{seconds[name]:.2f} |"
        )
        raw[name] = dict(lds=res.lds, se=se, spearman=res.spearman.tolist(), seconds=seconds[name])
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(dict(problem=summary, results=raw), indent=1))


if __name__ == "__main__":
    main()
