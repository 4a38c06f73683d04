"""The gradient store on dask: a task per store block, to build it and to score against it.

Building (:meth:`GradientStore.build <xinfluence.compute.GradientStore.build>`
with dask arrays or ``client=``): the training data is

* a pair ``(x, y)`` of dask arrays chunked along samples only (rechunked to
  ``block_rows`` where their chunks differ; by default ``block_rows`` is the
  length of their first chunk), or
* with a ``client``, a sequence of partitions, each one block: a ``Batch``, an
  ``(x, y)`` pair, or an iterable of batches whose size is known without a pass
  (a ``DataLoader`` over a dataset with ``len``), all of ``block_rows`` samples
  but the last, which may hold fewer (``block_rows`` defaults to the first
  partition's size). Partitions are pickled to the workers: a ``DataLoader``
  over a dataset that reads its samples where it runs ships little.

Each task computes ``B g_j`` of its block and writes the block (one zarr chunk
of ``values`` and of ``self_influence``) and then its finished-block record
into the store itself, so the workers must reach the store (a local path on a
``LocalCluster``, a shared file system or an object store on a cluster). The
calling process opens the store as a sequential build does (fingerprint,
probes, lock, damaged blocks) and creates the arrays at their final shape;
zarr writes distinct chunks independently. The store is the same as a
sequential build's (the same fingerprint, arrays, chunks and records): either
kind of run resumes the other's. A rerun computes only the blocks without a
valid record, after a task per finished block has checked that its data has
the recorded digest.

Scoring (``client=`` in the scoring methods): the query features ``A g_t``
are computed in the calling process, in the model's namespace, and sent to the
workers as numpy arrays; a task per block reads the block, checks it against
its checksum and returns its product (``influences``, ``total_influence``),
its per-row top-k (``top_k``, merged here) or its self-influences. Results
come back as the sequential methods return them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _chunking, _xp
from .._xp import Array
from ..types import Batch
from . import _gradient_features as _gf
from . import _store
from ._factor import factorize
from ._progress import note, progress_bar
from ._reductions import TopK, smallest_columns

__all__ = [
    "build",
    "default_block_rows",
    "influences",
    "is_dask_pair",
    "self_influence",
    "top_k",
]


def is_dask_pair(data: Any) -> bool:
    """Whether ``data`` is an ``(x, y)`` pair of dask arrays (without importing dask)."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(type(a).__module__.startswith("dask.array") for a in data)
    )


def _dask() -> Any:
    from .dask import _dask

    return _dask()


