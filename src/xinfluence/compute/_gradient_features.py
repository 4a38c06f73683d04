"""The training side's features, shared by the sequential and the dask builds of
a :class:`~xinfluence.compute.GradientStore` (:mod:`.gradient_store`,
:mod:`._gradient_store_dask`): ``B g`` and ``<M B g, B g>`` of a chunk, the
store's fingerprint, block sizes and the checks before a (resumed) run."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _chunking, _xp
from .._xp import Array
from ..types import Batch, InfluenceMode
from . import _store
from ._factor import BlockFactor, row_bytes

KIND = "gradient_store"
CHUNK_BYTES = 32 * 2**20  # at most this many bytes of stored features per block
# features of random projections and gradients do not compress: zstd would cost
# about 6 ms per MB written and 4 per MB read (measured), for nothing
VALUE_OPTIONS: dict[str, Any] = {"compressors": None}


def storage_dtype(dtype: Any, model_dtype: np.dtype) -> np.dtype:
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


def features(factors: list[BlockFactor], batch: Batch, xp: Any) -> tuple[Array, Array]:
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


def query(factors: list[BlockFactor], feats: Array, xp: Any) -> Array:
    """``M f`` per block for features ``(N, k)``."""
    parts, start = [], 0
    for f in factors:
        parts.append(f.query(feats[:, start : start + f.size]))
        start += f.size
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)


def peek(data: Any) -> tuple[Batch, Any]:
    """The first chunk of ``data`` and an iterator over all of its chunks."""
    from .sequential import _batches, _peek

    return _peek(_batches(data), "GradientStore.build")


def default_rows(
    model: Any, factors: list[BlockFactor], one: Batch, k: int, storage: np.dtype
) -> int:
    """Training points per block: half the model's memory budget over what
    featurizing one sample like ``one`` holds (:func:`._factor.row_bytes`), at most
    ``CHUNK_BYTES`` of stored features."""
    per_row = row_bytes(factors, model.gradient_provider, one)
    budget = (_chunking.model_budget(model) // 2) // max(1, per_row)
    cap = max(1, CHUNK_BYTES // max(1, k * storage.itemsize))
    return max(1, min(budget, cap))


def check_rows(block_rows: Any) -> None:
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")


def fingerprint(
    model: Any, factors: list[BlockFactor], block_rows: int, storage: np.dtype
) -> dict[str, Any]:
    """A store's fingerprint: the same for a sequential and a dask build."""
    return {
        **_store.options_fingerprint(model, KIND, InfluenceMode.Up),
        "block_rows": block_rows,
        "storage_dtype": storage.name,
        "blocks": [[f.name, f.size] for f in factors],
    }


def prepare(
    bs: _store.BlockStore, factors: list[BlockFactor], one: Batch, probe: Array, xp: Any
) -> Any:
    """Before a (resumed) run: check or write the probes and the first training
    point, forget damaged finished blocks (with a warning); returns the
    self-influence array (None before the first block)."""
    g = bs.group
    probe_np = np.asarray(_xp.to_numpy(probe), dtype=np.float64)
    bs.check_probe(
        "probe_features",
        probe_np,
        "other training data, parameters or fit (the features of the first training point differ)",
    )
    bs.check_probe(
        "probe_query",
        np.asarray(_xp.to_numpy(query(factors, probe, xp)), dtype=np.float64),
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
    _store.warn_damaged(damaged_rows, what="the gradient store", stacklevel=4)
    return selfs
