"""Factorizations ``I[t, j] = <M (B g_t), B g_j>`` of fitted influence models.

For every block of a fitted model this finds a feature map ``B`` (per-sample
gradients to ``(N, k_b)``) and a ``(k_b, k_b)`` map ``M`` on features such that
the block's up-mode influence is ``(M B g_t)^T (B g_j)``; the query side is then
``A = M B``. The gradient store keeps ``B g_j`` of the training points.

============================  ===========================  =============================
operator (model)              ``B g`` (stored, ``k_b``)    ``M``
============================  ===========================  =============================
Identity (IdentityInfluence)  ``g`` (``P_b``)              identity
Direct (DirectInfluence)      ``g`` (``P_b``)              ``(C + lambda I)^-1``
Projected (ProjectedInfl.)    ``R g`` (``k``)              ``(C_R + lambda I)^-1``
EK-FAC (EkfacInfluence)       ``Q_S^T G Q_A`` (``O I'``)   ``1 / (Lambda + lambda)``
low rank (Arnoldi, Nystroem)  ``V^T g`` (rank)             ``1 / (lambda_i + mu)``
low rank with Woodbury        ``[V^T g, g]`` (rank + P_b)  ``diag(1/(l+mu) - 1/mu, 1/mu)``
============================  ===========================  =============================

(Nystroem always uses the Woodbury form; Arnoldi with ``use_woodbury=True``.)
CG, LiSSA and the inverse harmonic mean apply their inverse by iteration or by
a pass over the training data: they have no such factorization.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _xp
from .._xp import Array
from ..operators import (
    DirectOperator,
    EkfacOperator,
    IdentityOperator,
    LowRankOperator,
)
from ..projection import KroneckerProjection, ProjectedOperator
from ..types import Batch

FACTORIZED_MODELS = (
    "IdentityInfluence",
    "DirectInfluence",
    "ProjectedInfluence",
    "EkfacInfluence",
    "ArnoldiInfluence",
    "NystroemSketchInfluence",
)


class NoFactorizationError(TypeError):
    """The model's operator does not factor as ``<A g_t, B g_j>``."""


@dataclass(frozen=True)
class BlockFactor:
    """One block: ``features(batch) = B g`` ``(N, size)``, ``query(f) = M f``.

    ``self_dot(f)`` is ``<M f, f>`` per row ``(N,)`` where a cheaper way than
    ``sum(query(f) * f)`` exists (a dense ``M = (L L^T)^-1``: ``|L^-1 f|^2``, one
    triangular solve instead of two); ``grads`` is False where ``features``
    never forms per-sample gradients (Kronecker projections), so that chunks are
    sized from the activations instead of ``P``.
    """

    name: str
    size: int
    features: Callable[[Batch], Array]
    query: Callable[[Array], Array]
    self_dot: Callable[[Array], Array] | None = None
    grads: bool = True

    def self_influence(self, f: Array, xp: Any) -> Array:
        """``<M f, f>`` per row of features ``f`` ``(N, size)``: ``(N,)``."""
        if self.self_dot is not None:
            return self.self_dot(f)
        return xp.sum(self.query(f) * f, axis=1)


def factorize(model: Any) -> list[BlockFactor]:
    """The factorization of every block of a fitted model (in block order)."""
    mapper = model._fitted_mapper()
    memo = _LastFactors(model.gradient_provider)
    out = []
    for name, comp in mapper.composable_block_dict.items():
        op = comp.op
        if isinstance(op, EkfacOperator) and callable(getattr(memo._gp, "kfac_factors", None)):
            out.append(_ekfac(name, op, memo))
            continue
        if isinstance(op, ProjectedOperator) and isinstance(op.projection, KroneckerProjection):
            # every layer block's Kronecker projection runs the whole model on the
            # chunk: share one forward and backward pass per chunk among them
            proj = copy.copy(op.projection)
            proj._provider = memo  # type: ignore[assignment]
            op = ProjectedOperator.__new__(ProjectedOperator)
            op.__dict__.update(comp.op.__dict__, projection=proj)
        out.append(_block(name, op, comp.gp, model))
    return out


