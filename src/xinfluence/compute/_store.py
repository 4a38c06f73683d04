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
                          block's test and training data and the checksum
                          (BLAKE2b) of the block's values as written
    .xinfluence-lock      while a run writes (local directories): its pid and
                          host; a second writer is refused

A rerun lists ``done``, verifies every finished block against its checksum
(a damaged block is recomputed) and computes only the other blocks; the data
of a finished block must have the same digest, the fingerprint must be equal
and the probe must agree to 1e-6, else the store is refused. Reading through
:func:`open_influences` verifies each block it reads. ``overwrite`` empties
only a store that xinfluence wrote (or an empty directory).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._chunking import digest
from ..errors import XinfluenceError

__all__ = [
    "StoreDamagedError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoredInfluences",
    "digest",
    "model_options",
    "open_influences",
    "open_store",
]

FORMAT = 2  # 2: a checksum per finished block
PROBE_RTOL = 1e-6
LOCK_NAME = ".xinfluence-lock"


class StoreMismatchError(XinfluenceError, ValueError):
    """A zarr store was written by another computation (other data, model or options),
    or the path holds something that xinfluence did not write."""


class StoreDamagedError(XinfluenceError, ValueError):
    """Blocks of a store do not match the checksums recorded when they were written
    (or are not finished): their values are not returned."""


class StoreLockedError(XinfluenceError, RuntimeError):
    """Another run (a live process) is writing to the same store."""


