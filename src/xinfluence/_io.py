"""Saving and loading fitted influence models without pickle.

A file is one ``.npz`` archive (numpy's zip of ``.npy`` arrays, read with
``allow_pickle=False``) holding

* ``__metadata__``: UTF-8 JSON with the format version, the model's class and
  constructor options, the block structure and regularizations, the parameter
  names, shapes, dtype and SHA-256 fingerprint, and per block the operator's
  kind and scalar fields;
* the arrays of each block's operator (dense curvature and Cholesky factor,
  eigenpairs, EK-FAC bases and eigenvalues, the projected curvature of a
  ProjectedInfluence, whose seeded map is drawn again from its options on
  load), as ``block{i}/{field}``;
* for models that solve at query time from the training data (CG, LiSSA,
  DataInf), the prepared training batches ``data{j}/x`` and ``data{j}/y``: their
  operators are rebuilt from that data and the saved options on load (CG's
  preconditioner and LiSSA's scale estimate are recomputed; both are seeded).

* ``__metadata_sha256__``: the SHA-256 (hex, as bytes) of the metadata's bytes.

The metadata record the SHA-256 of every array (its name, shape, dtype and
bytes) under ``digests``; :func:`load` verifies every digest and the set of
arrays, and raises :class:`~xinfluence.errors.CorruptFileError` naming the file
and what differs (an array scaled by 2, an edited regularization, an array
removed or added, a truncated or empty file). The digests detect damage and
edits, not a forger who recomputes them. Files of format version 1 (no digests)
still load, with a warning that they cannot be verified.

Nothing in a file is executed: loading reads arrays and JSON, instantiates
only the classes named in :data:`MODELS` and :data:`_STATE_OPERATORS`, and
takes the gradient provider (the model) from the caller.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
import zlib
from collections import OrderedDict
from typing import Any

import numpy as np

from . import _xp
from ._state import fingerprint
from .errors import CorruptFileError, warn
from .operators import (
    CgOperator,
    DirectOperator,
    EkfacOperator,
    IdentityOperator,
    InverseHarmonicMeanOperator,
    LissaOperator,
    LowRankOperator,
)
from .types import Batch, GradientProvider, OperatorGradientComposition

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "xinfluence.fitted-model"
FORMAT_VERSION = 2
# versions load reads; version 1 has no digests (loaded with a warning)
_READABLE_VERSIONS = (1, 2)
_METADATA = "__metadata__"
_METADATA_DIGEST = "__metadata_sha256__"

# Operators whose state (arrays and scalars) is the whole fitted state.
_STATE_OPERATORS: dict[str, Any] = {
    "direct": DirectOperator,
    "low_rank": LowRankOperator,
    "ekfac": EkfacOperator,
    "identity": IdentityOperator,
}
#: Operators around a DirectOperator ``inner`` (saved as "direct" is) whose other
#: state the model rebuilds from its options on load, with
#: ``model._restore_block(block, block_provider, inner)`` -> the block's
#: composition: kind -> class, filled by the module that defines them
#: (xinfluence.projection: "projected"), so that this module need not import it.
WRAPPED_OPERATORS: dict[str, type] = {}
# Operator attributes that report how a fit went and play no part in queries.
_DIAGNOSTICS = frozenset({"eigen_result"})
# Operators that keep the training data and solve at query time.
_DATA_OPERATORS = (CgOperator, LissaOperator, InverseHarmonicMeanOperator)
#: The public model classes by name (a file's "class"), filled by
#: ComposableInfluence.__init_subclass__ for the models defined in
#: xinfluence.influence, so that this module need not import influence.
MODELS: dict[str, type] = {}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "shape") and getattr(value, "shape", None) == ():
        return float(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"cannot save an option of type {type(value).__name__}: {value!r}")


def _encode_scalar(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, slice):
        return {"slice": [value.start, value.stop, value.step]}
    if isinstance(value, _xp._NamespaceRef):
        return {"namespace": value.name}
    raise TypeError(
        f"cannot save {where} of type {type(value).__name__}: only arrays and scalars are "
        "saved (please report this: an operator gained state that save does not know)"
    )


def _decode_scalar(value: Any, xp: Any) -> Any:
    if isinstance(value, dict) and "slice" in value:
        return slice(*value["slice"])
    if isinstance(value, dict) and "namespace" in value:
        return xp  # the caller's provider decides the namespace, not the file
    return value


def _is_array(value: Any) -> bool:
    import array_api_compat

    return bool(array_api_compat.is_array_api_obj(value)) and not isinstance(value, np.generic)


def _host(a: Any) -> np.ndarray:
    return np.ascontiguousarray(_xp.to_numpy(a))


def _to_provider(a: np.ndarray, gp: GradientProvider) -> Any:
    xp = gp.xp
    dtype = getattr(xp, a.dtype.name, None)
    if dtype is None:
        raise ValueError(f"the file holds an array of dtype {a.dtype}, which {xp} lacks")
    return _xp.from_numpy(a, dtype=dtype, device=gp.device, xp=xp)


def _parameters(gp: GradientProvider) -> dict[str, Any]:
    return {
        "names": list(gp.parameter_names),
        "shapes": [list(s) for s in gp.parameter_shapes.values()],
        "dtype": str(_host(_xp.eye(1, dtype=gp.dtype, device=gp.device, xp=gp.xp)).dtype),
        "fingerprint": gp.parameter_fingerprint(),
    }


def save(model: Any, path: str | os.PathLike[str]) -> None:
    """Write ``model``'s fitted state to ``path`` (see the module docstring)."""
    arrays = _archive(model)
    # write a sibling file, then rename: an interrupted save leaves no truncated file
    target = os.fspath(path)
    partial = target + ".partial"
    try:
        with open(partial, "wb") as f:  # np.savez(path) would append ".npz"
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def dumps(model: Any) -> bytes:
    """The bytes :func:`save` would write (for a file kept elsewhere, e.g. in a store)."""
    buffer = io.BytesIO()
    np.savez(buffer, **_archive(model))  # type: ignore[arg-type]
    return buffer.getvalue()


