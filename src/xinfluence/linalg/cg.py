"""Batched (preconditioned) conjugate gradients for symmetric positive definite systems."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from .. import _xp
from .._progress import Reporter
from .._xp import Array, Namespace
from ..errors import (
    NonFiniteError,
    NotConvergedError,
    NotConvergedWarning,
    NotPositiveDefiniteError,
    warn,
)
from ._results import SolverResult
from ._util import (
    MatMat,
    apply_operator,
    check_solver_args,
    padded_with_tolerances,
    row_norms,
    stall_reason,
)

__all__ = ["cg"]

OnFailure = Literal["warn", "raise", "ignore"]

# How often a row whose recurrence residual claims convergence, but whose true
# residual does not, is restarted from the true residual ("residual replacement").
_MAX_RESIDUAL_REPLACEMENTS = 5

# The iteration counter is an int32 array (jax's default integer width).
_MAX_COUNT = 2**31 - 1

_INDEFINITE_M = (
    "conjugate gradients broke down at iteration {iterations}: r^T M r <= 0 for a nonzero "
    "residual r, so the preconditioner M is not positive definite"
)


def cg(
    matmat: MatMat,
    b: Array,
    /,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    preconditioner: MatMat | None = None,
    x0: Array | None = None,
    on_failure: OnFailure = "warn",
) -> SolverResult:
    r"""Solve ``A x_k = b_k`` for ``K`` right-hand sides by conjugate gradients.

    ``A`` (P, P) is symmetric positive definite and given only through
    ``matmat``, which applies it to every row of a ``(K, P)`` array:
    ``matmat(V) = V A`` (row convention; ``A`` is symmetric). The rows are
    solved by independent CG recurrences advanced together, so every iteration
    costs exactly one batched ``matmat`` call (and one ``preconditioner`` call).
    With ``M`` the preconditioner (an SPD approximation of ``A^{-1}``) and
    ``r = b - A x``, ``z = M r``, each row follows

    .. math::
        \alpha = \frac{r^T z}{p^T A p}, \quad x \leftarrow x + \alpha p, \quad
        r \leftarrow r - \alpha A p, \quad
        p \leftarrow z' + \frac{r'^T z'}{r^T z} p.

    A row stops updating (it is masked, never dropped or zeroed) once
    ``|r_k| <= max(rtol * |b_k|, atol)``, scipy's convention. A zero
    right-hand side has the solution 0 and converges at iteration 0. When the
    recurrence residual of every row is below its tolerance, the true residual
    is recomputed; rows whose true residual is not are restarted from it (at most
    5 times, and only while that keeps reducing it: below the attainable accuracy
    the solve stops and reports the rows as not converged).

    On jax the iterations and the true residual run as one compiled program
    (``jax.lax.while_loop``, no host synchronisation per iteration): ``matmat``
    and ``preconditioner`` are traced once per call, so they must be pure
    functions of their input (host side effects, such as drawing samples with
    numpy, would run once); one that reads array values on the host runs
    iteration by iteration instead.

    Args:
        matmat: ``(K, P) -> (K, P)``, the rows of its input multiplied by ``A``.
        b: ``(K, P)`` right-hand sides as rows (a real floating array).
        rtol: relative tolerance on the residual norm of each row; None (default)
            means 1e-8 in float64 and ``sqrt(eps)`` in narrower dtypes (float32:
            3.45e-4). The relative error of a row's solution is at most ``rtol``
            times the condition number of ``A``; no dtype gets below about
            ``eps`` times it (float32: 1.2e-7, float64: 2.2e-16), so a float32
            solve with float64's tolerance would stall at that floor.
        atol: absolute tolerance on the residual norm of each row.
        maxiter: maximum number of iterations; default ``10 * P``.
        preconditioner: ``None`` or ``(K, P) -> (K, P)`` applying an SPD
            approximation of ``A^{-1}`` to each row.
        x0: ``(K, P)`` initial guess; default zero.
        on_failure: what to do if some row has not converged after ``maxiter``
            iterations: ``"warn"`` (:class:`~xinfluence.errors.NotConvergedWarning`),
            ``"raise"`` (:class:`~xinfluence.errors.NotConvergedError`) or
            ``"ignore"``. The result reports the state either way.

    Returns:
        :class:`SolverResult` with the ``(K, P)`` solution in the namespace,
        device and dtype of ``b``.

    Raises:
        NotPositiveDefiniteError: ``p^T A p <= 0`` for some search direction
            (``A`` is not positive definite; add regularization), or
            ``r^T M r <= 0`` (the preconditioner is not positive definite).
        NonFiniteError: the operator or preconditioner produced NaN or inf.
    """
    xp, rtol, maxiter = check_solver_args(
        b, rtol=rtol, atol=atol, maxiter=maxiter, on_failure=on_failure
    )
    n_rows = int(b.shape[0])

    def apply_a(v: Array) -> Array:
        return apply_operator(matmat, v, xp=xp, what="matmat")

    def apply_m(v: Array) -> Array:
        if preconditioner is None:
            return v
        return apply_operator(preconditioner, v, xp=xp, what="preconditioner")

    # Jit-compiling namespaces (jax): zero rows (converged from the start) pad the
    # right-hand sides to a few fixed counts, so that every query of a problem
    # runs the same compiled programs; the first direction comes from the same
    # code as the others (from p = 0 and r^T z = 1), and the iterations up to the
    # true residual run as one compiled program (see _xp.compiled).
    n_padded = _xp.padded_rows(n_rows, xp=xp)
    start = _xp.maybe_jit(_start, xp=xp, static_argnames=("xp", "n_padded"))
    update = _xp.maybe_jit(_update, xp=xp)
    new_direction = _xp.maybe_jit(_new_direction, xp=xp)
    b, tol, x, done, p, rz, flags = start(b, float(rtol), float(atol), xp=xp, n_padded=n_padded)
    r = b
    x_is_zero = True
    if x0 is not None:
        _xp.check_namespace(x0, xp=xp, what="x0")
        if tuple(x0.shape) != (n_rows, int(b.shape[1])):
            raise ValueError(
                f"expected x0 of shape {(n_rows, int(b.shape[1]))}, got {tuple(x0.shape)}"
            )
        x = xp.astype(x0, b.dtype)
        if n_padded > n_rows:
            x = xp.concat([x, xp.zeros_like(b[n_rows:, :])], axis=0)
        r = b - apply_a(x)
        done = row_norms(r, xp=xp) <= tol
        x_is_zero = False
    progress = Reporter("CG", maxiter)
    limit = min(maxiter, _MAX_COUNT)

    def stopping(state: tuple[Array, ...]) -> tuple[Array, Array]:
        """``(stop, breakdown)``: whether to stop iterating (every row done, maxiter
        or a breakdown) and whether a breakdown flag is set (flags: A indefinite,
        non-finite p^T A p, ratio, all done, M indefinite, non-finite r^T z, the
        last checked from the first iteration on)."""
        flags, count = state[5], state[6]
        broken = (flags[0] != 0) | (flags[1] != 0) | (flags[4] != 0)
        broken = broken | ((flags[5] != 0) & (count > 0))
        return broken | (flags[3] != 0) | (count >= limit), broken

    def iterate(state: tuple[Array, ...], ap: Array) -> tuple[Array, ...]:
        x, r, p, rz, done, flags, count, norm = state[:8]
        x, r, done, flags = update(x, r, p, ap, rz, done, tol, xp=xp)
        p, rz, flags = new_direction(r, apply_m(r), p, rz, done, flags, xp=xp)
        ratio = flags[2]  # a lower bound on |A| (for the warning)
        norm = xp.where(xp.isfinite(ratio) & (ratio > norm), ratio, norm)
        return x, r, p, rz, done, flags, count + 1, norm

    def step(state: tuple[Array, ...]) -> tuple[Array, ...]:
        """One CG iteration, or (``final``) the true residual ``b - A x``: either
        way one product, so that compiled code holds a single copy of it."""
        x, p, true_r, final = state[0], state[2], state[8], state[9]
        if _xp.is_traced(final):  # compiled: both, then a selection
            av = apply_a(xp.where(final, x, p))
            stepped = iterate(state, av)
            kept = tuple(xp.where(final, a, a_new) for a, a_new in zip(state[:8], stepped))
            true_r = xp.where(final, b - av, true_r)
        elif bool(final):
            kept, true_r = state[:8], b - apply_a(x)
        else:
            kept = stepped = iterate(state, apply_a(p))
        stop, broken = stopping(kept)
        finished = final | (stop & broken)  # after a breakdown: no true residual
        return (*kept, true_r, ~final & stop & ~broken, finished)

    def observe(state: tuple[Array, ...]) -> None:
        if progress.due():
            worst = float(_xp.to_numpy(xp.max(row_norms(state[1], xp=xp))))
            progress.report(int(state[6]), f"largest residual {worst:.3e}")

    def segment(*state: Array) -> tuple[Array, ...]:
        """From ``(x, r, p, rz, done, flags, count, |A| bound)``, with ``p`` and ``rz``
        those of the previous direction: the iterations until every row is done,
        ``maxiter`` or a breakdown, then the true residual; the state and
        ``(b - A x, its row norms, the solution rows, the rows it meets tol)``."""
        x, r, p, rz, done, flags = state[:6]
        p, rz, flags = new_direction(r, apply_m(r), p, rz, done, flags, xp=xp)
        state = (x, r, p, rz, done, flags, *state[6:])
        stop, broken = stopping(state)
        if x_is_zero and not _xp.is_traced(stop) and bool(stop & ~broken):
            true_r = b  # converged at the start: b - A 0 without a product
        else:
            state = (*state, b, stop & ~broken, stop & broken)
            state = _xp.while_loop(lambda s: ~s[10], step, state, xp=xp, observe=observe)
            state, true_r = state[:8], state[8]
        true_norms = row_norms(true_r, xp=xp)
        return (*state, true_r, true_norms, state[0][:n_rows, :], true_norms <= tol)

    count = xp.zeros((), dtype=xp.int32, device=_xp.device_of(b))
    norm = xp.zeros((), dtype=b.dtype, device=_xp.device_of(b))
    state = (x, r, p, rz, done, flags, count, norm)
    # jax: the arguments of compiled programs are committed (see _xp.committed)
    state = tuple(_xp.committed(a, xp=xp) for a in state)
    b, tol = _xp.committed(b, xp=xp), _xp.committed(tol, xp=xp)
    p_zero, rz_one, flags_zero = state[2], state[3], state[5]
    tol_host = np.asarray(_xp.to_numpy(tol), dtype=np.float64)
    replacements = 0
    last_excess = math.inf
    while True:
        out = _xp.compiled(segment, *state, xp=xp)
        state, (true_residual, true_norms, solution, done) = out[:8], out[8:]
        f = [float(v) for v in _xp.to_numpy(state[5])]
        iterations, operator_norm = int(_xp.to_numpy(state[6])), float(_xp.to_numpy(state[7]))
        if iterations and (f[1] or f[5]):
            raise NonFiniteError(
                f"conjugate gradients produced NaN or inf at iteration {iterations}: "
                "check the operator and the preconditioner"
            )
        if f[0]:
            raise not_positive_definite(
                f"conjugate gradients broke down at iteration {iterations}: p^T A p <= 0 "
                "for some search direction p",
                matmat,
                b,
                xp=xp,
            )
        if f[4]:
            raise NotPositiveDefiniteError(_INDEFINITE_M.format(iterations=iterations))
        residual_norms = np.asarray(_xp.to_numpy(true_norms), dtype=np.float64)
        converged = residual_norms <= tol_host
        if not f[3] or iterations >= maxiter or bool(np.all(converged)):
            break
        # Every recurrence residual is below tolerance but some true residual is not:
        # restart those rows from the true residual, unless that stopped paying off
        # (the tolerance is below the attainable accuracy).
        floor = np.maximum(tol_host[~converged], np.finfo(np.float64).tiny)
        excess = float(np.max(residual_norms[~converged] / floor))
        if replacements >= _MAX_RESIDUAL_REPLACEMENTS or excess > 0.5 * last_excess:
            break
        last_excess = excess
        replacements += 1
        x, count, norm = state[0], state[6], state[7]
        state = (x, true_residual, p_zero, rz_one, done, flags_zero, count, norm)
        x_is_zero = False

    x, residual_norms, converged = solution, residual_norms[:n_rows], converged[:n_rows]
    result = SolverResult(
        solution=x,
        residual_norms=residual_norms,
        iterations=iterations,
        converged=converged,
    )
    if not result.all_converged and on_failure != "ignore":
        bad = ~converged
        reason = stall_reason(
            residual_norms[bad],
            np.asarray(_xp.to_numpy(row_norms(x, xp=xp)), dtype=np.float64)[bad],
            np.asarray(_xp.to_numpy(row_norms(b[:n_rows, :], xp=xp)), dtype=np.float64)[bad],
            operator_norm=operator_norm,
            eps=_xp.finfo_eps(b.dtype, xp=xp),
            size=int(b.shape[1]),
            iterations=iterations,
            maxiter=maxiter,
        )
        message = (
            f"conjugate gradients did not converge for {int(np.sum(bad))} of {n_rows} "
            f"right-hand sides: largest residual norm {float(np.max(residual_norms[bad])):.3e} "
            f"(rtol={rtol:g}, atol={atol:g}); {reason}"
        )
        if on_failure == "raise":
            raise NotConvergedError(message)
        warn(message, NotConvergedWarning)
    return result


def _start(
    b: Array, rtol: float, atol: float, /, *, xp: Namespace, n_padded: int
) -> tuple[Array, Array, Array, Array, Array, Array, Array]:
    """``(b, tol, x, done, p, rz, flags)``: ``b`` with zero rows up to ``n_padded``,
    the row tolerances ``max(rtol |b_k|, atol)``, a zero start, which rows are
    done, ``p = 0`` and ``r^T z = 1`` (from which :func:`_new_direction` makes the
    first direction) and zero flags; one compiled program on jax."""
    b, norms, tol = padded_with_tolerances(b, rtol, atol, xp=xp, n_padded=n_padded)
    x = xp.zeros_like(b)
    rz = xp.ones((b.shape[0],), dtype=b.dtype, device=_xp.device_of(b))
    flags = xp.zeros((3,), dtype=b.dtype, device=_xp.device_of(b))
    return b, tol, x, norms <= tol, x, rz, flags


def _update(
    x: Array, r: Array, p: Array, ap: Array, rz: Array, done: Array, tol: Array, /, *, xp: Namespace
) -> tuple[Array, Array, Array, Array]:
    """The CG step along ``p`` given ``A p``: ``(x, r, done, flags)``, ``flags`` =
    ``[A indefinite, non-finite p^T A p, max |A p| / |p|]`` over the active rows
    (the last a lower bound on ``|A|``, for the precision-floor test of the warning)."""
    active = ~done
    pap = xp.linalg.vecdot(p, ap)
    p_norm = row_norms(p, xp=xp)
    ratio = xp.where(
        active & (p_norm > 0),
        row_norms(ap, xp=xp) / xp.where(p_norm > 0, p_norm, xp.ones_like(p_norm)),
        xp.zeros_like(p_norm),
    )
    bad_a = active & (pap <= 0)
    step = active & ~bad_a
    alpha = xp.where(step, rz / xp.where(step, pap, xp.ones_like(pap)), xp.zeros_like(pap))
    x = x + alpha[:, None] * p
    r = r - alpha[:, None] * ap
    done = done | (row_norms(r, xp=xp) <= tol)
    flags = xp.stack(
        [
            xp.astype(xp.any(bad_a), x.dtype),
            xp.astype(xp.any(~xp.isfinite(pap)), x.dtype),
            xp.max(ratio),
        ]
    )
    return x, r, done, flags


def _new_direction(
    r: Array, z: Array, p: Array, rz: Array, done: Array, flags: Array, /, *, xp: Namespace
) -> tuple[Array, Array, Array]:
    """The next search direction from ``z = M r``: ``(p, r^T z, flags)``, ``flags``
    = the 3 of :func:`_update` then ``[all done, M indefinite, non-finite r^T z]``
    (one host transfer per iteration)."""
    rz_new = xp.linalg.vecdot(r, z)
    going = ~done
    bad_m = going & (rz_new <= 0)
    beta = xp.where(
        going & ~bad_m, rz_new / xp.where(rz > 0, rz, xp.ones_like(rz)), xp.zeros_like(rz)
    )
    p = xp.where(going[:, None], z + beta[:, None] * p, p)
    rz = xp.where(going, rz_new, rz)
    flags_m = xp.stack(
        [
            xp.astype(xp.all(done), r.dtype),
            xp.astype(xp.any(bad_m), r.dtype),
            xp.astype(xp.any(~xp.isfinite(rz_new)), r.dtype),
        ]
    )
    return p, rz, xp.concat([flags, flags_m])


def not_positive_definite(
    what: str, matmat: MatMat, b: Array, /, *, xp: Namespace
) -> NotPositiveDefiniteError:
    """The error for a solver that met a direction of non-positive curvature, with a
    shift that suffices (:func:`~xinfluence.linalg.lanczos.positive_definite_shift`:
    a short Lanczos run, verified) rather than the Rayleigh quotient met, which
    only bounds the smallest eigenvalue from above and undershoots.

    The error carries ``smallest_eigenvalue`` (the estimate) and ``suggested_shift``.
    """
    from .lanczos import positive_definite_shift

    lowest, shift = positive_definite_shift(
        lambda v: apply_operator(matmat, v, xp=xp, what="matmat"),
        int(b.shape[1]),
        xp=xp,
        dtype=b.dtype,
        device=_xp.device_of(b),
    )
    error = NotPositiveDefiniteError(
        f"{what}: the operator is not positive definite (its smallest eigenvalue is about "
        f"{lowest:.3e} by Lanczos); add at least {shift:.2g} more regularization "
        f"(A + mu I with mu >= {shift:.2g}), or make it positive semi-definite"
    )
    error.smallest_eigenvalue = lowest  # type: ignore[attr-defined]
    error.suggested_shift = shift  # type: ignore[attr-defined]
    return error
