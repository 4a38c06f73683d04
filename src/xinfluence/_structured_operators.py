"""Operators with structure, re-exported by :mod:`xinfluence.operators`: low-rank
(Arnoldi, Nystroem; with or without Woodbury), the inverse harmonic mean
(DataInf) and the Kronecker-factored eigenbasis (EK-FAC).
"""

from __future__ import annotations

from typing import final

import numpy as np

from . import _xp
from ._xp import Array, Namespace
from .curvature import Dataset
from .errors import (
    NotPositiveDefiniteError,
)
from .linalg import (
    EigenResult,
)
from .types import (
    Batch,
    BilinearForm,
    GradientProvider,
    Operator,
    OperatorBilinearForm,
    _contract,
    contract,
)


@final
class LowRankOperator(Operator):
    """``V diag(1 / (lambda + mu)) V^T`` from eigenpairs ``C ~ V diag(lambda) V^T``.

    With ``woodbury=True`` it is the exact inverse of the damped low-rank
    curvature, ``(V diag(lambda) V^T + mu I)^-1``, which adds
    ``(I - V V^T) / mu`` for the directions the sketch left out (needs ``mu > 0``
    unless ``V`` spans the whole space). ``eigenvectors`` is ``(P, k)``.
    """

    def __init__(
        self,
        eigenvalues: Array,
        eigenvectors: Array,
        regularization: float,
        *,
        woodbury: bool = False,
        block: str = "",
    ):
        xp = _xp.namespace(eigenvalues, eigenvectors)
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.regularization = float(regularization)
        self.woodbury = bool(woodbury)
        self.block = block
        # (rank,) numbers: checked and inverted on the host (no program to compile on jax)
        lowest = float(np.min(_xp.to_numpy(eigenvalues))) if eigenvalues.shape[0] else 0.0
        shifted = np.asarray(_xp.to_numpy(eigenvalues), dtype=np.float64) + self.regularization
        if not lowest + self.regularization > 0:
            where = f" of block {block!r}" if block else ""
            raise NotPositiveDefiniteError(
                f"the low-rank curvature{where} has eigenvalue {lowest:.3e}; "
                f"with regularization {self.regularization:g} it is not positive definite: "
                f"use a regularization above {max(-lowest, 0.0):.3e}"
            )
        p, k = int(eigenvectors.shape[0]), int(eigenvectors.shape[1])
        if self.woodbury and k < p and self.regularization <= 0:
            raise ValueError(
                "the Woodbury form of a low-rank curvature needs regularization > 0 "
                f"(rank {k} < {p} parameters)"
            )
        self._scale = _xp.from_numpy(
            1.0 / shifted, dtype=eigenvalues.dtype, device=_xp.device_of(eigenvalues), xp=xp
        )
        #: the eigensolver's result (residuals, Krylov dimension) where one made it
        self.eigen_result: EigenResult | None = None

    @property
    def input_size(self) -> int:
        return int(self.eigenvectors.shape[0])

    @property
    def rank(self) -> int:
        return int(self.eigenvectors.shape[1])

    @property
    def has_complement(self) -> bool:
        """Whether the Woodbury term ``(I - V V^T) / mu`` is present (it needs the
        full gradients, not only their coordinates in ``V``)."""
        return self.woodbury and self.regularization > 0 and self.rank < self.input_size

    def coefficients(self, t: Array) -> Array:
        """Coordinates in the eigenbasis: ``t V``, ``(K, k)``."""
        return t @ self.eigenvectors

    def _apply(self, t: Array) -> Array:
        xp = _xp.namespace(t)
        apply = _xp.maybe_jit(_low_rank_apply, xp=xp)
        complement = self.regularization if self.has_complement else None
        return apply(t, self.eigenvectors, self._scale, complement, xp=xp)

    def with_regularization(self, regularization: float) -> LowRankOperator:
        return LowRankOperator(
            self.eigenvalues,
            self.eigenvectors,
            regularization,
            woodbury=self.woodbury,
            block=self.block,
        )

    def as_bilinear_form(self) -> BilinearForm:
        return LowRankBilinearForm(self)


