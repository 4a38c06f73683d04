"""Sessions for xinfluence: the backend test matrix, lint, typecheck, bench, docs.

    nox                                  # default: lint, typecheck, tests on numpy,
                                         # array_api_strict, torch and jax, cross, docs
    nox -l                               # list sessions
    nox -s "tests(backend='torch')"      # one backend
    nox -s "tests(backend='jax')" -- -x -k cg    # arguments after -- go to pytest
    nox -s "tests(backend='cupy')"       # needs a CUDA device; skips without one
    nox -s bench                         # benchmarks/run_*.py
    nox -s docs                          # mkdocs build --strict (site/)

Every test session installs the package (a built wheel, not the source tree)
with its ``test``, ``dask`` and ``progress`` extras plus the pinned set
``backends/<backend>.txt``, and tells
the test suite which namespace to use through ``XINFLUENCE_BACKEND``.

Sessions live in plain virtualenvs. Where uv is installed (``pip install uv``,
as ``.ci/run`` does), sessions without torch install with ``uv pip`` (seconds,
not a minute each); those with torch go through pip, so that pip's global
configuration, e.g. a local find-links directory holding the CPU build of torch,
is honoured. Keep torch pinned (backends/torch.txt): an unpinned torch resolves
to the multi-GB CUDA build.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "virtualenv"
# Reuse session environments between local runs (a fresh clone creates them once).
nox.options.reuse_venv = "yes"

ROOT = Path(__file__).parent
BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "cupy")
DEFAULT_BACKENDS = ("numpy", "array_api_strict", "torch", "jax")

# pytest-xdist workers per test session: the test problems are small, so one core
# per worker beats threads inside one process (jit compilation is single-threaded)
WORKERS = str(min(4, os.cpu_count() or 1))

# Tools whose output must not change under us between runs.
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"

nox.options.sessions = [
    "lint",
    "typecheck",
    *(f"tests(backend='{b}')" for b in DEFAULT_BACKENDS),
    "cross",
    "docs",
]

# Quiet, non-interactive pip in every session.
os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
os.environ.setdefault("PIP_PROGRESS_BAR", "off")
os.environ.setdefault("PIP_NO_INPUT", "1")


def _requirements(*backends: str) -> list[str]:
    args: list[str] = []
    for b in backends:
        args += ["-r", str(ROOT / "backends" / f"{b}.txt")]
    return args


def _uv() -> str | None:
    """The uv binary, where installed (``pip install uv``): None otherwise."""
    try:
        import uv

        return uv.find_uv_bin()
    except Exception:
        return shutil.which("uv")


def _install(session: nox.Session, *args: str, fast: bool = True) -> None:
    """Install into the session's virtualenv, quietly, and log how long it took.

    With ``fast`` and uv available, ``uv pip install`` (seconds instead of a
    minute per session); else pip. Sessions that install torch pass
    ``fast=False``: pip honours pip's configuration (a local find-links
    directory holding the CPU build), uv does not and would take the CUDA build.
    """
    start = time.perf_counter()
    uv = _uv() if fast else None
    if uv is not None and getattr(session.virtualenv, "location", None):
        python = str(Path(session.bin) / "python")
        session.run_install(
            uv, "pip", "install", "--quiet", "--python", python, *args, external=True
        )
    else:
        session.install("--quiet", *args)
    session.log(f"install took {time.perf_counter() - start:.1f} s")


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """Run the test suite against one array backend."""
    if backend == "cupy" and not _has_cuda():
        session.skip("cupy needs a CUDA device: nvidia-smi not found")
    # The package is reinstalled every time so a reused venv tests the current tree.
    # dask, distributed, zarr and tqdm: the compute tests (calculators, resumption).
    # text (transformers): the GPT-2 tests, where torch is installed
    extras = "test,dask,progress,text" if backend == "torch" else "test,dask,progress"
    _install(
        session,
        f".[{extras}]",
        *_requirements(backend),
        fast=backend not in ("torch", "cupy"),
    )
    env = {"XINFLUENCE_BACKEND": backend}
    if backend == "array_api_strict":
        # its second device refuses to mix with the default one: a CPU check that
        # no array silently lands on the default device (numpy covers the default)
        env["XINFLUENCE_DEVICE"] = "device1"
    args = ["-q", "-ra", "-n", WORKERS]
    session.run("pytest", *(session.posargs or args), env=env)


@nox.session
def cross(session: nox.Session) -> None:
    """The same models in torch and jax (and numpy) give the same numbers."""
    _install(session, ".[test]", *_requirements("torch", "jax"), fast=False)
    session.run(
        "pytest",
        *(
            session.posargs
            or ["-q", "-ra", "-n", WORKERS, "-m", "cross", "tests/test_cross_backend.py"]
        ),
        env={"XINFLUENCE_BACKEND": "numpy"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    _install(session, RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package (optional frameworks are not installed: typed as Any)."""
    _install(session, MYPY, ".", *_requirements("numpy"))
    session.run("mypy", "src", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run benchmarks/run_*.py: speed and accuracy against pyDVL 0.10 (not tests).

    Arguments after ``--`` go to every script, e.g. ``nox -s bench -- --quick``
    or ``-- --methods direct,cg --skip-pydvl``. The baseline lives in its own
    virtual environment, ``benchmarks/.envs/pydvl`` (pyDVL 0.10 needs numpy < 2),
    which the script creates with pip on first use (CPU torch, pinned) and then
    reuses. Results: ``benchmarks/results/latest.md`` (gitignored).
    """
    scripts = sorted((ROOT / "benchmarks").glob("run_*.py"))
    if not scripts:
        session.skip("no benchmarks/run_*.py yet")
    # test extra: scikit-learn (the digits data) and scipy; torch pinned (CPU build);
    # dask extra: run_scale.py's calculators; text extra: run_language_model.py (transformers).
    # jax: the jax EK-FAC row of run_large_models.py (convolutions found by tracing)
    _install(session, ".[test,torch,dask,text]", *_requirements("torch", "jax"), fast=False)
    for script in scripts:
        session.run("python", str(script.relative_to(ROOT)), *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with mkdocs into site/, strict: a broken link,
    a missing page or a docstring mkdocstrings cannot parse fails the build."""
    # the API reference is read from src/ statically (griffe): no framework needed
    _install(session, ".[docs]", *_requirements("numpy"))
    session.run(
        "mkdocs",
        "build",
        *(session.posargs or ["--strict"]),
        env={"NO_MKDOCS_2_WARNING": "1"},
    )
