"""Side-by-side speed and accuracy of xinfluence and pyDVL 0.10 influence models.

    python benchmarks/run_influence.py              # full run: small and large case
    python benchmarks/run_influence.py --quick      # 1 timed run, small case only
    python benchmarks/run_influence.py --methods direct,cg --skip-pydvl
    nox -s bench                                    # the same through nox (args after --)

What it does (details and caveats in benchmarks/README.md):

1. Trains each problem (a tanh network on scikit-learn's digits, float64, fixed
   seed) and saves data and weights to a temporary ``.npz``: both libraries
   rebuild the model from it and see bit-identical numbers.
2. Starts pyDVL 0.10 as a long-lived worker in its own virtual environment
   (``benchmarks/.envs/pydvl``, created on first use: pyDVL 0.10 needs
   numpy < 2) and runs xinfluence in this process, alternating the two
   libraries run by run, so that both see the same machine load.
3. Every method: ``fit`` on a DataLoader (batches of 250), then the influence
   matrix of the test points against the 1,000 training points (mode up).
   Timing: one untimed warm-up on a reduced workload (one batch, 4 test and 20
   training points), then the best of ``--repeats`` timed runs of
   fit + influences (runs longer than ``--long-run`` seconds are not repeated).
4. Accuracy: ``max |I - I_ref| / max |I_ref|``, with ``I_ref`` xinfluence's
   exact DirectInfluence (small case) or xinfluence's CG at rtol 1e-8 without
   preconditioner (large case: the dense Hessian of its 99,126 parameters would
   take 79 GB), and the same between the two libraries' matrices.
5. Prints a markdown table and writes it to ``benchmarks/results/latest.md``
   (raw numbers in ``latest.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def _threads_from_argv(default: int = 2) -> int:
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return default


# Thread pools, the same in both processes and set before numpy is imported:
# torch's OpenMP pool gets --threads; the OpenBLAS pool of numpy and scipy (host
# work: Lanczos' tridiagonal eigh, pyDVL's ARPACK) gets one thread. With
# OpenBLAS' default (a thread per core) its idle threads spin while torch
# computes: pyDVL's ARPACK-based Arnoldi on the large case took 12 s instead of 5.
def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": "1"}


os.environ.update(thread_env(_threads_from_argv()))

import _problem  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

try:
    import xinfluence as xi
except ImportError:  # a checkout without the package installed: use the source tree
    sys.path.insert(0, str(ROOT / "src"))
    import xinfluence as xi
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402
from xinfluence.curvature import Curvature  # noqa: E402
from xinfluence.types import Batch  # noqa: E402

PYDVL_REQUIREMENTS = [
    "pydvl[influence]==0.10.0",
    "numpy<2",
    "torch==2.13.0",  # pinned: an unpinned torch resolves to the multi-GB CUDA build
    "scikit-learn",
]
FAMILIES = ("direct", "cg", "lissa", "arnoldi", "nystroem", "datainf", "ekfac")

# CG tolerances. xinfluence stops a row at |r| <= rtol |b|; pyDVL 0.10's block CG
# at |r| <= max(rtol^2 |b|, atol^2) (it squares both): pyDVL gets the square root,
# so that both stop at the same relative residual. rtol 1e-8 gives a relative
# error of the influences below 1e-8 on the small case (both libraries).
CG_RTOL = 1e-8
PYDVL_ATOL = 1e-15
PRECONDITIONER_RANK = 50
LISSA_SCALE = 3.0  # about 2.5 x the top eigenvalue (1.17) of the small case's Hessian
LISSA_SAMPLED_ITERS = 200
LISSA_FULL_ITERS = 50  # the same number of per-batch products as 200 sampled iterations
PER_RHS_TEST = 20  # test points for pyDVL's default one-right-hand-side-at-a-time CG


def pydvl_cg(rtol: float, **extra) -> dict:
    return dict(rtol=rtol**0.5, atol=PYDVL_ATOL, solve_simultaneously=True, **extra)


# -- method table ---------------------------------------------------------------


@dataclass
class Row:
    family: str
    label: str
    ours: dict | None = None  # {"cls": name in xinfluence, "params": {...}}
    pydvl: dict | None = None  # {"id": ..., "method": ..., "params": {...}}
    note: str = ""
    n_test: int | None = None  # default: all test points of the case
    seeded: bool = False  # the result depends on random draws: accuracy over seeds too


def small_rows() -> list[Row]:
    nys = dict(preconditioner="nystroem", preconditioner_rank=PRECONDITIONER_RANK)
    lissa = dict(scale=LISSA_SCALE, dampen=0.0, rtol=1e-12)
    dropped = "both block CG; pyDVL's CgInfluence drops the preconditioner (see README)"
    rows = [
        Row(
            "direct",
            "Direct",
            {"cls": "DirectInfluence", "params": {}},
            {"id": "direct", "method": "direct", "params": {}},
        ),
        Row(
            "cg",
            f"CG rtol {CG_RTOL:g}, Nyström precond. rank {PRECONDITIONER_RANK}",
            {"cls": "CgInfluence", "params": dict(rtol=CG_RTOL, **nys)},
            {"id": "cg_nys", "method": "cg", "params": pydvl_cg(CG_RTOL, **nys)},
            dropped,
        ),
        Row(
            "cg",
            f"CG rtol {CG_RTOL:g}, no preconditioner",
            {"cls": "CgInfluence", "params": dict(rtol=CG_RTOL)},
            {"id": "cg_plain", "method": "cg", "params": pydvl_cg(CG_RTOL)},
            "both block CG",
        ),
        Row(
            "cg",
            f"CG rtol {CG_RTOL:g}, no preconditioner, batched (non-block) CG",
            {"cls": "CgInfluence", "params": dict(rtol=CG_RTOL, solver="batched")},
            None,
            "xinfluence only: independent CG recurrences, one per test point",
        ),
        Row(
            "cg",
            f"CG rtol {CG_RTOL:g}, Jacobi precond.",
            {"cls": "CgInfluence", "params": dict(rtol=CG_RTOL, preconditioner="jacobi")},
            None,
            "xinfluence only",
        ),
        Row(
            "cg",
            f"CG rtol {CG_RTOL:g}, Nyström precond. rank 200",
            {
                "cls": "CgInfluence",
                "params": dict(rtol=CG_RTOL, preconditioner="nystroem", preconditioner_rank=200),
            },
            None,
            "xinfluence only",
        ),
        Row(
            "cg",
            f"CG rtol {CG_RTOL:g}, Nyström rank {PRECONDITIONER_RANK}, {PER_RHS_TEST} test points",
            {"cls": "CgInfluence", "params": dict(rtol=CG_RTOL, **nys)},
            {
                "id": "cg_per_rhs",
                "method": "cg",
                "params": dict(pydvl_cg(CG_RTOL, **nys), solve_simultaneously=False),
            },
            "ours: block CG; pyDVL: its default one-RHS-at-a-time CG (preconditioner dropped)",
            n_test=PER_RHS_TEST,
        ),
        Row(
            "lissa",
            f"LiSSA {LISSA_SAMPLED_ITERS} it., sampled batches of 250, scale {LISSA_SCALE:g}",
            {
                "cls": "LissaInfluence",
                "params": dict(lissa, maxiter=LISSA_SAMPLED_ITERS, batch_size=_problem.BATCH_SIZE),
            },
            {
                "id": "lissa",
                "method": "lissa",
                "params": dict(lissa, maxiter=LISSA_SAMPLED_ITERS),
            },
            seeded=True,
        ),
        Row(
            "lissa",
            f"LiSSA {LISSA_FULL_ITERS} it., full data, scale {LISSA_SCALE:g}",
            {"cls": "LissaInfluence", "params": dict(lissa, maxiter=LISSA_FULL_ITERS)},
            None,
            "xinfluence only (deterministic; as many batch products as the row above)",
        ),
    ]
    for rank in (10, 50):
        rows.append(
            Row(
                "arnoldi",
                f"Arnoldi rank {rank}",
                {"cls": "ArnoldiInfluence", "params": dict(rank=rank)},
                {"id": f"arnoldi{rank}", "method": "arnoldi", "params": dict(rank=rank)},
            )
        )
    for rank in (10, 50):
        for so in ("hessian", "gauss_newton"):
            rows.append(_nystroem_row(rank, so))
    rows += [
        Row(
            "datainf",
            "DataInf (inverse harmonic mean)",
            {"cls": "InverseHarmonicMeanInfluence", "params": {}},
            {"id": "datainf", "method": "datainf", "params": {}},
        ),
        Row(
            "ekfac",
            "EK-FAC (update_diagonal)",
            {
                "cls": "EkfacInfluence",
                # the curvature the note names (the default is now "gauss_newton")
                "params": dict(update_diagonal=True, second_order="empirical_fisher"),
            },
            {"id": "ekfac", "method": "ekfac", "params": dict(update_diagonal=True)},
            "different curvatures: ours empirical Fisher, pyDVL a label-free pseudo-Fisher",
        ),
    ]
    return rows


_OURS = {"gauss_newton": "empirical_fisher"}


def _nystroem_row(rank: int, so: str) -> Row:
    note = "pyDVL's Gauss-Newton average is mis-weighted (see README)" if so != "hessian" else ""
    return Row(
        "nystroem",
        f"Nyström sketch rank {rank}, {so.replace('_', '-')}",
        {
            "cls": "NystroemSketchInfluence",
            # pyDVL's GAUSS_NEWTON is mean g g^T: our "empirical_fisher"
            "params": dict(rank=rank, second_order=_OURS.get(so, so)),
        },
        {
            "id": f"nystroem{rank}_{so}",
            "method": "nystroem",
            "params": dict(rank=rank, second_order_mode=so),
        },
        note,
        seeded=True,
    )


def large_rows() -> list[Row]:
    nys = dict(preconditioner="nystroem", preconditioner_rank=PRECONDITIONER_RANK)
    return [
        Row(
            "cg",
            f"CG rtol {CG_RTOL:g}, no preconditioner (reference)",
            {"cls": "CgInfluence", "params": dict(rtol=CG_RTOL)},
            {"id": "cg_plain", "method": "cg", "params": pydvl_cg(CG_RTOL)},
            "both block CG",
        ),
        Row(
            "cg",
            f"CG rtol {CG_RTOL:g}, Nyström precond. rank {PRECONDITIONER_RANK}",
            {"cls": "CgInfluence", "params": dict(rtol=CG_RTOL, **nys)},
            {"id": "cg_nys", "method": "cg", "params": pydvl_cg(CG_RTOL, **nys)},
            "both block CG; pyDVL drops the preconditioner",
        ),
        Row(
            "arnoldi",
            "Arnoldi rank 50",
            {"cls": "ArnoldiInfluence", "params": dict(rank=50)},
            {"id": "arnoldi50", "method": "arnoldi", "params": dict(rank=50)},
        ),
        _nystroem_row(50, "hessian"),
        _nystroem_row(50, "gauss_newton"),
        Row(
            "ekfac",
            "EK-FAC (update_diagonal)",
            {
                "cls": "EkfacInfluence",
                # the curvature the note names (the default is now "gauss_newton")
                "params": dict(update_diagonal=True, second_order="empirical_fisher"),
            },
            {"id": "ekfac", "method": "ekfac", "params": dict(update_diagonal=True)},
            "different curvatures: ours empirical Fisher, pyDVL a label-free pseudo-Fisher",
        ),
    ]


# -- xinfluence side --------------------------------------------------------------


@dataclass
class Outcome:
    values: np.ndarray | None = None
    times: list[tuple[float, float]] = field(default_factory=list)
    info: str = ""
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    long_run: float = 20.0  # a timed run longer than this is not repeated
    warmup_error: str = ""  # the untimed warm-up failed (the timed runs still go ahead)

    @property
    def total(self) -> float | None:
        return _problem.best_total(self.times)[2] if self.times and not self.error else None

    @property
    def active(self) -> bool:
        """Whether another timed run is wanted (no error, last run not too long)."""
        return not self.error and (not self.times or sum(self.times[-1]) <= self.long_run)

    def add(self, values, fit_s: float, infl_s: float, info: str, warns) -> None:
        """Record one timed run; keep the matrix and counters of the fastest."""
        self.times.append((fit_s, infl_s))
        if self.values is None or fit_s + infl_s <= min(sum(t) for t in self.times):
            self.values, self.info = values, info
        self.warnings = sorted(set(self.warnings) | set(warns))


class _Counter:
    """Counts xinfluence's full-data curvature products (and the vectors they carry)."""

    products = 0
    vectors = 0

    @classmethod
    def install(cls) -> None:
        original = Curvature.matmat

        def counted(self, v):
            cls.products += 1
            cls.vectors += int(v.shape[0])
            return original(self, v)

        Curvature.matmat = counted


