"""Streaming reductions of in-memory queries: the model's arrays in, small results out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._xp import Array
from ..types import Batch
from ._reductions import TopK
from .sequential import SequentialInfluenceCalculator

if TYPE_CHECKING:
    from ..influence import ComposableInfluence

__all__ = ["top_k", "self_influence", "total_influence"]


def _pair(x: Any, y: Any) -> Any:
    return x if y is None else Batch(x, y)


def top_k(
    model: ComposableInfluence,
    x_test: Array,
    y_test: Array,
    x: Any,
    y: Array | None = None,
    *,
    k: int,
) -> TopK:
    """The ``k`` most helpful and most harmful training points of ``(x, y)`` for
    each test point (up mode), without the ``(N_test, N)`` matrix: chunks from
    the model's memory budget. ``x`` alone may be any training data ``fit``
    accepts. Ties go to the smaller index (as a stable ``argsort``)."""
    calc = SequentialInfluenceCalculator(model, progress=False)
    return calc.influences(Batch(x_test, y_test), _pair(x, y)).top_k(k)


def self_influence(model: ComposableInfluence, x: Any, y: Array | None = None) -> Array:
    """``I[j, j]`` per training point, ``(N,)``: the memorisation / mislabel score."""
    return SequentialInfluenceCalculator(model, progress=False).self_influence(_pair(x, y))


def total_influence(
    model: ComposableInfluence,
    x_test: Array,
    y_test: Array,
    x: Any,
    y: Array | None = None,
    *,
    reduce: str = "sum",
) -> Array:
    """Sum (``reduce="sum"``) or mean (``"mean"``) of the up-mode influences over
    the test points, per training point: ``(N,)``."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    lazy = SequentialInfluenceCalculator(model, progress=False).influences(
        Batch(x_test, y_test), _pair(x, y)
    )
    return lazy.sum() if reduce == "sum" else lazy.mean()