@final
class LowRankBilinearForm(BilinearForm):
    """Inner products through ``jacobian_prod``: per-sample gradients are never
    materialised, only their coordinates ``J V`` (N, k) in the eigenbasis.

    (The Woodbury complement needs full gradient inner products, so with
    ``woodbury=True`` the up-mode product falls back to gradients.)
    """

    def __init__(self, operator: LowRankOperator):
        self.operator = operator

    def inner_prod(self, left: Array, right: Array | None) -> Array:
        return OperatorBilinearForm(self.operator).inner_prod(left, right)

    def _left_coefficients(self, batch: Batch, gp: GradientProvider) -> Array:
        xp = gp.xp
        v_t = xp.matrix_transpose(self.operator.eigenvectors)  # (k, P)
        return gp.jacobian_prod(batch, v_t) * self.operator._scale  # (N, k)

    def grads_inner_prod(
        self, left: Batch, right: Batch | None, gradient_provider: GradientProvider
    ) -> Array:
        op = self.operator
        if op.has_complement:
            return super().grads_inner_prod(left, right, gradient_provider)
        xp = gradient_provider.xp
        # jax: V^T and the scales padded with zero rows to the provider's fixed
        # counts (they add nothing), so that no padding or slicing compiles
        pad = _xp.maybe_jit(_padded_basis, xp=xp, static_argnames=("xp", "rows"))
        v_t, scale = pad(op.eigenvectors, op._scale, xp=xp, rows=_xp.padded_rows(op.rank, xp=xp))
        left_coef = gradient_provider.jacobian_prod(left, v_t)
        right_coef = gradient_provider.jacobian_prod(left if right is None else right, v_t)
        return _xp.maybe_jit(_scaled_contract, xp=xp)(left_coef, scale, right_coef, xp=xp)

    def mixed_grads_inner_prod(
        self, left: Batch, right: Batch | None, gradient_provider: GradientProvider
    ) -> Array:
        op = self.operator
        if op.has_complement:
            return super().mixed_grads_inner_prod(left, right, gradient_provider)
        xp = gradient_provider.xp
        factors = self._left_coefficients(left, gradient_provider) @ xp.matrix_transpose(
            op.eigenvectors
        )
        mixed = gradient_provider.flat_mixed_grads(left if right is None else right)
        return contract(factors, mixed, xp=xp)


def _low_rank_apply(
    t: Array, eigenvectors: Array, scale: Array, complement: float | None, /, *, xp: Namespace
) -> Array:
    """``t V diag(scale) V^T`` (+ ``t (I - V V^T) / complement``): one program on jax."""
    coef = t @ eigenvectors
    out = (coef * scale) @ xp.matrix_transpose(eigenvectors)
    if complement is not None:
        out = out + (t - coef @ xp.matrix_transpose(eigenvectors)) / complement
    return out


def _padded_basis(
    eigenvectors: Array, scale: Array, /, *, xp: Namespace, rows: int
) -> tuple[Array, Array]:
    """``(V^T, scale)`` with zero rows (entries) up to ``rows``: (rows, P), (rows,)."""
    v_t = xp.matrix_transpose(eigenvectors)
    extra = rows - int(v_t.shape[0])
    if extra > 0:
        dev = _xp.device_of(v_t)
        v_t = xp.concat([v_t, xp.zeros((extra, v_t.shape[1]), dtype=v_t.dtype, device=dev)])
        scale = xp.concat([scale, xp.zeros((extra,), dtype=scale.dtype, device=dev)])
    return v_t, scale


def _scaled_contract(left: Array, scale: Array, right: Array, /, *, xp: Namespace) -> Array:
    """``(left * scale) right^T``: (N, k), (k,), (M, k) -> (N, M)."""
    return (left * scale) @ xp.matrix_transpose(right)


@final
class InverseHarmonicMeanOperator(Operator):
    """DataInf: ``R = mean_i (g_i g_i^T + lambda I)^-1`` (Kwon et al. 2024).

    By Sherman-Morrison, ``R v = (v - mean_i g_i (g_i^T v) / (lambda + |g_i|^2)) / lambda``;
    each application is one pass over the training gradients, none stored.
    Needs ``lambda > 0``.
    """

    def __init__(self, gp: GradientProvider, data: Dataset, regularization: float):
        if not regularization > 0:
            raise ValueError(
                "InverseHarmonicMeanInfluence needs regularization > 0 "
                f"(each g g^T is singular), got {regularization}"
            )
        self.gp = gp
        self.data = data
        self.regularization = float(regularization)

    @property
    def input_size(self) -> int:
        return self.gp.n_parameters

    def _apply(self, t: Array) -> Array:
        xp = self.gp.xp
        reg = self.regularization
        total = xp.zeros_like(t)
        n = 0
        for batch in self.data:
            grads = self.gp.flat_grads(batch)  # (N, P)
            weights = 1.0 / (reg + xp.sum(grads * grads, axis=1))  # (N,)
            total = total + ((t @ xp.matrix_transpose(grads)) * weights) @ grads
            n += int(grads.shape[0])
        return (t - total / n) / reg

    def with_regularization(self, regularization: float) -> InverseHarmonicMeanOperator:
        return InverseHarmonicMeanOperator(self.gp, self.data, regularization)


