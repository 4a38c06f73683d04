"""The ``xinfluence`` command: ``demo``, ``compute``, ``report``, ``featurize`` and ``score``.

``xinfluence demo`` trains a small model on scikit-learn's bundled digits with
flipped labels (``--task text``: a small GPT-2 on docstrings with planted facts)
and writes an HTML report; ``xinfluence compute`` runs an influence
model on a user's recipe and writes a zarr store; ``xinfluence report`` summarises
such a store. Bad input prints one line and exits with a non-zero status
(``--debug`` shows the traceback). The library never imports this package.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from argparse import SUPPRESS
from collections.abc import Sequence
from pathlib import Path

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """Bad input to the command: printed as one line, exit status 1."""


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    from ._demo import BACKENDS, METHODS

    common = _common()
    parser = argparse.ArgumentParser(
        prog="xinfluence",
        description="Influence functions on NumPy, PyTorch and JAX: training-data attribution.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="run influence functions on bundled digits (or text) and write an HTML report",
        description=(
            "Train a small classifier on scikit-learn's bundled digits (offline) with 10% of "
            "the training labels flipped, fit an influence model and write a report "
            "(index.html and PNG figures): the most helpful and harmful training images of "
            "misclassified test images, mislabel detection by self-influence, accuracy "
            "against the exact influences, and timings. With --task text: train a small "
            "byte-level GPT-2 (no download) on docstrings of Python's standard library plus "
            "made-up facts planted in known training sequences, and report the recall@10 "
            "of those sources for EK-FAC, a Kronecker projection and gradient similarity "
            "(needs torch and transformers; a few minutes on 2 cores)."
        ),
    )
    demo.add_argument(
        "--task",
        choices=("digits", "text"),
        default="digits",
        help="digits (default): flipped labels; text: a GPT-2 with planted facts",
    )
    demo.add_argument(
        "--backend", choices=BACKENDS, default=None, help="default: numpy (digits only)"
    )
    demo.add_argument("--method", choices=METHODS, default=None, help="default: cg (digits only)")
    # the text demo's sizes: "tiny" is for the tests
    demo.add_argument("--size", choices=("default", "tiny"), default="default", help=SUPPRESS)
    demo.add_argument(
        "--out", type=Path, default=Path("xinfluence-demo"), help="report folder (created)"
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="data split, label flips, init (text: corpus, facts, init, training batches)",
    )
    demo.add_argument(
        "--flip-fraction",
        type=float,
        default=None,
        help="share of flipped training labels (digits only; default 0.1)",
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help=(
            "BLAS / torch threads (default 1: reproducible timings on shared machines; "
            "0 leaves the libraries' defaults)"
        ),
    )
    demo.set_defaults(func=_cmd_demo)

    from ._compute import add_compute_parser, add_report_parser

    add_compute_parser(sub, common)
    add_report_parser(sub, common)
    from ._featurize import add_featurize_parser, add_score_parser

    add_featurize_parser(sub, common)
    add_score_parser(sub, common)
    return parser


def _version() -> str:
    from .. import __version__

    return f"xinfluence {__version__}"


def _limit_threads(n: int) -> None:
    if n <= 0:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        return
    threadpool_limits(n)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.task == "text":
        return _cmd_demo_text(args)
    if args.size != "default":
        raise CliError("--size applies to --task text")
    from ._demo import relative_error, run_demo
    from ._report import write_report

    args.backend = args.backend or "numpy"
    args.method = args.method or "cg"
    args.flip_fraction = 0.1 if args.flip_fraction is None else args.flip_fraction
    _limit_threads(args.threads)
    if args.backend == "torch" and args.threads > 0:
        try:
            import torch
        except ImportError:
            pass
        else:
            torch.set_num_threads(args.threads)
    start, cpu = time.perf_counter(), time.process_time()
    print(f"xinfluence demo: backend {args.backend}, method {args.method}", flush=True)
    result = run_demo(args.backend, args.method, seed=args.seed, flip_fraction=args.flip_fraction)
    page = write_report(result, args.out, "xinfluence " + " ".join(sys.argv[1:]))
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    m, flipped = result.model, result.problem.flipped
    from ._demo import average_precision

    print(f"  model: {m.description}, {m.n_parameters} parameters")
    print(f"  accuracy: train {result.train_accuracy:.3f}, test {result.test_accuracy:.3f}")
    print(
        f"  mislabel detection ({int(flipped.sum())} flipped), average precision: "
        f"self-influence {average_precision(result.run.self_influence, flipped):.3f}, "
        f"training loss {average_precision(result.train_loss, flipped):.3f}, "
        f"random {flipped.mean():.3f}"
    )
    if result.exact is not None:
        err = relative_error(result.run.query, result.exact.query)
        print(f"  {args.method} vs exact influences: relative error {err:.2e}")
    for message in result.run.warnings:
        print(f"  warning ({args.method}): {message}")
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in result.run.seconds.items())
    print(f"  {args.method}: {steps}; total {total:.1f} s wall, {cpu:.1f} s CPU")
    print(f"report: {page.resolve()}")
    return 0


def _cmd_demo_text(args: argparse.Namespace) -> int:
    if args.backend not in (None, "torch"):
        raise CliError(f"--task text runs on torch, not --backend {args.backend}")
    if args.method is not None:
        raise CliError(
            "--task text compares its own methods (EK-FAC, Kronecker projection, gradient "
            "similarity); --method applies to --task digits"
        )
    if args.flip_fraction is not None:
        raise CliError("--flip-fraction applies to --task digits")
    _limit_threads(args.threads)
    from ._text import _need_text, run_text_demo
    from ._text_report import write_text_report

    torch, _ = _need_text()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start, cpu = time.perf_counter(), time.process_time()
    print(f"xinfluence demo: task text, size {args.size}", flush=True)
    result = run_text_demo(args.size, seed=args.seed)
    page = write_text_report(result, args.out, "xinfluence " + " ".join(sys.argv[1:]))
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    c, s = result.corpus, result.size
    print(
        f"  model: GPT-2, {s.n_layer} layers, width {s.n_embd}, {result.n_parameters} "
        f"parameters ({result.n_tracked} in {len(result.tracked_layers)} tracked layers)"
    )
    print(
        f"  corpus: {c.n} sequences of {s.seq_len} bytes, {len(c.facts)} facts planted in "
        f"{sum(len(x) for x in c.sources)}"
    )
    print(
        f"  completion loss (nats/token): planted facts {result.loss_init.mean():.3f} -> "
        f"{result.loss_trained.mean():.3f}, unseen facts {result.loss_control.mean():.3f}"
    )
    for name, run in result.methods.items():
        extra = "" if name == "random" else f" ({run.seconds:.1f} s)"
        print(f"  recall@10 {name}: {run.recall.mean():.3f}{extra}")
        for message in run.warnings:
            print(f"  warning ({name}): {message}")
    print(f"  total {total:.1f} s wall, {cpu:.1f} s CPU")
    print(f"report: {page.resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 on success)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("xinfluence: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the traceback with --debug
        if debug:
            raise
        print(f"xinfluence {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    from ._demo import DemoError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, CliError | DemoError):
        return text
    return f"{type(exc).__name__}: {text}"
