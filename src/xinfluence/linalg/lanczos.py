"""Lanczos with full re-orthogonalisation for a few extreme eigenpairs."""

from __future__ import annotations

import math
from typing import Any

import array_api_extra as xpx
import numpy as np

from .. import _xp
from .._xp import Array, Namespace
from ._results import EigenResult
from ._util import MatMat, apply_operator, check_positive_int, resolve_namespace

__all__ = ["lanczos", "positive_definite_shift"]


def lanczos(
    matmat: MatMat,
    size: int,
    /,
    *,
    rank: int,
    krylov_dimension: int | None = None,
    tol: float = 1e-10,
    seed: int | np.random.Generator | None = 0,
    xp: Namespace,
    dtype: Any,
    device: Any = None,
) -> EigenResult:
    r"""The ``rank`` eigenpairs of largest magnitude of a symmetric operator.

    Builds an orthonormal basis ``Q`` (m, P) of the Krylov space
    ``span{q_0, A q_0, ..., A^{m-1} q_0}`` (``q_0`` Gaussian, seeded) with the
    three-term Lanczos recurrence

    .. math::
        \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},
        \qquad \alpha_j = q_j^T A q_j,

    re-orthogonalising every new vector against all previous ones twice
    ("twice is enough"), so that ``Q A Q^T = T`` is tridiagonal to working
    precision. The eigenpairs ``T s_i = \theta_i s_i`` of the small ``T``
    (computed on the host in float64) give the Ritz pairs ``(\theta_i, Q^T s_i)``.

    If the Krylov space becomes invariant (``beta_j <= tol * |A|_est``), the
    recurrence is restarted with a fresh random vector orthogonal to ``Q``
    (``T`` gets a zero off-diagonal entry), so that repeated eigenvalues are
    found with their multiplicity (zero eigenvalues of a low-rank ``A``
    included); the iteration stops at ``krylov_dimension`` vectors. With
    ``krylov_dimension == size`` the result is the full eigendecomposition of
    ``A``. Like every single-vector Krylov method, it sees only one copy of a
    repeated eigenvalue as long as the Krylov space is not invariant.

    Args:
        matmat: ``(K, P) -> (K, P)``, the rows of its input multiplied by the
            symmetric ``A`` (called here with ``K = 1``).
        size: ``P``, the dimension of ``A``.
        rank: number of eigenpairs to return, ``1 <= rank <= size``.
        krylov_dimension: ``m``, number of Lanczos vectors, ``rank <= m``;
            default ``min(size, max(2 * rank + 1, 20))``; values above ``size``
            are clipped to ``size``.
        tol: relative threshold on ``beta_j`` for an invariant subspace.
        seed: seed (or numpy ``Generator``) for the starting vector.
        xp, dtype, device: namespace, real floating dtype and device of the
            result and of the vectors passed to ``matmat``.

    Returns:
        :class:`EigenResult`: ``eigenvalues`` (rank,) sorted by descending
        magnitude, ``eigenvectors`` (P, rank) with orthonormal columns, and
        ``residual_norms`` (rank,), the Ritz residuals ``|A u_i - theta_i u_i|``
        (free by-products of the recurrence) to judge whether
        ``krylov_dimension`` was large enough.
    """
    size = check_positive_int(size, "size")
    rank = check_positive_int(rank, "rank")
    xp = resolve_namespace(xp, dtype, device)
    if rank > size:
        raise ValueError(f"rank must be <= size, got rank={rank} > size={size}")
    if krylov_dimension is None:
        krylov_dimension = max(2 * rank + 1, 20)
    krylov_dimension = min(check_positive_int(krylov_dimension, "krylov_dimension"), size)
    if krylov_dimension < rank:
        raise ValueError(
            f"krylov_dimension must be >= rank, got krylov_dimension={krylov_dimension} "
            f"< rank={rank}"
        )
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def random_unit(basis: Array | None) -> Array:
        v = _xp.random_normal((size,), seed=rng, dtype=dtype, device=device, xp=xp)
        if basis is not None:
            v, _ = _orthogonalize(v, basis, xp=xp)
        return v / xp.linalg.vector_norm(v)

    # An (m, P) basis filled row by row (in place where the namespace allows).
    # Jit-compiling namespaces (jax) project against all m rows, the unfilled ones
    # zero, so that shapes stay constant and nothing recompiles; the others only
    # against the j + 1 filled rows.
    m = krylov_dimension
    basis = xp.zeros((m, size), dtype=dtype, device=device)
    fixed_shapes = _xp.compiles_per_shape(xp)
    q = random_unit(None)
    q_prev = xp.zeros_like(q)
    beta_prev = 0.0
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for j in range(m):
        basis = xpx.at(basis)[j, :].set(q)
        rows = basis if fixed_shapes else basis[: j + 1, :]
        w = apply_operator(matmat, q[None, :], xp=xp)[0, :]
        a_q_norm = xp.linalg.vector_norm(w)
        alpha = xp.linalg.vecdot(q, w)
        w = w - alpha * q - beta_prev * q_prev
        w, removed = _orthogonalize(w, rows, xp=xp)
        alpha = alpha + removed[j]
        host = _xp.to_numpy(xp.stack([alpha, xp.linalg.vector_norm(w), a_q_norm]))
        alpha_f, beta_f, a_q_norm_f = (float(h) for h in host)
        alphas.append(alpha_f)
        scale = max(scale, a_q_norm_f)
        if j == m - 1:
            break
        q_prev = q
        if beta_f <= tol * scale:
            # Invariant subspace: continue in its orthogonal complement.
            beta_prev = 0.0
            q = random_unit(basis)
        else:
            beta_prev = beta_f
            q = w / beta_f
        betas.append(beta_prev)

    t = np.diag(np.asarray(alphas, dtype=np.float64))
    if betas:
        off = np.asarray(betas, dtype=np.float64)
        t = t + np.diag(off, 1) + np.diag(off, -1)
    theta, s = np.linalg.eigh(t)
    order = np.argsort(-np.abs(theta), kind="stable")[:rank]
    s_top = _xp.from_numpy(np.ascontiguousarray(s[:, order]), dtype=dtype, device=device, xp=xp)
    eigenvectors = xp.matrix_transpose(basis) @ s_top
    eigenvalues = _xp.from_numpy(theta[order], dtype=dtype, device=device, xp=xp)
    # Ritz residuals |A Q^T s_i - theta_i Q^T s_i| = beta_m |s_{m-1, i}| (beta_m: last |w|).
    residual_norms = beta_f * np.abs(s[-1, order])
    return EigenResult(
        eigenvalues=eigenvalues, eigenvectors=eigenvectors, residual_norms=residual_norms
    )


