"""Private helpers shared by the solvers (array-API only, no framework imports)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

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
    return _xp.maybe_jit(_row_norms, xp=xp)(x, xp=xp)  # jax: one program, not five


def _row_norms(x: Array, /, *, xp: Namespace) -> Array:
    return xp.linalg.vector_norm(x, axis=-1)


def padded_with_norms(b: Array, /, *, xp: Namespace, n_padded: int) -> tuple[Array, Array]:
    """``(b with zero rows up to n_padded, its row norms)``; one program on jax."""
    n_rows = int(b.shape[0])
    if n_padded > n_rows:
        pad = xp.zeros((n_padded - n_rows, int(b.shape[1])), dtype=b.dtype, device=_xp.device_of(b))
        b = xp.concat([b, pad], axis=0)
    return b, row_norms(b, xp=xp)


def padded_with_tolerances(
    b: Array, rtol: float, atol: float, /, *, xp: Namespace, n_padded: int
) -> tuple[Array, Array, Array]:
    """``(b with zero rows up to n_padded, its row norms, the row tolerances
    max(rtol |b_k|, atol))``: the start of a CG solve (inside its compiled program)."""
    b, norms = padded_with_norms(b, xp=xp, n_padded=n_padded)
    tol = norms * rtol
    return b, norms, xp.where(tol > atol, tol, full_like(tol, atol, xp=xp))


def residual_rows(
    b: Array, ax: Array, x: Array, /, *, xp: Namespace, n_rows: int
) -> tuple[Array, Array, Array]:
    """``(b - A x, its row norms, the first n_rows rows of x)``: the end of a CG
    solve, one compiled program on jax."""
    r = b - ax
    return r, row_norms(r, xp=xp), x[:n_rows, :]


def full_like(x: Array, value: float, /, *, xp: Namespace) -> Array:
    return xp.full(x.shape, value, dtype=x.dtype, device=_xp.device_of(x))


def resolve_namespace(xp: Namespace, dtype: Any, device: Any, /) -> Namespace:
    """The array-API (compat) namespace for ``xp``, which may be a bare module such as ``torch``.

    Also checks that ``dtype`` is a real floating dtype of it.
    """
    if not _xp.compiles_per_shape(xp):  # jax: an empty array would compile two programs
        xp = _xp.namespace(xp.empty((0,), dtype=dtype, device=device))
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"expected a real floating dtype, got {dtype}")
    return xp


def check_positive_int(value: int, name: str, /) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def default_rtol(dtype: Any, /, *, xp: Namespace, float64_rtol: float) -> float:
    """The default relative residual tolerance of an iterative solve in ``dtype``.

    ``float64_rtol`` for float64 (and wider); ``sqrt(eps)`` for narrower dtypes
    (float32: 3.45e-4). The solution of a solve with relative residual ``rtol``
    is within ``rtol * cond(A)`` of the exact one, and products computed in a
    dtype are themselves only accurate to about ``eps * cond(A)``, so a float32
    solve cannot reach float64's 1e-7 or 1e-8 on most problems: it would stall
    at its precision floor and warn on every query.
    """
    eps = _xp.finfo_eps(dtype, xp=xp)
    return float(float64_rtol) if eps <= 1e-15 else max(float(float64_rtol), eps**0.5)


def check_solver_args(
    b: Array,
    /,
    *,
    rtol: float | None,
    atol: float,
    maxiter: int | None,
    on_failure: str,
    float64_rtol: float = 1e-8,
) -> tuple[Namespace, float, int]:
    """Validate the common arguments of the CG solvers; return ``(xp, rtol, maxiter)``
    with ``rtol`` defaulting to :func:`default_rtol` and ``maxiter`` to ``10 P``."""
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
    if rtol is None:
        rtol = default_rtol(b.dtype, xp=xp, float64_rtol=float64_rtol)
    if not (math.isfinite(rtol) and math.isfinite(atol)) or rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be finite and >= 0, got rtol={rtol}, atol={atol}")
    maxiter = 10 * int(b.shape[1]) if maxiter is None else int(maxiter)
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")
    return xp, float(rtol), maxiter


def stall_reason(
    residual_norms: np.ndarray,
    solution_norms: np.ndarray,
    b_norms: np.ndarray,
    /,
    *,
    operator_norm: float,
    eps: float,
    size: int,
    iterations: int,
    maxiter: int,
) -> str:
    """Why the rows given stopped above their tolerance, as a sentence for a warning.

    A residual ``|b - A x|`` at or below ``10 sqrt(P) eps (|A| |x| + |b|)`` (``|A|``
    estimated from the products seen) is the rounding level of computing ``A x``
    in the dtype: the solve reached the dtype's precision floor and more
    iterations cannot help. Otherwise it either ran out of iterations or stopped
    making progress (its restarts from the true residual stopped paying off).
    """
    floor = 10 * math.sqrt(size) * eps * (operator_norm * solution_norms + b_norms)
    backward = float(
        np.max(residual_norms / np.maximum(operator_norm * solution_norms + b_norms, 1e-300))
    )
    if np.all(residual_norms <= floor):
        return (
            f"it stalled at the precision floor of the dtype after {iterations} iterations "
            f"(maxiter={maxiter}): the residual is at the rounding level of the operator's "
            f"products (normwise backward error {backward:.1e}, eps {eps:.1e}), so the "
            "solutions are as accurate as this dtype allows and raising maxiter cannot help; "
            "loosen rtol (rtol=None picks the dtype's default) or compute in float64"
        )
    if iterations >= maxiter:
        return (
            f"it reached maxiter={maxiter} while still above the tolerance (normwise backward "
            f"error {backward:.1e}); increase maxiter, add regularization or use a "
            "preconditioner"
        )
    return (
        f"it stopped making progress after {iterations} iterations, far below "
        f"maxiter={maxiter}, above the dtype's rounding level (normwise backward error "
        f"{backward:.1e}): the operator's products are not accurate (or not symmetric) to "
        "rtol; loosen rtol, add regularization, or check the operator"
    )


def round_up_2(value: float) -> float:
    """``value`` rounded up to two significant digits, exactly as it prints with
    ``:.2g`` (a printed sufficient regularization is never rounded down)."""
    if not value > 0:
        return 0.0
    exponent = math.floor(math.log10(value)) - 1
    mantissa = math.ceil(value / 10.0**exponent * (1 - 1e-12))
    return float(f"{mantissa}e{exponent}")
