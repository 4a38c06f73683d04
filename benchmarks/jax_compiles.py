"""XLA compilations and cold/warm times of a fit and query on jax (issue 23).

For each method, a fresh provider is built (so its own jitted functions compile
again, as in a new process), then ``fit`` + ``influences`` run twice: the first
call is cold, the second warm. Compilations are counted with a
:mod:`jax.monitoring` listener on the backend-compile event (every XLA
compilation, whether of a ``jax.jit`` or of a single eager operation). The
hand-written reference is ``vmap(grad)`` + a ``jvp``-of-``grad`` HVP +
``jax.scipy.sparse.linalg.cg`` over the right-hand sides, jitted as one program.

Usage: ``python benchmarks/jax_compiles.py [--n-train 200] [--n-test 40]
[--hidden 16] [--dtype float64] [--methods cg,lissa,...]``. Prints a table.

Every method runs in a fresh Python process (jax caches compilations per
process, so a method measured after another would find its eager operations
compiled). The warm call builds a new provider too, so its count is the
provider's own jitted functions (4-7): what a job that builds a provider pays.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

_COUNT = [0]
_LISTENING = [False]


def _listen() -> None:
    import jax
    from jax._src import dispatch

    if _LISTENING[0]:
        return

    def on_duration(event: str, duration: float, **kwargs: object) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            _COUNT[0] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    _LISTENING[0] = True


@contextlib.contextmanager
def count_compiles() -> Iterator[list[int]]:
    """Context manager yielding a one-element list that holds, on exit, the number
    of XLA compilations made inside the block."""
    _listen()
    out = [0]
    start = _COUNT[0]
    try:
        yield out
    finally:
        out[0] = _COUNT[0] - start


def problem(n_train: int, n_test: int, hidden: int, dtype: str, seed: int = 0):
    """A tanh MLP on sklearn's digits (64 -> hidden -> 10), briefly trained."""
    import jax
    import jax.numpy as jnp
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(dtype)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))[: n_train + n_test]
    x, y = jnp.asarray(x[idx]), jnp.asarray(y[idx])
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(64, hidden)) / 8, dtype=dtype),
            "bias": jnp.zeros(hidden, dtype=dtype),
        },
        "out": {
            "kernel": jnp.asarray(rng.normal(size=(hidden, 10)) / np.sqrt(hidden), dtype=dtype),
            "bias": jnp.zeros(10, dtype=dtype),
        },
    }

    def hidden_fn(p, xb):
        return jnp.tanh(xb @ p["dense"]["kernel"] + p["dense"]["bias"])

    def apply_fn(p, xb):
        return hidden_fn(p, xb) @ p["out"]["kernel"] + p["out"]["bias"]

    apply_fn.dense_layers = {"dense": lambda p, xb: xb, "out": hidden_fn}  # for EK-FAC

    def loss(logits, labels):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    def mean_loss(p):
        return loss(apply_fn(p, x[:n_train]), y[:n_train])

    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(mean_loss)(p)))
    for _ in range(200):
        params = step(params)
    return apply_fn, loss, params, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def handwritten(apply_fn, loss, params, train, test, reg: float, rtol: float):
    """The reference: one jitted program, vmap(grad) + jvp-of-grad HVP + jax CG."""
    import jax
    from jax.flatten_util import ravel_pytree

    theta0, unravel = ravel_pytree(params)

    def per_sample(t, xi, yi):
        return loss(apply_fn(unravel(t), xi[None]), yi[None])

    def mean_loss(t):
        return loss(apply_fn(unravel(t), train[0]), train[1])

    grad_fn = jax.grad(mean_loss)

    @jax.jit
    def run(t, x_test, y_test, x_train, y_train):
        g_test = jax.vmap(jax.grad(per_sample), (None, 0, 0))(t, x_test, y_test)
        g_train = jax.vmap(jax.grad(per_sample), (None, 0, 0))(t, x_train, y_train)

        def hvp(v):
            return jax.jvp(grad_fn, (t,), (v,))[1] + reg * v

        def solve(b):
            return jax.scipy.sparse.linalg.cg(hvp, b, tol=rtol, maxiter=10 * t.size)[0]

        factors = jax.lax.map(solve, g_test)
        return factors @ g_train.T

    return lambda: np.asarray(run(theta0, *test, *train))


def models(gp, reg: float):
    import xinfluence as xi

    return {
        "direct": lambda: xi.DirectInfluence(gp, regularization=reg),
        "cg": lambda: xi.CgInfluence(gp, regularization=reg),
        "cg_batched": lambda: xi.CgInfluence(gp, regularization=reg, solver="batched"),
        "lissa": lambda: xi.LissaInfluence(gp, regularization=reg, maxiter=2000),
        "arnoldi": lambda: xi.ArnoldiInfluence(gp, regularization=reg, rank=20),
        "nystroem": lambda: xi.NystroemSketchInfluence(gp, regularization=reg, rank=20),
        "ekfac": lambda: xi.EkfacInfluence(gp, regularization=reg, block_structure="layer"),
    }


def timed(fn: Callable[[], object]) -> tuple[float, int, object]:
    with count_compiles() as n:
        t0 = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - t0
    return elapsed, n[0], out


def run_method(
    name: str, *, n_train: int, n_test: int, hidden: int, dtype: str, reg: float = 1e-2
) -> dict[str, float]:
    """Cold and warm figures of one method: ``{"cold_s", "cold_compiles",
    "warm_s", "warm_compiles", "provider_compiles"}`` (the last counts the
    compilations of the provider's own jitted functions, measured by a
    DirectInfluence-free gradient call)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    apply_fn, loss, params, train, test = problem(n_train, n_test, hidden, dtype)
    if name == "handwritten":
        rtol = 1e-7 if dtype == "float64" else 3.45e-4
        fn = handwritten(apply_fn, loss, params, train, test, reg, rtol)
        cold = timed(fn)
        warm = timed(fn)
    else:
        from xinfluence.backends.jax import JaxGradientProvider

        def fn():
            gp = JaxGradientProvider(apply_fn, params, loss, dense_layers=apply_fn.dense_layers)
            model = models(gp, reg)[name]().fit([train])
            return np.asarray(model.influences(*test, *train))

        cold = timed(fn)
        warm = timed(fn)
    return {
        "cold_s": cold[0],
        "cold_compiles": cold[1],
        "warm_s": warm[0],
        "warm_compiles": warm[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-test", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument(
        "--methods", default="handwritten,direct,cg,cg_batched,lissa,arnoldi,nystroem,ekfac"
    )
    parser.add_argument("--json", action="store_true", help="one method, JSON out (internal)")
    args = parser.parse_args()
    sizes = {"n_train": args.n_train, "n_test": args.n_test, "hidden": args.hidden}
    if args.json:
        print(json.dumps(run_method(args.methods, dtype=args.dtype, **sizes)))
        return
    print(
        f"n_train={args.n_train} n_test={args.n_test} hidden={args.hidden} dtype={args.dtype}",
        flush=True,
    )
    print(f"{'method':<12} {'cold s':>8} {'compiles':>9} {'warm s':>8} {'compiles':>9}", flush=True)
    for name in args.methods.split(","):
        cmd = [sys.executable, __file__, "--json", "--methods", name, "--dtype", args.dtype]
        for key, value in sizes.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{name:<12} failed: {out.stderr.strip().splitlines()[-1]}", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{name:<12} {r['cold_s']:8.2f} {r['cold_compiles']:9d} "
            f"{r['warm_s']:8.2f} {r['warm_compiles']:9d}",
            flush=True,
        )


if __name__ == "__main__":
    main()