def _orthogonalize(w: Array, basis: Array, /, *, xp: Namespace) -> tuple[Array, Array]:
    """Remove from ``w`` (P,) its components along the rows of ``basis`` (m, P), twice.

    The rows are orthonormal or zero. Returns the projected vector and the total
    coefficients ``basis @ w`` removed (m,).
    """
    h1 = basis @ w
    w = w - h1 @ basis
    h2 = basis @ w
    w = w - h2 @ basis
    return w, h1 + h2


def positive_definite_shift(
    matmat: MatMat,
    size: int,
    /,
    *,
    xp: Namespace,
    dtype: Any,
    device: Any = None,
    seed: int = 0,
    krylov_dimension: int = 64,
) -> tuple[float, float]:
    r"""A shift ``mu >= 0`` that makes the symmetric ``A + mu I`` positive definite.

    For advice after a solver met a non-positive curvature: the Rayleigh quotient
    it met is only an upper bound on the smallest eigenvalue, so suggesting it
    undershoots. Here a Lanczos run (``krylov_dimension`` single-vector products)
    gives the leftmost Ritz value ``theta`` and its residual ``rho``: an eigenvalue
    lies in ``[theta - rho, theta + rho]``, and the leftmost Ritz value converges
    to ``lambda_min`` first, so ``ell = theta - rho`` estimates a lower bound. The
    shift is ``mu = 1.5 max(-ell, 0) + 1e-6 |A|``, rounded up to two significant
    digits, then checked by a second Lanczos run from another random start on
    ``A + mu I`` (a Krylov space is shift-invariant, so only a new start vector
    is a new test); ``mu`` is doubled until that check finds no non-positive
    Ritz value (three times at most).

    Returns:
        ``(ell, mu)``: the estimate of the smallest eigenvalue and the shift.
    """
    m = min(int(size), int(krylov_dimension))

    def leftmost(op: MatMat, start: int) -> tuple[float, float, float]:
        eig = lanczos(
            op, size, rank=m, krylov_dimension=m, seed=start, xp=xp, dtype=dtype, device=device
        )
        theta = np.asarray(_xp.to_numpy(eig.eigenvalues), dtype=np.float64)
        rho = np.zeros_like(theta) if eig.residual_norms is None else eig.residual_norms
        i = int(np.argmin(theta))
        return float(theta[i]), float(rho[i]), float(np.max(np.abs(theta)))

    theta, rho, top = leftmost(matmat, seed)
    ell = theta - rho
    mu = _round_up(1.5 * max(-ell, 0.0) + 1e-6 * top)
    for attempt in range(3):

        def shifted(v: Array, mu: float = mu) -> Array:
            return matmat(v) + mu * v

        check, _, _ = leftmost(shifted, seed + 1 + attempt)
        if check > 0:
            break
        mu = _round_up(2 * mu + max(-check, 0.0))
    return ell, mu


def _round_up(value: float) -> float:
    """``value`` rounded up to two significant digits (so that printing it with
    ``:.1e`` does not round a sufficient shift down)."""
    if not value > 0:
        return 0.0
    exponent = math.floor(math.log10(value)) - 1
    return math.ceil(value / 10.0**exponent) * 10.0**exponent
