"""Models with a closed-form operator: direct inverse, identity (gradient
similarity), inverse harmonic mean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

from ..curvature import Dataset, make_curvature
from ..operators import (
    DirectOperator,
    IdentityOperator,
    InverseHarmonicMeanOperator,
)
from ..types import (
    GradientProvider,
    Operator,
)
from .base import ComposableInfluence

if TYPE_CHECKING:
    from .base import BlockStructure, Regularization


@final
class DirectInfluence(ComposableInfluence):
    """Exact influence: the dense curvature of each block, Cholesky-factorised in
    ``fit``. Memory ``O(P_b^2)`` and time ``O(P_b^3)`` per block.

    ``with_regularization`` refactorises the stored curvature without a new
    pass over the data. A curvature that is not positive definite after
    regularization raises :class:`~xinfluence.errors.NotPositiveDefiniteError`
    with its smallest eigenvalue.
    """

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        curvature = make_curvature(self.second_order, gp, data).dense()
        return DirectOperator(curvature, regularization, block=block)


@final
class IdentityInfluence(ComposableInfluence):
    """No curvature: ``I[t, j] = g_t^T g_j`` (the gradient-similarity baseline).

    ``regularization`` and ``second_order`` have no effect.
    """

    _uses_curvature = False

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        return IdentityOperator(gp.n_parameters)


@final
class InverseHarmonicMeanInfluence(ComposableInfluence):
    """DataInf (Kwon et al. 2024): ``(H + lambda I)^-1`` replaced by the mean of the
    per-sample inverses ``mean_i (g_i g_i^T + lambda I)^-1``, applied in closed
    form by Sherman-Morrison. Needs ``regularization > 0``; it is built from
    gradients only, so ``second_order`` must be ``"empirical_fisher"`` (the default
    here).
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "empirical_fisher",
    ):
        if second_order != "empirical_fisher":
            raise ValueError(
                "InverseHarmonicMeanInfluence is built from per-sample gradients only: "
                f"second_order must be 'empirical_fisher', got {second_order!r}"
            )
        super().__init__(
            gradient_provider,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        for block, reg in self.regularization.items():
            if not reg > 0:
                raise ValueError(
                    f"InverseHarmonicMeanInfluence needs regularization > 0 (block {block!r})"
                )

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        return InverseHarmonicMeanOperator(gp, data, regularization)