def _ekfac_scaled(
    t: Array,
    q_s: Array,
    q_a: Array,
    eigenvalues: Array,
    shift: float,
    /,
    *,
    xp: Namespace,
    layout: str,
    slices: tuple[int, int, tuple[int, int], tuple[int, int] | None],
    invert: bool,
) -> Array:
    """:func:`_ekfac_in_eigenbasis` with ``scale = 1 / (eigenvalues + shift)``
    (``invert``) or ``eigenvalues``."""
    scale = 1.0 / (eigenvalues + shift) if invert else eigenvalues
    return _ekfac_in_eigenbasis(t, q_s, q_a, scale, xp=xp, layout=layout, slices=slices)


def _ekfac_scaled_contract(
    left: Array,
    right: Array,
    q_s: Array,
    q_a: Array,
    eigenvalues: Array,
    shift: float,
    /,
    *,
    xp: Namespace,
    layout: str,
    slices: tuple[int, int, tuple[int, int], tuple[int, int] | None],
) -> Array:
    """``(EK-FAC + shift I)^-1 left`` contracted with ``right`` (M, *D, P): (N, M, *D)."""
    scaled = _ekfac_scaled(
        left, q_s, q_a, eigenvalues, shift, xp=xp, layout=layout, slices=slices, invert=True
    )
    return _contract(scaled, right, xp=xp)


def _ekfac_in_eigenbasis(
    t: Array,
    q_s: Array,
    q_a: Array,
    scale: Array,
    /,
    *,
    xp: Namespace,
    layout: str,
    slices: tuple[int, int, tuple[int, int], tuple[int, int] | None],
) -> Array:
    """:meth:`EkfacOperator._in_eigenbasis`; ``slices`` = ``(O, I, (start, stop) of the
    weight, (start, stop) of the bias or None)`` in the rows of ``t``."""
    n_out, n_in, (w0, w1), bias = slices
    k = t.shape[0]
    w = t[:, w0:w1]
    if layout == "oi":
        w = xp.reshape(w, (k, n_out, n_in))
    else:
        w = xp.permute_dims(xp.reshape(w, (k, n_in, n_out)), (0, 2, 1))
    g = w if bias is None else xp.concat([w, t[:, bias[0] : bias[1]][:, :, None]], axis=2)
    rotated = xp.matrix_transpose(q_s) @ g @ q_a
    back = q_s @ (rotated * scale) @ xp.matrix_transpose(q_a)
    w = back[:, :, :n_in]
    if layout == "io":
        w = xp.permute_dims(w, (0, 2, 1))
    pieces = [(w0, xp.reshape(w, (k, n_out * n_in)))]
    if bias is not None:
        pieces.append((bias[0], back[:, :, n_in]))
    return xp.concat([p for _, p in sorted(pieces, key=lambda item: item[0])], axis=1)


