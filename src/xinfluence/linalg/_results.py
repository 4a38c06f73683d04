"""Result objects returned by the solvers and eigensolvers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._xp import Array

__all__ = ["EigenResult", "SolverResult"]


@dataclass(frozen=True)
class SolverResult:
    """Outcome of an iterative solve of ``A x_k = b_k`` for ``K`` right-hand sides.

    Attributes:
        solution: ``(K, P)`` array, the approximate solutions as rows, in the
            namespace, device and dtype of the right-hand sides.
        residual_norms: ``(K,)`` host float64 array, the true residual
            ``|b_k - A x_k|`` of each row at exit (recomputed, not the
            recurrence estimate).
        iterations: number of iterations performed (one batched operator
            application each).
        converged: ``(K,)`` host bool array, ``residual_norms[k] <=
            max(rtol * |b_k|, atol)``.
    """

    solution: Array
    residual_norms: np.ndarray
    iterations: int
    converged: np.ndarray

    @property
    def all_converged(self) -> bool:
        """Whether every right-hand side reached its tolerance."""
        return bool(np.all(self.converged))


@dataclass(frozen=True)
class EigenResult:
    """A few eigenpairs ``A u_i = lambda_i u_i`` of a symmetric operator.

    Attributes:
        eigenvalues: ``(rank,)`` array, sorted by descending magnitude.
        eigenvectors: ``(P, rank)`` array with orthonormal columns; column ``i``
            belongs to ``eigenvalues[i]``.

        residual_norms: ``(rank,)`` host float64 array of estimates of
            ``|A u_i - lambda_i u_i|`` where the method provides them
            (:func:`~xinfluence.linalg.lanczos`: the Ritz residuals), else None.
        converged: whether every residual met the eigensolver's tolerance
            (:func:`~xinfluence.linalg.block_lanczos`), else None.
        krylov_dimension: the dimension of the Krylov space used, where known.
        matmat_calls: the number of ``matmat`` calls made, where known.

    ``eigenvalues`` and ``eigenvectors`` live in the namespace, device and dtype
    the eigensolver was asked for.
    """

    eigenvalues: Array
    eigenvectors: Array
    residual_norms: np.ndarray | None = None
    converged: bool | None = None
    krylov_dimension: int | None = None
    matmat_calls: int | None = None

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])
