"""Scale benchmark: peak memory and time of the calculators (not tests).

On the 99,126-parameter benchmark network (``_problem.py``, case ``large``)
with ``CgInfluence`` fitted on its 1,000 training points, influences of
``--test`` test points on ``N`` query points (digits resampled with noise, so
``N`` can exceed the data set), every configuration in a fresh process whose
peak RSS (``getrusage``) is read at its end:

* ``sequential``: ``SequentialInfluenceCalculator(...).to_zarr`` at each
  ``--train`` size (the issue: 10,000 and 50,000 with 500 test points; flat
  and below 2 GiB expected);
* ``throughput``: the sequential calculator's ``compute()`` against the
  unchunked in-memory ``influences`` (budget raised so that it does not chunk)
  at ``--throughput-train`` points where both fit;
* ``pydvl``: pyDVL 0.10's ``SequentialInfluenceCalculator`` (to zarr, block CG)
  on the same problem in its own environment (``benchmarks/.envs/pydvl``, see
  ``run_influence.py``), up to ``--pydvl-max-train`` points (it solves for the
  test factors again in every block), unless ``--skip-pydvl``;
* ``dask``: ``DaskInfluenceCalculator`` on a ``LocalCluster`` of 1 and 2
  worker processes (time; the workers' memory is theirs).

    python benchmarks/run_scale.py [--quick] [--train 10000,50000] [--test 500]

Unknown options (those of ``run_influence.py``, passed by ``nox -s bench``)
are ignored. Results go to ``benchmarks/results/scale.md`` and ``scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CG_RTOL = 1e-6
NOISE = 0.05


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- data ------------------------------------------------------------------------
def make_data(path: str, n_train: int, n_test: int, seed: int = 1) -> None:
    """Query points: digits (pixels / 16) resampled with replacement plus noise."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    rng = np.random.default_rng(seed)

    def draw(n: int) -> tuple:
        idx = rng.integers(0, len(x), size=n)
        return x[idx] + NOISE * rng.standard_normal((n, x.shape[1])), y[idx]

    xt, yt = draw(n_test)
    xq, yq = draw(n_train)
    np.savez(path, x_test=xt, y_test=yt, x_query=xq, y_query=yq)


