"""Block conjugate gradients: all right-hand sides share one Krylov space."""

from __future__ import annotations

import math

import numpy as np

from .. import _xp
from .._progress import Reporter
from .._xp import Array, Namespace
from ..errors import (
    NonFiniteError,
    NotConvergedError,
    NotConvergedWarning,
    warn,
)
from ._results import SolverResult
from ._util import (
    MatMat,
    apply_operator,
    check_solver_args,
    padded_with_tolerances,
    residual_rows,
    row_norms,
    stall_reason,
)
from .cg import OnFailure, not_positive_definite

__all__ = ["block_cg"]

_MAX_RESTARTS = 3


def _gram_eigh(gram: Array, /, *, xp: Namespace) -> tuple[Array, Array, np.ndarray]:
    """``eigh`` of a small Gram matrix: ``(lam, u, lam on the host)``, ascending.

    A Gram matrix of many nearly dependent rows has a cluster of eigenvalues at
    rounding level, on which some backends' ``eigh`` fails to converge (torch on
    float32 with 100 rows of a 5-dimensional space); such a matrix is then
    decomposed on the host in float64, where LAPACK's ``syevd`` handles it.
    """
    try:
        lam, u = xp.linalg.eigh(gram)
        lam_host = np.asarray(_xp.to_numpy(lam), dtype=np.float64)
        if np.all(np.isfinite(lam_host)):
            return lam, u, lam_host
    except Exception:  # noqa: BLE001 - every backend names its LinAlgError differently
        pass
    lam_host, u_host = np.linalg.eigh(np.asarray(_xp.to_numpy(gram), dtype=np.float64))
    device = _xp.device_of(gram)
    return (
        _xp.from_numpy(lam_host, dtype=gram.dtype, device=device, xp=xp),
        _xp.from_numpy(u_host, dtype=gram.dtype, device=device, xp=xp),
        lam_host,
    )


def _orthonormal_rows(w: Array, /, *, xp: Namespace, drop: float) -> Array:
    """Orthonormal rows spanning the rows of ``w`` (K, P), near-dependent ones dropped.

    Rows are normalised first, so that a nearly converged column (a short
    residual) is not mistaken for a dependent one. The Gram matrix ``W W^T``
    (K, K) is decomposed; directions whose eigenvalue is below ``drop`` times the
    largest, or below the rounding level ``10 K eps`` of the dtype (with
    ``K > P`` rows at most ``P`` are independent, the rest is rounding noise), are
    deflated. Gram-matrix orthogonalisation leaves rows orthonormal to about
    ``eps * lam_max / lam_min`` of the kept eigenvalues; a second pass (as
    CholeskyQR2) runs when that exceeds ``1e4 eps``.
    """
    norms = row_norms(w, xp=xp)
    keep = norms > 0
    w = w / xp.where(keep, norms, xp.ones_like(norms))[:, None]
    noise = 10 * int(w.shape[0]) * _xp.finfo_eps(w.dtype, xp=xp)
    for first in (True, False):
        gram = _xp.symmetrize(w @ xp.matrix_transpose(w), xp=xp)
        lam, u, lam_host = _gram_eigh(gram, xp=xp)
        top = float(lam_host[-1]) if lam_host.size else 0.0
        if not top > 0:
            return w[:0, :]
        cut = max(drop, noise) * top if first else 0.5 * top
        idx = np.flatnonzero(lam_host > cut)
        if idx.size == 0:
            return w[:0, :]
        start = int(idx[0])  # eigh sorts ascending: the kept ones are a suffix
        u, lam = u[:, start:], lam[start:]
        w = (xp.matrix_transpose(u) @ w) / xp.sqrt(lam)[:, None]
        if first and float(lam_host[start]) >= 1e-4 * top:
            break  # already orthonormal to about 1e4 eps
    return w


def _orthonormal_rows_masked(w: Array, /, *, xp: Namespace, drop: float) -> Array:
    """As :func:`_orthonormal_rows` with the shape kept (for compiled code, jax):
    the result has all ``K`` rows, the dropped directions as zero rows. Both
    passes always run; no host synchronisation."""
    norms = row_norms(w, xp=xp)
    keep = norms > 0
    w = w / xp.where(keep, norms, xp.ones_like(norms))[:, None]
    noise = 10 * int(w.shape[0]) * _xp.finfo_eps(w.dtype, xp=xp)
    for cut_ratio in (max(drop, noise), 0.5):
        lam, u = xp.linalg.eigh(_xp.symmetrize(w @ xp.matrix_transpose(w), xp=xp))
        top = lam[-1]
        kept = (lam > cut_ratio * top) & (top > 0)
        inv_sqrt = xp.where(kept, 1 / xp.sqrt(xp.where(kept, lam, xp.ones_like(lam))), 0.0)
        w = (xp.matrix_transpose(u) @ w) * inv_sqrt[:, None]
    return w