class _LastFactors:
    """The provider, with ``kfac_factors`` of the last batch remembered (by identity)."""

    def __init__(self, gp: Any):
        self._gp = gp
        self._last: tuple[Any, Any, Any] | None = None

    def kfac_factors(self, batch: Batch) -> Any:
        last = self._last
        if last is not None and last[0] is batch.x and last[1] is batch.y:
            return last[2]
        out = self._gp.kfac_factors(batch)
        self._last = (batch.x, batch.y, out)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._gp, name)


def _no(model: Any, op: Any) -> NoFactorizationError:
    return NoFactorizationError(
        f"{type(model).__name__} ({type(op).__name__}) applies its inverse by iteration or "
        "by a pass over the training data, so its influences do not factor as "
        "<A g_t, B g_j> and cannot be served from a gradient store; models that can: "
        f"{', '.join(FACTORIZED_MODELS)}"
    )


def _block(name: str, op: Any, gp: Any, model: Any) -> BlockFactor:
    if isinstance(op, IdentityOperator):
        return BlockFactor(name, op.input_size, gp.flat_grads, lambda f: f)
    if isinstance(op, DirectOperator):
        return BlockFactor(
            name, op.input_size, gp.flat_grads, op.apply, _cholesky_self_dot(op._factor, gp.xp)
        )
    if isinstance(op, ProjectedOperator):
        proj = op.projection
        return BlockFactor(
            name,
            proj.output_size,
            lambda b: proj.project_grads(gp, b),
            op.inner.apply,
            _cholesky_self_dot(op.inner._factor, gp.xp),
            grads=not _kronecker(proj),
        )
    if isinstance(op, EkfacOperator):
        return _ekfac_from_grads(name, op, gp)
    if isinstance(op, LowRankOperator):
        return _low_rank(name, op, gp)
    raise _no(model, op)


def _kronecker(proj: Any) -> bool:
    """Whether ``proj.project_grads`` works from the Kronecker factors (no ``(N, P)``)."""
    while not isinstance(proj, KroneckerProjection) and hasattr(proj, "base"):
        proj = proj.base  # OrthonormalizedProjection over a Kronecker map
    return isinstance(proj, KroneckerProjection)


def _cholesky_self_dot(factor: Array, xp: Any) -> Callable[[Array], Array]:
    """``f^T (L L^T)^-1 f = |L^-1 f|^2`` per row: one triangular solve (``size^2 / 2``
    multiply-adds per row) where ``cho_solve`` and a dot take two."""

    def self_dot(f: Array) -> Array:
        if _xp.namespace_name(xp) == "torch":
            import torch

            # rows: w L^T = f, so w = (L^-1 f)^T, without transposing f
            w = torch.linalg.solve_triangular(factor.mT, f, upper=True, left=False)
        else:
            w = xp.matrix_transpose(
                _xp.solve_triangular(factor, xp.matrix_transpose(f), lower=True, xp=xp)
            )
        return xp.linalg.vector_norm(w, axis=1) ** 2

    return self_dot


def row_bytes(factors: list[BlockFactor], gp: Any, one: Batch) -> int:
    """Bytes that featurizing one training sample like ``one`` holds at once: the
    provider's per-sample estimate where a block forms per-sample gradients, else
    (Kronecker projections) a few copies of the layers' inputs and output
    gradients, measured on ``one``, plus the features."""
    itemsize = int(getattr(gp.dtype, "itemsize", 8) or 8)
    k = sum(f.size for f in factors)
    if any(f.grads for f in factors):
        return int(gp.bytes_per_sample(one)) + 4 * k * itemsize
    acts = 0
    for a, s in gp.kfac_factors(one).values():
        acts += int(a.shape[-1] * math.prod(a.shape[1:-1])) + int(math.prod(s.shape[1:]))
    # a, s and their projections, the autograd graph behind them; features, their
    # concatenation, the whitened copy for the self-influence and the host copy
    return 4 * acts * itemsize + 4 * k * itemsize


