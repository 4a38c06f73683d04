"""Large models: the floor, curvature products, EK-FAC and peak memory, with
kronfluence's EK-FAC side by side (measurements, not tests).

Problems (``_large_problem.py``): a 97k-parameter CNN (two Conv2d), the 99k MLP
and a 1M-parameter MLP on digits, 1,000 training points in batches of 250.

* **floor**: every per-sample gradient once (``flat_grads`` over all batches);
* **product K**: the Hessian of the mean training loss applied to ``K`` vectors
  (``hvp`` over all batches), structured (this library's default) and through
  the general ``torch.func`` path (``_hvp``, what Conv2d models got before);
* **EK-FAC**: ``EkfacInfluence`` fit + ``influences`` of ``--n-test`` test points
  against all training points; its error against the exact layer-wise
  empirical-Fisher influences (Woodbury on per-sample gradient Gram matrices:
  exact, and affordable for any layer size);
* **kronfluence**: its EK-FAC (empirical Fisher, float64, same damping) in its own
  environment, ``benchmarks/.envs/kronfluence`` (created on first use with pip:
  CPU torch pinned, kronfluence ``--no-deps`` plus its light dependencies).

Every configuration runs in a fresh process; peak memory is that process's peak
RSS minus its RSS before the timed call. Times are the best of ``--repeats``.

    python benchmarks/run_large_models.py [--quick] [--cases cnn,mlp99k,mlp1m]
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
ROOT = HERE.parent
KF_ENV = HERE / ".envs" / "kronfluence"
REG = 1e-2


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Reset the process's peak RSS (Linux ``clear_refs`` 5), so that the peak
    measured afterwards belongs to the timed call, not to imports or warm-up."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak` (``VmHWM``), else since start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- worker (one configuration per process) ------------------------------------------


def worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import _large_problem as lp

    torch.set_num_threads(args.threads)
    model, d = lp.load_problem(args.problem)
    x, y = d["x_train"][: args.n_train], d["y_train"][: args.n_train]
    xt, yt = d["x_test"][: args.n_test], d["y_test"][: args.n_test]
    bs = lp.BATCH_SIZE
    if args.method == "kronfluence":
        return kronfluence_run(model, x, y, xt, yt, args)
    if args.method == "ekfac_jax":
        return ekfac_jax_run(model, x, y, xt, yt, args)

    import xinfluence as xi
    from xinfluence.backends.torch import TorchGradientProvider
    from xinfluence.types import Batch

    gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
    batches = [gp.prepare_batch(Batch(x[i : i + bs], y[i : i + bs])) for i in range(0, len(x), bs)]
    gen = torch.Generator().manual_seed(0)
    k = args.vectors
    v = torch.randn(k, gp.n_parameters, generator=gen, dtype=torch.float64)

    def floor() -> None:
        for b in batches:
            gp.flat_grads(b)

    def product() -> None:
        for b in batches:
            gp.hvp(b, v)

    def general() -> None:
        for b in batches:
            gp._hvp(b, v)

    out: dict = {}

    def ekfac() -> None:
        # the empirical Fisher, as kronfluence's use_empirical_fisher and the exact row
        infl = xi.EkfacInfluence(gp, regularization=REG, second_order="empirical_fisher")
        infl.fit(list(zip(x.split(bs), y.split(bs))))
        out["scores"] = infl.influences(xt, yt, x, y).numpy()

    def arnoldi() -> None:
        # rank 50, default block; the Krylov budget is not capped by the memory
        # budget here (1M parameters: 160 basis vectors are 1.3 GB)
        # the ReLU CNN's Hessian has eigenvalues down to about -2.8 at this point:
        # its regularization must exceed that (the fit time does not depend on it)
        reg = 5.0 if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) else REG
        infl = xi.ArnoldiInfluence(gp, regularization=reg, rank=args.rank, krylov_dimension=500)
        infl.fit(list(zip(x.split(bs), y.split(bs))))
        op = next(iter(infl._fitted_mapper().composable_block_dict.values())).op
        eig = op.eigen_result
        out["info"] = {
            "krylov_dimension": eig.krylov_dimension,
            "products": eig.matmat_calls,
            "converged": eig.converged,
        }

    def exact() -> None:
        out["scores"] = exact_layerwise(gp, batches, gp.prepare_batch(Batch(xt, yt)))

    fn = {
        "floor": floor,
        "product": product,
        "general": general,
        "ekfac": ekfac,
        "exact": exact,
        "arnoldi": arnoldi,
    }[args.method]
    # warm-up on one small batch (tracing, allocator), not timed
    if args.method in ("product", "general", "floor"):
        small = gp.prepare_batch(Batch(x[:8], y[:8]))
        {"floor": gp.flat_grads}.get(args.method, lambda b: gp.hvp(b, v[:2]))(small)
        if args.method == "general":
            gp._hvp(small, v[:2])
    times = []
    base = rss_bytes()
    reset_peak()
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    result = {"seconds": min(times), "peak_extra": peak_bytes() - base, "p": gp.n_parameters}
    result.update(out.get("info", {}))
    if "scores" in out:
        np.save(args.scores_out, out["scores"])
    return result


def ekfac_jax_run(model, x, y, xt, yt, args) -> dict:
    """EK-FAC (empirical Fisher) of the same network in jax: the convolutions found
    by tracing (``conv_layers``), the dense layers declared with their features."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import torch

    import xinfluence as xi
    from xinfluence.backends.jax import JaxGradientProvider

    mods = list(model)
    params: dict = {}
    plan = []  # (kind, name) per module
    for i, m in enumerate(mods):
        name = f"l{i}"
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            params[name] = {
                "weight": jnp.asarray(m.weight.detach().numpy()),
                "bias": jnp.asarray(m.bias.detach().numpy()),
            }
            kind = "conv" if isinstance(m, torch.nn.Conv2d) else "linear"
            if kind == "conv" and (m.stride != (1, 1) or m.dilation != (1, 1)):
                raise NotImplementedError("stride and dilation are not mapped here")
            plan.append((kind, name, getattr(m, "padding", None)))
        elif isinstance(m, torch.nn.ReLU):
            plan.append(("relu", name, None))
        elif isinstance(m, torch.nn.Tanh):
            plan.append(("tanh", name, None))
        elif isinstance(m, torch.nn.MaxPool2d):
            plan.append(("pool", name, m.kernel_size))
        elif isinstance(m, torch.nn.Flatten):
            plan.append(("flatten", name, None))
        else:
            raise NotImplementedError(type(m).__name__)

    def run(p, h, stop=None):
        for kind, name, extra in plan:
            if name == stop:
                return h
            if kind == "conv":
                pad = [(extra[0], extra[0]), (extra[1], extra[1])]
                h = jax.lax.conv_general_dilated(h, p[name]["weight"], (1, 1), pad)
                h = h + p[name]["bias"][None, :, None, None]
            elif kind == "linear":
                h = h @ p[name]["weight"].T + p[name]["bias"]
            elif kind == "relu":
                h = jax.nn.relu(h)
            elif kind == "tanh":
                h = jnp.tanh(h)
            elif kind == "pool":
                k = extra
                h = jax.lax.reduce_window(
                    h, -jnp.inf, jax.lax.max, (1, 1, k, k), (1, 1, k, k), "VALID"
                )
            elif kind == "flatten":
                h = jnp.reshape(h, (h.shape[0], -1))
        return h

    def loss(z, t):
        return jnp.mean(jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, t[:, None], 1)[:, 0])

    convs = [name for kind, name, _ in plan if kind == "conv"]
    dense = {
        name: (lambda p, xb, name=name: run(p, xb, stop=name))
        for kind, name, _ in plan
        if kind == "linear"
    }
    gp = JaxGradientProvider(run, params, loss, conv_layers=convs, dense_layers=dense)
    xj, yj = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())
    xtj, ytj = jnp.asarray(xt.numpy()), jnp.asarray(yt.numpy())
    bs = 250
    loader = [(xj[i : i + bs], yj[i : i + bs]) for i in range(0, len(xj), bs)]
    # warm-up: compile on the first batch, not timed
    xi.EkfacInfluence(gp, regularization=REG, second_order="empirical_fisher").fit(loader[:1])
    times, scores = [], None
    base = rss_bytes()
    reset_peak()
    for _ in range(args.repeats):
        start = time.perf_counter()
        infl = xi.EkfacInfluence(gp, regularization=REG, second_order="empirical_fisher")
        scores = np.asarray(infl.fit(loader).influences(xtj, ytj, xj, yj))
        times.append(time.perf_counter() - start)
    np.save(args.scores_out, scores)
    return {"seconds": min(times), "peak_extra": peak_bytes() - base, "p": gp.n_parameters}


