"""Pickling and copying of providers, operators and fitted models.

Providers and operators hold their array namespace (a module) and, for jax, a
device: neither pickles. :class:`PicklableState` stores both by name and
re-resolves them on load (:func:`xinfluence._xp.portable_state`). User
functions (a loss, a jax ``apply_fn``) pickle by their module-level name only:
:func:`check_picklable_function` turns the standard pickler's obscure error for a
lambda into one that says what to do.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
import sys
import types
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _xp

__all__ = ["PicklableState", "check_picklable_function", "fingerprint"]


def fingerprint(named: Iterable[tuple[str, Any]], /) -> str:
    """SHA-256 (hex) of named arrays: names, shapes, dtypes and bytes. Any array
    (moved to the host); a numpy array of raw bytes stands for itself."""
    h = hashlib.sha256()
    for name, a in named:
        host = np.ascontiguousarray(_xp.to_numpy(a))
        h.update(f"{name}|{host.shape}|{host.dtype.str};".encode())
        h.update(host.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


class PicklableState:
    """Mixin: ``pickle``, ``copy`` and ``copy.deepcopy`` store array namespaces and
    jax devices by name. Subclasses that drop caches override ``__getstate__``
    and call this one."""

    def __getstate__(self) -> dict[str, Any]:
        return _xp.portable_state(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(_xp.restore_state(state))


_COPY_FILE = copy.__file__


def _copying_or_cloudpickle() -> bool:
    """Whether the object is being copied (``copy``) or pickled by cloudpickle,
    both of which handle lambdas, rather than by the standard pickler."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if name == _COPY_FILE or "cloudpickle" in name:
            return True
        frame = frame.f_back
    return False


def check_picklable_function(fn: Any, what: str) -> None:
    """Raise :class:`pickle.PicklingError` naming ``what`` when the standard pickler
    is about to fail on ``fn`` (a lambda or a function defined in another
    function: pickle saves functions by module-level name). Call from
    ``__getstate__``; copies and cloudpickle are let through."""
    if not isinstance(fn, types.FunctionType):
        return  # builtins, partials, callable objects: the pickler decides
    qualname = getattr(fn, "__qualname__", "")
    if "<lambda>" not in qualname and "<locals>" not in qualname:
        return
    if _copying_or_cloudpickle():
        return
    raise pickle.PicklingError(
        f"cannot pickle {what} {fn.__module__}.{qualname}: pickle saves functions by "
        "their module-level name, which a lambda or a function defined inside another "
        "function does not have. Define it with def at module level, or pickle with "
        "cloudpickle (cloudpickle.dumps(obj); dask does so), which saves functions by value"
    )