def _archive(model: Any) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file of ``model``, metadata and digests included."""
    mapper = model._fitted_mapper()  # NotFittedError, StaleFitError
    gp = model.gradient_provider
    arrays: dict[str, np.ndarray] = {}
    blocks: list[dict[str, Any]] = []
    needs_data = False
    for i, (block, comp) in enumerate(mapper.composable_block_dict.items()):
        op = comp.op
        kind = next((k for k, c in _STATE_OPERATORS.items() if type(op) is c), None)
        wrapped = next((k for k, c in WRAPPED_OPERATORS.items() if type(op) is c), None)
        if kind is not None:
            blocks.append({"name": block, "kind": kind, **_operator_state(op, i, arrays)})
        elif wrapped is not None:
            entry = _operator_state(op.inner, i, arrays)
            blocks.append({"name": block, "kind": wrapped, **entry})
        elif isinstance(op, _DATA_OPERATORS):
            needs_data = True
            blocks.append({"name": block, "kind": "from_data"})
        else:
            raise NotImplementedError(
                f"{type(model).__name__}.save does not know the operator "
                f"{type(op).__name__} of block {block!r}; saving supports Direct, Arnoldi, "
                "Nyström, EK-FAC, Identity, Projected, and (with their training data) CG, "
                "LiSSA and DataInf models. Pickle the model instead, or refit it after loading"
            )
    n_batches = 0
    if needs_data:
        assert model._data is not None
        for j, batch in enumerate(model._data):
            arrays[f"data{j}/x"] = _host(batch.x)
            arrays[f"data{j}/y"] = _host(batch.y)
            n_batches = j + 1
    from . import __version__

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "xinfluence_version": __version__,
        "class": type(model).__name__,
        "options": model._init_kwargs,
        "second_order": model.second_order,
        "blocks": {k: list(v) for k, v in model.blocks.items()},
        "regularization": dict(model.regularization),
        "parameters": _parameters(gp),
        "namespace": _xp.namespace_name(gp.xp),
        "operators": blocks,
        "data_batches": n_batches,
    }
    metadata["digests"] = {k: _digest(k, a) for k, a in arrays.items()}
    raw = json.dumps(metadata, default=_json_default).encode("utf-8")
    arrays[_METADATA] = np.frombuffer(raw, dtype=np.uint8)
    arrays[_METADATA_DIGEST] = np.frombuffer(
        hashlib.sha256(raw).hexdigest().encode("ascii"), dtype=np.uint8
    )
    return arrays


def _operator_state(op: Any, i: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Put the arrays of ``op``'s state into ``arrays`` (as ``block{i}/{field}``);
    returns the entry's ``arrays``, ``transposed`` and ``scalars``."""
    scalars: dict[str, Any] = {}
    fields: list[str] = []
    transposed: list[str] = []
    for key, value in op.__getstate__().items():
        if key in _DIAGNOSTICS:
            continue
        if _is_array(value):
            host = _xp.to_numpy(value)
            # keep a transposed view transposed: products with it then take
            # the same BLAS path after loading (bit-for-bit results)
            if host.ndim == 2 and host.flags.f_contiguous and not host.flags.c_contiguous:
                host = host.T
                transposed.append(key)
            arrays[f"block{i}/{key}"] = np.ascontiguousarray(host)
            fields.append(key)
        else:
            scalars[key] = _encode_scalar(value, f"{type(op).__name__}.{key}")
    return {"arrays": fields, "transposed": transposed, "scalars": scalars}