# -- building ------------------------------------------------------------------
def build(
    model: Any,
    factors: Any,
    data: Any,
    store: Any,
    dtype: Any,
    block_rows: int | None,
    overwrite: bool,
    progress: bool,
    on_block: Any,
    client: Any,
) -> Any:
    """Build the store on dask (see the module docstring); returns its zarr group."""
    from .dask import _shipped, _to_provider

    dask = _dask()
    gp = model.gradient_provider
    xp = gp.xp
    k = sum(f.size for f in factors)
    if block_rows is not None:
        _gf.check_rows(block_rows)
    if is_dask_pair(data):
        x, y = _check_arrays(*data)
        n = int(x.shape[0])
        x0, y0 = (np.asarray(a[:1].compute()) for a in (x, y))
        if block_rows is None:
            block_rows = int(x.chunks[0][0])
        x, y = (a.rechunk({0: block_rows}) for a in (x, y))
        parts: list[Any] = [
            (xc, yc) for xc, yc in zip(x.to_delayed().ravel(), y.to_delayed().ravel())
        ]
        sizes = [int(c) for c in x.chunks[0]]
        first = Batch(_to_provider(model, x0), _to_provider(model, y0))
    else:
        if not isinstance(data, (list, tuple)):
            # (a DataLoader here would be read through in this process, batch by batch)
            raise TypeError(
                "GradientStore.build with a client takes a pair (x, y) of dask arrays or a "
                f"list of partitions (each one block), got {type(data).__name__}"
            )
        parts = list(data)
        sizes = [_partition_size(p, i) for i, p in enumerate(parts)]
        if not parts:
            raise ValueError("GradientStore.build: no partitions given")
        if block_rows is None:
            block_rows = sizes[0]
        if any(s != block_rows for s in sizes[:-1]) or not 0 < sizes[-1] <= block_rows:
            raise ValueError(
                f"every partition is one block of the store: all must hold block_rows = "
                f"{block_rows} samples but the last, which may hold fewer; got sizes {sizes}"
            )
        n = sum(sizes)
        first, _ = _gf.peek(parts[0])
    if n == 0:
        raise ValueError("GradientStore.build: the training data holds no samples")
    first = gp.prepare_batch(first)
    one = Batch(first.x[:1, ...], first.y[:1, ...])
    probe, _ = _gf.features(factors, one, xp)
    storage = _gf.storage_dtype(dtype, np.asarray(_xp.to_numpy(probe)).dtype)
    fingerprint = _gf.fingerprint(model, factors, block_rows, storage)
    if client is not None and type(store).__name__ == "MemoryStore":
        raise ValueError(
            "the workers of a dask.distributed client cannot write into an in-memory zarr "
            "store: give a directory (or a store) that they and this process share"
        )
    bs = _store.open_store(store, fingerprint, overwrite=overwrite)
    try:
        _gf.prepare(bs, factors, one, probe, xp)
        _arrays(bs, n, k, block_rows, storage)
        where = bs.group.store
        if client is not None:
            shipped = client.scatter(_shipped(model), broadcast=True, hash=False)
        else:
            shipped = dask.delayed(_shipped(model), pure=True)
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        done = [i for i in range(len(parts)) if (i, 0) in bs.done]
        todo = [i for i in range(len(parts)) if (i, 0) not in bs.done]
        # finished blocks: their data must be the data they were computed from
        digest = dask.delayed(_digest_task, pure=False)
        digests = _run([digest(shipped, parts[i]) for i in done], client)
        for i, d in zip(done, digests):
            bs.check_done(i, 0, "", d)
        if done:
            note(progress, f"resuming: {len(done)} blocks of the gradient store done")
        task = dask.delayed(_block_task, pure=False)
        tasks = [task(shipped, parts[i], where, i, starts[i], sizes[i], storage.name) for i in todo]
        bar = progress_bar(progress, total=len(parts), desc="gradient store", initial=len(done))
        try:
            for i, record in _run_as_completed(tasks, todo, client):
                bs.done[(i, 0)] = record
                if on_block is not None:
                    on_block(i)
                bar.update(1)
        finally:
            bar.close()
        seen = {tuple(int(t) for t in name.split(".")) for name in bs._done_group.group_keys()}
        lost = [i for i in todo if (i, 0) not in seen]
        if lost:
            raise _store.StoreDamagedError(
                f"the workers wrote blocks {lost[:5]} but their records are not in the store "
                f"{where} as this process sees it: the store must be on storage that the "
                "workers and this process share (the same directory, or an object store)"
            )
        bs.finish((n, k))
    finally:
        bs.close()
    return bs.group


def _check_arrays(x: Any, y: Any) -> tuple[Any, Any]:
    for name, a in (("x", x), ("y", y)):
        if a.ndim < 1 or any(len(c) != 1 for c in a.chunks[1:]):
            raise ValueError(
                f"training points: {name} must be a dask array chunked along samples only "
                f"(one chunk over the other dimensions), got chunks {a.chunks}"
            )
    if x.shape[0] != y.shape[0] or math.isnan(x.shape[0]):
        raise ValueError(
            f"training points: x and y must have the same known number of samples, got "
            f"{x.shape[0]} and {y.shape[0]}"
        )
    return x, y


def _partition_size(part: Any, i: int) -> int:
    from .sequential import _n_samples

    if isinstance(part, (tuple, list)) and len(part) == 2 and hasattr(part[0], "shape"):
        return int(part[0].shape[0])
    n = _n_samples(part)
    if n is None:
        raise TypeError(
            f"partition {i} ({type(part).__name__}) does not say how many samples it holds: "
            "pass Batches, (x, y) pairs or DataLoaders over datasets with len()"
        )
    return int(n)


def _arrays(bs: _store.BlockStore, n: int, k: int, rows: int, storage: np.dtype) -> None:
    """``values`` ``(n, k)`` and ``self_influence`` ``(n,)`` at their final shape,
    one chunk per block (a resumed sequential run's arrays grow to it)."""
    g = bs.group
    for name, shape, chunks, dt in (
        ("values", (n, k), (rows, k), storage),
        ("self_influence", (n,), (rows,), np.dtype("float64")),
    ):
        if name not in g:
            opts = _gf.VALUE_OPTIONS if name == "values" else {}
            g.create_array(name, shape=shape, chunks=chunks, dtype=dt, fill_value=np.nan, **opts)
            continue
        arr = g[name]
        if int(arr.shape[0]) > n or tuple(arr.shape[1:]) != shape[1:]:
            raise _store.StoreMismatchError(
                f"the store's {name} has shape {tuple(arr.shape)}, this run's data gives "
                f"{shape}: use a new store, or overwrite=True"
            )
        if tuple(arr.shape) != shape:
            arr.resize(shape)
    stale = [i for (i, _), rec in bs.done.items() if rec["rows"][1] > n]
    if stale:
        raise _store.StoreMismatchError(
            f"the store holds blocks {stale} beyond this run's {n} training points: use a "
            "new store, or overwrite=True"
        )
    bs.values = g["values"]


