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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _chunking, _xp
from .._xp import Array
from ..types import Batch, InfluenceMode
from . import _store
from ._factor import (
    FACTORIZED_MODELS,
    BlockFactor,
    NoFactorizationError,
    factorize,
    row_bytes,
)
from ._progress import note, progress_bar
from ._reductions import ColumnSumReducer, TopK, TopKReducer

__all__ = ["GradientStore", "NoFactorizationError", "FACTORIZED_MODELS"]

KIND = "gradient_store"
_CHUNK_BYTES = 32 * 2**20  # at most this many bytes of stored features per block


def _storage_dtype(dtype: Any, model_dtype: np.dtype) -> np.dtype:
    if dtype is None:
        return model_dtype
    name = str(dtype).rsplit(".", 1)[-1]  # torch.float32, jnp.float32, "float32"
    try:
        out = np.dtype(name)
    except TypeError:
        out = None
    if out is None or out.kind != "f":
        raise ValueError(
            f"dtype must be a floating dtype such as 'float32' or 'float64', got {dtype!r}"
        )
    return out


def _features(factors: list[BlockFactor], batch: Batch, xp: Any) -> tuple[Array, Array]:
    """``B g`` ``(N, k)`` of a chunk and ``<M B g, B g>`` per sample ``(N,)``."""
    parts, self_infl = [], None
    for f in factors:
        b = f.features(batch)
        term = f.self_influence(b, xp)
        self_infl = term if self_infl is None else self_infl + term
        parts.append(b)
    feats = parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)
    assert self_infl is not None
    return feats, self_infl


