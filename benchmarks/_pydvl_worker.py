"""Run pyDVL 0.10's influence models on a saved benchmark problem.

Runs in pyDVL's own virtual environment (numpy < 2), started by
``run_influence.py`` as a long-lived subprocess::

    python _pydvl_worker.py --problem p.npz --outdir DIR [--threads 2 ...]

It reads one JSON request per line on stdin (``{"id", "method", "params",
"n_test", "seed", "phase"}``), runs it and answers with one line
``RESULT {json}`` on stdout (timings, counters, warnings, or the error);
progress goes to stderr. ``phase`` is ``"warmup"`` (an untimed run on a
reduced workload: one batch of 250, 4 test and 20 training points) or
``"run"`` (one timed run on the full workload: ``fit`` on the DataLoader, then
``influences`` of the test points against the training points, mode up; the
matrix goes to ``DIR/<id>.npy``). Keeping one process alive lets the
orchestrator alternate xinfluence and pyDVL run by run, so that both see the
same machine load, without paying pyDVL's import for every run.

Conventions checked against pyDVL 0.10's source and numerically (Direct
agrees with xinfluence to 1e-14): ``influences(..., mode=Up)`` is
``<(H + lambda I)^-1 grad l(z_test), grad l(z)>`` with ``H`` the Hessian of the
mean training loss and no minus sign, as in xinfluence, so nothing is flipped
or rescaled.

``torch.set_default_dtype(torch.float64)``: pyDVL's EK-FAC allocates its
Kronecker-factor accumulators with the default dtype (``torch.zeros((sA,
sA))``), so with the float32 default a float64 model would get float32 factors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _problem  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Counters:
    """Counts curvature products (full passes over the data, and the vectors they
    carry) through pyDVL's averaging operators, and CG operator applications."""

    products = 0
    vectors = 0
    cg_applications = 0

    @classmethod
    def reset(cls) -> None:
        cls.products = cls.vectors = cls.cg_applications = 0

    @classmethod
    def install(cls) -> None:
        from pydvl.influence.torch.operator import CgOperator, _AveragingBatchOperator

        averaging = _AveragingBatchOperator._apply_to_vec
        cg_apply = CgOperator._reg_operator_apply

        def counted_averaging(self, vec):
            cls.products += 1
            cls.vectors += 1 if vec.ndim == 1 else int(vec.shape[0])
            return averaging(self, vec)

        def counted_cg(self, x):
            cls.cg_applications += 1
            return cg_apply(self, x)

        _AveragingBatchOperator._apply_to_vec = counted_averaging
        CgOperator._reg_operator_apply = counted_cg


def make_model(method: str, params: dict, model: torch.nn.Module, reg: float):
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        CgInfluence,
        DirectInfluence,
        EkfacInfluence,
        InverseHarmonicMeanInfluence,
        LissaInfluence,
        NystroemSketchInfluence,
    )
    from pydvl.influence.torch.preconditioner import (
        JacobiPreconditioner,
        NystroemPreconditioner,
    )
    from pydvl.influence.torch.util import SecondOrderMode

    loss = torch.nn.functional.cross_entropy
    params = dict(params)
    if "second_order_mode" in params:
        params["second_order_mode"] = {
            "hessian": SecondOrderMode.HESSIAN,
            "gauss_newton": SecondOrderMode.GAUSS_NEWTON,
        }[params["second_order_mode"]]
    if method == "direct":
        return DirectInfluence(model, loss, regularization=reg, **params)
    if method == "cg":
        pre = params.pop("preconditioner", None)
        pre_rank = params.pop("preconditioner_rank", 20)
        if pre == "nystroem":
            params["preconditioner"] = NystroemPreconditioner(rank=pre_rank)
        elif pre == "jacobi":
            params["preconditioner"] = JacobiPreconditioner(
                num_samples_estimator=params.pop("jacobi_samples", 10)
            )
        return CgInfluence(model, loss, regularization=reg, **params)
    if method == "lissa":
        return LissaInfluence(model, loss, regularization=reg, **params)
    if method == "arnoldi":
        return ArnoldiInfluence(model, loss, regularization=reg, **params)
    if method == "nystroem":
        return NystroemSketchInfluence(model, loss, regularization=reg, **params)
    if method == "datainf":
        return InverseHarmonicMeanInfluence(model, loss, regularization=reg, **params)
    if method == "ekfac":
        return EkfacInfluence(model, hessian_regularization=reg, **params)
    raise ValueError(f"unknown method {method!r}")


def _counter_info(method: str) -> str:
    parts = []
    if method == "cg" and Counters.cg_applications:
        parts.append(f"{Counters.cg_applications} CG op. appl.")
    if Counters.products:
        parts.append(f"{Counters.products} curv. products ({Counters.vectors} vectors)")
    return ", ".join(parts)


def run_spec(spec: dict, prob: _problem.Problem, args) -> dict:
    """One phase of one spec: ``"warmup"`` (reduced workload, untimed) or ``"run"``
    (the full workload, timed; the matrix goes to ``<outdir>/<id>.npy``)."""
    method, params = spec["method"], spec.get("params", {})
    seed = int(spec.get("seed", 0))
    n_test = int(spec.get("n_test", len(prob.x_test)))
    x_test, y_test = prob.x_test[:n_test], prob.y_test[:n_test]

    def once(loader, xt, yt, x, y):
        torch.manual_seed(seed)  # pyDVL draws its random sketches from torch's global RNG
        model = make_model(method, params, prob.model, args.regularization)
        Counters.reset()
        _problem.synchronize(args.device)
        start = time.perf_counter()
        model = model.fit(loader)
        _problem.synchronize(args.device)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        values = model.influences(xt, yt, x, y)
        _problem.synchronize(args.device)
        infl_s = time.perf_counter() - start
        return values.detach().cpu().numpy(), fit_s, infl_s

    if spec.get("phase") == "warmup":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            once(
                _problem.warmup_loader(prob),
                x_test[:4],
                y_test[:4],
                prob.x_train[:20],
                prob.y_train[:20],
            )
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values, fit_s, infl_s = once(prob.loader, x_test, y_test, prob.x_train, prob.y_train)
    np.save(Path(args.outdir) / f"{spec['id']}.npy", values)
    return {
        "times": [(fit_s, infl_s)],
        "info": _counter_info(method),
        "warnings": sorted({str(w.message).splitlines()[0][:200] for w in caught}),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", required=True)
    ap.add_argument("--outdir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--regularization", type=float, default=_problem.REGULARIZATION)
    ap.add_argument("--device", default="cpu", help="torch device of model and data")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    logging.disable(logging.WARNING)  # pyDVL logs every fit at INFO
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import pydvl

    Counters.install()
    prob = _problem.load_problem(args.problem, args.device)
    hello = {
        "pydvl": pydvl.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "device": str(next(prob.model.parameters()).device),
    }
    print("READY " + json.dumps(hello), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        spec = json.loads(line)
        try:
            reply = run_spec(spec, prob, args)
        except Exception as exc:  # report, keep serving
            traceback.print_exc(file=sys.stderr)
            reply = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        reply["id"] = spec["id"]
        print("RESULT " + json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