def _project(
    z: Array, active: Array, previous: tuple[Array, Array, Array] | None, /, *, xp: Namespace
) -> Array:
    """``Z`` with inactive rows zeroed, made A-orthogonal to the previous
    directions ``(S, S A, chol(S A S^T))``: ``Z - Z (S A)^T G^{-1} S``."""
    z = xp.where(active[:, None], z, xp.zeros_like(z))
    if previous is not None:
        s, q, factor = previous
        coef = xp.matrix_transpose(_xp.cho_solve(factor, q @ xp.matrix_transpose(z), xp=xp))
        z = _xp.add_matmul(z, coef, s, alpha=-1.0, xp=xp)
    return z


def _directions_fixed(
    z: Array,
    active: Array,
    previous: tuple[Array, Array, Array] | None,
    /,
    *,
    xp: Namespace,
    drop: float,
) -> Array:
    """:func:`_project` then :func:`_orthonormal_rows_masked`: one compiled program."""
    return _orthonormal_rows_masked(_project(z, active, previous, xp=xp), xp=xp, drop=drop)


def _step(
    x: Array, r: Array, s: Array, q: Array, active: Array, /, *, xp: Namespace
) -> tuple[Array, Array, Array, Array, Array]:
    """One block-CG update after the product ``Q = S A``: ``(x, r, factor, g, stats)``.

    ``G = S A S^T`` gets 1 on the diagonal of zero (deflated) rows of ``S``, whose
    coefficients are then zero. ``stats`` (K + 3,) holds the residual norms, the
    largest ``|A s|``, whether ``G`` was positive definite and the number of
    directions, so that the host reads them in one transfer.
    """
    s_norms = row_norms(s, xp=xp)
    g = _xp.symmetrize(s @ xp.matrix_transpose(q), xp=xp)
    dead = xp.astype(s_norms == 0, g.dtype)
    eye = _xp.eye(int(g.shape[0]), dtype=g.dtype, device=_xp.device_of(g), xp=xp)
    g = g + dead[:, None] * eye
    factor, ok = _xp.cholesky_checked(g, xp=xp)
    c = xp.matrix_transpose(_xp.cho_solve(factor, s @ xp.matrix_transpose(r), xp=xp))
    c = xp.where(active[:, None], c, xp.zeros_like(c))
    x = _xp.add_matmul(x, c, s, alpha=1.0, xp=xp)
    r = _xp.add_matmul(r, c, q, alpha=-1.0, xp=xp)
    head = xp.stack(
        [
            xp.max(row_norms(q, xp=xp)),
            xp.astype(ok, r.dtype),
            xp.sum(xp.astype(s_norms > 0, r.dtype)),
        ]
    )
    return x, r, factor, g, xp.concat([row_norms(r, xp=xp), head])


def _start(
    b: Array, rtol: float, atol: float, /, *, xp: Namespace, n_padded: int
) -> tuple[Array, Array, Array, Array, Array, Array]:
    """``(b, |b_k|, tol, x, r, eye)``: ``b`` with zero rows up to ``n_padded``,
    its row norms, the row tolerances ``max(rtol |b_k|, atol)``, a zero start,
    its residual (a copy of ``b``, updated in place on torch) and the identity
    (K, K); one compiled program on jax."""
    b, norms, tol = padded_with_tolerances(b, rtol, atol, xp=xp, n_padded=n_padded)
    eye = _xp.eye(int(b.shape[0]), dtype=b.dtype, device=_xp.device_of(b), xp=xp)
    return b, norms, tol, xp.zeros_like(b), xp.asarray(b, copy=True), eye