def _ekfac(name: str, op: EkfacOperator, factors: Any) -> BlockFactor:
    """``Q_S^T G Q_A`` from the layer's inputs ``a`` and output gradients ``s``
    (``kfac_factors``, shared by all layers of a chunk), never the flat gradient:
    ``G = s a'^T`` (``a' = [a, 1]`` with a bias) rotates to ``outer(Q_S^T s,
    Q_A^T a')``, or over ``T`` positions (tokens, convolutions) to
    ``(S Q_S)^T (A' Q_A)``: ``O(N (O^2 + I'^2))`` work, not ``O(N O I' (O + I'))``
    and an ``(N, P)`` array."""
    xp = factors.xp
    n_out, n_cols = int(op.q_s.shape[0]), int(op.q_a.shape[0])
    size = n_out * n_cols
    bias = op.bias_slice is not None

    def features(batch: Batch) -> Array:
        a, s = factors.kfac_factors(batch)[op.block]  # (N, [T,] I), (N, [T,] O)
        n = int(a.shape[0])
        if bias:
            ones = xp.ones((*a.shape[:-1], 1), dtype=a.dtype, device=_xp.device_of(a))
            a = xp.concat([a, ones], axis=-1)
        rs, ra = s @ op.q_s, a @ op.q_a  # rows of Q_S^T s and Q_A^T a'
        if a.ndim == 2:
            rotated = rs[:, :, None] * ra[:, None, :]
        else:
            ra = xp.reshape(ra, (n, -1, n_cols))
            rotated = xp.matrix_transpose(xp.reshape(rs, (n, -1, n_out))) @ ra
        return xp.reshape(rotated, (n, size))

    scale = xp.reshape(1.0 / (op.eigenvalues + op.regularization), (size,))
    return BlockFactor(name, size, features, lambda f: f * scale, grads=False)


def _ekfac_from_grads(name: str, op: EkfacOperator, gp: Any) -> BlockFactor:
    """``Q_S^T G Q_A`` from the flat per-sample gradients (providers without
    ``kfac_factors``)."""
    xp = gp.xp
    n_out, n_cols = int(op.q_s.shape[0]), int(op.q_a.shape[0])
    size = n_out * n_cols

    def features(batch: Batch) -> Array:
        t = gp.flat_grads(batch)
        n, ws, bs = int(t.shape[0]), op.weight_slice, op.bias_slice
        if op.layout == "oi":
            w = xp.reshape(t[:, ws], (n, op.n_out, op.n_in))
        else:
            w = xp.permute_dims(xp.reshape(t[:, ws], (n, op.n_in, op.n_out)), (0, 2, 1))
        g = w if bs is None else xp.concat([w, t[:, bs][:, :, None]], axis=2)  # (N, O, I')
        rotated = xp.matrix_transpose(op.q_s) @ g @ op.q_a
        return xp.reshape(rotated, (int(g.shape[0]), size))

    scale = xp.reshape(1.0 / (op.eigenvalues + op.regularization), (size,))
    return BlockFactor(name, size, features, lambda f: f * scale)


def _low_rank(name: str, op: LowRankOperator, gp: Any) -> BlockFactor:
    xp = gp.xp
    v_t = xp.matrix_transpose(op.eigenvectors)  # (k, P)
    rank = op.rank
    if not op.has_complement:
        return BlockFactor(name, rank, lambda b: gp.jacobian_prod(b, v_t), lambda f: f * op._scale)
    mu = op.regularization

    def features(batch: Batch) -> Array:
        g = gp.flat_grads(batch)
        return xp.concat([op.coefficients(g), g], axis=1)

    def query(f: Array) -> Array:
        # <c_t, (s - 1/mu) c_j> + <g_t, g_j> / mu: the Woodbury form
        return xp.concat([f[:, :rank] * (op._scale - 1.0 / mu), f[:, rank:] / mu], axis=1)

    return BlockFactor(name, rank + op.input_size, features, query)
