"""Block conjugate gradients: all right-hand sides share one Krylov space."""

from __future__ import annotations

import math
import warnings

import numpy as np

from .. import _xp
from .._progress import Reporter
from .._xp import Array, Namespace
from ..errors import (
    NonFiniteError,
    NotConvergedError,
    NotConvergedWarning,
    NotPositiveDefiniteError,
)
from ._results import SolverResult
from ._util import MatMat, apply_operator, check_solver_args, full_like, row_norms
from .cg import OnFailure

__all__ = ["block_cg"]

_MAX_RESTARTS = 3


def _orthonormal_rows(w: Array, /, *, xp: Namespace, drop: float) -> Array:
    """Orthonormal rows spanning the rows of ``w`` (K, P), near-dependent ones dropped.

    Rows are normalised first, so that a nearly converged column (a short
    residual) is not mistaken for a dependent one. Gram-matrix orthogonalisation
    leaves rows orthonormal to about ``eps * lam_max / lam_min`` of the kept Gram
    eigenvalues; a second pass (as CholeskyQR2) runs when that exceeds ``1e4 eps``.
    """
    norms = row_norms(w, xp=xp)
    keep = norms > 0
    w = w / xp.where(keep, norms, xp.ones_like(norms))[:, None]
    for first in (True, False):
        gram = _xp.symmetrize(w @ xp.matrix_transpose(w), xp=xp)
        lam, u = xp.linalg.eigh(gram)
        lam_host = _xp.to_numpy(lam)
        top = float(lam_host[-1]) if lam_host.size else 0.0
        if not top > 0:
            return w[:0, :]
        cut = drop * top if first else 0.5 * top
        idx = np.flatnonzero(lam_host > cut)
        if idx.size == 0:
            return w[:0, :]
        start = int(idx[0])  # eigh sorts ascending: the kept ones are a suffix
        u, lam = u[:, start:], lam[start:]
        w = (xp.matrix_transpose(u) @ w) / xp.sqrt(lam)[:, None]
        if first and float(lam_host[start]) >= 1e-4 * top:
            break  # already orthonormal to about 1e4 eps
    return w


