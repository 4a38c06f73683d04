"""Library-wide settings: the memory budget that sizes chunks.

Chunked code asks :func:`memory_budget` for the number of bytes one chunk of
work may hold (gradients, activations, output blocks together) and sizes its
chunks from it. Users set it globally with :func:`set_memory_budget`, for a
block of code with :func:`memory_budget_scope`, or per model where a model
offers a ``memory_budget`` option (which takes precedence).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

__all__ = ["memory_budget", "set_memory_budget", "memory_budget_scope", "DEFAULT_MEMORY_BUDGET"]

#: 1 GiB, or the environment variable ``XINFLUENCE_MEMORY_BUDGET`` (bytes).
DEFAULT_MEMORY_BUDGET = 2**30

_global: list[int] = []
_local = threading.local()


def _check(nbytes: int) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"memory budget must be a positive number of bytes, got {nbytes!r}")
    return nbytes


def memory_budget() -> int:
    """The bytes one chunk of work may hold: the innermost :func:`memory_budget_scope`
    of this thread, else :func:`set_memory_budget`'s value, else
    ``XINFLUENCE_MEMORY_BUDGET``, else 1 GiB."""
    scoped = getattr(_local, "stack", None)
    if scoped:
        return int(scoped[-1])
    if _global:
        return _global[-1]
    env = os.environ.get("XINFLUENCE_MEMORY_BUDGET")
    if env:
        try:
            return _check(int(float(env)))
        except ValueError as e:
            raise ValueError(
                f"XINFLUENCE_MEMORY_BUDGET must be a positive number of bytes, got {env!r}"
            ) from e
    return DEFAULT_MEMORY_BUDGET


def set_memory_budget(nbytes: int | None) -> None:
    """Set the global budget in bytes (``None`` restores the default)."""
    _global.clear()
    if nbytes is not None:
        _global.append(_check(int(nbytes)) if not isinstance(nbytes, bool) else _check(nbytes))


@contextlib.contextmanager
def memory_budget_scope(nbytes: int) -> Iterator[None]:
    """Use ``nbytes`` as the budget inside a ``with`` block (this thread only)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(_check(int(nbytes)) if not isinstance(nbytes, bool) else _check(nbytes))
    try:
        yield
    finally:
        stack.pop()