def block_cg(
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
    xp, rtol, maxiter = check_solver_args(
        b, rtol=rtol, atol=atol, maxiter=maxiter, on_failure=on_failure
    )
    n_rows = int(b.shape[0])
    # Jit-compiling namespaces (jax): the right-hand sides are padded with zero
    # rows (converged from the start) to a few fixed counts, and deflated
    # directions become zero rows instead of being removed, so that every
    # iteration and every query of the problem runs the same compiled programs.
    fixed = _xp.compiles_per_shape(xp)
    n_padded = _xp.padded_rows(n_rows, xp=xp)
    step = _xp.maybe_jit(_step, xp=xp)
    directions_fixed = _xp.maybe_jit(_directions_fixed, xp=xp, static_argnames=("xp", "drop"))
    residual = _xp.maybe_jit(residual_rows, xp=xp, static_argnames=("xp", "n_rows"))
    start = _xp.maybe_jit(_start, xp=xp, static_argnames=("xp", "n_padded"))
    b, r_norms, tol, x, r, eye = start(b, float(rtol), float(atol), xp=xp, n_padded=n_padded)
    tol_host = np.asarray(_xp.to_numpy(tol), dtype=np.float64)

    def apply_a(v: Array) -> Array:
        return apply_operator(matmat, v, xp=xp, what="matmat")

    def apply_m(v: Array) -> Array:
        return (
            v
            if preconditioner is None
            else apply_operator(preconditioner, v, xp=xp, what="preconditioner")
        )

    if x0 is not None:
        _xp.check_namespace(x0, xp=xp, what="x0")
        if tuple(x0.shape) != (n_rows, int(b.shape[1])):
            raise ValueError(
                f"expected x0 of shape {(n_rows, int(b.shape[1]))}, got {tuple(x0.shape)}"
            )
        x = xp.astype(x0, b.dtype)
        if n_padded > n_rows:
            x = xp.concat([x, xp.zeros_like(b[n_rows:, :])], axis=0)
        r, r_norms, _ = residual(b, apply_a(x), x, xp=xp, n_rows=n_rows)
    x, r = _xp.committed(x, xp=xp), _xp.committed(r, xp=xp)
    # compiled code takes "no previous directions" as zero ones (exactly the same
    # projection), so that the first iteration runs the same program as the others
    zero = x if x0 is None else xp.zeros_like(x)
    no_previous = (zero, zero, _xp.committed(eye, xp=xp))

    def directions(r: Array, active: Array, previous: tuple[Array, Array, Array] | None) -> Array:
        """New search directions from the active residuals, A-orthogonal to the
        previous ones ``(S, S A, chol(S A S^T))``."""
        if fixed:
            previous = no_previous if previous is None else previous
            return directions_fixed(apply_m(r), active, previous, xp=xp, drop=drop_tol)
        return _orthonormal_rows(
            _project(apply_m(r), active, previous, xp=xp), xp=xp, drop=drop_tol
        )

    iterations = 0
    restarts = 0
    operator_norm = 0.0
    last_excess = math.inf
    progress = Reporter("block CG", maxiter)
    while True:
        norms = _xp.to_numpy(r_norms)
        if not np.all(np.isfinite(norms)):
            raise NonFiniteError("block conjugate gradients met NaN or inf in the residual")
        done_host = norms <= tol_host
        active = _xp.from_numpy(~done_host, dtype=xp.bool, device=_xp.device_of(b), xp=xp)
        s = directions(r, active, None) if not done_host.all() else b[:0, :]
        while not done_host.all() and iterations < maxiter and s.shape[0] > 0:
            q = apply_a(s)  # (r, P)
            x_new, r_new, factor, g, stats = step(x, r, s, q, active, xp=xp)
            stats_host = np.asarray(_xp.to_numpy(stats), dtype=np.float64)
            norms, (q_max, ok, n_directions) = stats_host[:-3], stats_host[-3:]
            if n_directions == 0:  # every direction deflated (jax): nothing moved
                break
            # rows of S are unit vectors: |A s| is a lower bound on |A| (for the warning)
            operator_norm = max(operator_norm, float(q_max))
            if not ok:
                # S has orthonormal rows: an eigenvalue of S A S^T is a Rayleigh
                # quotient of A, so a non-positive one proves A not positive definite;
                # it only bounds the smallest eigenvalue from above, so the advice
                # comes from a Lanczos bound instead.
                lowest = float(np.min(_xp.to_numpy(xp.linalg.eigvalsh(g))))
                raise not_positive_definite(
                    f"block conjugate gradients broke down at iteration {iterations + 1}: "
                    f"a direction v has v^T A v / v^T v = {lowest:.3e}",
                    matmat,
                    b[:n_rows, :],
                    xp=xp,
                )
            x, r = x_new, r_new
            iterations += 1
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
        if iterations or x0 is not None:
            true_residual, true_norms, solution = residual(b, apply_a(x), x, xp=xp, n_rows=n_rows)
        else:
            true_residual, true_norms, solution = b, r_norms, x[:n_rows, :]
        progress.close(iterations, "done")
        residual_norms = np.asarray(_xp.to_numpy(true_norms), dtype=np.float64)
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
        r, r_norms = true_residual, true_norms

    x = solution
    residual_norms, converged = residual_norms[:n_rows], converged[:n_rows]
    result = SolverResult(
        solution=x, residual_norms=residual_norms, iterations=iterations, converged=converged
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
            f"block conjugate gradients did not converge for {int(np.sum(bad))} of {n_rows} "
            f"right-hand sides: largest residual norm {float(np.max(residual_norms[bad])):.3e} "
            f"(rtol={rtol:g}, atol={atol:g}); {reason}"
        )
        if on_failure == "raise":
            raise NotConvergedError(message)
        warn(message, NotConvergedWarning)
    return result
