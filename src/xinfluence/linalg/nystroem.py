"""Randomized Nyström approximation of a positive semi-definite operator."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _xp
from .._xp import Array, Namespace
from ..errors import NonFiniteError, NotPositiveDefiniteError
from ._results import EigenResult
from ._util import MatMat, apply_operator, check_positive_int, resolve_namespace

__all__ = ["nystroem"]


def nystroem(
    matmat: MatMat,
    size: int,
    /,
    *,
    rank: int,
    seed: int | np.random.Generator | None = 0,
    xp: Namespace,
    dtype: Any,
    device: Any = None,
) -> EigenResult:
    r"""Rank-``rank`` randomized Nyström approximation ``A ≈ U diag(λ) U^T`` of a PSD ``A``.

    The numerically stable algorithm of Tropp, Yurtsever, Udell and Cevher
    (2017, "Fixed-rank approximation of a positive-semidefinite matrix from
    streaming data", Alg. 3):

    1. ``Ω`` (P, r): a Gaussian test matrix (seeded), orthonormalised by QR;
    2. ``Y = A Ω`` (one batched ``matmat`` call with ``r`` rows);
    3. shift ``ν = sqrt(P) eps |Y|_F`` and ``Y_ν = Y + ν Ω``;
    4. ``C = chol(Ω^T Y_ν)`` (lower), ``B = Y_ν C^{-T}`` (P, r);
    5. thin SVD ``B = U Σ V^T``; ``λ = max(σ^2 - ν, 0)``.

    Then ``U diag(λ) U^T = Y_ν (Ω^T Y_ν)^{-1} Y_ν^T - ν U U^T``, the Nyström
    approximation ``A Ω (Ω^T A Ω)^{-1} Ω^T A`` computed without forming the
    inverse. At ``rank == size`` it reproduces ``A`` up to rounding. If the
    Cholesky factorisation fails (rank-deficient ``Ω^T Y_ν`` in floating
    point), a pseudo-inverse square root from ``eigh`` is used instead.

    Args:
        matmat: ``(K, P) -> (K, P)``, the rows of its input multiplied by the
            PSD ``A`` (called once with ``K = rank``; on jax with zero rows up
            to :func:`~xinfluence._xp.padded_rows`, the solvers' fixed counts).
        size: ``P``, the dimension of ``A``.
        rank: sketch size ``r``, ``1 <= r <= size``.
        seed: seed (or numpy ``Generator``) for ``Ω``.
        xp, dtype, device: namespace, real floating dtype and device of the
            result and of the test matrix.

    Returns:
        :class:`EigenResult`: ``eigenvalues`` (rank,) non-negative, descending;
        ``eigenvectors`` (P, rank) with orthonormal columns.

    Raises:
        NotPositiveDefiniteError: ``Ω^T A Ω`` has clearly negative eigenvalues
            (the operator is not PSD).
        NonFiniteError: the product ``A Ω`` holds NaN or inf.
    """
    size = check_positive_int(size, "size")
    rank = check_positive_int(rank, "rank")
    xp = resolve_namespace(xp, dtype, device)
    if rank > size:
        raise ValueError(f"rank must be <= size, got rank={rank} > size={size}")

    omega = _xp.random_normal((size, rank), seed=seed, dtype=dtype, device=device, xp=xp)
    # jax: the steps between host decisions are compiled programs (a few, not ~25),
    # and Ω^T has zero rows up to the solvers' fixed row counts (the product's
    # shape: no padding or slicing of it compiles)
    rows = _xp.padded_rows(rank, xp=xp)
    orthonormal = _xp.maybe_jit(_orthonormal_rows, xp=xp, static_argnames=("xp", "rows"))
    omega_t = orthonormal(omega, xp=xp, rows=rows)  # (rows, P)
    y_t = apply_operator(matmat, omega_t, xp=xp)  # (rows, P): rows are (A Ω)^T
    eps = _xp.finfo_eps(dtype, xp=xp)
    shifted = _xp.maybe_jit(_shifted_core, xp=xp, static_argnames=("xp", "rank"))
    y_t, core, shift, factor, ok, bad = shifted(
        y_t, omega_t, math.sqrt(size) * eps, xp=xp, rank=rank
    )
    if bool(bad):
        raise NonFiniteError("nystroem: the product of matmat contains NaN or inf values")
    if bool(ok):
        u, eigenvalues = _xp.maybe_jit(_from_factor, xp=xp)(factor, y_t, shift, xp=xp)
        return EigenResult(eigenvalues=eigenvalues, eigenvectors=u)
    w, v = xp.linalg.eigh(core)
    w_host = _xp.to_numpy(w)
    top = float(np.max(np.abs(w_host))) if w_host.size else 0.0
    if w_host.size and float(np.min(w_host)) < -math.sqrt(eps) * top:
        raise NotPositiveDefiniteError(
            "nystroem needs a positive semi-definite operator, but Ω^T A Ω has the "
            f"eigenvalue {float(np.min(w_host)):.3e} (largest magnitude {top:.3e})"
        )
    keep = w > (rank * eps * top)
    inv_sqrt = xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, w, xp.ones_like(w))), xp.zeros_like(w))
    b = (xp.matrix_transpose(y_t) @ v) * inv_sqrt[None, :]
    u, sigma, _ = xp.linalg.svd(b, full_matrices=False)
    eigenvalues = xp.clip(sigma**2 - shift, min=0.0)
    return EigenResult(eigenvalues=eigenvalues, eigenvectors=u)


def _orthonormal_rows(omega: Array, /, *, xp: Namespace, rows: int) -> Array:
    """``Q^T`` of the QR factorisation of ``omega`` (P, r): (r, P), orthonormal
    rows, then zero rows up to ``rows``."""
    q, _ = xp.linalg.qr(omega)
    q_t = xp.matrix_transpose(q)
    extra = rows - int(q_t.shape[0])
    if extra <= 0:
        return q_t
    zeros = xp.zeros((extra, int(q_t.shape[1])), dtype=q_t.dtype, device=_xp.device_of(q_t))
    return xp.concat([q_t, zeros], axis=0)


def _shifted_core(
    y_t: Array, omega_t: Array, relative_shift: float, /, *, xp: Namespace, rank: int
) -> tuple[Array, Array, Array, Array, Array, Array]:
    """``(Y_ν^T, C, ν, L, ok, whether Y holds NaN or inf)``: the sketch (its first
    ``rank`` rows) shifted by ``ν = relative_shift |Y|_F`` (for a stable Cholesky
    of the core), the symmetrised core ``C = Ω^T Y_ν`` (r, r), its lower
    Cholesky factor and whether that exists (:func:`~xinfluence._xp.cholesky_checked`)."""
    if int(y_t.shape[0]) != rank:
        y_t, omega_t = y_t[:rank, :], omega_t[:rank, :]
    bad = xp.logical_not(xp.all(xp.isfinite(y_t)))
    shift = relative_shift * xp.linalg.vector_norm(y_t, axis=None)
    y_t = y_t + shift * omega_t
    core = _xp.symmetrize(omega_t @ xp.matrix_transpose(y_t), xp=xp)
    factor, ok = _xp.cholesky_checked(core, xp=xp)
    return y_t, core, shift, factor, ok, bad


def _from_factor(
    factor: Array, y_t: Array, shift: Array, /, *, xp: Namespace
) -> tuple[Array, Array]:
    """``(U, max(sigma^2 - ν, 0))`` from the SVD of ``B = Y_ν C^{-T}`` (``C`` the
    Cholesky factor of the core): the Nyström eigenpairs."""
    b = xp.matrix_transpose(_xp.solve_triangular(factor, y_t, lower=True, xp=xp))
    u, sigma, _ = xp.linalg.svd(b, full_matrices=False)
    return u, xp.clip(sigma**2 - shift, min=0.0)
