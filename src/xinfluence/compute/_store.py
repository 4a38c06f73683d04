"""Zarr stores written by the calculators: fingerprint, finished-block record, resumption.

Layout of a store (a zarr group, a local directory by default)::

    attrs["xinfluence"]   the fingerprint: kind, model class and options, mode,
                          dtype, SHA-256 of the parameters, trailing shape,
                          chunk layout (rows per chunk)
    values                the result, chunked exactly like the blocks, so each
                          block is one zarr chunk (written atomically by the
                          local store: a temporary file, then a rename)
    probe_test            the model's factors of the first test point: other
                          parameters, another fit or other test data give
                          other numbers
    probe_train           the gradient of the first training point
    done/<i>.<j>          one empty group per finished block, written after
                          its values; its attributes hold the digests of the
                          block's test and training data

A rerun lists ``done`` and computes only the other blocks; the data of a
finished block must have the same digest, the fingerprint must be equal and
the probe must agree to 1e-6, else the store is refused.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._chunking import digest
from ..errors import XinfluenceError

__all__ = ["StoreMismatchError", "digest", "model_options", "open_store"]

FORMAT = 1
PROBE_RTOL = 1e-6


class StoreMismatchError(XinfluenceError, ValueError):
    """A zarr store was written by another computation (other data, model or options)."""


def _plain(value: Any) -> Any:
    """A JSON-able rendering of simple option values (None for anything else)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        out = {str(k): _plain(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None or value.get(k) is None}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return None


_NOT_OPTIONS = {"gradient_provider", "memory_budget", "_mapper", "_data", "_factors"}


def model_options(model: Any) -> dict[str, Any]:
    """The model's class and its simple settings (regularization, blocks, solver
    options), as stored in a fingerprint."""
    opts = {}
    for key, value in sorted(vars(model).items()):
        # public settings and the solver options; other private state (caches,
        # version counters) may differ between processes for the same model
        if key in _NOT_OPTIONS or (key.startswith("_") and key != "_options"):
            continue
        plain = _plain(value)
        if plain is not None or value is None:
            opts[key] = plain
    return {
        "class": type(model).__name__,
        "provider": type(model.gradient_provider).__name__,
        "options": opts,
    }


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "writing to a zarr store needs zarr: pip install 'xinfluence[dask]'"
        ) from e
    return zarr


class BlockStore:
    """One calculator store (see the module docstring)."""

    def __init__(self, group: Any, fingerprint: dict[str, Any]):
        self.group = group
        self.fingerprint = fingerprint
        done = group.require_group("done")
        self._done_group = done
        self.done: dict[tuple[int, int], dict[str, Any]] = {}
        for name in done.group_keys():
            i, j = (int(s) for s in name.split("."))
            self.done[(i, j)] = dict(done[name].attrs)
        self.values = group["values"] if "values" in group else None

    def check_probe(self, name: str, probe: np.ndarray, meaning: str) -> None:
        """Store ``probe`` under ``name``, or compare it with the stored one."""
        g = self.group
        if name not in g:
            g.create_array(name, data=probe)
            return
        stored = np.asarray(g[name][...])
        scale = max(float(np.linalg.norm(stored)), 1e-300)
        if stored.shape != probe.shape or not (
            float(np.linalg.norm(stored - probe)) <= PROBE_RTOL * scale
        ):
            raise StoreMismatchError(
                f"the store was written with {meaning}: use a new store, or overwrite=True"
            )

    def check_done(self, i: int, j: int, test_digest: str, train_digest: str) -> bool:
        """Whether block (i, j) is finished; raises if it was made from other data."""
        rec = self.done.get((i, j))
        if rec is None:
            return False
        if rec.get("test") != test_digest or rec.get("train") != train_digest:
            side = "test" if rec.get("test") != test_digest else "training"
            raise StoreMismatchError(
                f"the store's block ({i}, {j}) was computed from other {side} data: use a new "
                "store, or overwrite=True"
            )
        return True

    def write(
        self,
        i: int,
        j: int,
        rows: tuple[int, int],
        cols: tuple[int, int],
        value: np.ndarray,
        chunks: tuple[int, ...],
        record: dict[str, Any],
    ) -> None:
        r0, r1 = rows
        c0, c1 = cols
        if self.values is None:
            self.values = self.group.create_array(
                "values",
                shape=(r1, c1, *value.shape[2:]),
                chunks=chunks,
                dtype=value.dtype,
                fill_value=np.nan if value.dtype.kind == "f" else 0,
            )
        shape = tuple(self.values.shape)
        want = (max(shape[0], r1), max(shape[1], c1), *shape[2:])
        if want != shape:
            self.values.resize(want)
        self.values[r0:r1, c0:c1, ...] = value
        # the record comes after the values: a kill in between recomputes the block
        self._done_group.create_group(f"{i}.{j}", attributes=record)
        self.done[(i, j)] = record

    def finish(self, shape: tuple[int, ...]) -> Any:
        attrs = dict(self.group.attrs)
        recorded = attrs.get("xinfluence_shape")
        if recorded is not None and tuple(recorded) != tuple(shape):
            raise StoreMismatchError(
                f"the store holds a result of shape {tuple(recorded)}, this run's data gives "
                f"{tuple(shape)}: use a new store, or overwrite=True"
            )
        if self.values is None or tuple(self.values.shape) != tuple(shape):
            raise StoreMismatchError(
                f"the store's values do not have this run's shape "
                f"gives {tuple(shape)}: use a new store, or overwrite=True"
            )
        self.group.attrs["xinfluence_shape"] = list(shape)
        return self.values


def open_store(store: Any, fingerprint: dict[str, Any], *, overwrite: bool) -> BlockStore:
    """Open or create the group at ``store`` (a path or a zarr store) for a run
    with ``fingerprint``; refuse a store written by another computation."""
    zarr = _zarr()
    fingerprint = json.loads(json.dumps(fingerprint))
    group = zarr.open_group(store, mode="w" if overwrite else "a")
    existing = group.attrs.get("xinfluence")
    if existing is None:
        if len(list(group.keys())) or len(dict(group.attrs)):
            raise StoreMismatchError(
                "the store holds data that no xinfluence calculator wrote: use an empty "
                "store, or overwrite=True"
            )
        group.attrs["xinfluence"] = fingerprint
    elif existing != fingerprint:
        diff = sorted(
            k for k in set(existing) | set(fingerprint) if existing.get(k) != fingerprint.get(k)
        )
        details = "; ".join(
            f"{k}: store {existing.get(k)!r}, this run {fingerprint.get(k)!r}" for k in diff
        )
        raise StoreMismatchError(
            f"the store was written by another computation ({details}): use a new store, "
            "or overwrite=True"
        )
    return BlockStore(group, fingerprint)