def _ours_info(model) -> str:
    parts = []
    mapper = getattr(model, "_mapper", None)
    for comp in mapper.composable_block_dict.values() if mapper is not None else ():
        res = getattr(comp.op, "last_result", None)
        if res is not None:
            parts.append(f"{res.iterations} CG it.")
    if _Counter.products:
        parts.append(f"{_Counter.products} curv. products ({_Counter.vectors} vectors)")
    return ", ".join(parts)


class OursRunner:
    """xinfluence's side of one row: an untimed warm-up, then timed runs one at a time."""

    def __init__(self, spec: dict, prob: _problem.Problem, args, n_test: int):
        self.cls = getattr(xi, spec["cls"])
        self.params = spec.get("params", {})
        self.gp = TorchGradientProvider(prob.model, torch.nn.functional.cross_entropy)
        self.prob, self.args = prob, args
        self.xt, self.yt = prob.x_test[:n_test], prob.y_test[:n_test]
        self.out = Outcome(long_run=args.long_run)

    def _once(self, loader, x_test, y_test, x, y):
        model = self.cls(self.gp, regularization=self.args.regularization, **self.params)
        _Counter.products = _Counter.vectors = 0
        device = self.args.device
        _problem.synchronize(device)
        start = time.perf_counter()
        model.fit(loader)
        _problem.synchronize(device)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        values = model.influences(x_test, y_test, x, y, mode="up")
        _problem.synchronize(device)
        infl_s = time.perf_counter() - start
        return values.detach().cpu().numpy(), fit_s, infl_s, _ours_info(model)

    def _guard(self, fn, *, trace: bool = True) -> str:
        try:
            fn()
        except Exception as exc:
            if trace:
                traceback.print_exc()
            return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return ""

    def warmup(self) -> None:
        p = self.prob

        def go():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loader = _problem.warmup_loader(p)
                self._once(loader, self.xt[:4], self.yt[:4], p.x_train[:20], p.y_train[:20])

        # A failed warm-up is no verdict on the method: one batch's Hessian can be
        # indefinite where the full data's is not. The timed runs go ahead.
        self.out.warmup_error = self._guard(go, trace=False)

    def run(self) -> None:
        p = self.prob

        def go():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = self._once(p.loader, self.xt, self.yt, p.x_train, p.y_train)
            messages = {str(w.message).splitlines()[0][:160] for w in caught}
            self.out.add(*result, messages)

        self.out.error = self._guard(go) or self.out.error