def _query(factors: list[BlockFactor], feats: Array, xp: Any) -> Array:
    """``M f`` per block for features ``(N, k)``."""
    parts, start = [], 0
    for f in factors:
        parts.append(f.query(feats[:, start : start + f.size]))
        start += f.size
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)


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
        if not isinstance(fp, dict) or fp.get("kind") != KIND or "values" not in group:
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
    ) -> GradientStore:
        """Write ``B g_j`` of every training point of ``data`` to ``store``.

        Args:
            model: a fitted model whose influences factor (``FACTORIZED_MODELS``;
                others raise :class:`NoFactorizationError`).
            data: the training points, anything ``fit`` accepts (an iterable of
                batches is passed over once; a generator serves).
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
        """
        from ..influence import ComposableInfluence

        if not isinstance(model, ComposableInfluence):
            raise TypeError(f"expected a fitted influence model, got {type(model).__name__}")
        factors = factorize(model)  # NotFittedError / NoFactorizationError before any I/O
        gp = model.gradient_provider
        xp = gp.xp
        k = sum(f.size for f in factors)
        first, batches = _peek(data)
        first = gp.prepare_batch(first)
        one = Batch(first.x[:1, ...], first.y[:1, ...])
        probe, _ = _features(factors, one, xp)
        probe_np = _xp.to_numpy(probe)
        storage = _storage_dtype(dtype, probe_np.dtype)
        if block_rows is None:
            per_row = row_bytes(factors, gp, one)
            budget = (_chunking.model_budget(model) // 2) // max(1, per_row)
            cap = max(1, _CHUNK_BYTES // max(1, k * storage.itemsize))
            block_rows = max(1, min(budget, cap))
        elif isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
        fingerprint = {
            **_store.options_fingerprint(model, KIND, InfluenceMode.Up),
            "block_rows": block_rows,
            "storage_dtype": storage.name,
            "blocks": [[f.name, f.size] for f in factors],
        }
        bs = _store.open_store(store, fingerprint, overwrite=overwrite)
        # features of random projections and gradients do not compress: zstd would
        # cost about 6 ms per MB written and 4 per MB read (measured), for nothing
        bs.value_options = {"compressors": None}
        try:
            _write(bs, model, factors, batches, one, probe, block_rows, storage, progress, on_block)
        finally:
            bs.close()
        return cls(bs.group)

    @classmethod
    def open(cls, store: Any) -> GradientStore:
        """Open a finished gradient store for scoring (read only)."""
        return cls(_store._zarr().open_group(store, mode="r"))

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

    def self_influence(self, like: Array | None = None) -> Array:
        """``I[j, j] = <A g_j, B g_j>`` per training point, ``(N,)``, computed at build
        time from unrounded features: numpy float64, or in the namespace, device
        and dtype of ``like``."""
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
        feats, _ = _features(factors, gp.prepare_batch(Batch(x, y)), xp)
        query = _query(factors, feats, xp)
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
            parts.append(_query(factors, feats, xp))
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

    def influences(self, model: Any, x: Any, y: Any = None) -> Array:
        """Up-mode influences ``(N_test, N)`` of the stored training points on the
        queries, as ``model.influences(x, y, x_train, y_train)`` gives them."""
        return self.influences_from_query_features(self.query_features(model, x, y))

    def top_k(self, model: Any, x: Any, y: Any = None, *, k: int) -> TopK:
        """The ``k`` most helpful and most harmful stored training points per query,
        streaming over the blocks (see :class:`~xinfluence.compute.TopK`)."""
        q = self.query_features(model, x, y)
        reducer = TopKReducer(k, _xp.namespace(q))
        for c0, block in self._products(q):
            reducer.update(0, c0, block)
        return reducer.result()

    def total_influence(self, model: Any, x: Any, y: Any = None, *, reduce: str = "sum") -> Array:
        """Sum (``"sum"``) or mean (``"mean"``) over the queries per training point,
        ``(N,)``: one matrix-vector product per block."""
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        q = self.query_features(model, x, y)
        xp = _xp.namespace(q)
        n = int(q.shape[0])
        total = xp.sum(q, axis=0, keepdims=True)
        reducer = ColumnSumReducer(xp)
        for c0, block in self._products(total):
            reducer.update(0, c0, block)
        out = reducer.result()
        return out if reduce == "sum" else out / n


def _features_only(factors: list[BlockFactor], batch: Batch, xp: Any) -> tuple[Array, None]:
    parts = [f.features(batch) for f in factors]
    return (parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)), None


def _plain_json(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def _peek(data: Any) -> tuple[Batch, Any]:
    from .sequential import _batches
    from .sequential import _peek as peek

    return peek(_batches(data), "GradientStore.build")


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
    probe_np = np.asarray(_xp.to_numpy(probe), dtype=np.float64)
    bs.check_probe(
        "probe_features",
        probe_np,
        "other training data, parameters or fit (the features of the first training point differ)",
    )
    bs.check_probe(
        "probe_query",
        np.asarray(_xp.to_numpy(_query(factors, probe, xp)), dtype=np.float64),
        "another fit or regularization (the query map of the first training point differs)",
    )
    for name, value in (("probe_x", one.x), ("probe_y", one.y)):
        if name not in g:
            g.create_array(name, data=np.ascontiguousarray(_xp.to_numpy(value)))
    selfs = g["self_influence"] if "self_influence" in g else None
    # damaged blocks (values or self-influences) are forgotten and recomputed
    damaged = bs.drop_damaged()
    for i, _ in sorted(bs.done):
        rec = bs.done[(i, 0)]
        r0, r1 = rec["rows"]
        ok = selfs is not None and _store.checksum(np.asarray(selfs[r0:r1])) == rec.get(
            "self_checksum"
        )
        if not ok:
            damaged.append(((i, 0), "its self-influences differ from their checksum"))
            del bs._done_group[f"{i}.0"]
            del bs.done[(i, 0)]
    damaged_rows = [(k[0], why) for k, why in damaged]
    _store.warn_damaged(damaged_rows, what="the gradient store", stacklevel=3)
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
            feats, self_infl = _features(factors, chunk, xp)
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