def exact_layerwise(gp, batches, test) -> object:
    """Exact layer-wise empirical-Fisher influences ``(N_test, N)``:
    ``g_t^T (G^T G / N + lambda)^-1 g_j`` per layer by Woodbury on Gram matrices,
    ``(1/lambda) (K_tj - K_t. (N lambda + K)^-1 K_.j)``, summed over layers. Grams
    come from the K-FAC factors (per-sample layer gradients), never ``(N, P)``."""
    import torch

    def layer_grads(batch):
        out = {}
        for layer, (a, s) in gp.kfac_factors(batch).items():
            w, b = gp.kfac_layers()[layer]
            if b is not None:
                a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)
            out[layer] = (a, s)
        return out

    def gram(f1, f2):
        (a1, s1), (a2, s2) = f1, f2
        if a1.ndim == 2:  # dense: (a.a')(s.s')
            return (a1 @ a2.T) * (s1 @ s2.T)
        g1 = (s1.transpose(1, 2) @ a1).flatten(1)
        g2 = (s2.transpose(1, 2) @ a2).flatten(1)
        return g1 @ g2.T

    train = [layer_grads(b) for b in batches]
    tf = layer_grads(test)
    n = sum(b.x.shape[0] for b in batches)
    total = 0
    for layer in tf:
        k_tt = torch.cat(
            [torch.cat([gram(f[layer], g[layer]) for g in train], 1) for f in train], 0
        )
        k_t = torch.cat([gram(tf[layer], g[layer]) for g in train], 1)
        sol = torch.linalg.solve(n * REG * torch.eye(n, dtype=k_tt.dtype) + k_tt, k_t.T)
        # (1/lambda) (K_t - K_t (N lambda + K)^-1 K)
        total = total + (k_t - (k_tt @ sol).T) / REG
    return total.numpy()


