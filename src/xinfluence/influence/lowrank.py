"""Low-rank models: Arnoldi (Lanczos) and Nystroem sketch."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, final

from ..curvature import Dataset
from ..linalg import block_lanczos, nystroem
from ..linalg.cg import OnFailure
from ..operators import (
    LowRankOperator,
)
from ..types import (
    GradientProvider,
    Operator,
)
from .base import _CurvatureInfluence

if TYPE_CHECKING:
    from .base import BlockStructure, Regularization


@final
class ArnoldiInfluence(_CurvatureInfluence):
    """Low-rank influence from the ``rank`` eigenpairs of largest magnitude of the
    curvature, by block Lanczos with full re-orthogonalisation
    (:func:`~xinfluence.linalg.block_lanczos`; Schioppa et al. 2022 use the
    single-vector Arnoldi iteration).

    ``(H + lambda I)^-1 ~ V diag(1 / (lambda_i + lambda)) V^T``; with
    ``use_woodbury=True`` the directions outside ``V`` get ``1 / lambda`` (the
    exact inverse of the damped low-rank curvature). Influences go through
    ``jacobian_prod``: per-sample gradients of the whole training set are never
    held at once.

    Each Lanczos step is one curvature product with ``block_size`` vectors at
    once (default ``min(rank, 8)``: cheaper per vector than single products;
    larger blocks need a larger Krylov space for the same pairs). A block finds
    an eigenvalue's copies up to ``block_size`` times; one found that often may
    have more, so the default block then reruns with ``rank`` vectors, and an
    explicit one warns. The Krylov space is extended until the Ritz residuals of the
    ``rank`` pairs satisfy ``|H u - theta u| <= tol max|theta|``, or until it
    reaches ``krylov_dimension`` vectors (default ``min(P, max(10 rank, 100))``,
    within the memory budget); then :class:`~xinfluence.errors.NotConvergedWarning`
    names the residuals reached (``on_failure="raise"`` raises instead).

    Args:
        rank: number of eigenpairs.
        krylov_dimension: the largest Krylov space (the budget).
        tol: relative Ritz residual tolerance (default 1e-6: eigenvalues to
            about ``1e-12 |H|^2 / gap``, eigenvectors to ``1e-6 |H| / gap``).
        block_size: vectors per curvature product (default ``min(rank, 8)``).
        use_woodbury: add ``(I - V V^T) / lambda``.
        seed: seed of the start block.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when the budget ends
            before convergence.
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "hessian",
        rank: int = 10,
        krylov_dimension: int | None = None,
        tol: float = 1e-6,
        block_size: int | None = None,
        use_woodbury: bool = False,
        seed: int = 0,
        on_failure: OnFailure = "warn",
    ):
        super().__init__(
            gradient_provider,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1 or None, got {block_size}")
        if on_failure not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
        self.rank, self.krylov_dimension, self.tol, self.seed = rank, krylov_dimension, tol, seed
        self.block_size, self.on_failure = block_size, on_failure
        self.use_woodbury = use_woodbury

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        curvature = self._curvature(gp, data)
        curvature.prepare_products()  # Lanczos: one pass per block of Krylov vectors
        rank = min(self.rank, curvature.size)
        krylov = self.krylov_dimension
        eig = block_lanczos(
            functools.partial(curvature.matmat, check=False),  # it checks its products
            curvature.size,
            rank=rank,
            block_size=None if self.block_size is None else min(self.block_size, curvature.size),
            krylov_dimension=None if krylov is None else max(min(krylov, curvature.size), rank),
            tol=self.tol,
            seed=self.seed,
            xp=curvature.xp,
            dtype=curvature.dtype,
            device=curvature.device,
            on_failure=self.on_failure,
        )
        op = LowRankOperator(
            eig.eigenvalues,
            eig.eigenvectors,
            regularization,
            woodbury=self.use_woodbury,
            block=block,
        )
        op.eigen_result = eig  # diagnostics: residuals, Krylov dimension, products
        return op


@final
class NystroemSketchInfluence(_CurvatureInfluence):
    """Randomized Nyström sketch ``C ~ U diag(lambda) U^T`` (rank ``rank``, seeded)
    and the exact inverse of the damped sketch by Woodbury:
    ``U diag(1 / (lambda_i + mu)) U^T + (I - U U^T) / mu``.

    Needs a positive semi-definite curvature (``"gauss_newton"`` or ``"empirical_fisher"``,
    or a convex loss) and ``regularization > 0`` below full rank.
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "hessian",
        rank: int = 10,
        seed: int = 0,
    ):
        super().__init__(
            gradient_provider,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank, self.seed = rank, seed

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        curvature = self._curvature(gp, data)
        sketch = nystroem(
            functools.partial(curvature.matmat, check=False),  # it checks its product
            curvature.size,
            rank=min(self.rank, curvature.size),
            seed=self.seed,
            xp=curvature.xp,
            dtype=curvature.dtype,
            device=curvature.device,
        )
        return LowRankOperator(
            sketch.eigenvalues, sketch.eigenvectors, regularization, woodbury=True, block=block
        )