def checksum(values: np.ndarray) -> str:
    """BLAKE2b of an array's dtype, shape and raw bytes (C order)."""
    arr = np.ascontiguousarray(values)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    """A JSON-able rendering of simple option values (None for anything else)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, np.generic):  # rank=np.int64(20), tol=np.float32(1e-6)
        return _plain(value.item())
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


def options_fingerprint(model: Any, kind: str, mode: Any) -> dict[str, Any]:
    """The part of a store's fingerprint that the model, its options and its
    parameters decide, before any fit or pass over the data."""
    gp = model.gradient_provider
    return {
        "format": FORMAT,
        "kind": kind,
        "model": model_options(model),
        "mode": getattr(mode, "value", mode),
        "dtype": str(gp.dtype),
        "n_parameters": gp.n_parameters,
        # SHA-256 of the parameters (None where the provider has none): an
        # optimizer step, however small, is another computation
        "parameters": gp.parameter_fingerprint(),
    }


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "writing to a zarr store needs zarr: pip install 'xinfluence[dask]'"
        ) from e
    return zarr


def _diff(stored: Any, now: Any, path: str = "") -> list[str]:
    """The differing leaves of two fingerprints, as "name: store X, now Y"."""
    if isinstance(stored, dict) and isinstance(now, dict):
        if set(stored) == set(now) and _uniform(stored) and _uniform(now):
            # one value for every block (regularization): name it once
            return _diff(next(iter(stored.values())), next(iter(now.values())), path)
        out = []
        for k in sorted(set(stored) | set(now)):
            out += _diff(stored.get(k), now.get(k), f"{path}.{k}" if path else str(k))
        return out
    if stored == now:
        return []
    # the model's options are the common case: name them without the prefix
    name = path.removeprefix("model.options.").removeprefix("model.")
    return [f"{name}: store {stored!r}, now {now!r}"]


def _uniform(d: dict[str, Any]) -> bool:
    values = [json.dumps(v, sort_keys=True) for v in d.values()]
    return (
        len(values) >= 1 and len(set(values)) == 1 and not isinstance(next(iter(d.values())), dict)
    )


class BlockStore:
    """One calculator store (see the module docstring)."""

    #: extra options of the values array when this store creates it (``compressors``)
    value_options: dict[str, Any]

    def __init__(self, group: Any, fingerprint: dict[str, Any], lock: _Lock | None = None):
        self.value_options = {}
        self.group = group
        self.fingerprint = fingerprint
        self.lock = lock
        done = group.require_group("done")
        self._done_group = done
        self.done: dict[tuple[int, int], dict[str, Any]] = {}
        for name in done.group_keys():
            i, j = (int(s) for s in name.split("."))
            self.done[(i, j)] = dict(done[name].attrs)
        self.values = group["values"] if "values" in group else None

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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

    def damage(self, i: int, j: int) -> str | None:
        """Why finished block (i, j) cannot be trusted, or None when its values
        match the recorded checksum."""
        return _block_damage(self.values, self.done[(i, j)])

    def drop_damaged(self) -> list[tuple[tuple[int, int], str]]:
        """Verify every finished block; forget the damaged ones (they are recomputed)."""
        damaged = []
        for key in sorted(self.done):
            why = self.damage(*key)
            if why is not None:
                damaged.append((key, why))
                del self._done_group[f"{key[0]}.{key[1]}"]
                del self.done[key]
        return damaged

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
                **self.value_options,
            )
        shape = tuple(self.values.shape)
        want = (max(shape[0], r1), max(shape[1], c1), *shape[2:])
        if want != shape:
            self.values.resize(want)
        value = np.ascontiguousarray(value, dtype=self.values.dtype)
        self.values[r0:r1, c0:c1, ...] = value
        # the record comes after the values: a kill in between recomputes the block
        record = {**record, "checksum": checksum(value)}
        self._done_group.create_group(f"{i}.{j}", attributes=record, overwrite=True)
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


def _block_damage(values: Any, rec: dict[str, Any]) -> str | None:
    if values is None:
        return "no values array"
    if "checksum" not in rec:
        return "no checksum recorded"
    (r0, r1), (c0, c1) = rec["rows"], rec["cols"]
    try:
        block = np.asarray(values[r0:r1, c0:c1, ...])
    except Exception as exc:  # a chunk that does not decompress
        return f"unreadable ({type(exc).__name__}: {exc})"
    if checksum(block) != rec["checksum"]:
        return "its values differ from the checksum written with them"
    return None


# -- locks, overwrite, opening ---------------------------------------------------
def _local_path(store: Any) -> Path | None:
    """The directory of a local store (a path or a zarr LocalStore), else None."""
    if isinstance(store, (str, os.PathLike)):
        s = os.fspath(store)
        return None if "://" in s else Path(s)
    root = getattr(store, "root", None)
    if type(store).__name__ == "LocalStore" and root is not None:
        return Path(root)
    return None


def _alive(pid: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - no signal 0 there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    """An exclusive lock file in a local store: created with O_EXCL, holding the
    writer's pid and host. A lock of a dead process on this host is taken over."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        me = {"pid": os.getpid(), "host": host, "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                pid = holder.get("pid")
                if holder.get("host") == host and isinstance(pid, int) and not _alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise StoreLockedError(
                    f"another run is writing to the store {self.path.parent} (pid "
                    f"{pid}, host {holder.get('host')}, lock file {self.path}): wait for it "
                    "to finish; if no such process runs, delete the lock file"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise StoreLockedError(f"cannot take the lock {self.path}")  # pragma: no cover

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _attrs_of(directory: Path) -> dict[str, Any] | None:
    """The attributes of the zarr group at a local directory (None if not one)."""
    try:
        meta = json.loads((directory / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        return None
    attrs = meta.get("attributes", {})
    return attrs if isinstance(attrs, dict) else {}


def is_xinfluence_store(directory: Path) -> bool:
    attrs = _attrs_of(directory)
    return attrs is not None and ("xinfluence" in attrs or "xinfluence_cli" in attrs)


def check_overwritable(directory: Path) -> None:
    """Refuse to empty ``directory`` unless it is absent, empty (but for a lock)
    or a store that xinfluence wrote."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise StoreMismatchError(
            f"refusing to overwrite {directory}: it is a file, not a store that xinfluence "
            "wrote; choose another path"
        )
    entries = sorted(e for e in os.listdir(directory) if e != LOCK_NAME)
    if not entries or is_xinfluence_store(directory):
        return
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    zarr_group = _attrs_of(directory) is not None
    what = "a zarr group without xinfluence's fingerprint" if zarr_group else "files"
    raise StoreMismatchError(
        f"refusing to overwrite {directory}: it is not a store that xinfluence wrote "
        f"({what}: {shown}); choose another path, or remove it yourself"
    )


def precheck(store: Any, fingerprint: dict[str, Any], *, overwrite: bool) -> None:
    """What can be decided before any fitting: whether ``store`` may be
    overwritten, and whether an existing store's fingerprint agrees with the
    given part of this run's (for example the options alone)."""
    directory = _local_path(store)
    if directory is None or not directory.exists():
        return
    check_overwritable(directory)
    if overwrite:
        return
    attrs = _attrs_of(directory)
    existing = None if attrs is None else attrs.get("xinfluence")
    if existing is None:
        return
    fingerprint = json.loads(json.dumps(fingerprint))
    diff = _diff({k: existing.get(k) for k in fingerprint}, fingerprint)
    if diff:
        raise StoreMismatchError(
            f"the store was written by another computation ({'; '.join(diff)}): use a new "
            "store, or overwrite=True"
        )


def _empty(directory: Path) -> None:
    for entry in os.listdir(directory):
        if entry == LOCK_NAME:
            continue
        target = directory / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


def warn_damaged(damaged: list[tuple[Any, str]], *, what: str, stacklevel: int) -> None:
    """Warn that the finished blocks ``damaged`` (``(block, why)``, at most five
    shown) of ``what`` are recomputed; ``stacklevel`` as the caller's own."""
    if damaged:
        shown = "; ".join(f"block {k}: {why}" for k, why in damaged[:5])
        warnings.warn(
            f"{len(damaged)} finished block(s) of {what} are damaged and are recomputed ({shown})",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def open_store(store: Any, fingerprint: dict[str, Any], *, overwrite: bool) -> BlockStore:
    """Open or create the group at ``store`` (a path or a zarr store) for a run
    with ``fingerprint``; refuse a store written by another computation, a path
    holding anything else, and a store another live process is writing to."""
    zarr = _zarr()
    fingerprint = json.loads(json.dumps(fingerprint))
    directory = _local_path(store)
    lock = None
    if directory is not None:
        if overwrite:
            check_overwritable(directory)
        lock = _Lock(directory)
        lock.acquire()
    try:
        if overwrite and directory is not None:
            _empty(directory)
        if overwrite and directory is None:
            group = zarr.open_group(store, mode="a")
            if len(list(group.keys())) or len(dict(group.attrs)):
                if "xinfluence" not in group.attrs and "xinfluence_cli" not in group.attrs:
                    raise StoreMismatchError(
                        "refusing to overwrite a store that xinfluence did not write: use "
                        "another store"
                    )
            group = zarr.open_group(store, mode="w")
        else:
            group = zarr.open_group(store, mode="a")
        existing = group.attrs.get("xinfluence")
        if existing is None:
            with warnings.catch_warnings():  # our lock file is no zarr node
                warnings.simplefilter("ignore")
                members = list(group.keys())
            if members or len(dict(group.attrs)):
                raise StoreMismatchError(
                    "the store holds data without a calculator's fingerprint (another "
                    "program's, or a dask run of an earlier xinfluence): use an empty store, "
                    "or overwrite=True where xinfluence wrote it"
                )
            group.attrs["xinfluence"] = fingerprint
        elif existing != fingerprint:
            raise StoreMismatchError(
                f"the store was written by another computation "
                f"({'; '.join(_diff(existing, fingerprint))}): use a new store, or "
                "overwrite=True"
            )
        return BlockStore(group, fingerprint, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


# -- reading ----------------------------------------------------------------------
class StoredInfluences:
    """The values of a calculator's store, read with every block verified.

    ``stored[key]`` (numpy indexing on the first two axes, e.g. ``stored[:10]``,
    ``stored[...]``) returns a numpy array after checking each block it
    touches against the checksum recorded when the block was written; a
    damaged or unfinished block raises :class:`StoreDamagedError` naming its
    (test chunk, training chunk) index. ``verify()`` checks all blocks.
    ``array`` is the raw zarr array (no checks).
    """

    def __init__(self, group: Any):
        fingerprint = group.attrs.get("xinfluence")
        if fingerprint is None or "values" not in group:
            raise StoreMismatchError("not a store written by an xinfluence calculator")
        self.group = group
        if "xinfluence_shape" not in group.attrs:
            n = len(list(group["done"].group_keys())) if "done" in group else 0
            raise StoreDamagedError(
                f"the store {group.store} is unfinished ({n} blocks done; its run was "
                "interrupted): rerun the computation on it to finish it"
            )
        self.array = group["values"]
        self.shape = tuple(int(d) for d in self.array.shape)
        self.dtype = self.array.dtype
        self.chunks = tuple(self.array.chunks)
        self.test_rows = int(fingerprint.get("test_rows") or max(self.shape[0], 1))
        self.train_rows = int(fingerprint.get("train_rows") or max(self.shape[1], 1))
        self.records: dict[tuple[int, int], dict[str, Any]] = {}
        if "done" in group:
            done = group["done"]
            for name in done.group_keys():
                i, j = (int(s) for s in name.split("."))
                self.records[(i, j)] = dict(done[name].attrs)
        self._verified: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        return self.shape[0]

    def _check(self, blocks: list[tuple[int, int]]) -> None:
        bad = []
        for key in blocks:
            if key in self._verified:
                continue
            rec = self.records.get(key)
            why = "not finished" if rec is None else _block_damage(self.array, rec)
            if why is None:
                self._verified.add(key)
            else:
                bad.append(f"block {key}: {why}")
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise StoreDamagedError(
                f"the store {self.group.store} has {len(bad)} damaged or unfinished block(s) "
                f"(test chunk, training chunk): {'; '.join(bad[:5])}{more}. Rerun the "
                "computation on the store to recompute them"
            )

    def verify(self) -> None:
        """Check every block; raise :class:`StoreDamagedError` naming the bad ones."""
        rows = range(-(-self.shape[0] // self.test_rows))
        cols = range(-(-self.shape[1] // self.train_rows))
        self._check([(i, j) for i in rows for j in cols])

    def __getitem__(self, key: Any) -> np.ndarray:
        k = key if isinstance(key, tuple) else (key,)
        k = tuple(slice(None) if part is Ellipsis else part for part in k[:2])
        k = k + (slice(None),) * (2 - len(k))
        rows = np.unique(np.arange(self.shape[0])[k[0]] // self.test_rows)
        cols = np.unique(np.arange(self.shape[1])[k[1]] // self.train_rows)
        self._check([(int(i), int(j)) for i in rows for j in cols])
        return np.asarray(self.array[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def open_influences(store: Any) -> StoredInfluences:
    """Open a calculator's store for reading, with each block verified against
    its checksum (see :class:`StoredInfluences`)."""
    zarr = _zarr()
    return StoredInfluences(zarr.open_group(store, mode="r"))