def kronfluence_float64_arguments(damping: float, **factor_options):
    """kronfluence's ``(FactorArguments, ScoreArguments)`` for EK-FAC on the empirical
    Fisher with every dtype float64 (the default ``per_sample_gradient_dtype``,
    float32, would compute the corrected eigenvalues from float32 gradients) and the
    absolute ``damping`` (its default ``None`` is a heuristic); ``factor_options``
    are passed on to ``FactorArguments``."""
    import torch
    from kronfluence.arguments import FactorArguments, ScoreArguments

    f64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64,
        eigendecomposition_dtype=f64,
        per_sample_gradient_dtype=f64,
        lambda_dtype=f64,
        **factor_options,
    )
    score_args = ScoreArguments(
        damping_factor=damping,
        score_dtype=f64,
        per_sample_gradient_dtype=f64,
        precondition_dtype=f64,
    )
    return factor_args, score_args


def kronfluence_run(model, x, y, xt, yt, args) -> dict:
    import numpy as np
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    task = ClassificationTask()
    model = prepare_model(model, task)
    factor_args, score_args = kronfluence_float64_arguments(REG)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(
            analysis_name="bench",
            model=model,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=tmp,
        )
        train, test = TensorDataset(x, y), TensorDataset(xt, yt)
        base = rss_bytes()
        reset_peak()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            analyzer.fit_all_factors(
                factors_name="f",
                dataset=train,
                per_device_batch_size=250,
                factor_args=factor_args,
                overwrite_output_dir=True,
            )
            analyzer.compute_pairwise_scores(
                scores_name="s",
                factors_name="f",
                query_dataset=test,
                train_dataset=train,
                per_device_query_batch_size=len(xt),
                per_device_train_batch_size=250,
                score_args=score_args,
                overwrite_output_dir=True,
            )
            times.append(time.perf_counter() - start)
        scores = analyzer.load_pairwise_scores("s")["all_modules"]
        np.save(args.scores_out, scores.numpy())
    return {"seconds": min(times), "peak_extra": peak_bytes() - base}


