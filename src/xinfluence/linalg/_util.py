"""Private helpers shared by the solvers (array-API only, no framework imports)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _xp
from .._xp import Array, Namespace

MatMat = Callable[[Array], Array]


def apply_operator(matmat: MatMat, v: Array, /, *, xp: Namespace, what: str = "matmat") -> Array:
    """``matmat(v)`` with a check that it kept the shape and namespace of ``v`` (K, P)."""
    out = matmat(v)
    _xp.check_namespace(out, xp=xp, what=f"the output of {what}")
    if tuple(out.shape) != tuple(v.shape):
        raise ValueError(
            f"{what} must map arrays of shape (K, P) to (K, P); given {tuple(v.shape)} "
            f"it returned {tuple(out.shape)}"
        )
    return out


def row_norms(x: Array, /, *, xp: Namespace) -> Array:
    """Euclidean norm of each row: ``(K, P) -> (K,)``."""
    return xp.linalg.vector_norm(x, axis=-1)


def full_like(x: Array, value: float, /, *, xp: Namespace) -> Array:
    return xp.full(x.shape, value, dtype=x.dtype, device=_xp.device_of(x))


def resolve_namespace(xp: Namespace, dtype: Any, device: Any, /) -> Namespace:
    """The array-API (compat) namespace for ``xp``, which may be a bare module such as ``torch``.

    Also checks that ``dtype`` is a real floating dtype of it.
    """
    xp = _xp.namespace(xp.empty((0,), dtype=dtype, device=device))
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"expected a real floating dtype, got {dtype}")
    return xp


def check_positive_int(value: int, name: str, /) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_solver_args(
    b: Array, /, *, rtol: float, atol: float, maxiter: int | None, on_failure: str
) -> tuple[Namespace, int]:
    """Validate the common arguments of the CG solvers; return ``(xp, maxiter)``
    with ``maxiter`` defaulting to ``10 P``."""
    xp = _xp.namespace(b)
    if b.ndim != 2:
        raise ValueError(
            f"expected b of shape (K, P), got shape {tuple(b.shape)}; "
            "for a single right-hand side use b[None, :]"
        )
    if not _xp.is_floating(b, xp=xp):
        raise TypeError(f"expected b with a real floating dtype, got {b.dtype}")
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    maxiter = 10 * int(b.shape[1]) if maxiter is None else int(maxiter)
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")
    return xp, maxiter