def datainf_oracle(prob: _problem.Problem, reg: float) -> np.ndarray:
    """Closed-form DataInf from explicit per-sample gradients (Sherman-Morrison):
    ``R v = (v - mean_i g_i (g_i^T v) / (reg + |g_i|^2)) / reg``."""
    gp = TorchGradientProvider(prob.model, torch.nn.functional.cross_entropy)
    g = gp.flat_grads(gp.prepare_batch(Batch(prob.x_train, prob.y_train))).cpu().numpy()
    gt = gp.flat_grads(gp.prepare_batch(Batch(prob.x_test, prob.y_test))).cpu().numpy()
    w = 1.0 / (reg + np.sum(g * g, axis=1))
    factors = (gt - ((gt @ g.T) * w) @ g / len(g)) / reg
    return factors @ g.T


# -- pyDVL side -------------------------------------------------------------------


def pydvl_python(args) -> Path:
    if args.pydvl_python:
        return Path(args.pydvl_python)
    return Path(args.pydvl_env) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _base_python(args) -> str:
    if args.pydvl_base_python:
        return args.pydvl_base_python
    if sys.version_info < (3, 13):  # numpy < 2 has no wheels for 3.13+
        return sys.executable
    for name in ("python3.12", "python3.11", "python3.10"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("pyDVL 0.10 needs numpy < 2: pass --pydvl-base-python (3.10 to 3.12)")


def ensure_pydvl_env(args) -> str:
    """Create pyDVL's venv on first use (or when broken); return a version line."""
    py = pydvl_python(args)
    check = (
        "import pydvl, torch, numpy, sys; "
        "assert pydvl.__version__ == '0.10.0', pydvl.__version__; "
        "assert torch.version.cuda is None, 'a CUDA build of torch in the pyDVL env'; "
        "print(f'pyDVL {pydvl.__version__} (torch {torch.__version__}, numpy "
        "{numpy.__version__}, python {sys.version.split()[0]})')"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.pydvl_python:  # an interpreter given as is (e.g. on a GPU machine): only check it
        check = check.replace("assert torch.version.cuda is None", "assert True")
        res = subprocess.run([str(py), "-c", check], capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"--pydvl-python {py} cannot run pyDVL 0.10:\n{res.stderr}")
        return res.stdout.strip()
    if py.exists():
        res = subprocess.run([str(py), "-c", check], capture_output=True, text=True, env=env)
        if res.returncode == 0:
            return res.stdout.strip()
        print(f"pyDVL environment {args.pydvl_env} is unusable, rebuilding:\n{res.stderr[-2000:]}")
        shutil.rmtree(args.pydvl_env)
    base = _base_python(args)
    print(f"creating the pyDVL environment {args.pydvl_env} with {base} ...", flush=True)
    start = time.perf_counter()
    subprocess.run([base, "-m", "venv", str(args.pydvl_env)], check=True)
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        + PYDVL_REQUIREMENTS,
        check=True,
    )
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    res = subprocess.run([str(py), "-c", check], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"the new pyDVL environment does not work:\n{res.stderr}")
    return res.stdout.strip()


class PydvlWorker:
    """The long-lived ``_pydvl_worker.py`` subprocess: one request in, one reply out."""

    def __init__(self, problem_path: str, outdir: str, args):
        cmd = [
            str(pydvl_python(args)),
            str(HERE / "_pydvl_worker.py"),
            "--problem", problem_path,
            "--outdir", outdir,
            "--threads", str(args.threads),
            "--regularization", str(args.regularization),
            "--device", args.device,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        env.update(thread_env(args.threads))
        if not args.pydvl_python:  # its own venv: nothing of ours on the path
            env.pop("PYTHONPATH", None)
        self.outdir = Path(outdir)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.hello = self._read("READY ")

    def _read(self, prefix: str) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix) :])
        raise RuntimeError(f"the pyDVL worker exited (code {self.proc.wait()})")

    def request(self, spec: dict, phase: str) -> dict:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({**spec, "phase": phase}) + "\n")
            self.proc.stdin.flush()
            return self._read("RESULT ")
        except (RuntimeError, BrokenPipeError, OSError) as exc:
            return {"error": f"pyDVL worker: {exc}"}

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class PydvlRunner:
    """pyDVL's side of one row, run by the worker: the same protocol as OursRunner."""

    def __init__(self, worker: PydvlWorker, spec: dict, args):
        self.worker, self.spec = worker, spec
        self.out = Outcome(long_run=args.long_run)

    def warmup(self) -> None:
        reply = self.worker.request(self.spec, "warmup")
        self.out.warmup_error = reply.get("error", "")

    def run(self) -> None:
        reply = self.worker.request(self.spec, "run")
        if reply.get("error"):
            self.out.error = reply["error"]
            return
        values = np.load(self.worker.outdir / f"{self.spec['id']}.npy")
        ((fit_s, infl_s),) = reply["times"]
        self.out.add(values, fit_s, infl_s, reply.get("info", ""), reply.get("warnings", []))