# -- children ------------------------------------------------------------------------
def child(spec: dict) -> dict:
    """One configuration in this (fresh) process; returns timings and peak RSS."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import _problem

    torch.set_num_threads(spec["threads"])
    prob = _problem.load_problem(spec["problem"])
    with np.load(spec["data"]) as f:
        xt = torch.from_numpy(f["x_test"][: spec["n_test"]])
        yt = torch.from_numpy(f["y_test"][: spec["n_test"]])
        xq = torch.from_numpy(f["x_query"][: spec["n_train"]])
        yq = torch.from_numpy(f["y_query"][: spec["n_train"]])
    from torch.utils.data import DataLoader, TensorDataset

    test_loader = DataLoader(TensorDataset(xt, yt), batch_size=100)
    train_loader = DataLoader(TensorDataset(xq, yq), batch_size=250)
    out: dict = {"rss_start_mib": _peak_rss_mib()}
    kind = spec["kind"]
    if kind == "pydvl":
        from pydvl.influence import InfluenceMode
        from pydvl.influence import SequentialInfluenceCalculator as PydvlSequential
        from pydvl.influence.torch import CgInfluence
        from pydvl.influence.torch.util import TorchNumpyConverter

        start = time.perf_counter()
        # pyDVL's fastest CG, its block CG; it squares rtol and atol (see
        # run_influence.py), so it gets their square roots: the same stopping rule
        model = CgInfluence(
            prob.model,
            torch.nn.functional.cross_entropy,
            regularization=_problem.REGULARIZATION,
            rtol=CG_RTOL**0.5,
            atol=1e-15,
            solve_simultaneously=True,
        ).fit(prob.loader)
        out["fit_s"] = time.perf_counter() - start
        start = time.perf_counter()
        lazy = PydvlSequential(model).influences(test_loader, train_loader, mode=InfluenceMode.Up)
        with tempfile.TemporaryDirectory() as tmp:
            lazy.to_zarr(str(Path(tmp) / "z"), TorchNumpyConverter())
        out["query_s"] = time.perf_counter() - start
        out["peak_rss_mib"] = _peak_rss_mib()
        return out

    import xinfluence as xi
    from xinfluence.backends.torch import TorchGradientProvider
    from xinfluence.compute import DaskInfluenceCalculator, SequentialInfluenceCalculator

    gp = TorchGradientProvider(prob.model, torch.nn.functional.cross_entropy)
    start = time.perf_counter()
    model = xi.CgInfluence(gp, regularization=_problem.REGULARIZATION, rtol=CG_RTOL).fit(
        prob.loader
    )
    out["fit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if kind == "sequential":
        with tempfile.TemporaryDirectory() as tmp:
            calc = SequentialInfluenceCalculator(model, progress=False)
            calc.influences(test_loader, train_loader).to_zarr(str(Path(tmp) / "z"))
    elif kind == "sequential_compute":
        SequentialInfluenceCalculator(model, progress=False).influences(
            test_loader, train_loader
        ).compute()
    elif kind == "in_memory":
        model.memory_budget = 2**40  # the unchunked query, as before chunking existed
        model.influences(xt, yt, xq, yq)
    elif kind == "dask":
        import dask.array as da
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=spec["workers"],
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            client.run(torch.set_num_threads, max(1, spec["threads"] // spec["workers"]))
            start = time.perf_counter()
            calc = DaskInfluenceCalculator(model, client=client)
            lazy = calc.influences(
                da.from_array(xt.numpy(), chunks=(100, 64)),
                da.from_array(yt.numpy(), chunks=(100,)),
                da.from_array(xq.numpy(), chunks=(1000, 64)),
                da.from_array(yq.numpy(), chunks=(1000,)),
            )
            with tempfile.TemporaryDirectory() as tmp:
                lazy.to_zarr(str(Path(tmp) / "z"))
    else:
        raise ValueError(kind)
    out["query_s"] = time.perf_counter() - start
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def run_child(spec: dict, python: str, *, timeout: float) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    src = str(HERE.parent / "src")
    if spec["kind"] != "pydvl":
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    else:
        env.pop("PYTHONPATH", None)
    try:
        res = subprocess.run(
            [python, str(Path(__file__)), "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (res.stderr or res.stdout)[-1500:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes (2,000 and 5,000, 100 test)")
    ap.add_argument("--train", default="10000,50000", help="query sizes of the RSS runs")
    ap.add_argument("--test", type=int, default=500, help="test points")
    ap.add_argument("--throughput-train", type=int, default=2000)
    ap.add_argument("--throughput-test", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-pydvl", action="store_true")
    ap.add_argument("--skip-dask", action="store_true")
    ap.add_argument(
        "--pydvl-max-train",
        type=int,
        default=10000,
        help="largest N for pyDVL (it recomputes the test factors for every block)",
    )
    ap.add_argument("--pydvl-env", default=str(HERE / ".envs" / "pydvl"))
    ap.add_argument("--pydvl-python", default=None)
    ap.add_argument("--pydvl-base-python", default=None)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    ap.add_argument(
        "--train-iters", type=int, default=300, help="L-BFGS iterations training the network"
    )
    ap.add_argument("--output", default=str(HERE / "results" / "scale.md"))
    args, _unknown = ap.parse_known_args()
    if args.child:
        result = child(json.loads(args.child))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    sizes = [int(s) for s in args.train.split(",")]
    n_test = args.test
    if args.quick:
        sizes, n_test = [2000, 5000], 100
        args.throughput_train, args.throughput_test = 1000, 50
    sys.path.insert(0, str(HERE))
    import _problem

    work = tempfile.mkdtemp(prefix="xinfluence-scale-")
    problem = str(Path(work) / "problem.npz")
    data = str(Path(work) / "data.npz")
    print(f"training the large network and drawing data in {work} ...", flush=True)
    _problem.make_problem("large", problem, train_iters=args.train_iters)
    make_data(data, max(sizes + [args.throughput_train]), max(n_test, args.throughput_test))
    base = {"problem": problem, "data": data, "threads": args.threads}
    me = sys.executable
    pydvl = None
    if not args.skip_pydvl:
        try:
            import run_influence

            pydvl_args = argparse.Namespace(
                pydvl_python=args.pydvl_python,
                pydvl_env=args.pydvl_env,
                pydvl_base_python=args.pydvl_base_python,
            )
            print(run_influence.ensure_pydvl_env(pydvl_args), flush=True)
            pydvl = str(run_influence.pydvl_python(pydvl_args))
        except Exception as exc:  # the baseline is optional
            print(f"pyDVL unavailable, skipped: {exc}", flush=True)

    rows: list[tuple[str, int, int, dict]] = []

    def run(label: str, kind: str, n: int, t: int, python: str = me, **extra) -> None:
        spec = {**base, "kind": kind, "n_train": n, "n_test": t, **extra}
        print(f"{label}: N={n}, {t} test points ...", flush=True)
        res = run_child(spec, python, timeout=args.timeout)
        print(f"  {res}", flush=True)
        rows.append((label, n, t, res))

    for n in sizes:
        run("xinfluence sequential, to_zarr", "sequential", n, n_test)
        if pydvl and n <= args.pydvl_max_train:
            run("pyDVL 0.10 sequential, to_zarr", "pydvl", n, n_test, python=pydvl)
    tn, tt = args.throughput_train, args.throughput_test
    run("xinfluence in-memory influences (unchunked)", "in_memory", tn, tt)
    run("xinfluence sequential, compute()", "sequential_compute", tn, tt)
    if not args.skip_dask:
        for w in (1, 2):
            run(f"xinfluence dask, {w} worker(s), to_zarr", "dask", tn, tt, workers=w)

    lines = [
        "# Scale benchmark",
        "",
        f"99,126-parameter network, CgInfluence (rtol {CG_RTOL:g}) fitted on 1,000 points; "
        f"{args.threads} torch threads; memory budget 1 GiB (default); load average at the "
        f"end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
        "",
        "| configuration | N | test | fit s | query s | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for label, n, t, res in rows:
        if "error" in res:
            lines.append(f"| {label} | {n} | {t} | error: {res['error'][-200:]!r} | | |")
            continue
        lines.append(
            f"| {label} | {n} | {t} | {res['fit_s']:.1f} | {res['query_s']:.1f} | "
            f"{res['peak_rss_mib']:.0f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    out.with_suffix(".json").write_text(json.dumps([r for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
