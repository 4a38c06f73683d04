"""``xinfluence compute`` and ``xinfluence report``, on :mod:`xinfluence.compute`.

A *recipe* is a Python file with a function returning
``(gradient_provider, train_data, test_data)``; each data side is an ``(x, y)``
pair of arrays, a :class:`~xinfluence.Batch` or an iterable of those (a torch
``DataLoader``). ``compute`` fits the chosen influence model on the training
data and writes the up-weighting influences ``(N_test, N)`` to a zarr store
with the resumable :class:`~xinfluence.compute.SequentialInfluenceCalculator`
(or a dask cluster with ``--scheduler``); ``report`` summarises such a store.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import CliError

METHODS = {
    "direct": "DirectInfluence",
    "cg": "CgInfluence",
    "lissa": "LissaInfluence",
    "arnoldi": "ArnoldiInfluence",
    "nystroem": "NystroemSketchInfluence",
    "datainf": "InverseHarmonicMeanInfluence",
    "ekfac": "EkfacInfluence",
    "identity": "IdentityInfluence",
    "projected": "ProjectedInfluence",
}
CLI_ATTRS = "xinfluence_cli"
COMMON_OPTIONS = ("regularization", "block_structure", "second_order")


# -- compute ---------------------------------------------------------------------
def add_model_options(p: argparse.ArgumentParser, *, example: str) -> None:
    """``--regularization``, ``--block-structure``, ``--second-order`` and
    ``--option KEY=VALUE`` (shared by ``compute``, ``featurize`` and ``score``)."""
    p.add_argument("--regularization", type=float, default=None, help="damping lambda (default 0)")
    p.add_argument(
        "--block-structure",
        default=None,
        help="full (default), layer, parameter, or a JSON object block -> parameter names",
    )
    p.add_argument(
        "--second-order",
        choices=("hessian", "gauss_newton", "empirical_fisher"),
        default=None,
        help="curvature (default: the method's own)",
    )
    p.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"an option of the method, e.g. {example} (repeatable)",
    )


def add_compute_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "compute",
        parents=[common],
        help="influences of a recipe's training data on its test data, into a zarr store",
        description=(
            "Fit an influence model on the training data that RECIPE.py:function returns, "
            "then write the up-weighting influences (N_test, N) to a zarr store, block by "
            "block: an interrupted run resumes where it stopped when rerun with the same "
            "arguments. The function takes no arguments and returns (gradient_provider, "
            "train_data, test_data); each data side is an (x, y) pair, a Batch or an "
            "iterable of those (a torch DataLoader)."
        ),
        epilog=(
            "method options (--option KEY=VALUE): cg: rtol, atol, maxiter, preconditioner, "
            "preconditioner_rank, solver; lissa: maxiter, scale, dampen, rtol, batch_size, "
            "seed; arnoldi: rank, krylov_dimension, tol, use_woodbury, seed; nystroem: rank, "
            "seed; ekfac: update_diagonal. Example: xinfluence compute recipe.py:build "
            "--method cg --regularization 1e-3 --option rtol=1e-8 --top-k 10 --out scores.zarr"
        ),
    )
    p.add_argument("recipe", metavar="RECIPE.py:function", help="the recipe file and function")
    p.add_argument("--method", choices=sorted(METHODS), default="cg", help="default: cg")
    p.add_argument("--out", type=Path, required=True, help="the zarr store (a directory)")
    add_model_options(p, example="rtol=1e-8 or rank=20")
    p.add_argument("--top-k", type=int, default=0, help="also store the k most helpful/harmful")
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help=(
            "run the blocks as tasks on a dask.distributed scheduler (the recipe must return "
            "(x, y) arrays, not iterables); this process writes each finished block, so the "
            "store resumes and shows progress as a sequential run does"
        ),
    )
    p.add_argument("--test-chunk-size", type=int, default=None, help="test samples per block")
    p.add_argument("--train-chunk-size", type=int, default=None, help="training samples per block")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compute)


def load_recipe(spec: str, *, need_train: bool = True) -> tuple[Any, Any, Any]:
    """Import ``path.py:function``, call it and check what it returns. Without
    ``need_train`` the function may return ``(gradient_provider, test_data)``
    (training data: None) and its training data is not checked (nor touched)."""
    from ..types import GradientProvider

    path_s, sep, func_name = spec.rpartition(":")
    if not sep or not path_s or not func_name:
        raise CliError(f"expected RECIPE.py:function, got {spec!r}")
    path = Path(path_s)
    if not path.is_file():
        raise CliError(f"recipe file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location(f"_xinfluence_recipe_{path.stem}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise CliError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        mod_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    func = getattr(module, func_name, None)
    if not callable(func):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise CliError(f"{path} has no function {func_name!r} (functions: {', '.join(names)})")
    out = func()
    what = f"{path.name}:{func_name}() must return (gradient_provider, train_data, test_data)"
    if not need_train:
        what += " or (gradient_provider, test_data)"
    sizes = (3,) if need_train else (2, 3)
    if not isinstance(out, tuple | list) or len(out) not in sizes:
        raise CliError(f"{what}; got {_describe(out)}")
    gp, train, test = out if len(out) == 3 else (out[0], None, out[1])
    if not isinstance(gp, GradientProvider):
        raise CliError(f"{what}; its first item is {_describe(gp)}, not a gradient provider")
    checked = (("train_data", train),) if need_train else ()
    for name, data in (*checked, ("test_data", test)):
        if data is None or isinstance(data, str | bytes) or not hasattr(data, "__iter__"):
            raise CliError(
                f"{what}; {name} is {_describe(data)}, expected (x, y), a Batch or an "
                "iterable of those"
            )
    return gp, train, test


def _describe(obj: Any) -> str:
    if isinstance(obj, tuple | list):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__module__}.{type(obj).__name__}"


def parse_options(method: str, pairs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the method's constructor, checked against its signature."""
    import xinfluence as xi

    cls = getattr(xi, METHODS[method])
    allowed = [
        n
        for n, prm in inspect.signature(cls).parameters.items()
        if prm.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CliError(f"--option expects KEY=VALUE, got {pair!r}")
        if key in COMMON_OPTIONS:
            raise CliError(f"give {key} with --{key.replace('_', '-')}, not --option")
        if key not in allowed:
            own = [n for n in allowed if n not in COMMON_OPTIONS]
            raise CliError(
                f"unknown option {key!r} for --method {method}; its options: "
                f"{', '.join(own) or 'none'}"
            )
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw  # a bare word: a string option such as preconditioner=jacobi
    if args.regularization is not None:
        if "regularization" not in allowed:
            raise CliError(f"--method {method} takes no --regularization")
        kwargs["regularization"] = args.regularization
    if args.block_structure is not None:
        bs = args.block_structure
        kwargs["block_structure"] = json.loads(bs) if bs.lstrip().startswith("{") else bs
    if args.second_order is not None:
        if "second_order" not in allowed:
            raise CliError(f"--method {method} takes no --second-order")
        kwargs["second_order"] = args.second_order
    return kwargs


def _as_arrays(data: Any, what: str) -> tuple[Any, Any]:
    from ..types import Batch

    if isinstance(data, Batch):
        return data.x, data.y
    if isinstance(data, tuple | list) and len(data) == 2 and hasattr(data[0], "shape"):
        return data[0], data[1]
    raise CliError(f"--scheduler needs {what} as an (x, y) pair of arrays, not an iterable")


def cmd_compute(args: argparse.Namespace) -> int:
    import xinfluence as xi

    from ..compute import StoreDamagedError, StoreLockedError, StoreMismatchError, _store

    if args.top_k < 0:
        raise CliError(f"--top-k must be >= 0, got {args.top_k}")
    kwargs = parse_options(args.method, args.option, args)
    gp, train, test = load_recipe(args.recipe)
    model = getattr(xi, METHODS[args.method])(gp, **kwargs)

    def cli_error(exc: Exception) -> CliError:
        return CliError(str(exc).replace("overwrite=True", "--overwrite"))

    # before the fit: what the path and the options alone decide
    try:
        options = _store.options_fingerprint(model, "influences", "up")
        if args.scheduler is not None:
            options["runner"] = "dask"
        _store.precheck(str(args.out), options, overwrite=args.overwrite)
    except StoreMismatchError as exc:
        raise cli_error(exc) from exc
    t0 = time.perf_counter()
    print(f"fitting {type(model).__name__} ({gp.n_parameters} parameters) ...", flush=True)
    model.fit(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    computed, resumed = 0, 0
    if args.scheduler is not None:
        values, computed, resumed = _compute_dask(model, train, test, args)
    else:
        from ..compute import SequentialInfluenceCalculator

        calc = SequentialInfluenceCalculator(
            model,
            progress=not args.no_progress,
            test_chunk_size=args.test_chunk_size,
            train_chunk_size=args.train_chunk_size,
        )
        lazy = calc.influences(test, train)
        try:
            values = lazy.to_zarr(str(args.out), overwrite=args.overwrite)
        except (StoreMismatchError, StoreLockedError, StoreDamagedError) as exc:
            raise cli_error(exc) from exc
        computed, resumed = lazy.blocks_computed, lazy.blocks_resumed
    run_s = time.perf_counter() - t0
    import zarr

    group = zarr.open_group(str(args.out), mode="a")
    previous: dict[str, Any] = dict(group.attrs.get(CLI_ATTRS, {}))  # type: ignore[arg-type]
    if computed == 0:
        # a finished store: the stored timings stay those of the runs that computed
        if args.top_k and previous.get("top_k") != args.top_k:
            _write_top_k(group, args.top_k)
            group.attrs[CLI_ATTRS] = {**previous, "top_k": args.top_k}
        print(
            f"nothing to compute: all {resumed} blocks of {args.out} are done "
            f"({tuple(values.shape)}; stored timings kept)"
        )
        return 0
    if args.top_k:
        _write_top_k(group, args.top_k)
    runs = list(previous.get("runs", []))
    runs.append(
        {
            "started": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - fit_s - run_s)
            ),
            "fit_seconds": round(fit_s, 3),
            "influence_seconds": round(run_s, 3),
            "blocks_computed": computed,
            "blocks_resumed": resumed,
            "scheduler": args.scheduler,
        }
    )
    group.attrs[CLI_ATTRS] = {
        "recipe": args.recipe,
        "method": args.method,
        "class": type(model).__name__,
        "options": {k: _jsonable(v) for k, v in kwargs.items()},
        "scheduler": args.scheduler,
        "top_k": args.top_k,
        # totals over the runs that computed blocks (an interrupted run, its resumptions)
        "fit_seconds": round(sum(r["fit_seconds"] for r in runs), 3),
        "influence_seconds": round(sum(r["influence_seconds"] for r in runs), 3),
        "runs": runs,
    }
    how = f", resumed: {resumed} blocks were done, {computed} computed" if resumed else ""
    print(
        f"wrote influences {tuple(values.shape)} to {args.out} "
        f"(fit {fit_s:.1f} s, influences {run_s:.1f} s{how})"
    )
    return 0


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _compute_dask(
    model: Any, train: Any, test: Any, args: argparse.Namespace
) -> tuple[Any, int, int]:
    """Blocks as dask tasks on the scheduler, written by this process as they
    finish into a calculator store (done flags, checksums, resumable, a progress
    bar). Returns the values, the blocks computed and the blocks already done."""
    try:
        import dask.array as da
        from dask.distributed import Client, as_completed
    except ImportError as exc:
        raise CliError(
            "--scheduler needs dask.distributed: pip install 'dask[distributed]'"
        ) from exc

    from .. import _chunking, _xp
    from ..compute import DaskInfluenceCalculator, _store
    from ..compute._progress import note, progress_bar
    from ..types import Batch

    (x0, y0), (xt0, yt0) = _as_arrays(train, "train_data"), _as_arrays(test, "test_data")
    x, y, xt, yt = (_xp.to_numpy(a) for a in (x0, y0, xt0, yt0))
    rows = args.train_chunk_size or max(1, min(len(x), 1024))
    rows_t = args.test_chunk_size or max(1, min(len(xt), 1024))
    fingerprint = {
        **_store.options_fingerprint(model, "influences", "up"),
        "runner": "dask",
        "trailing": [],
        "test_rows": rows_t,
        "train_rows": rows,
    }
    try:
        bs = _store.open_store(str(args.out), fingerprint, overwrite=args.overwrite)
    except (_store.StoreMismatchError, _store.StoreLockedError) as exc:
        raise CliError(str(exc).replace("overwrite=True", "--overwrite")) from exc
    try:
        gp = model.gradient_provider
        mapper = model._fitted_mapper()
        one = gp.prepare_batch(Batch(xt0[:1, ...], yt0[:1, ...]))
        factors = mapper.transformed_grads(one)
        probe = np.ravel(np.concatenate([_xp.to_numpy(v) for v in factors.values()], axis=-1))
        one = gp.prepare_batch(Batch(x0[:1, ...], y0[:1, ...]))
        try:
            bs.check_probe("probe_test", probe, "another model, other parameters or another fit")
            bs.check_probe(
                "probe_train",
                np.ravel(_xp.to_numpy(gp.flat_grads(one))),
                "other training data or other parameters",
            )
        except _store.StoreMismatchError as exc:
            raise CliError(str(exc).replace("overwrite=True", "--overwrite")) from exc
        _store.warn_damaged(bs.drop_damaged(), what="the store", stacklevel=2)
        n_i, n_j = -(-len(xt) // rows_t), -(-len(x) // rows)

        def span(k: int, size: int, n: int) -> tuple[int, int]:
            return k * size, min((k + 1) * size, n)

        test_digests = [
            _chunking.digest(Batch(*(a[slice(*span(i, rows_t, len(xt)))] for a in (xt, yt))))
            for i in range(n_i)
        ]
        train_digests = [
            _chunking.digest(Batch(*(a[slice(*span(j, rows, len(x)))] for a in (x, y))))
            for j in range(n_j)
        ]
        todo = [
            (i, j)
            for i in range(n_i)
            for j in range(n_j)
            if not bs.check_done(i, j, test_digests[i], train_digests[j])
        ]
        resumed = n_i * n_j - len(todo)
        progress = not args.no_progress
        if resumed:
            note(progress, f"resuming: {resumed} of {n_i * n_j} blocks done")
        chunks = (min(rows_t, len(xt)), min(rows, len(x)))
        if todo:
            dx = da.from_array(x, chunks=(rows, *x.shape[1:]))
            dy = da.from_array(y, chunks=(rows, *y.shape[1:]))
            dxt = da.from_array(xt, chunks=(rows_t, *xt.shape[1:]))
            dyt = da.from_array(yt, chunks=(rows_t, *yt.shape[1:]))
            bar = progress_bar(progress, total=n_i * n_j, desc="dask", initial=resumed)
            try:
                with Client(args.scheduler) as client:
                    lazy = DaskInfluenceCalculator(model, client=client).influences(
                        dxt, dyt, dx, dy
                    )
                    futures = client.compute([lazy.blocks[i, j] for i, j in todo])
                    where = {f.key: ij for f, ij in zip(futures, todo)}
                    for future in as_completed(futures):
                        i, j = where[future.key]
                        r, c = span(i, rows_t, len(xt)), span(j, rows, len(x))
                        record = {
                            "test": test_digests[i],
                            "train": train_digests[j],
                            "rows": list(r),
                            "cols": list(c),
                        }
                        bs.write(i, j, r, c, np.asarray(future.result()), chunks, record)
                        bar.update(1)
            finally:
                bar.close()
        else:
            note(progress, f"nothing to compute: all {resumed} blocks of the store are done")
        return bs.finish((len(xt), len(x))), len(todo), resumed
    finally:
        bs.close()


def _write_top_k(group: Any, k: int) -> None:
    """Top-k per test point from the stored values, a chunk of rows at a time."""
    import array_api_compat.numpy as xp

    from ..compute._reductions import smallest_columns

    values = group["values"]
    n_test, n = int(values.shape[0]), int(values.shape[1])
    k = min(k, n)
    rows = max(1, int(values.chunks[0]))
    arrays = {
        name: group.create_array(name, shape=(n_test, k), dtype=dtype, overwrite=True)
        for name, dtype in (
            ("top_k/helpful_indices", np.int64),
            ("top_k/helpful_scores", np.float64),
            ("top_k/harmful_indices", np.int64),
            ("top_k/harmful_scores", np.float64),
        )
    }
    for r0 in range(0, n_test, rows):
        block = np.asarray(values[r0 : r0 + rows], dtype=np.float64)
        helpful = smallest_columns(-block, k, xp=xp)  # a stable argsort's first k
        harmful = smallest_columns(block, k, xp=xp)
        arrays["top_k/helpful_indices"][r0 : r0 + rows] = helpful
        arrays["top_k/helpful_scores"][r0 : r0 + rows] = np.take_along_axis(block, helpful, 1)
        arrays["top_k/harmful_indices"][r0 : r0 + rows] = harmful
        arrays["top_k/harmful_scores"][r0 : r0 + rows] = np.take_along_axis(block, harmful, 1)


# -- report ----------------------------------------------------------------------
def add_report_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "report",
        parents=[common],
        help="summarise a store written by xinfluence compute",
        description=(
            "Print a store's shape, method and options and the top-k training points per "
            "test point; with --plots DIR, also write PNG figures (needs matplotlib)."
        ),
    )
    p.add_argument("store", type=Path, help="the zarr store")
    p.add_argument("--top-k", type=int, default=5, help="training points per test point shown")
    p.add_argument("--rows", type=int, default=10, help="test points listed (default 10)")
    p.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write figures here")
    p.set_defaults(func=cmd_report)


