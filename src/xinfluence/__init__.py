"""xinfluence: influence functions written once against the Python Array API.

One implementation of the mathematics serves numpy, array-api-strict, cupy,
torch and jax arrays; a backend supplies only a gradient provider
(:mod:`xinfluence.backends`). Importing this package imports no optional
framework.
"""

from __future__ import annotations

import os

from . import evaluate
from ._config import memory_budget, memory_budget_scope, set_memory_budget
from .errors import (
    CorruptFileError,
    DivergenceError,
    NamespaceMismatchError,
    NonFiniteError,
    NotConvergedError,
    NotConvergedWarning,
    NotFittedError,
    NotPositiveDefiniteError,
    StaleFitError,
    XinfluenceError,
)
from .influence import (
    ArnoldiInfluence,
    CgInfluence,
    ComposableInfluence,
    DirectInfluence,
    EkfacInfluence,
    IdentityInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
)
from .projection import ProjectedInfluence
from .types import (
    Batch,
    BilinearForm,
    BlockMapper,
    GradientProvider,
    InfluenceMode,
    Operator,
    OperatorGradientComposition,
)

__version__ = "0.1.0"


def load(
    path: str | os.PathLike[str],
    gradient_provider: GradientProvider,
    /,
    *,
    on_mismatch: str = "raise",
) -> ComposableInfluence:
    """Read any influence model written by ``model.save(path)``, for ``gradient_provider``;
    see :meth:`ComposableInfluence.load`."""
    return ComposableInfluence.load(path, gradient_provider, on_mismatch=on_mismatch)


__all__ = [
    "ArnoldiInfluence",
    "EkfacInfluence",
    "CgInfluence",
    "InverseHarmonicMeanInfluence",
    "LissaInfluence",
    "NystroemSketchInfluence",
    "Batch",
    "BilinearForm",
    "BlockMapper",
    "ComposableInfluence",
    "DirectInfluence",
    "DivergenceError",
    "GradientProvider",
    "IdentityInfluence",
    "InfluenceMode",
    "NamespaceMismatchError",
    "NonFiniteError",
    "NotConvergedError",
    "NotConvergedWarning",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "Operator",
    "OperatorGradientComposition",
    "ProjectedInfluence",
    "StaleFitError",
    "CorruptFileError",
    "XinfluenceError",
    "evaluate",
    "load",
    "memory_budget",
    "memory_budget_scope",
    "set_memory_budget",
]