def _run(tasks: list[Any], client: Any) -> list[Any]:
    if not tasks:
        return []
    if client is not None:
        return list(client.gather(client.compute(tasks)))
    return list(_dask().compute(*tasks))


def _run_as_completed(tasks: list[Any], keys: list[int], client: Any) -> Any:
    """``(key, result)`` as the tasks finish (a client), or in order after all."""
    if not tasks:
        return
    if client is None:
        yield from zip(keys, _run(tasks, None))
        return
    from distributed import as_completed

    futures = client.compute(tasks)
    index = {f.key: key for f, key in zip(futures, keys)}
    for future in as_completed(futures):
        yield index[future.key], future.result()


def _chunk(model: Any, part: Any) -> Batch:
    """A block's training points as one prepared batch of the model's provider."""
    from .dask import _to_provider
    from .sequential import _batches

    gp = model.gradient_provider
    if isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], np.ndarray):
        part = Batch(_to_provider(model, part[0]), _to_provider(model, part[1]))
    chunks = [c for _, c in _chunking.rebatch(_batches(part), 2**62, gp)]
    if len(chunks) != 1:
        raise ValueError("a partition of the training data holds no samples")
    return chunks[0]


def _digest_task(model: Any, part: Any) -> str:
    from .dask import _unwrap

    return _store.digest(_chunk(_unwrap(model), part))


def _block_task(
    model: Any, part: Any, store: Any, i: int, r0: int, size: int, storage: str
) -> dict[str, Any]:
    """On a worker: ``B g_j`` of block ``i`` (rows ``r0:r0 + size``) into the store,
    then its finished-block record (the values first: a kill in between
    recomputes the block)."""
    from .dask import _unwrap

    model = _unwrap(model)
    gp = model.gradient_provider
    xp = gp.xp
    chunk = _chunk(model, part)
    if len(chunk) != size:
        raise ValueError(f"partition {i} holds {len(chunk)} samples; its length said {size}")
    factors = factorize(model)
    feats, self_infl = _gf.features(factors, chunk, xp)
    feats = _xp.check_finite(feats, xp=xp, what="gradient store features")
    self_np = np.asarray(_xp.to_numpy(self_infl), dtype=np.float64)
    if not np.all(np.isfinite(self_np)):
        raise FloatingPointError("self-influence of the training points is not finite")
    value = np.ascontiguousarray(np.asarray(_xp.to_numpy(feats)).astype(storage, copy=False))
    g = _store._zarr().open_group(store, mode="r+")
    r1 = r0 + size
    g["self_influence"][r0:r1] = self_np
    g["values"][r0:r1, :] = value
    record = {
        "test": "",
        "train": _store.digest(chunk),
        "rows": [r0, r1],
        "cols": [0, int(value.shape[1])],
        "self_checksum": _store.checksum(self_np),
        "checksum": _store.checksum(value),
    }
    g["done"].create_group(f"{i}.0", attributes=record, overwrite=True)
    return record


# -- scoring -------------------------------------------------------------------
def _read(store: Any, record: dict[str, Any], i: int, what: str) -> np.ndarray:
    """On a worker: block ``i``'s values or self-influences, checked against the
    checksum recorded with them."""
    g = _store._zarr().open_group(store, mode="r")
    r0, r1 = record["rows"]
    if what == "values":
        out, key = np.asarray(g["values"][r0:r1, :]), "checksum"
    else:
        out, key = np.asarray(g["self_influence"][r0:r1]), "self_checksum"
    if _store.checksum(out) != record.get(key):
        raise _store.StoreDamagedError(
            f"the gradient store {store} has a damaged block {i} (rows {r0}:{r1}): its "
            f"{'values' if what == 'values' else 'self-influences'} differ from the checksum "
            "written with them. Rerun GradientStore.build on it to recompute it"
        )
    return out


