"""Batched (preconditioned) conjugate gradients for symmetric positive definite systems."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np

from .. import _xp
from .._progress import Reporter
from .._xp import Array
from ..errors import (
    NonFiniteError,
    NotConvergedError,
    NotConvergedWarning,
    NotPositiveDefiniteError,
)
from ._results import SolverResult
from ._util import MatMat, apply_operator, check_solver_args, full_like, row_norms

__all__ = ["cg"]

OnFailure = Literal["warn", "raise", "ignore"]

# How often a row whose recurrence residual claims convergence, but whose true
# residual does not, is restarted from the true residual ("residual replacement").
_MAX_RESIDUAL_REPLACEMENTS = 5

_INDEFINITE_M = (
    "conjugate gradients broke down at iteration {iterations}: r^T M r <= 0 for a nonzero "
    "residual r, so the preconditioner M is not positive definite"
)


def cg(
    matmat: MatMat,
    b: Array,
    /,
    *,
    rtol: float = 1e-8,
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

    Args:
        matmat: ``(K, P) -> (K, P)``, the rows of its input multiplied by ``A``.
        b: ``(K, P)`` right-hand sides as rows (a real floating array).
        rtol: relative tolerance on the residual norm of each row.
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
    xp, maxiter = check_solver_args(b, rtol=rtol, atol=atol, maxiter=maxiter, on_failure=on_failure)
    n_rows = int(b.shape[0])

    def apply_a(v: Array) -> Array:
        return apply_operator(matmat, v, xp=xp, what="matmat")

    def apply_m(v: Array) -> Array:
        if preconditioner is None:
            return v
        return apply_operator(preconditioner, v, xp=xp, what="preconditioner")

    tol = row_norms(b, xp=xp) * rtol
    tol = xp.where(tol > atol, tol, full_like(tol, atol, xp=xp))

    if x0 is None:
        x = xp.zeros_like(b)
        r = b
        x_is_zero = True
    else:
        _xp.check_namespace(x0, xp=xp, what="x0")
        if tuple(x0.shape) != tuple(b.shape):
            raise ValueError(f"expected x0 of shape {tuple(b.shape)}, got {tuple(x0.shape)}")
        x = xp.astype(x0, b.dtype)
        r = b - apply_a(x)
        x_is_zero = False

    done = row_norms(r, xp=xp) <= tol
    z = apply_m(r)
    p = z
    rz = xp.linalg.vecdot(r, z)

    iterations = 0
    replacements = 0
    last_excess = math.inf
    tol_host = np.asarray(_xp.to_numpy(tol), dtype=np.float64)
    flags = _xp.to_numpy(xp.stack([xp.all(done), xp.any(~done & (rz <= 0))]))
    all_done = bool(flags[0])
    if bool(flags[1]):
        raise NotPositiveDefiniteError(_INDEFINITE_M.format(iterations=0))
    progress = Reporter("CG", maxiter)
    while True:
        while not all_done and iterations < maxiter:
            active = ~done
            ap = apply_a(p)
            pap = xp.linalg.vecdot(p, ap)
            bad_a = active & (pap <= 0)
            step = active & ~bad_a
            alpha = xp.where(step, rz / xp.where(step, pap, xp.ones_like(pap)), xp.zeros_like(pap))
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            done = done | (row_norms(r, xp=xp) <= tol)
            z = apply_m(r)
            rz_new = xp.linalg.vecdot(r, z)
            going = ~done
            bad_m = going & (rz_new <= 0)
            beta = xp.where(
                going & ~bad_m, rz_new / xp.where(rz > 0, rz, xp.ones_like(rz)), xp.zeros_like(rz)
            )
            p = xp.where(going[:, None], z + beta[:, None] * p, p)
            rz = xp.where(going, rz_new, rz)
            iterations += 1
            # One small host transfer per iteration:
            # [all done, A indefinite, M indefinite, non-finite].
            flags = _xp.to_numpy(
                xp.stack(
                    [
                        xp.all(done),
                        xp.any(bad_a),
                        xp.any(bad_m),
                        xp.any(~xp.isfinite(pap)) | xp.any(~xp.isfinite(rz_new)),
                    ]
                )
            )
            all_done, indefinite_a, indefinite_m, nonfinite = (bool(f) for f in flags)
            if progress.due():
                worst = float(_xp.to_numpy(xp.max(row_norms(r, xp=xp))))
                progress.report(iterations, f"largest residual {worst:.3e}")
            if nonfinite:
                raise NonFiniteError(
                    f"conjugate gradients produced NaN or inf at iteration {iterations}: "
                    "check the operator and the preconditioner"
                )
            if indefinite_a:
                raise NotPositiveDefiniteError(
                    f"conjugate gradients broke down at iteration {iterations}: p^T A p <= 0 for "
                    "some search direction p, so the operator is not positive definite; "
                    "add (more) regularization, e.g. A + lambda I with lambda > 0"
                )
            if indefinite_m:
                raise NotPositiveDefiniteError(_INDEFINITE_M.format(iterations=iterations))

        if x_is_zero and iterations == 0:
            true_residual = b
        else:
            true_residual = b - apply_a(x)
        residual_norms = np.asarray(_xp.to_numpy(row_norms(true_residual, xp=xp)), dtype=np.float64)
        converged = residual_norms <= tol_host
        if not all_done or iterations >= maxiter or bool(np.all(converged)):
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
        done = row_norms(true_residual, xp=xp) <= tol
        all_done = False
        r = true_residual
        z = apply_m(r)
        p = z
        rz = xp.linalg.vecdot(r, z)

    result = SolverResult(
        solution=x,
        residual_norms=residual_norms,
        iterations=iterations,
        converged=converged,
    )
    if not result.all_converged and on_failure != "ignore":
        n_bad = int(np.sum(~converged))
        worst = float(np.max(residual_norms[~converged]))
        message = (
            f"conjugate gradients did not converge for {n_bad} of {n_rows} right-hand sides "
            f"after {iterations} iterations (maxiter={maxiter}); largest residual norm "
            f"{worst:.3e} (rtol={rtol:g}, atol={atol:g}); increase maxiter, loosen the "
            "tolerance, add regularization or use a preconditioner"
        )
        if on_failure == "raise":
            raise NotConvergedError(message)
        warnings.warn(message, NotConvergedWarning, stacklevel=2)
    return result
