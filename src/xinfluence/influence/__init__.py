"""The user-facing influence models.

Every model takes a :class:`~xinfluence.types.GradientProvider` first and
keyword-only options; ``fit`` builds one operator per block, queries map the
spec's compositions over the blocks.

Conventions: with ``H`` the curvature of the mean training loss named by
``second_order`` and ``lambda`` the block's regularization,

* ``"hessian"``: the Hessian;
* ``"gauss_newton"``: the generalized Gauss-Newton matrix
  ``mean_i J_i^T H_i J_i`` (``J_i = d out_i / d theta``, ``H_i = d^2 l / d out^2``
  at sample ``i``'s model output), equal to the Hessian for GLMs with canonical
  links and positive semi-definite for losses convex in the output;
* ``"empirical_fisher"``: ``mean_i g_i g_i^T`` (what ``"gauss_newton"`` meant
  before 0.2),

the influences are

* up: ``I[t, j] = g_t^T (H + lambda I)^-1 g_j``, shape ``(N_test, N)``; removing
  training point ``j`` of ``n`` changes the loss at ``t`` by about ``I[t, j] / n``;
* perturbation: ``I[t, j, ...] = g_t^T (H + lambda I)^-1 d/dx d/dtheta l(z_j)``,
  shape ``(N_test, N, *x.shape[1:])``.

Modules: ``base`` :class:`ComposableInfluence` (fit, queries, blocks,
save/load) and the shared option types; ``exact`` Direct, Identity and
InverseHarmonicMean; ``iterative`` Cg and Lissa; ``lowrank`` Arnoldi and
NystroemSketch; ``kronecker`` Ekfac.
"""

from __future__ import annotations

from .base import BlockStructure as BlockStructure
from .base import ComposableInfluence as ComposableInfluence
from .base import Regularization as Regularization
from .exact import DirectInfluence as DirectInfluence
from .exact import IdentityInfluence as IdentityInfluence
from .exact import InverseHarmonicMeanInfluence as InverseHarmonicMeanInfluence
from .iterative import CgInfluence as CgInfluence
from .iterative import LissaInfluence as LissaInfluence
from .kronecker import EkfacInfluence as EkfacInfluence
from .lowrank import ArnoldiInfluence as ArnoldiInfluence
from .lowrank import NystroemSketchInfluence as NystroemSketchInfluence

__all__ = [
    "ComposableInfluence",
    "DirectInfluence",
    "IdentityInfluence",
    "CgInfluence",
    "LissaInfluence",
    "ArnoldiInfluence",
    "NystroemSketchInfluence",
    "InverseHarmonicMeanInfluence",
    "EkfacInfluence",
]