def _product_task(store: Any, record: dict[str, Any], i: int, q: np.ndarray) -> np.ndarray:
    f = _read(store, record, i, "values")
    return q @ f.astype(q.dtype, copy=False).T


def _top_k_task(
    store: Any, record: dict[str, Any], i: int, q: np.ndarray, k: int
) -> tuple[np.ndarray, ...]:
    block = _product_task(store, record, i, q)
    return _select(block, np.arange(*record["rows"], dtype=np.int64), k)


def _select(vals: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Per row, the ``k`` largest and ``k`` smallest, ties by position (as a stable
    sort: :func:`smallest_columns`)."""
    idx = np.broadcast_to(idx, vals.shape) if idx.ndim == 1 else idx
    xp, keep = _xp.namespace(vals), min(k, vals.shape[1])
    out = []
    for key in (-vals, vals):
        order = smallest_columns(key, keep, xp=xp)
        out += [np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1)]
    return tuple(out)


def _self_task(store: Any, record: dict[str, Any], i: int) -> np.ndarray:
    return _read(store, record, i, "self")


def _records(gstore: Any) -> list[dict[str, Any]]:
    out = []
    for i in range(gstore._n_blocks()):
        rec = gstore.records.get(i)
        if rec is None:
            raise _store.StoreDamagedError(
                f"the gradient store {gstore.group.store} has no finished block {i}: rerun "
                "GradientStore.build on it"
            )
        out.append(rec)
    return out


def _per_block(gstore: Any, client: Any, fn: Any, *args: Any) -> list[Any]:
    """``fn(store, record, i, *args)`` for every block, as tasks on ``client``."""
    futures = [
        client.submit(fn, gstore.group.store, rec, i, *args, pure=False)
        for i, rec in enumerate(_records(gstore))
    ]
    return list(client.gather(futures))


def _host_query(gstore: Any, q: Array, client: Any) -> tuple[Any, Any]:
    """``q`` as a numpy array scattered to the workers, and its namespace."""
    if q.ndim != 2 or int(q.shape[1]) != gstore.shape[1]:
        raise ValueError(
            f"query features must have shape (N_test, {gstore.shape[1]}), got {tuple(q.shape)}"
        )
    host = np.ascontiguousarray(_xp.to_numpy(q))
    return client.scatter(host, broadcast=True, hash=False), _xp.namespace(q)


def _back(value: np.ndarray, like: Array, xp: Any) -> Array:
    return _xp.from_numpy(value, dtype=like.dtype, device=_xp.device_of(like), xp=xp)


def influences(gstore: Any, q: Array, client: Any) -> Array:
    """``q F^T`` ``(N_test, N)``, a task per block."""
    shipped, xp = _host_query(gstore, q, client)
    parts = _per_block(gstore, client, _product_task, shipped)
    return _back(np.concatenate(parts, axis=1), q, xp)


def top_k(gstore: Any, q: Array, k: int, client: Any) -> TopK:
    """The top-``k`` of each block on the workers, merged here (the merged
    candidates keep index order, so ties resolve as in a global stable sort)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    shipped, xp = _host_query(gstore, q, client)
    parts = _per_block(gstore, client, _top_k_task, shipped, k)
    hv, hi, lv, li = (np.concatenate([p[j] for p in parts], axis=1) for j in range(4))
    k = min(k, gstore.shape[0])
    hv, hi, _, _ = _select(hv, hi, k)
    _, _, lv, li = _select(lv, li, k)
    device = _xp.device_of(q)

    def idx(a: np.ndarray) -> Array:
        return _xp.from_numpy(np.ascontiguousarray(a), dtype=xp.int64, device=device, xp=xp)

    return TopK(idx(hi), _back(hv, q, xp), idx(li), _back(lv, q, xp))


def self_influence(gstore: Any, client: Any) -> np.ndarray:
    """``(N,)`` float64, a task per block."""
    return np.concatenate(_per_block(gstore, client, _self_task))


def default_block_rows(model: Any, x: Any, y: Any, dtype: Any) -> int:
    """The block rows a sequential build would choose for training points like
    ``x[:1], y[:1]`` (so that a dask build of in-memory arrays writes the same
    store as a sequential one)."""
    from .dask import _np_dtype

    gp = model.gradient_provider
    factors = factorize(model)
    k = sum(f.size for f in factors)
    one = gp.prepare_batch(Batch(x[:1, ...], y[:1, ...]))
    return _gf.default_rows(
        model, factors, one, k, _gf.storage_dtype(dtype, np.dtype(_np_dtype(model)))
    )