# -- orchestrator ------------------------------------------------------------------------


def kronfluence_python(extra: tuple[str, ...] = ()) -> Path | None:
    """The kronfluence environment's Python (created on first use), with the
    requirements ``extra`` (for example ``"transformers==5.25.0"``) installed
    where missing."""
    py = KF_ENV / "bin" / "python"
    if not py.exists():
        print("creating", KF_ENV, file=sys.stderr)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(KF_ENV)], check=True)
            pip = [str(py), "-m", "pip", "install", "-q"]
            subprocess.run([*pip, "torch==2.13.0", "numpy", "scikit-learn"], check=True)
            subprocess.run([*pip, "--no-deps", "kronfluence==1.0.1"], check=True)
            light = "accelerate einconv einops opt-einsum safetensors tqdm psutil pyyaml"
            light += " huggingface_hub packaging"
            subprocess.run([*pip, "--no-deps", *light.split()], check=True)
        except subprocess.CalledProcessError as e:
            print("kronfluence environment failed:", e, file=sys.stderr)
            return None
    missing = [req for req in extra if not _installed(py, req)]
    if missing:
        try:
            subprocess.run([str(py), "-m", "pip", "install", "-q", *missing], check=True)
        except subprocess.CalledProcessError as e:
            print("kronfluence environment: installing", missing, "failed:", e, file=sys.stderr)
            return None
    return py


def _installed(python: Path, requirement: str) -> bool:
    """Whether ``requirement`` (``name==version`` or ``name``) is installed in ``python``'s
    environment."""
    name, _, version = requirement.partition("==")
    code = f"import importlib.metadata as m; print(m.version({name!r}))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return proc.returncode == 0 and (not version or proc.stdout.strip() == version)


def run_worker(
    python: str,
    script: str,
    args: list[str],
    *,
    threads: int,
    budget: int | None = None,
    error_lines: int = 1,
) -> dict:
    """Run ``script --worker *args --scores-out FILE`` with ``python`` in a fresh
    process (its own peak memory, ``threads`` BLAS threads, the source tree's
    xinfluence): the JSON of its last output line, with ``scores_path``, or
    ``{"error": its last error_lines lines of stderr}``."""
    scores = tempfile.mktemp(suffix=".npy")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS="1")
    if budget:
        env["XINFLUENCE_MEMORY_BUDGET"] = str(int(budget))
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [python, script, "--worker", *args, "--scores-out", scores]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-error_lines:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if os.path.exists(scores):
        result["scores_path"] = scores
    return result


