"""``xinfluence featurize`` and ``xinfluence score``, on :class:`~xinfluence.compute.GradientStore`.

``featurize`` fits an influence model on a recipe's training data (the recipe
convention of ``xinfluence compute``: ``RECIPE.py:function`` returns
``(gradient_provider, train_data, test_data)``) and writes the training side's
transformed gradients ``B g_j`` to a resumable gradient store, together with
the fitted model (``GradientStore.build(..., save_model=True)``) and the method
and options (``attrs["xinfluence_cli"]``). ``score`` loads that model for the
recipe's gradient provider (verified against its checksums and the store's
fingerprint) and scores the recipe's test data against the store: it reads no
training data and fits nothing (its recipe may return ``(gradient_provider,
test_data)``). ``score --refit`` rebuilds the model from the kept method and
options and refits it on the recipe's training data instead, as stores written
before the model was kept are scored (with a warning). The store refuses a
model that differs from the one that built it.

Both take ``--scheduler ADDRESS`` as ``xinfluence compute`` does: the blocks
are tasks on that ``dask.distributed`` scheduler, whose workers write their
blocks into the store (so they must reach its directory), and ``score``
multiplies the stored blocks there. The store is the one a run without
``--scheduler`` writes (with ``--block-rows`` or when the recipe's training
data is an ``(x, y)`` pair), and either run resumes the other.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import CliError
from ._compute import (
    CLI_ATTRS,
    METHODS,
    _as_arrays,
    _jsonable,
    add_model_options,
    load_recipe,
    parse_options,
)

FEATURIZE_METHODS = ("arnoldi", "direct", "ekfac", "identity", "nystroem", "projected")


def _add_model_options(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--method",
        choices=FEATURIZE_METHODS,
        default=default,
        help=f"default: {default or 'the one that built the store'}",
    )
    add_model_options(p, example="rank=20, or k=64 and projection=kronecker for projected")


def _add_scheduler(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help=f"{what} as tasks on a dask.distributed scheduler, one per block of the store",
    )


class _Client:
    """``dask.distributed.Client(address)`` as a context, or None without an address."""

    def __init__(self, address: str | None):
        self.address = address
        self.client: Any = None

    def __enter__(self) -> Any:
        if self.address is None:
            return None
        try:
            from dask.distributed import Client
        except ImportError as exc:
            raise CliError(
                "--scheduler needs dask.distributed: pip install 'dask[distributed]'"
            ) from exc
        self.client = Client(self.address)
        return self.client

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()


def _dask_train(model: Any, train: Any, args: argparse.Namespace) -> tuple[Any, int | None]:
    """The recipe's training data for a build on the scheduler: an ``(x, y)`` pair
    as dask arrays in blocks of ``--block-rows`` (default: a sequential run's),
    or a list of partitions (each one block) as it is."""
    from .. import _xp
    from ..compute import _gradient_store_dask as gsd

    if isinstance(train, (list, tuple)) and not (len(train) == 2 and hasattr(train[0], "shape")):
        return list(train), args.block_rows
    x, y = (_xp.to_numpy(a) for a in _as_arrays(train, "train_data"))
    import dask.array as da

    rows = args.block_rows or gsd.default_block_rows(model, x, y, args.dtype)
    return (
        da.from_array(x, chunks=(rows, *x.shape[1:])),
        da.from_array(y, chunks=(rows, *y.shape[1:])),
    ), rows


def _cli_error(exc: Exception) -> CliError:
    return CliError(str(exc).replace("overwrite=True", "--overwrite"))


# -- featurize -------------------------------------------------------------------
def add_featurize_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "featurize",
        parents=[common],
        help="fit a model on a recipe's training data and store its transformed gradients",
        description=(
            "Fit an influence model on the training data that RECIPE.py:function returns "
            "and write the training side's transformed gradients B g_j to a gradient store "
            "(zarr), block by block, and the fitted model with it: an interrupted run "
            "resumes when rerun with the same arguments. Score queries against it with "
            "xinfluence score, which needs no training data. Only models whose "
            "influences factor have a store: " + ", ".join(FEATURIZE_METHODS) + ". With "
            "--scheduler the recipe returns its training data as an (x, y) pair of arrays "
            "or a list of partitions of --block-rows samples each (the last may be shorter)."
        ),
        epilog=(
            "Examples: xinfluence featurize recipe.py:build --method direct "
            "--regularization 1e-3 --out store.zarr; xinfluence featurize recipe.py:build "
            "--method projected -o k=4096 -o projection=kronecker --out store.zarr"
        ),
    )
    p.add_argument("recipe", metavar="RECIPE.py:function", help="the recipe file and function")
    p.add_argument("--out", type=Path, required=True, help="the gradient store (a directory)")
    _add_model_options(p, "direct")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None, help="storage dtype")
    p.add_argument("--block-rows", type=int, default=None, help="training points per block")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_scheduler(p, "compute and write the blocks")
    p.set_defaults(func=cmd_featurize)


def cmd_featurize(args: argparse.Namespace) -> int:
    import xinfluence as xi

    from ..compute import (
        GradientStore,
        StoreDamagedError,
        StoreLockedError,
        StoreMismatchError,
        _store,
    )

    if args.block_rows is not None and args.block_rows < 1:
        raise CliError(f"--block-rows must be >= 1, got {args.block_rows}")
    kwargs = parse_options(args.method, args.option, args)
    gp, train, _ = load_recipe(args.recipe)
    model = getattr(xi, METHODS[args.method])(gp, **kwargs)
    try:  # before the fit: what the path and the options alone decide
        _store.precheck(
            str(args.out),
            _store.options_fingerprint(model, "gradient_store", "up"),
            overwrite=args.overwrite,
        )
    except StoreMismatchError as exc:
        raise _cli_error(exc) from exc
    t0 = time.perf_counter()
    print(f"fitting {type(model).__name__} ({gp.n_parameters} parameters) ...", flush=True)
    model.fit(train)
    fit_s = time.perf_counter() - t0
    done: list[int] = []
    t0 = time.perf_counter()
    rows = args.block_rows
    try:
        with _Client(args.scheduler) as client:
            if client is not None:
                train, rows = _dask_train(model, train, args)
            gs = GradientStore.build(
                model,
                train,
                str(args.out),
                dtype=args.dtype,
                block_rows=rows,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                on_block=done.append,
                client=client,
                save_model=True,
            )
    except (StoreMismatchError, StoreLockedError, StoreDamagedError) as exc:
        raise _cli_error(exc) from exc
    except xi.compute.NoFactorizationError as exc:
        raise CliError(str(exc)) from exc
    run_s = time.perf_counter() - t0
    import zarr

    group = zarr.open_group(str(args.out), mode="a")
    group.attrs[CLI_ATTRS] = {
        "recipe": args.recipe,
        "method": args.method,
        "class": type(model).__name__,
        "options": {k: _jsonable(v) for k, v in kwargs.items()},
    }
    n_blocks = len(gs.records)
    if not done:
        how = f"nothing to compute: all {n_blocks} blocks were done"
    elif len(done) < n_blocks:
        how = f"resumed: {n_blocks - len(done)} blocks were done, {len(done)} computed"
    else:
        how = f"{len(done)} blocks"
    print(
        f"wrote features {gs.shape} ({gs.dtype}) and the fitted model to {args.out} "
        f"(fit {fit_s:.1f} s, features {run_s:.1f} s; {how})"
    )
    return 0


# -- score -----------------------------------------------------------------------
def add_score_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "score",
        parents=[common],
        help="the top-k training points of a recipe's test data, from a gradient store",
        description=(
            "Score the test data that RECIPE.py:function returns against a gradient store "
            "written by xinfluence featurize: the fitted model kept in the store is loaded "
            "for the recipe's gradient provider (verified by its checksums and against the "
            "store), so no training data is read and nothing is fitted; the recipe may "
            "return (gradient_provider, test_data). With --refit (and for stores written "
            "before the model was kept, with a warning) the model is rebuilt with the "
            "method and options kept in the store, refitted on the recipe's training data "
            "and checked against the store, which refuses another model. Prints the k most "
            "helpful and harmful training indices per query."
        ),
        epilog="Example: xinfluence score store.zarr recipe.py:build --top-k 10 --out top.npz",
    )
    p.add_argument("store", type=Path, help="the gradient store")
    p.add_argument("recipe", metavar="RECIPE.py:function", help="the recipe file and function")
    p.add_argument("--top-k", type=int, default=10, help="training points per query (default 10)")
    p.add_argument(
        "--out", type=Path, default=None, help="also write the top-k to this .npz (no pickle)"
    )
    p.add_argument("--rows", type=int, default=None, help="queries printed (default all)")
    p.add_argument(
        "--refit",
        action="store_true",
        help="refit the model on the recipe's training data instead of loading the kept one",
    )
    _add_model_options(p, None)
    _add_scheduler(p, "multiply the stored blocks")
    p.set_defaults(func=cmd_score)


def _store_error(exc: Exception) -> CliError:
    text = str(exc).replace("GradientStore.build with save_model=True", "xinfluence featurize")
    return CliError(text.replace("GradientStore.build", "xinfluence featurize"))


def _refit(args: argparse.Namespace, method: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """The model rebuilt from ``method`` and ``kwargs``, fitted on the recipe's training data."""
    import xinfluence as xi

    gp, train, test = load_recipe(args.recipe)
    model = getattr(xi, METHODS[method])(gp, **kwargs)
    print(f"fitting {type(model).__name__} ({gp.n_parameters} parameters) ...", flush=True)
    model.fit(train)
    return model, test


def _check_options(gs: Any, gp: Any, method: str, kwargs: dict[str, Any]) -> None:
    """Options given on the command line must be those the store's model was built with."""
    import xinfluence as xi

    from ..compute import _store
    from ..compute.gradient_store import _plain_json

    now = _store.model_options(getattr(xi, METHODS[method])(gp, **kwargs))
    kept = gs.fingerprint["model"]
    diff = _store._diff(
        {"class": kept["class"], "options": kept["options"]},
        {"class": now["class"], "options": _plain_json(now["options"])},
    )
    if diff:
        raise CliError(
            f"the gradient store was built by another model ({'; '.join(diff)}): score "
            "without these options, or give --refit to refit a model (which the store "
            "then refuses unless it is the same)"
        )


def cmd_score(args: argparse.Namespace) -> int:
    from .. import _xp
    from ..compute import GradientStore, StoreDamagedError, StoreMismatchError
    from ..errors import CorruptFileError

    if args.top_k < 1:
        raise CliError(f"--top-k must be >= 1, got {args.top_k}")
    if not args.store.exists():
        raise CliError(f"store not found: {args.store}")
    try:
        gs = GradientStore.open(str(args.store))
    except (StoreMismatchError, StoreDamagedError) as exc:
        raise _store_error(exc) from exc
    kept: dict[str, Any] = dict(gs.group.attrs.get(CLI_ATTRS, {}))
    method = args.method or kept.get("method")
    given = (
        args.method is not None
        or bool(args.option)
        or any(
            v is not None for v in (args.regularization, args.block_structure, args.second_order)
        )
    )
    refit = args.refit or not gs.has_model
    if method is None and (refit or given):
        raise CliError(
            f"{args.store} was not written by xinfluence featurize: give the model with --method"
        )
    kwargs: dict[str, Any] = {}
    if method is not None:
        kwargs = {**(kept.get("options", {}) if method == kept.get("method") else {})}
        kwargs.update(parse_options(method, args.option, args))
    t0 = time.perf_counter()
    try:
        if refit:
            if not args.refit:
                warnings.warn(
                    f"{args.store} keeps no fitted model (written by an older xinfluence "
                    "featurize): refitting it on the recipe's training data. Rerun xinfluence "
                    "featurize with the same arguments (every block is kept) to keep the "
                    "model and score without training data",
                    UserWarning,
                    stacklevel=2,
                )
            assert method is not None
            model, test = _refit(args, method, kwargs)
            how = "refitted"
        else:
            gp, _, test = load_recipe(args.recipe, need_train=False)
            if given:
                assert method is not None
                _check_options(gs, gp, method, kwargs)
            model = gs.model(gp)
            how = "loaded from the store"
    except (StoreMismatchError, StoreDamagedError, CorruptFileError) as exc:
        raise _store_error(exc) from exc
    model_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        with _Client(args.scheduler) as client:
            top = gs.top_k(model, test, k=args.top_k, client=client)
    except (StoreMismatchError, StoreDamagedError) as exc:
        raise _store_error(exc) from exc
    score_s = time.perf_counter() - t0
    result = {
        name: np.asarray(_xp.to_numpy(getattr(top, name)))
        for name in ("helpful_indices", "helpful_scores", "harmful_indices", "harmful_scores")
    }
    n_test, k = result["helpful_indices"].shape
    shown = n_test if args.rows is None else min(args.rows, n_test)
    print(
        f"{type(model).__name__} {how} ({model_s:.1f} s), scored in {score_s:.1f} s: "
        f"top {k} of {len(gs)} training points (index: score) for {n_test} queries:"
    )
    for t in range(shown):
        fmt = ", ".join
        hi, hs = result["helpful_indices"][t], result["helpful_scores"][t]
        li, ls = result["harmful_indices"][t], result["harmful_scores"][t]
        print(f"  query {t}: helpful {fmt(f'{j}: {s:+.6g}' for j, s in zip(hi, hs))}")
        print(f"           harmful {fmt(f'{j}: {s:+.6g}' for j, s in zip(li, ls))}")
    if args.out is not None:
        np.savez(
            args.out,
            helpful_indices=result["helpful_indices"],
            helpful_scores=result["helpful_scores"],
            harmful_indices=result["harmful_indices"],
            harmful_scores=result["harmful_scores"],
        )
        print(f"wrote {args.out}")
    return 0
