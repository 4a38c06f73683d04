"""Concrete operators approximating ``(C + lambda I)^-1`` on one block."""

from __future__ import annotations

from typing import final

from . import _xp
from ._xp import Array
from .errors import NotPositiveDefiniteError
from .types import Operator

__all__ = ["IdentityOperator", "DirectOperator", "check_positive_definite"]


@final
class IdentityOperator(Operator):
    """``B = I``: influences become plain gradient inner products."""

    def __init__(self, size: int):
        self._size = int(size)

    @property
    def input_size(self) -> int:
        return self._size

    def _apply(self, t: Array) -> Array:
        return t

    def with_regularization(self, regularization: float) -> IdentityOperator:
        return self


def _not_pd_error(curvature: Array, regularization: float, block: str) -> NotPositiveDefiniteError:
    xp = _xp.namespace(curvature)
    w = _xp.to_numpy(xp.linalg.eigvalsh(curvature))
    lo, hi = float(w[0]), float(w[-1])
    suggestion = max(-lo, 0.0) + 1e-3 * max(abs(hi), abs(lo), 1e-12)
    where = f" of block {block!r}" if block else ""
    return NotPositiveDefiniteError(
        f"the regularised curvature{where} is not positive definite: the curvature's "
        f"smallest eigenvalue is {lo:.3e} (largest {hi:.3e}) and regularization is "
        f"{regularization:g}; use a regularization of about {suggestion:.1e} or larger"
    )


def check_positive_definite(
    factor: Array | None, curvature: Array, regularization: float, block: str = ""
) -> Array:
    """Return the Cholesky factor, or raise if it failed or is numerically singular.

    A factor whose pivots span more than ``1 / (10 P eps)`` in squared ratio means a
    condition number beyond what the dtype resolves: a silently wrong solve.
    """
    xp = _xp.namespace(curvature)
    if factor is not None:
        d = xp.linalg.diagonal(factor)
        lo, hi = float(xp.min(d)), float(xp.max(d))
        eps = _xp.finfo_eps(curvature.dtype, xp=xp)
        if lo > 0 and (lo / hi) ** 2 > 10 * curvature.shape[0] * eps:
            return factor
    raise _not_pd_error(curvature, regularization, block)


@final
class DirectOperator(Operator):
    """``(C + lambda I)^-1`` from a dense ``(P, P)`` curvature ``C``.

    Factorised once (Cholesky ``C + lambda I = L L^T``); the inverse
    ``L^-T L^-1`` is formed with two triangular solves so that every later
    application is one matrix product.
    """

    def __init__(self, curvature: Array, regularization: float, *, block: str = ""):
        xp = _xp.namespace(curvature)
        p = curvature.shape[0]
        self.curvature = curvature
        self.regularization = float(regularization)
        self.block = block
        eye = _xp.eye(p, dtype=curvature.dtype, device=_xp.device_of(curvature), xp=xp)
        regularised = curvature + self.regularization * eye
        factor = check_positive_definite(
            _xp.cholesky_or_none(regularised, xp=xp), curvature, self.regularization, block
        )
        linv = _xp.solve_triangular(factor, eye, lower=True, xp=xp)
        self._inverse = _xp.symmetrize(xp.matrix_transpose(linv) @ linv, xp=xp)

    @property
    def input_size(self) -> int:
        return int(self.curvature.shape[0])

    def _apply(self, t: Array) -> Array:
        return t @ self._inverse

    def with_regularization(self, regularization: float) -> DirectOperator:
        return DirectOperator(self.curvature, regularization, block=self.block)
