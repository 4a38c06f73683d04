"""The library's own exceptions and warnings (all importable from ``xinfluence``)."""

from __future__ import annotations

__all__ = [
    "XinfluenceError",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "NonFiniteError",
    "NamespaceMismatchError",
    "NotConvergedError",
    "NotConvergedWarning",
    "DivergenceError",
    "StaleFitError",
]


class XinfluenceError(Exception):
    """Base class of every error raised by xinfluence itself."""


class NotFittedError(XinfluenceError, RuntimeError):
    """A query was made before ``fit``."""


class NotPositiveDefiniteError(XinfluenceError, ValueError):
    """The regularised curvature is not (numerically) positive definite."""


class NonFiniteError(XinfluenceError, FloatingPointError):
    """NaN or inf in inputs, gradients or results."""


class NamespaceMismatchError(XinfluenceError, TypeError):
    """Arrays of two array-API namespaces were mixed."""


class NotConvergedError(XinfluenceError, RuntimeError):
    """An iterative solver did not reach its tolerance (when asked to raise)."""


class DivergenceError(XinfluenceError, FloatingPointError):
    """An iteration diverged (for example LiSSA with too small a scale)."""


class StaleFitError(XinfluenceError, RuntimeError):
    """The model's parameters changed after ``fit`` (an optimizer step, say): the
    fitted curvature no longer belongs to them. Refit."""


class NotConvergedWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""