# -- machine load -------------------------------------------------------------------


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 10 s in which some runnable task waited for a CPU."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(first.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


# -- report -----------------------------------------------------------------------


def _err(values: np.ndarray | None, ref: np.ndarray | None) -> str:
    if values is None or ref is None:
        return "-"
    return f"{_problem.relative_error(values, ref[: len(values)]):.1e}"


def _time(o: Outcome | None) -> str:
    if o is None:
        return "-"
    if o.error:
        return "error"
    if not o.times:
        return "-"
    fit_s, infl_s, total = _problem.best_total(o.times)
    f = _problem.fmt_seconds
    text = f"{f(total)} ({f(fit_s)} + {f(infl_s)})"
    if len(o.times) > 2:
        text += f"; med. {f(float(np.median([a + b for a, b in o.times])))}"
    return text


@dataclass
class RowResult:
    row: Row
    ours: Outcome | None
    pydvl: Outcome | None
    pressure: float | None
    extra: list[str] = field(default_factory=list)


def case_table(title: str, results: list[RowResult], ref: np.ndarray | None) -> str:
    lines = [
        f"### {title}",
        "",
        "| method | time ours [s] (fit + infl.) | time pyDVL [s] (fit + infl.) | ours/pyDVL "
        "| rel. err. ours | rel. err. pyDVL | ours vs pyDVL | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        o, p = r.ours, r.pydvl
        ratio = f"{o.total / p.total:.2f}" if o and p and o.total and p.total else "-"
        notes = []
        if o and o.info:
            notes.append(f"ours: {o.info}")
        if p and p.info:
            notes.append(f"pyDVL: {p.info}")
        if r.row.note and (p is not None or "pyDVL" not in r.row.note):
            notes.append(r.row.note)
        notes += r.extra
        for who, oc in (("ours", o), ("pyDVL", p)):
            if oc and oc.error:
                notes.append(f"{who} failed: {oc.error}")
            elif oc:
                for w in oc.warnings:
                    if any(k in w for k in ("not converge", "max number of iter", "diverg")):
                        notes.append(f"{who} warns: {w[:100]}")
                        break
        if r.pressure is not None and r.pressure > 10:
            notes.append(f"machine busy (CPU pressure {r.pressure:.0f}%)")
        lines.append(
            f"| {r.row.label} | {_time(o)} | {_time(p)} | {ratio} | "
            f"{_err(o.values if o else None, ref)} | {_err(p.values if p else None, ref)} | "
            f"{_err(o.values if o else None, p.values if p else None)} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def _summarize(o: Outcome | None, ref: np.ndarray | None) -> dict | None:
    if o is None:
        return None
    return {
        "times": o.times,
        "info": o.info,
        "error": o.error,
        "warnings": o.warnings,
        "warmup_error": o.warmup_error,
        "rel_err": None
        if o.values is None or ref is None
        else _problem.relative_error(o.values, ref[: len(o.values)]),
    }


def seed_sweep(row: Row, prob, args, n_test: int, worker, ref: np.ndarray) -> str:
    """Relative errors of a randomized method over ``--accuracy-seeds`` seeds
    (untimed; seed ``args.seed`` is the timed run's), both libraries: one draw
    says little about a random sketch's accuracy."""
    seeds = range(args.seed, args.seed + args.accuracy_seeds)
    errs: dict[str, list[float]] = {"ours": [], "pyDVL": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in seeds:
            if row.ours is not None:
                spec = {**row.ours, "params": {**row.ours.get("params", {}), "seed": seed}}
                runner = OursRunner(spec, prob, args, n_test)
                values, *_ = runner._once(
                    prob.loader, runner.xt, runner.yt, prob.x_train, prob.y_train
                )
                errs["ours"].append(_problem.relative_error(values, ref[:n_test]))
            if worker is not None and row.pydvl is not None:
                sid = f"{row.pydvl['id']}_seed{seed}"
                spec = {**row.pydvl, "id": sid, "n_test": n_test, "seed": seed}
                reply = worker.request(spec, "run")
                if not reply.get("error"):
                    values = np.load(worker.outdir / f"{sid}.npy")
                    errs["pyDVL"].append(_problem.relative_error(values, ref[:n_test]))
    parts = [
        f"{who} {np.mean(e):.3g} (sd {np.std(e):.2g})" for who, e in errs.items() if len(e) > 1
    ]
    return f"rel. err. over seeds {seeds.start}-{seeds.stop - 1}: mean " + ", ".join(parts)


# -- main -----------------------------------------------------------------------


def run_case(case: str, args, families: list[str], workdir: str, pydvl_ok: bool) -> tuple:
    problem_path = str(Path(workdir) / f"problem_{case}.npz")
    print(f"\n== {case} case: training ...", flush=True)
    summary = _problem.make_problem(case, problem_path, seed=args.seed)
    print(f"   {summary}", flush=True)
    prob = _problem.load_problem(problem_path, args.device)
    n_test = len(prob.x_test) if case == "small" else min(args.large_test, len(prob.x_test))
    rows = [r for r in (small_rows() if case == "small" else large_rows()) if r.family in families]

    gp = TorchGradientProvider(prob.model, torch.nn.functional.cross_entropy)
    ref: np.ndarray | None = None
    if case == "small":
        model = xi.DirectInfluence(gp, regularization=args.regularization).fit(prob.loader)
        ref = model.influences(prob.x_test, prob.y_test, prob.x_train, prob.y_train).cpu().numpy()
        ref_label = "xinfluence DirectInfluence (exact)"
    else:
        ref_label = f"xinfluence CgInfluence, rtol {CG_RTOL:g}, no preconditioner: the first row"
        if not any(r.family == "cg" for r in rows):
            print("   reference: xinfluence CG ...", flush=True)
            model = xi.CgInfluence(gp, regularization=args.regularization, rtol=CG_RTOL)
            ref = (
                model.fit(prob.loader)
                .influences(prob.x_test[:n_test], prob.y_test[:n_test], prob.x_train, prob.y_train)
                .cpu()
                .numpy()
            )
            ref_label = ref_label.replace(": the first row", "")

    worker = None
    if pydvl_ok:
        (Path(workdir) / f"pydvl_{case}").mkdir(exist_ok=True)
        worker = PydvlWorker(problem_path, str(Path(workdir) / f"pydvl_{case}"), args)

    results: list[RowResult] = []
    done_pydvl: dict[str, PydvlRunner] = {}
    pressures: list[float] = []
    try:
        for row in rows:
            rn = row.n_test or n_test
            p_start = cpu_pressure()
            sides: list = []
            ours = pyd = None
            if row.ours is not None:
                ours = OursRunner(row.ours, prob, args, rn)
                sides.append(("ours ", ours))
            if worker is not None and row.pydvl is not None:
                pid = row.pydvl["id"]
                if pid in done_pydvl:  # shared with an earlier row
                    pyd = done_pydvl[pid]
                else:
                    pyd = PydvlRunner(worker, {**row.pydvl, "n_test": rn, "seed": args.seed}, args)
                    done_pydvl[pid] = pyd
                    sides.append(("pyDVL", pyd))
            print(f"  {row.label} ...", flush=True)
            for _, side in sides:
                side.warmup()
            # Alternate the two libraries run by run: both see the same machine load.
            for _ in range(max(1, args.repeats)):
                for _, side in sides:
                    if side.out.active:
                        side.run()
            for name, side in sides:
                print(
                    f"    [{name}] {_time(side.out)} {side.out.info} {side.out.error}", flush=True
                )
            o = ours.out if ours else None
            p = pyd.out if pyd else None
            if ref is None and case == "large" and row.family == "cg" and o is not None:
                ref = o.values  # the large case's reference is this row's result
            p_end = cpu_pressure()
            load = max((x for x in (p_start, p_end) if x is not None), default=None)
            if load is not None:
                pressures.append(load)
            res = RowResult(row, o, p, load)
            if row.seeded and args.accuracy_seeds > 1 and ref is not None:
                res.extra.append(seed_sweep(row, prob, args, rn, worker, ref))
            if row.family == "datainf" and case == "small":
                oracle = datainf_oracle(prob, args.regularization)
                res.extra.append(
                    "vs closed-form oracle: ours "
                    f"{_err(o.values if o else None, oracle)}, pyDVL "
                    f"{_err(p.values if p else None, oracle)}"
                )
            results.append(res)
    finally:
        if worker is not None:
            worker.close()

    hidden = "-".join(map(str, summary["hidden"]))
    title = (
        f"{case} case: 64-{hidden}-10 tanh, {summary['n_parameters']:,} parameters, "
        f"{n_test} test x {_problem.N_TRAIN} training points"
    )
    table = case_table(title, results, ref)
    table += (
        f"\n\nReference: {ref_label}. Model: train acc. {summary['train_accuracy']:.3f}, "
        f"test acc. {summary['test_accuracy']:.3f}, train loss {summary['train_loss']:.4f}."
    )
    if pressures:
        table += f" CPU pressure during the case: max {max(pressures):.0f}% (PSI avg10)."
    raw = {
        "summary": summary,
        "n_test": n_test,
        "reference": ref_label,
        "rows": [
            {
                "label": r.row.label,
                "ours_spec": r.row.ours,
                "pydvl_spec": r.row.pydvl,
                "ours": _summarize(r.ours, ref),
                "pydvl": _summarize(r.pydvl, ref),
                "ours_vs_pydvl": None
                if not (
                    r.ours and r.pydvl and r.ours.values is not None and r.pydvl.values is not None
                )
                else _problem.relative_error(r.ours.values, r.pydvl.values),
                "cpu_pressure": r.pressure,
                "notes": r.extra,
            }
            for r in results
        ],
    }
    return table, raw, (worker.hello if worker else None)


def _device_label(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 timed run, small case only")
    ap.add_argument("--methods", default=",".join(FAMILIES), help=f"subset of {','.join(FAMILIES)}")
    ap.add_argument("--skip-pydvl", action="store_true", help="run xinfluence only")
    ap.add_argument("--cases", default=None, help="small,large (default both; --quick: small)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, both processes")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 3; --quick 1)")
    ap.add_argument(
        "--long-run", type=float, default=20.0, help="runs over this [s] are not repeated"
    )
    ap.add_argument("--regularization", type=float, default=_problem.REGULARIZATION)
    ap.add_argument("--large-test", type=int, default=50, help="test points of the large case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--accuracy-seeds",
        type=int,
        default=None,
        help="randomized methods (Nyström sketch, sampled LiSSA): mean relative error "
        "over this many seeds, untimed (default 10; --quick: 1, i.e. off)",
    )
    ap.add_argument("--pydvl-env", default=str(HERE / ".envs" / "pydvl"))
    ap.add_argument("--pydvl-base-python", default=None, help="python 3.10-3.12 for pyDVL's venv")
    ap.add_argument(
        "--pydvl-python",
        default=None,
        help="an interpreter that already has pyDVL 0.10 (no venv is made; PYTHONPATH is kept)",
    )
    ap.add_argument("--device", default="cpu", help="torch device of model and data, both sides")
    ap.add_argument("--output", default=str(HERE / "results" / "latest.md"))
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.accuracy_seeds is None:
        args.accuracy_seeds = 1 if args.quick else 10
    cases = [
        c.strip() for c in (args.cases or ("small" if args.quick else "small,large")).split(",")
    ]
    families = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = (set(families) - set(FAMILIES)) | (set(cases) - set(_problem.CASES))
    if unknown:
        ap.error(f"unknown methods or cases: {sorted(unknown)}")

    torch.set_num_threads(args.threads)
    _Counter.install()
    started = time.perf_counter()
    baseline = "not run (--skip-pydvl)"
    if not args.skip_pydvl:
        baseline = ensure_pydvl_env(args)
        print(baseline, flush=True)

    sections, raw = [], {"settings": vars(args), "cases": {}}
    with tempfile.TemporaryDirectory(prefix="xinfluence-bench-") as workdir:
        for case in cases:
            table, case_raw, hello = run_case(case, args, families, workdir, not args.skip_pydvl)
            if hello and hello.get("threads") != torch.get_num_threads():
                table += f"\n\nWARNING: pyDVL ran with {hello.get('threads')} threads."
            print("\n" + table + "\n", flush=True)
            sections.append(table)
            raw["cases"][case] = case_raw

    f = _problem
    header = "\n".join(
        [
            "## xinfluence vs pyDVL 0.10: influence functions, side by side",
            "",
            f"- machine: {platform.machine()}, {os.cpu_count()} CPUs; torch threads: "
            f"{args.threads} in both processes (numpy/scipy OpenBLAS: 1); float64 throughout; "
            f"device: {_device_label(args.device)}",
            f"- xinfluence {xi.__version__} (torch {torch.__version__}, numpy {np.__version__}, "
            f"python {platform.python_version()}); baseline: {baseline}",
            f"- regularization {args.regularization:g}, mode up, training data in a DataLoader "
            f"with batches of {f.BATCH_SIZE}, seed {args.seed}",
            f"- times: fit + influences, best of {args.repeats} timed run(s) (and their median "
            "total, 'med.') after one untimed warm-up on a reduced workload, the libraries "
            f"alternating run by run; runs over {args.long_run:g} s are not repeated",
            "- rel. err.: max|I - I_ref| / max|I_ref|; 'ours vs pyDVL': the same between the "
            "two libraries' matrices",
            f"- CG: xinfluence stops at |r| <= rtol |b|; pyDVL block CG is given rtol = "
            f"sqrt(rtol), atol {PYDVL_ATOL:g} (it stops at |r| <= max(rtol^2 |b|, atol^2)): "
            "the same relative residual",
            f"- wall time of the whole run: {time.perf_counter() - started:.0f} s",
        ]
    )
    report = header + "\n\n" + "\n\n".join(sections) + "\n"
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    print(report)
    print(f"written to {out} (and {out.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
