"""Models that solve at query time: conjugate gradients and LiSSA."""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from ..curvature import Dataset
from ..linalg.cg import OnFailure
from ..operators import (
    CgOperator,
    CgOptions,
    LissaOperator,
    LissaOptions,
)
from ..types import (
    GradientProvider,
    Operator,
)
from .base import _CurvatureInfluence

if TYPE_CHECKING:
    from .base import BlockStructure, Regularization


@final
class CgInfluence(_CurvatureInfluence):
    """``(H + lambda I)^-1`` by conjugate gradients on curvature products.

    ``fit`` only records the data (and builds the preconditioner); every query
    solves for all its right-hand sides together, one pass over the training
    data (one batched curvature product) per iteration. ``solver="block"``
    (default) is block CG: the right-hand sides share one Krylov space, which
    takes far fewer iterations when there are many of them;
    ``solver="batched"`` runs independent CG recurrences side by side. Per-row
    stop: ``|r| <= max(rtol |b|, atol)``.

    Args:
        rtol, atol: tolerances of each solve. ``rtol=None`` (default) depends on
            the dtype: 1e-7 in float64, ``sqrt(eps)`` = 3.45e-4 in float32. The
            relative error of a solution is at most ``rtol * cond(H + lambda I)``;
            below about ``eps * cond`` (float64: 2.2e-16, float32: 1.2e-7 times
            the condition number) no solve in that dtype can go.
        maxiter: iteration cap (default ``10 P``); non-convergence warns with
            :class:`~xinfluence.errors.NotConvergedWarning` (or raises with
            ``on_failure="raise"``), saying whether the solve ran out of
            iterations or stalled at the dtype's precision floor. A curvature
            that is not positive definite raises
            :class:`~xinfluence.errors.NotPositiveDefiniteError` with a
            regularization that suffices (from a Lanczos bound).
        preconditioner: None, ``"jacobi"`` or ``"nystroem"`` (rank
            ``preconditioner_rank``, seeded by ``seed``).
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "hessian",
        rtol: float | None = None,
        atol: float = 0.0,
        maxiter: int | None = None,
        preconditioner: str | None = None,
        preconditioner_rank: int = 20,
        seed: int = 0,
        on_failure: OnFailure = "warn",
        solver: str = "block",
    ):
        super().__init__(
            gradient_provider,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        self._options = CgOptions(
            rtol=rtol,
            atol=atol,
            maxiter=maxiter,
            preconditioner=preconditioner,
            preconditioner_rank=preconditioner_rank,
            seed=seed,
            on_failure=on_failure,
            solver=solver,
        )

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        return CgOperator(self._curvature(gp, data), regularization, self._options)


@final
class LissaInfluence(_CurvatureInfluence):
    """LiSSA: ``h <- b + (1 - dampen) h - (H_S + lambda I) h / scale``, result ``h / scale``.

    ``batch_size`` None uses all fitted data in every iteration (deterministic);
    an int samples that many training points per iteration (seeded). The
    default ``scale`` is the Lanczos estimate of the top eigenvalue plus the
    regularization (doubled with sampled batches), so it converges without
    tuning; a diverging iteration raises
    :class:`~xinfluence.errors.DivergenceError` naming the scale to use, or, where
    ``H + lambda I`` has a negative eigenvalue (no scale helps), the
    regularization that suffices.

    It stops when ``|g - (H + mu I) x| <= rtol |g|`` for every right-hand side
    ``g``, with ``mu = lambda + dampen * scale``; ``rtol=None`` (default) is 1e-6
    in float64 and ``sqrt(eps)`` in float32, and the relative error of ``x`` is
    at most ``rtol * cond(H + mu I)``. On the full data the residual is exact at
    every iteration (it is the step); with ``batch_size`` the full-data residual
    is computed every ``ceil(n / batch_size)`` iterations. Not reaching ``rtol``
    in ``maxiter`` iterations warns with
    :class:`~xinfluence.errors.NotConvergedWarning` and the residual reached.
    ``scale`` must be finite and positive, ``dampen`` in ``[0, 1)``.
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "hessian",
        maxiter: int = 1000,
        scale: float | None = None,
        dampen: float = 0.0,
        rtol: float | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        on_failure: str = "warn",
    ):
        super().__init__(
            gradient_provider,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        self._options = LissaOptions(
            maxiter=maxiter,
            scale=scale,
            dampen=dampen,
            rtol=rtol,
            batch_size=batch_size,
            seed=seed,
            on_failure=on_failure,
        )

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        return LissaOperator(self._curvature(gp, data), regularization, self._options)