@final
class EkfacOperator(Operator):
    """EK-FAC inverse of one dense layer's Gauss-Newton block (George et al. 2018).

    With ``a_n`` the layer inputs (a trailing 1 appended when the layer has a
    bias, size ``I'``) and ``s_n`` the per-sample loss gradients at its outputs
    (``O``), the per-sample gradient is the matrix ``G_n = s_n a_n^T``
    (``O, I'``). K-FAC eigenbases ``Q_A`` of ``A = mean a a^T`` and ``Q_S`` of
    ``S = mean s s^T``; eigenvalues ``Lambda[o, i] = mean_n (Q_S^T G_n Q_A)[o, i]^2``
    (corrected) or ``lambda_S[o] lambda_A[i]`` (plain K-FAC). The curvature is
    ``C v = Q_S (Lambda * (Q_S^T V Q_A)) Q_A^T`` and the operator divides by
    ``Lambda + lambda`` instead.

    ``layout`` says how the weight is stored: ``"oi"`` (torch, ``(O, I)``) or
    ``"io"`` (flax kernel, ``(I, O)``); ``weight_slice`` and ``bias_slice``
    locate them in the block's flat vector.
    """

    def __init__(
        self,
        q_s: Array,
        q_a: Array,
        eigenvalues: Array,
        regularization: float,
        *,
        weight_slice: slice,
        bias_slice: slice | None,
        layout: str = "oi",
        block: str = "",
    ):
        if layout not in ("oi", "io"):
            raise ValueError(f"layout must be 'oi' or 'io', got {layout!r}")
        xp = _xp.namespace(q_s, q_a, eigenvalues)
        self.q_s, self.q_a, self.eigenvalues = q_s, q_a, eigenvalues
        self.regularization = float(regularization)
        self.weight_slice, self.bias_slice, self.layout, self.block = (
            weight_slice,
            bias_slice,
            layout,
            block,
        )
        self.n_out = int(q_s.shape[0])
        self.n_in = int(q_a.shape[0]) - (1 if bias_slice is not None else 0)
        lowest = _xp.min_value(eigenvalues, xp=xp)
        if not lowest + self.regularization > 0:
            raise NotPositiveDefiniteError(
                f"the EK-FAC curvature of block {block!r} has eigenvalue "
                f"{lowest:.3e}; use a regularization > 0"
            )
        self._xp = xp

    @property
    def input_size(self) -> int:
        bias = 0 if self.bias_slice is None else self.n_out
        return self.n_out * self.n_in + bias

    def _in_eigenbasis(self, t: Array, shift: float | None) -> Array:
        """``Q_S (scale * (Q_S^T G Q_A)) Q_A^T`` for the rows of ``t`` as matrices ``G``,
        ``scale = 1 / (eigenvalues + shift)``, or the eigenvalues where ``shift`` is
        None (one compiled program on jax)."""
        fn = _xp.maybe_jit(
            _ekfac_scaled, xp=self._xp, static_argnames=("xp", "layout", "slices", "invert")
        )
        return fn(
            t,
            self.q_s,
            self.q_a,
            self.eigenvalues,
            0.0 if shift is None else shift,
            xp=self._xp,
            layout=self.layout,
            slices=self._slices(),
            invert=shift is not None,
        )

    def _slices(self) -> tuple[int, int, tuple[int, int], tuple[int, int] | None]:
        bias = None if self.bias_slice is None else (self.bias_slice.start, self.bias_slice.stop)
        return (self.n_out, self.n_in, (self.weight_slice.start, self.weight_slice.stop), bias)

    def as_bilinear_form(self) -> BilinearForm:
        return EkfacBilinearForm(self)

    def _apply(self, t: Array) -> Array:
        return self._in_eigenbasis(t, self.regularization)

    def curvature_apply(self, t: Array) -> Array:
        """The (undamped) EK-FAC curvature on rows ``(K, P)``."""
        return self._in_eigenbasis(t, None)

    def dense_curvature(self) -> Array:
        """The EK-FAC curvature as a dense ``(P, P)`` matrix."""
        xp = self._xp
        eye = _xp.eye(self.input_size, dtype=self.q_s.dtype, device=_xp.device_of(self.q_s), xp=xp)
        return self.curvature_apply(eye)

    def with_regularization(self, regularization: float) -> EkfacOperator:
        return EkfacOperator(
            self.q_s,
            self.q_a,
            self.eigenvalues,
            regularization,
            weight_slice=self.weight_slice,
            bias_slice=self.bias_slice,
            layout=self.layout,
            block=self.block,
        )


@final
class EkfacBilinearForm(BilinearForm):
    """``<u, v> = (EK-FAC + lambda I)^-1 u . v``: the operator and the contraction as
    one compiled program per layer on jax (values as :class:`OperatorBilinearForm`)."""

    def __init__(self, operator: EkfacOperator):
        self.operator = operator

    def grads_inner_prod(
        self, left: Batch, right: Batch | None, gradient_provider: GradientProvider
    ) -> Array:
        grads_then = getattr(gradient_provider, "grads_then", None)
        if grads_then is None:  # a provider without shared layer factors
            return super().grads_inner_prod(left, right, gradient_provider)
        op = self.operator
        # the gradients from the layer factors, the operator and the contraction:
        # one compiled program per layer on jax
        return grads_then(
            _ekfac_scaled_contract,
            left,
            right,
            op.q_s,
            op.q_a,
            op.eigenvalues,
            op.regularization,
            static=(("layout", op.layout), ("slices", op._slices())),
        )

    def inner_prod(self, left: Array, right: Array | None) -> Array:
        op = self.operator
        if left.ndim != 2 or left.shape[-1] != op.input_size:
            return OperatorBilinearForm(op).inner_prod(left, right)
        fn = _xp.maybe_jit(
            _ekfac_scaled_contract, xp=op._xp, static_argnames=("xp", "layout", "slices")
        )
        return fn(
            left,
            left if right is None else right,
            op.q_s,
            op.q_a,
            op.eigenvalues,
            op.regularization,
            xp=op._xp,
            layout=op.layout,
            slices=op._slices(),
        )