def block_cg(
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
    drop_tol: float = 1e-10,
) -> SolverResult:
    r"""Solve ``A x_k = b_k`` for the ``K`` rows of ``b`` by block conjugate gradients.

    ``A`` (P, P) is symmetric positive definite, given through ``matmat`` (rows:
    ``V -> V A``). All right-hand sides share one block Krylov space, so with many
    of them (``K`` against ``P``) it needs far fewer iterations than ``K``
    independent solves; each iteration is one batched ``matmat`` of at most ``K``
    rows. Breakdown-free variant (Ji & Li 2017): the search directions ``S``
    (r, P) are kept orthonormal and directions that became linearly dependent
    are dropped (``r`` shrinks), while every right-hand side keeps its own
    solution and residual: none is zeroed or dropped, also when ``K > P``.
    With ``G = S A S^T``:

    .. math::
        C = R S^T G^{-1}, \quad X \leftarrow X + C S, \quad R \leftarrow R - C S A, \quad
        S \leftarrow \mathrm{orth}\big(Z - Z (S A)^T G^{-1} S\big), \quad Z = M(R).

    Rows stop (they are frozen) once ``|r_k| <= max(rtol |b_k|, atol)``. At the
    end the true residual is recomputed; rows that are not below it are
    restarted from it (a few times at most).

    Args:
        matmat, b, rtol, atol, maxiter, preconditioner, x0, on_failure: as in
            :func:`~xinfluence.linalg.cg` (``maxiter`` defaults to ``10 P``).
        drop_tol: directions whose squared singular value (after normalising the
            rows) is below ``drop_tol`` times the largest are dropped as dependent.

    Returns:
        :class:`SolverResult`; ``iterations`` counts ``matmat`` calls.

    Raises:
        NotPositiveDefiniteError: ``S A S^T`` is not positive definite.
        NonFiniteError: NaN or inf from the operator or the preconditioner.
    """
    xp, maxiter = check_solver_args(b, rtol=rtol, atol=atol, maxiter=maxiter, on_failure=on_failure)
    n_rows = int(b.shape[0])

    def apply_a(v: Array) -> Array:
        return apply_operator(matmat, v, xp=xp, what="matmat")

    def apply_m(v: Array) -> Array:
        return (
            v
            if preconditioner is None
            else apply_operator(preconditioner, v, xp=xp, what="preconditioner")
        )

    tol = row_norms(b, xp=xp) * rtol
    tol = xp.where(tol > atol, tol, full_like(tol, atol, xp=xp))
    tol_host = np.asarray(_xp.to_numpy(tol), dtype=np.float64)

    if x0 is None:
        x, r = xp.zeros_like(b), xp.asarray(b, copy=True)  # r is updated in place
    else:
        _xp.check_namespace(x0, xp=xp, what="x0")
        if tuple(x0.shape) != tuple(b.shape):
            raise ValueError(f"expected x0 of shape {tuple(b.shape)}, got {tuple(x0.shape)}")
        x = xp.astype(x0, b.dtype)
        r = b - apply_a(x)

    def directions(r: Array, active: Array, previous: tuple[Array, Array, Array] | None) -> Array:
        """New search directions from the active residuals, A-orthogonal to the
        previous ones ``(S, S A, chol(S A S^T))``."""
        z = xp.where(active[:, None], apply_m(r), xp.zeros_like(r))
        if previous is not None:
            s, q, factor = previous
            coef = xp.matrix_transpose(_xp.cho_solve(factor, q @ xp.matrix_transpose(z), xp=xp))
            z = _xp.add_matmul(z, coef, s, alpha=-1.0, xp=xp)
        return _orthonormal_rows(z, xp=xp, drop=drop_tol)

    iterations = 0
    restarts = 0
    last_excess = math.inf
    progress = Reporter("block CG", maxiter)
    while True:
        norms = _xp.to_numpy(row_norms(r, xp=xp))
        if not np.all(np.isfinite(norms)):
            raise NonFiniteError("block conjugate gradients met NaN or inf in the residual")
        done_host = norms <= tol_host
        active = _xp.from_numpy(~done_host, dtype=xp.bool, device=_xp.device_of(b), xp=xp)
        s = directions(r, active, None) if not done_host.all() else b[:0, :]
        while not done_host.all() and iterations < maxiter and s.shape[0] > 0:
            q = apply_a(s)  # (r, P)
            g = _xp.symmetrize(s @ xp.matrix_transpose(q), xp=xp)
            factor = _xp.cholesky_or_none(g, xp=xp)
            if factor is None:
                # S has orthonormal rows: an eigenvalue of S A S^T is a Rayleigh
                # quotient of A, so a negative one proves A indefinite.
                lowest = float(np.min(_xp.to_numpy(xp.linalg.eigvalsh(g))))
                raise NotPositiveDefiniteError(
                    f"block conjugate gradients broke down at iteration {iterations + 1}: the "
                    f"operator has a direction v with v^T A v / v^T v = {lowest:.3e}, so it is "
                    "not positive definite; add (more) regularization, at least "
                    f"{max(-lowest, 0.0):.3e} more (A + lambda I)"
                )
            c = xp.matrix_transpose(_xp.cho_solve(factor, s @ xp.matrix_transpose(r), xp=xp))
            c = xp.where(active[:, None], c, xp.zeros_like(c))
            x = _xp.add_matmul(x, c, s, alpha=1.0, xp=xp)
            r = _xp.add_matmul(r, c, q, alpha=-1.0, xp=xp)
            iterations += 1
            norms = _xp.to_numpy(row_norms(r, xp=xp))
            if not np.all(np.isfinite(norms)):
                raise NonFiniteError(
                    f"block conjugate gradients produced NaN or inf at iteration {iterations}: "
                    "check the operator and the preconditioner"
                )
            done_host = done_host | (norms <= tol_host)
            if progress.due():
                progress.report(iterations, f"largest residual {float(np.max(norms)):.3e}")
            active = _xp.from_numpy(~done_host, dtype=xp.bool, device=_xp.device_of(b), xp=xp)
            if not done_host.all():
                s = directions(r, active, (s, q, factor))
        true_residual = b - apply_a(x) if iterations or x0 is not None else b
        progress.close(iterations, "done")
        residual_norms = np.asarray(_xp.to_numpy(row_norms(true_residual, xp=xp)), dtype=np.float64)
        converged = residual_norms <= tol_host
        if converged.all() or iterations >= maxiter or restarts >= _MAX_RESTARTS:
            break
        excess = float(
            np.max(residual_norms[~converged] / np.maximum(tol_host[~converged], 1e-300))
        )
        if excess > 0.5 * last_excess:  # restarting stopped paying off
            break
        last_excess = excess
        restarts += 1
        r = true_residual

    result = SolverResult(
        solution=x, residual_norms=residual_norms, iterations=iterations, converged=converged
    )
    if not result.all_converged and on_failure != "ignore":
        n_bad = int(np.sum(~converged))
        message = (
            f"block conjugate gradients did not converge for {n_bad} of {n_rows} right-hand "
            f"sides after {iterations} iterations (maxiter={maxiter}); largest residual norm "
            f"{float(np.max(residual_norms[~converged])):.3e} (rtol={rtol:g}, atol={atol:g}); "
            "increase maxiter, loosen the tolerance, add regularization or use a preconditioner"
        )
        if on_failure == "raise":
            raise NotConvergedError(message)
        warnings.warn(message, NotConvergedWarning, stacklevel=2)
    return result