def _open_store(path: Path) -> Any:
    if not path.exists():
        raise CliError(f"store not found: {path}")
    try:
        import zarr
    except ImportError as exc:
        raise CliError("reading a store needs zarr: pip install 'xinfluence[dask]'") from exc
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:
        raise CliError(f"{path} is not a zarr store ({exc})") from exc
    if "values" not in group:
        raise CliError(f"{path} holds no influences (no 'values' array): not an xinfluence store")
    return group


def cmd_report(args: argparse.Namespace) -> int:
    group = _open_store(args.store)
    values = group["values"]
    attrs = dict(group.attrs)
    cli = attrs.get(CLI_ATTRS, {})
    fingerprint = attrs.get("xinfluence", {})
    n_test, n = int(values.shape[0]), int(values.shape[1])
    print(f"store: {args.store}")
    print(f"influences: shape {tuple(values.shape)} ({n_test} test x {n} training), {values.dtype}")
    model = fingerprint.get("model", {})
    print(f"method: {cli.get('class') or model.get('class', 'unknown')}")
    if cli:
        print(f"recipe: {cli.get('recipe')}")
        print(f"options: {json.dumps(cli.get('options', {}), sort_keys=True)}")
        print(
            f"timings: fit {cli.get('fit_seconds')} s, influences {cli.get('influence_seconds')} s"
            + (f" (over {len(cli['runs'])} runs)" if len(cli.get("runs", [])) > 1 else "")
        )
        if len(cli.get("runs", [])) > 1:
            for n_run, run in enumerate(cli["runs"], 1):
                print(
                    f"  run {n_run} ({run.get('started')}): fit {run.get('fit_seconds')} s, "
                    f"influences {run.get('influence_seconds')} s, "
                    f"{run.get('blocks_computed')} blocks computed"
                )
    if fingerprint:
        print(f"provider: {model.get('provider')}, mode {fingerprint.get('mode')}")
        done = len(list(group["done"].group_keys())) if "done" in group else None
        print(
            f"blocks: {fingerprint.get('test_rows')} test x {fingerprint.get('train_rows')} "
            f"training rows each" + ("" if done is None else f", {done} finished")
        )
    if args.top_k < 1:
        raise CliError(f"--top-k must be >= 1, got {args.top_k}")
    k = min(args.top_k, n)
    shown = min(args.rows, n_test)
    if fingerprint:
        # a calculator's store: every block read is checked against its checksum
        from ..compute import StoreDamagedError, open_influences

        try:
            block = np.asarray(open_influences(str(args.store))[:shown], dtype=np.float64)
        except StoreDamagedError as exc:
            raise CliError(str(exc).replace("the computation", "the compute command")) from exc
    else:
        block = np.asarray(values[:shown], dtype=np.float64)
    if np.isnan(block).any():
        print("note: the store is incomplete (NaN blocks): rerun the compute command")
    print(f"top {k} training points (index: score) for the first {shown} test points:")
    for t in range(shown):
        row = block[t]
        helpful = np.argsort(-row, kind="stable")[:k]
        harmful = np.argsort(row, kind="stable")[:k]
        fmt = ", ".join
        print(f"  test {t}: helpful {fmt(f'{j}: {row[j]:+.3g}' for j in helpful)}")
        print(f"          harmful {fmt(f'{j}: {row[j]:+.3g}' for j in harmful)}")
    if args.plots is not None:
        _plots(values, args.plots)
        print(f"figures: {args.plots.resolve()}")
    return 0


