"""Featurize once, score many: a zarr store of the training side's transformed gradients.

For a fitted model whose up-mode influence factors as
``I[t, j] = <A g_t, B g_j>`` with ``A = M B`` (see :mod:`._factor` for which
models do and what ``B`` and ``M`` are), :meth:`GradientStore.build` writes
``F[j] = B g_j`` of every training point, ``(N, k)``, block by block; a query
is then ``(M B g_t) F^T``, a matrix product against the store, without a pass
over the training data.

Layout of a store (a zarr group, a local directory by default)::

    attrs["xinfluence"]   the fingerprint: kind "gradient_store", model class and
                          options, SHA-256 of the parameters, rows per block,
                          storage dtype, the feature columns of every block
    values                F, (N, k), in the storage dtype; one zarr chunk per block
    self_influence        I[j, j] = <M F_j, F_j>, (N,) float64, computed from the
                          features before they are cast to the storage dtype
    probe_x, probe_y      the first training point, and probe_features its
    probe_features        features (float64) and probe_query the query map on
    probe_query           them: checked against the model that scores
    done/<i>.0            one group per finished block (after its values): digest
                          of its training data, BLAKE2b checksums of its values
                          and of its self-influences
    model                 with ``save_model=True``: the fitted model, the bytes of
                          its ``.npz`` file (:meth:`~xinfluence.ComposableInfluence.save`;
                          no pickle), and ``attrs["xinfluence_model"]`` their SHA-256
    .xinfluence-lock      while a run writes

A rerun resumes: finished blocks whose checksums agree are kept (damaged ones
are recomputed with a warning), the others are computed; a store with another
fingerprint, other data in a finished block, or another first training point
is refused (``overwrite=True`` starts afresh, on a store xinfluence wrote).

Storage dtype: float32 storage of float64 features rounds every stored value
(relative error ``2^-24`` each); a score ``<a, F_j>`` then errs by about
``2^-24 |a| |F_j|``, which relative to the score is small unless the score is
much smaller than ``|a| |F_j|``. Measured on the tests' ProjectedInfluence problem: relative
error of the whole matrix (Frobenius) 1.0e-7, elementwise at most 8.7e-8 of the largest score (see
``tests/test_gradient_store.py``). Self-influence is always from the
unrounded features.

Only the up mode is served (the perturbation mode needs the mixed derivatives
of every training point, ``(N, *D, P)``: not a gradient store).

A store that keeps its model answers queries without the training data:
:meth:`GradientStore.model` loads it for a gradient provider of the same
parameters (verified: the SHA-256 of its bytes, the digests inside the file,
the parameters' fingerprint, and the store's probes), so scoring reads no
training data and fits nothing.

On dask (:mod:`._gradient_store_dask`): ``build`` from dask arrays or, with
``client=``, from partitions, a task per block whose worker writes the block
into the store (the same store as a sequential build); the scoring methods
with ``client=`` run a task per block on the workers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _chunking, _xp
from .._xp import Array
from ..types import Batch
from . import _gradient_features as _gf
from . import _gradient_store_dask as _dask_build
from . import _store
from ._factor import (
    FACTORIZED_MODELS,
    BlockFactor,
    NoFactorizationError,
    factorize,
)
from ._progress import note, progress_bar
from ._reductions import ColumnSumReducer, TopK, TopKReducer

__all__ = ["GradientStore", "NoFactorizationError", "NoSavedModelError", "FACTORIZED_MODELS"]


class NoSavedModelError(LookupError):
    """The gradient store keeps no fitted model (built without ``save_model=True``,
    or by an xinfluence before stores kept one): fit the model again to score."""


MODEL = "model"  # the array holding the saved model's .npz bytes
MODEL_ATTRS = "xinfluence_model"  # {"sha256", "bytes", "class"} of those bytes


class GradientStore:
    """A finished gradient store, opened for scoring (see the module docstring).

    Build one with :meth:`build`, open an existing one with :meth:`open`.
    Scoring takes the fitted model (on any backend: numpy, torch, jax, ...) to
    map the queries to ``A g_t = M B g_t``; results come back in the model's
    namespace, device and dtype. The model must be the one that built the
    store (same class, options, parameters and fit): the store's first
    training point is featurized again and compared, else
    :class:`~xinfluence.compute.StoreMismatchError`.

    Every method that reads the store reads each block once per call (verified
    against its checksum the first time: damage raises
    :class:`~xinfluence.compute.StoreDamagedError`) and multiplies it with the
    features of all queries of the call.

    Attributes: ``shape`` ``(N, k)``, ``dtype`` (storage), ``blocks`` (block
    name -> ``(start, stop)`` columns), ``block_rows``.
    """

    def __init__(self, group: Any):
        fp = group.attrs.get("xinfluence")
        if not isinstance(fp, dict) or fp.get("kind") != _gf.KIND or "values" not in group:
            raise _store.StoreMismatchError(
                f"{group.store} is not a gradient store written by xinfluence"
            )
        if "xinfluence_shape" not in group.attrs:
            n = len(list(group["done"].group_keys())) if "done" in group else 0
            raise _store.StoreDamagedError(
                f"the gradient store {group.store} is unfinished ({n} blocks done; its run "
                "was interrupted): rerun GradientStore.build on it to finish it"
            )
        self.group = group
        self.fingerprint = fp
        self.array = group["values"]
        self.shape = tuple(int(d) for d in self.array.shape)
        self.dtype = self.array.dtype
        self.block_rows = int(fp["block_rows"])
        self.blocks = {}
        start = 0
        for name, size in fp["blocks"]:
            self.blocks[name] = (start, start + int(size))
            start += int(size)
        self.records: dict[int, dict[str, Any]] = {}
        for name in group["done"].group_keys():
            i, _ = (int(s) for s in name.split("."))
            self.records[i] = dict(group["done"][name].attrs)
        self._verified: set[int] = set()
        self._checked: dict[int, list[BlockFactor]] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        model = self.fingerprint["model"]["class"]
        return f"GradientStore({model}, N={self.shape[0]}, k={self.shape[1]}, {self.dtype})"

    # -- building ------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: Any,
        data: Any,
        store: Any,
        *,
        dtype: Any = None,
        block_rows: int | None = None,
        overwrite: bool = False,
        progress: bool = True,
        on_block: Any = None,
        client: Any = None,
        save_model: bool = False,
    ) -> GradientStore:
        """Write ``B g_j`` of every training point of ``data`` to ``store``.

        Args:
            model: a fitted model whose influences factor (``FACTORIZED_MODELS``;
                others raise :class:`NoFactorizationError`).
            data: the training points, anything ``fit`` accepts (an iterable of
                batches is passed over once; a generator serves); or, built on
                dask (see :mod:`._gradient_store_dask`), a pair ``(x, y)`` of
                dask arrays, or with ``client`` a sequence of partitions.
            store: a directory path or a zarr store.
            dtype: storage dtype (default: the model's); ``"float32"`` halves the
                store of a float64 model at about ``2^-24`` relative rounding of
                each feature.
            block_rows: training points per block (= zarr chunk and unit of
                resumption); default from the model's memory budget, at most
                32 MiB of stored features per block.
            overwrite: empty the store first (only one that xinfluence wrote).
            progress: a tqdm bar over blocks.
            on_block: ``on_block(i)`` after block ``i`` is written and recorded.
            client: a ``dask.distributed.Client``: one task per block on its
                workers, which write their blocks into the store (a path they
                can all reach); None with dask arrays uses dask's default
                scheduler. The store is the same as a sequential build's.
            save_model: also keep the fitted model in the store (its ``.npz``
                file's bytes, written after the blocks), so that
                :meth:`model` gives it back to score without the training data.
        """
        from ..influence import ComposableInfluence

        if not isinstance(model, ComposableInfluence):
            raise TypeError(f"expected a fitted influence model, got {type(model).__name__}")
        factors = factorize(model)  # NotFittedError / NoFactorizationError before any I/O
        if client is not None or _dask_build.is_dask_pair(data):
            group = _dask_build.build(
                model,
                factors,
                data,
                store,
                dtype,
                block_rows,
                overwrite,
                progress,
                on_block,
                client,
            )
            if save_model:
                _save_model(group, model)
            return cls(group)
        gp = model.gradient_provider
        xp = gp.xp
        k = sum(f.size for f in factors)
        first, batches = _gf.peek(data)
        first = gp.prepare_batch(first)
        one = Batch(first.x[:1, ...], first.y[:1, ...])
        probe, _ = _gf.features(factors, one, xp)
        probe_np = _xp.to_numpy(probe)
        storage = _gf.storage_dtype(dtype, probe_np.dtype)
        if block_rows is None:
            block_rows = _gf.default_rows(model, factors, one, k, storage)
        _gf.check_rows(block_rows)
        bs = _store.open_store(
            store, _gf.fingerprint(model, factors, block_rows, storage), overwrite=overwrite
        )
        bs.value_options = _gf.VALUE_OPTIONS
        try:
            _write(bs, model, factors, batches, one, probe, block_rows, storage, progress, on_block)
            if save_model:
                _save_model(bs.group, model)
        finally:
            bs.close()
        return cls(bs.group)

    @classmethod
    def open(cls, store: Any) -> GradientStore:
        """Open a finished gradient store for scoring (read only)."""
        return cls(_store._zarr().open_group(store, mode="r"))

    # -- the saved model -----------------------------------------------------
    @property
    def has_model(self) -> bool:
        """Whether the store keeps its fitted model (built with ``save_model=True``)."""
        return MODEL_ATTRS in self.group.attrs

    def model(self, gradient_provider: Any, *, check: bool = True) -> Any:
        """The fitted model that built the store, loaded for ``gradient_provider``
        (the provider of the parameters it was fitted on, in any namespace the
        model's arrays convert to); no training data is read.

        Verified: the SHA-256 of the saved bytes against the store's record, every
        array's digest inside the file, the provider's parameter names, shapes,
        dtype and values, and (``check``) the store's fingerprint and probes, as
        every scoring method does.

        Raises:
            NoSavedModelError: the store keeps no model (built without ``save_model``).
            CorruptFileError: the saved model is damaged, edited or missing.
            StoreMismatchError: the provider's parameters are not those the model
                was fitted on, or the model did not build this store.
        """
        from .. import _io
        from ..errors import CorruptFileError, StaleFitError

        local = _store._local_path(self.group.store)
        where = f"{local if local is not None else self.group.store}/{MODEL}"
        record = self.group.attrs.get(MODEL_ATTRS)
        if record is None:
            raise NoSavedModelError(
                f"the gradient store {self.group.store} keeps no fitted model (built without "
                "save_model=True, or by an older xinfluence): fit the model again to score, "
                "or rebuild the store with save_model=True"
            )
        try:
            raw = np.asarray(self.group[MODEL][...]).tobytes()
        except KeyError:
            raise CorruptFileError(
                f"{where}: the gradient store's saved model is missing (its record is there): "
                "rerun GradientStore.build with save_model=True to save it again"
            ) from None
        except Exception as exc:  # a chunk that does not decompress
            raise CorruptFileError(
                f"{where}: the gradient store's saved model is unreadable "
                f"({type(exc).__name__}: {exc}): rerun GradientStore.build with "
                "save_model=True to save it again"
            ) from exc
        if len(raw) != record.get("bytes") or hashlib.sha256(raw).hexdigest() != record.get(
            "sha256"
        ):
            raise CorruptFileError(
                f"{where}: the gradient store's saved model ({len(raw)} bytes) differs from the "
                f"SHA-256 recorded with it ({record.get('bytes')} bytes): it was edited or "
                "damaged. Rerun GradientStore.build with save_model=True to save it again"
            )
        try:
            model = _io.load(where, gradient_provider, raw=raw)
        except CorruptFileError as exc:
            raise CorruptFileError(
                str(exc).replace(
                    "Save the model again",
                    "Rerun GradientStore.build with save_model=True to save it again",
                )
            ) from exc
        except StaleFitError as exc:
            raise _store.StoreMismatchError(
                f"the gradient provider's parameters differ from those the store's model "
                f"({where}) was fitted on: score with the model that built it, or rebuild the "
                "store"
            ) from exc
        if check:
            self._factors(model)
        return model

    # -- reading -------------------------------------------------------------
    def _block(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        rec = self.records.get(i)
        if rec is None:
            raise _store.StoreDamagedError(
                f"the gradient store {self.group.store} has no finished block {i}: rerun "
                "GradientStore.build on it"
            )
        (r0, r1) = rec["rows"]
        values = np.asarray(self.array[r0:r1, :])
        selfs = np.asarray(self.group["self_influence"][r0:r1])
        if i not in self._verified:
            why = None
            if _store.checksum(values) != rec.get("checksum"):
                why = "its values differ from the checksum written with them"
            elif _store.checksum(selfs) != rec.get("self_checksum"):
                why = "its self-influences differ from the checksum written with them"
            if why is not None:
                raise _store.StoreDamagedError(
                    f"the gradient store {self.group.store} has a damaged block {i} (rows "
                    f"{r0}:{r1}): {why}. Rerun GradientStore.build on it to recompute it"
                )
            self._verified.add(i)
        return r0, values, selfs

    def _n_blocks(self) -> int:
        return math.ceil(self.shape[0] / self.block_rows)

    def iter_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, F[rows])`` per block, verified, as numpy arrays."""
        for i in range(self._n_blocks()):
            r0, values, _ = self._block(i)
            yield r0, values

    def features(self) -> np.ndarray:
        """All stored features ``F`` ``(N, k)`` (verified), a numpy array."""
        return np.concatenate([v for _, v in self.iter_blocks()], axis=0)

    def self_influence(self, like: Array | None = None, *, client: Any = None) -> Array:
        """``I[j, j] = <A g_j, B g_j>`` per training point, ``(N,)``, computed at build
        time from unrounded features: numpy float64, or in the namespace, device
        and dtype of ``like``. ``client``: read on its workers, a task per block."""
        if client is not None:
            out = _dask_build.self_influence(self, client)
        else:
            out = np.concatenate([self._block(i)[2] for i in range(self._n_blocks())])
        if like is None:
            return out
        xp = _xp.namespace(like)
        return _xp.from_numpy(out, dtype=like.dtype, device=_xp.device_of(like), xp=xp)

    # -- scoring -------------------------------------------------------------
    def _factors(self, model: Any) -> list[BlockFactor]:
        """The model's factorization, after checking that it made this store."""
        cached = self._checked.get(id(model))
        if cached is not None:
            return cached
        factors = factorize(model)
        fp = self.fingerprint
        now = _store.model_options(model)
        diff = _store._diff(
            {"class": fp["model"]["class"], "options": fp["model"]["options"]},
            {"class": now["class"], "options": _plain_json(now["options"])},
        )
        blocks = [[f.name, f.size] for f in factors]
        if blocks != fp["blocks"]:
            diff.append(f"blocks: store {fp['blocks']}, now {blocks}")
        gp = model.gradient_provider
        if gp.n_parameters != fp["n_parameters"]:
            diff.append(f"n_parameters: store {fp['n_parameters']}, now {gp.n_parameters}")
        if diff:
            raise _store.StoreMismatchError(
                f"the gradient store was built by another model ({'; '.join(diff)})"
            )
        xp = gp.xp
        g = self.group
        x = _xp.from_numpy(np.asarray(g["probe_x"][...]), dtype=None, device=gp.device, xp=xp)
        y = _xp.from_numpy(np.asarray(g["probe_y"][...]), dtype=None, device=gp.device, xp=xp)
        feats, _ = _gf.features(factors, gp.prepare_batch(Batch(x, y)), xp)
        query = _gf.query(factors, feats, xp)
        eps = float(_xp.finfo_eps(feats.dtype, xp=xp))
        rtol = max(_store.PROBE_RTOL, 1e3 * eps)
        for name, now_v, what in (
            ("probe_features", feats, "other parameters, projections or fit (the features"),
            ("probe_query", query, "another fit or regularization (the query features"),
        ):
            stored = np.asarray(g[name][...], dtype=np.float64)
            v = np.asarray(_xp.to_numpy(now_v), dtype=np.float64)
            scale = max(float(np.linalg.norm(stored)), 1e-300)
            if stored.shape != v.shape or not float(np.linalg.norm(stored - v)) <= rtol * scale:
                raise _store.StoreMismatchError(
                    f"the gradient store was built with {what} of its first training point "
                    "differ): score with the model that built it, or rebuild the store"
                )
        self._checked[id(model)] = factors
        return factors

    def query_features(self, model: Any, x: Any, y: Any = None) -> Array:
        """``A g_t = M B g_t`` of the queries, ``(N_test, k)``, in the model's namespace.

        ``x, y`` arrays, or in ``x`` alone anything ``fit`` accepts."""
        factors = self._factors(model)
        gp = model.gradient_provider
        xp = gp.xp
        parts = []
        for batch in _chunking.as_batches(x, y, "queries"):
            batch = gp.prepare_batch(batch)
            feats, _ = _features_only(factors, batch, xp)
            parts.append(_gf.query(factors, feats, xp))
        if not parts:
            raise ValueError("queries: no batches given")
        out = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
        return _xp.check_finite(out, xp=xp, what="query features")

    def _products(self, q: Array) -> Iterator[tuple[int, Array]]:
        """``(first column, q F_block^T)`` per block, in ``q``'s namespace and dtype."""
        if q.ndim != 2 or int(q.shape[1]) != self.shape[1]:
            raise ValueError(
                f"query features must have shape (N_test, {self.shape[1]}), got {tuple(q.shape)}"
            )
        xp = _xp.namespace(q)
        device = _xp.device_of(q)
        for r0, values in self.iter_blocks():
            f = _xp.from_numpy(values, dtype=q.dtype, device=device, xp=xp)
            yield r0, q @ xp.matrix_transpose(f)

    def influences_from_query_features(self, q: Array) -> Array:
        """``q F^T`` ``(N_test, N)`` for query features ``(N_test, k)`` (any namespace)."""
        xp = _xp.namespace(q)
        parts = [p for _, p in self._products(q)]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def influences(self, model: Any, x: Any, y: Any = None, *, client: Any = None) -> Array:
        """Up-mode influences ``(N_test, N)`` of the stored training points on the
        queries, as ``model.influences(x, y, x_train, y_train)`` gives them.

        ``client`` (a ``dask.distributed.Client``, here and in the other scoring
        methods): the query features are computed here, the products on the
        workers, a task per block (each reads its block from the store);
        the result is the same array."""
        q = self.query_features(model, x, y)
        if client is not None:
            return _dask_build.influences(self, q, client)
        return self.influences_from_query_features(q)

    def top_k(self, model: Any, x: Any, y: Any = None, *, k: int, client: Any = None) -> TopK:
        """The ``k`` most helpful and most harmful stored training points per query,
        streaming over the blocks (see :class:`~xinfluence.compute.TopK`); with
        ``client``, a top-k per block on the workers, merged here."""
        q = self.query_features(model, x, y)
        if client is not None:
            return _dask_build.top_k(self, q, k, client)
        reducer = TopKReducer(k, _xp.namespace(q))
        for c0, block in self._products(q):
            reducer.update(0, c0, block)
        return reducer.result()

    def total_influence(
        self, model: Any, x: Any, y: Any = None, *, reduce: str = "sum", client: Any = None
    ) -> Array:
        """Sum (``"sum"``) or mean (``"mean"``) over the queries per training point,
        ``(N,)``: one matrix-vector product per block (with ``client``, on the
        workers)."""
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        q = self.query_features(model, x, y)
        xp = _xp.namespace(q)
        n = int(q.shape[0])
        total = xp.sum(q, axis=0, keepdims=True)
        if client is not None:
            out = _dask_build.influences(self, total, client)[0, ...]
        else:
            reducer = ColumnSumReducer(xp)
            for c0, block in self._products(total):
                reducer.update(0, c0, block)
            out = reducer.result()
        return out if reduce == "sum" else out / n


def _save_model(group: Any, model: Any) -> None:
    """Keep ``model``'s ``.npz`` bytes in the store: an old record is removed first,
    the new one written after the bytes (a run killed in between leaves a store
    without a model, never a record of other bytes)."""
    from .. import _io

    raw = _io.dumps(model)
    if MODEL_ATTRS in group.attrs:
        del group.attrs[MODEL_ATTRS]
    data = np.frombuffer(raw, dtype=np.uint8)
    group.create_array(MODEL, data=data, chunks=(max(1, data.size),), overwrite=True)
    group.attrs[MODEL_ATTRS] = {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "bytes": len(raw),
        "class": type(model).__name__,
    }


def _features_only(factors: list[BlockFactor], batch: Batch, xp: Any) -> tuple[Array, None]:
    parts = [f.features(batch) for f in factors]
    return (parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)), None


def _plain_json(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def _write(
    bs: _store.BlockStore,
    model: Any,
    factors: list[BlockFactor],
    batches: Any,
    one: Batch,
    probe: Array,
    rows: int,
    storage: np.dtype,
    progress: bool,
    on_block: Any,
) -> None:
    gp = model.gradient_provider
    xp = gp.xp
    g = bs.group
    selfs = _gf.prepare(bs, factors, one, probe, xp)
    resumed = len(bs.done)
    if resumed:
        note(progress, f"resuming: {resumed} blocks of the gradient store done")
    n_total = _n_samples(batches)
    total = None if n_total is None else math.ceil(n_total / rows)
    bar = progress_bar(progress, total=total, desc="gradient store", initial=resumed)
    k = sum(f.size for f in factors)
    count = 0
    try:
        for i, (r0, chunk) in enumerate(_chunking.rebatch(batches, rows, gp)):
            r1 = r0 + len(chunk)
            count = r1
            train_digest = _store.digest(chunk)
            if bs.check_done(i, 0, "", train_digest):
                continue
            feats, self_infl = _gf.features(factors, chunk, xp)
            feats = _xp.check_finite(feats, xp=xp, what="gradient store features")
            self_np = np.asarray(_xp.to_numpy(self_infl), dtype=np.float64)
            if not np.all(np.isfinite(self_np)):
                raise FloatingPointError("self-influence of the training points is not finite")
            if selfs is None:
                selfs = g.create_array(
                    "self_influence",
                    shape=(r1,),
                    chunks=(rows,),
                    dtype="float64",
                    fill_value=np.nan,
                )
            if selfs.shape[0] < r1:
                selfs.resize((r1,))
            selfs[r0:r1] = self_np
            value = np.asarray(_xp.to_numpy(feats)).astype(storage, copy=False)
            record = {
                "test": "",
                "train": train_digest,
                "rows": [r0, r1],
                "cols": [0, k],
                "self_checksum": _store.checksum(self_np),
            }
            bs.write(i, 0, (r0, r1), (0, k), value, (rows, k), record)
            if on_block is not None:
                on_block(i)
            bar.update(1)
    finally:
        bar.close()
    if count == 0:
        raise ValueError("GradientStore.build: the training data holds no samples")
    stale = [i for i, _ in bs.done if bs.done[(i, 0)]["rows"][1] > count]
    if stale:
        raise _store.StoreMismatchError(
            f"the store holds blocks {stale} beyond this run's {count} training points: use a "
            "new store, or overwrite=True"
        )
    assert selfs is not None
    if selfs.shape[0] != count:
        raise _store.StoreMismatchError(
            f"the store's self-influences have {selfs.shape[0]} rows, this run's data "
            f"{count}: use a new store, or overwrite=True"
        )
    bs.finish((count, k))


def _n_samples(data: Any) -> int | None:
    from .sequential import _n_samples as n

    return n(data)