def _operator_from_state(
    op_cls: Any, entry: dict[str, Any], i: int, arrays: dict[str, np.ndarray], gp: Any
) -> Any:
    state = {k: _decode_scalar(v, gp.xp) for k, v in entry["scalars"].items()}
    for key in entry["arrays"]:
        state[key] = _to_provider(arrays[f"block{i}/{key}"], gp)
        if key in entry["transposed"]:
            state[key] = gp.xp.matrix_transpose(state[key])
    op = op_cls.__new__(op_cls)
    op.__setstate__(state)
    return op


def _digest(name: str, a: np.ndarray) -> str:
    return fingerprint([(name, a)])


def _open_archive(name: str, raw: bytes | None = None) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file (or of its bytes ``raw``, read from elsewhere
    under the name ``name``); :class:`CorruptFileError` where it cannot be read."""
    source: Any = name if raw is None else io.BytesIO(raw)
    try:
        with np.load(source, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise CorruptFileError(f"{name!r} is a single .npy array, not a saved model")
            return {k: archive[k] for k in archive.files}
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except CorruptFileError:
        raise
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError, KeyError) as e:
        if raw is not None:
            size: int | None = len(raw)
            source = io.BytesIO(raw)
        else:
            size = os.path.getsize(name) if os.path.isfile(name) else None
        if size == 0:
            what = "is empty (0 bytes)"
        elif not zipfile.is_zipfile(source):
            what = f"({size} bytes) is not a complete .npz (zip) archive"
        else:
            what = f"({size} bytes) has an unreadable array ({type(e).__name__}: {e})"
        raise CorruptFileError(
            f"{name!r} {what}: the file is truncated or damaged, or was not written by "
            "save. Save the model again"
        ) from e


def _read(
    path: str | os.PathLike[str], raw: bytes | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    name = os.fspath(path)
    arrays = _open_archive(name, raw)
    raw_array = arrays.pop(_METADATA, None)
    if raw_array is None:
        raise ValueError(f"{name!r} is not a saved xinfluence model (no metadata)")
    raw = bytes(raw_array)
    stored = arrays.pop(_METADATA_DIGEST, None)
    if stored is not None and bytes(stored).decode("ascii", "replace") != (
        hashlib.sha256(raw).hexdigest()
    ):
        raise CorruptFileError(
            f"{name!r}: the metadata (class, options, regularization, blocks, parameter "
            "fingerprint, array digests) differ from the SHA-256 recorded at save: the file "
            "was edited or damaged. Save the model again"
        )
    try:
        metadata = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{name!r}: the metadata are not readable JSON ({e})") from e
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{name!r} is not a saved xinfluence model")
    version = metadata.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"{name!r} has format version {version}; this xinfluence reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}"
        )
    if version == 1:
        warn(
            f"{name!r} was saved by an older xinfluence (format version 1) without digests: "
            "its arrays and metadata cannot be verified. Save it again to add them"
        )
        return metadata, arrays
    if stored is None:
        raise CorruptFileError(f"{name!r}: the metadata's digest ({_METADATA_DIGEST}) is missing")
    _verify_arrays(name, metadata.get("digests", {}), arrays)
    return metadata, arrays


def _verify_arrays(name: str, digests: dict[str, str], arrays: dict[str, np.ndarray]) -> None:
    """:class:`CorruptFileError` listing every array missing, added or changed."""
    problems = [f"array {k!r} is missing" for k in digests if k not in arrays]
    problems += [f"array {k!r} was added" for k in arrays if k not in digests]
    for k, a in arrays.items():
        if k in digests and _digest(k, a) != digests[k]:
            problems.append(
                f"array {k!r} ({a.dtype}, shape {a.shape}) differs from its SHA-256 at save"
            )
    if problems:
        raise CorruptFileError(
            f"{name!r} was edited or damaged after save: "
            + "; ".join(problems)
            + ". Save the model again"
        )


def _check_parameters(saved: dict[str, Any], gp: GradientProvider, on_mismatch: str) -> None:
    mine = _parameters(gp)
    if mine["names"] != saved["names"] or mine["shapes"] != saved["shapes"]:
        have = dict(zip(mine["names"], mine["shapes"]))
        problems = [
            f"{n}: saved {tuple(s)}, provider " + (str(tuple(have[n])) if n in have else "has none")
            for n, s in zip(saved["names"], saved["shapes"])
            if have.get(n) != s
        ]
        problems += [f"{n}: not in the file" for n in have if n not in saved["names"]]
        raise ValueError(
            "the gradient provider does not match the saved model: "
            + ("; ".join(problems) or "the parameter order differs")
        )
    if mine["dtype"] != saved["dtype"]:
        raise ValueError(
            f"the saved model was fitted in {saved['dtype']}, the provider's parameters are "
            f"{mine['dtype']}"
        )
    if saved["fingerprint"] is None or mine["fingerprint"] is None:
        return
    if saved["fingerprint"] != mine["fingerprint"] and on_mismatch != "ignore":
        message = (
            "the provider's parameter values differ from those the saved model was fitted on "
            "(SHA-256 fingerprints differ): its influences would mix the saved curvature with "
            "other gradients. Load the weights the model was fitted with, or refit"
        )
        if on_mismatch == "raise":
            from .errors import StaleFitError

            raise StaleFitError(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def load(
    path: str | os.PathLike[str],
    gradient_provider: GradientProvider,
    *,
    expected: type | None = None,
    on_mismatch: str = "raise",
    raw: bytes | None = None,
) -> Any:
    """Read a model saved by :func:`save`, for ``gradient_provider`` (see
    :meth:`~xinfluence.ComposableInfluence.load`); ``raw``: the file's bytes, read
    from elsewhere (a gradient store), ``path`` then only names them in errors."""
    if on_mismatch not in ("raise", "warn", "ignore"):
        raise ValueError(f"on_mismatch must be 'raise', 'warn' or 'ignore', got {on_mismatch!r}")
    if not isinstance(gradient_provider, GradientProvider):
        raise TypeError(
            "expected a GradientProvider as second argument, got "
            f"{type(gradient_provider).__name__}"
        )
    metadata, arrays = _read(path, raw)
    cls = MODELS.get(metadata["class"])
    if cls is None:
        raise ValueError(f"unknown model class {metadata['class']!r} in {os.fspath(path)!r}")
    if expected is not None and not issubclass(cls, expected):
        raise TypeError(
            f"{os.fspath(path)!r} holds a {cls.__name__}, not a {expected.__name__}; "
            "use xinfluence.load to load any model"
        )
    gp = gradient_provider
    _check_parameters(metadata["parameters"], gp, on_mismatch)
    model = cls(gp, **metadata["options"])
    blocks = {k: tuple(v) for k, v in metadata["blocks"].items()}
    if blocks != dict(model.blocks):
        raise ValueError(
            f"the saved blocks {list(blocks)} differ from those the options give here "
            f"({list(model.blocks)})"
        )
    model.regularization = OrderedDict((k, float(v)) for k, v in metadata["regularization"].items())
    data = None
    if metadata["data_batches"]:
        from .curvature import Dataset

        batches = [
            Batch(_to_provider(arrays[f"data{j}/x"], gp), _to_provider(arrays[f"data{j}/y"], gp))
            for j in range(metadata["data_batches"])
        ]
        data = Dataset(batches, gp)
    comps: OrderedDict[str, OperatorGradientComposition] = OrderedDict()
    for i, entry in enumerate(metadata["operators"]):
        block = entry["name"]
        block_gp = model._block_provider(model.blocks[block])
        if entry["kind"] == "from_data":
            assert data is not None
            op = model._create_operator(
                block, block_gp, data.with_provider(block_gp), model.regularization[block]
            )
        elif entry["kind"] in WRAPPED_OPERATORS:
            inner = _operator_from_state(DirectOperator, entry, i, arrays, gp)
            comps[block] = model._restore_block(block, block_gp, inner)
            continue
        else:
            op = _operator_from_state(_STATE_OPERATORS[entry["kind"]], entry, i, arrays, gp)
        comps[block] = OperatorGradientComposition(op, block_gp)
    model._data = data
    model._mapper = model._compose(comps)
    return model