def _subset(shown: int, total: int) -> str:
    return f"all {total}" if shown == total else f"the first {shown} of {total}"


def _plots(values: Any, out: Path) -> None:
    from ._report import pyplot

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    n_test, n = int(values.shape[0]), int(values.shape[1])
    rows = max(1, int(values.chunks[0]))
    total = np.zeros(n)
    hist_rows: list[np.ndarray] = []
    for r0 in range(0, n_test, rows):
        block = np.asarray(values[r0 : r0 + rows], dtype=np.float64)
        total += np.nansum(block, axis=0)
        if sum(h.size for h in hist_rows) < 10**6:
            hist_rows.append(block.ravel())
    sample = np.concatenate(hist_rows)
    sample = sample[np.isfinite(sample)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.hist(sample, bins=80)
    ax1.set_yscale("log")
    ax1.set_xlabel("influence I[t, j]")
    ax1.set_ylabel("pairs")
    ax2.plot(np.sort(total)[::-1])
    ax2.set_xlabel("training points, by total influence")
    ax2.set_ylabel("sum over test points")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "distribution.png", dpi=90)
    plt.close(fig)
    rows_shown, cols_shown = min(n_test, 50), min(n, 400)
    shown = np.asarray(values[:rows_shown, :cols_shown], dtype=np.float64)
    # a robust symmetric scale: a few outliers would otherwise wash out the rest
    finite = np.abs(shown[np.isfinite(shown)])
    lim = float(np.percentile(finite, 99)) if finite.size else 0.0
    lim = lim or (float(finite.max()) if finite.size else 0.0) or 1.0
    clipped = int(np.count_nonzero(finite > lim))
    fig, ax = plt.subplots(figsize=(10, 3.5))
    im = ax.imshow(shown, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_title(
        f"influence I[t, j]: {_subset(rows_shown, n_test)} test points x "
        f"{_subset(cols_shown, n)} training points",
        fontsize=10,
    )
    ax.set_xlabel("training point")
    ax.set_ylabel("test point")
    fig.colorbar(
        im,
        ax=ax,
        extend="both" if clipped else "neither",
        label=f"influence, clipped at ±{lim:.3g}\n(99th percentile of |I|; {clipped} pairs beyond)",
    )
    fig.tight_layout()
    fig.savefig(out / "matrix.png", dpi=90)
    plt.close(fig)
