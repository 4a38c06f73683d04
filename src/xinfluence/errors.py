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
    "user_stacklevel",
    "warn",
    "StaleFitError",
    "CorruptFileError",
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


class CorruptFileError(XinfluenceError, ValueError):
    """A saved model file is truncated, empty, not a readable archive, or its arrays
    or metadata differ from the SHA-256 digests recorded when it was saved."""


class NotConvergedWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function
    name the first frame outside the xinfluence package (the user's call).

    Library call depths vary (a solver under an operator under a model under a
    block mapper), so a fixed ``stacklevel`` points at a library line from some
    entry points; this walks the stack instead.
    """
    import os
    import sys
    import types

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame: types.FrameType | None = sys._getframe(1)  # the caller of warnings.warn
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's call (see :func:`user_stacklevel`)."""
    import warnings

    warnings.warn(message, category, stacklevel=user_stacklevel())