def run_one(python: str, problem: str, method: str, opts: argparse.Namespace, **extra) -> dict:
    args = [
        "--problem",
        problem,
        "--method",
        method,
        "--vectors",
        str(extra.get("vectors", 1)),
        "--repeats",
        str(opts.repeats),
        "--threads",
        str(opts.threads),
        "--n-train",
        str(opts.n_train),
        "--n-test",
        str(opts.n_test),
        "--rank",
        str(opts.rank),
    ]
    return run_worker(
        python,
        str(Path(__file__).resolve()),
        args,
        threads=opts.threads,
        budget=extra.get("budget"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--scores-out", help=argparse.SUPPRESS)
    parser.add_argument("--vectors", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="250 training points, 1 repeat")
    parser.add_argument("--cases", default="cnn,mlp99k,mlp1m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--product-vectors", type=int, default=50)
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--rank", type=int, default=50, help="ArnoldiInfluence rank")
    parser.add_argument(
        "--methods",
        default="products,budget,arnoldi,ekfac",
        help="which rows besides the floor: products, budget, arnoldi, ekfac",
    )
    parser.add_argument("--output", default=str(HERE / "results" / "large_models.json"))
    args, _ = parser.parse_known_args()  # nox -s bench passes run_influence's options too
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.n_train, args.repeats, args.n_test = 250, 1, 20
    import numpy as np

    sys.path.insert(0, str(HERE))
    import _large_problem as lp

    kf = None if args.skip_kronfluence else kronfluence_python()
    report: dict = {"conditions": conditions(args)}
    lines = []
    for case in args.cases.split(","):
        path = os.path.join(tempfile.gettempdir(), f"xinfluence_large_{case}.npz")
        if not os.path.exists(path):
            print(lp.make_problem(case, path), file=sys.stderr)
        py = sys.executable
        methods = set(args.methods.split(","))
        row: dict = {"floor": run_one(py, path, "floor", args)}
        fl = row["floor"].get("seconds")
        if "products" in methods:
            for k in (1, args.product_vectors):
                row[f"product{k}"] = run_one(py, path, "product", args, vectors=k)
                row[f"general{k}"] = run_one(py, path, "general", args, vectors=k)
        if "budget" in methods:
            for budget in (2**28, 2**30):
                row[f"product{args.product_vectors}@{budget >> 20}MiB"] = run_one(
                    py, path, "product", args, vectors=args.product_vectors, budget=budget
                )
        if "arnoldi" in methods:
            row[f"arnoldi{args.rank}"] = run_one(py, path, "arnoldi", args)
        ref = None
        if "ekfac" in methods:
            row["exact"] = run_one(py, path, "exact", args)
            row["ekfac"] = run_one(py, path, "ekfac", args)
            if case == "cnn":  # the same network in jax, convolutions found by tracing
                row["ekfac_jax"] = run_one(py, path, "ekfac_jax", args)
            if kf is not None and case in ("cnn", "mlp1m"):
                row["kronfluence"] = run_one(str(kf), path, "kronfluence", args)
            if "scores_path" in row["exact"]:
                ref = np.load(row["exact"]["scores_path"])
        for key in ("ekfac", "ekfac_jax", "kronfluence"):
            r = row.get(key, {})
            if ref is not None and "scores_path" in r:
                s = np.load(r["scores_path"])
                r["rel_err"] = float(np.max(np.abs(s - ref)) / np.max(np.abs(ref)))
                r["corr"] = float(np.corrcoef(s.ravel(), ref.ravel())[0, 1])
        for r in row.values():
            if fl and "seconds" in r:
                r["ratio_to_floor"] = r["seconds"] / fl
        report[case] = row
        lines.append(format_row(case, row))
        print(lines[-1], flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report["conditions"]))


def format_row(case: str, row: dict) -> str:
    out = [f"## {case}"]
    for key, r in row.items():
        if "error" in r:
            out.append(f"  {key}: error {r['error']}")
            continue
        bits = [f"{r['seconds']:.3g} s"]
        if "ratio_to_floor" in r:
            bits.append(f"{r['ratio_to_floor']:.3g}x floor")
        bits.append(f"peak +{r['peak_extra'] / 2**20:.0f} MiB")
        for m in ("rel_err", "corr", "krylov_dimension", "products", "converged"):
            if m in r:
                bits.append(f"{m} {r[m]:.3g}" if isinstance(r[m], float) else f"{m} {r[m]}")
        out.append(f"  {key}: " + ", ".join(bits))
    return "\n".join(out)


def conditions(args: argparse.Namespace) -> dict:
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "loadavg": load,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


if __name__ == "__main__":
    main()
