"""Concrete operators approximating ``(C + lambda I)^-1`` on one block."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import numpy as np

from . import _xp
from ._progress import Reporter
from ._xp import Array
from .curvature import Curvature, Dataset
from .errors import (
    DivergenceError,
    NotConvergedError,
    NotConvergedWarning,
    NotPositiveDefiniteError,
)
from .linalg import (
    EigenResult,
    JacobiPreconditioner,
    NystroemPreconditioner,
    SolverResult,
    block_cg,
    cg,
    lanczos,
    nystroem,
)
from .linalg.cg import OnFailure
from .types import (
    Batch,
    BilinearForm,
    GradientProvider,
    Operator,
    OperatorBilinearForm,
    contract,
)

__all__ = [
    "IdentityOperator",
    "DirectOperator",
    "CgOperator",
    "CgOptions",
    "LissaOptions",
    "LissaOperator",
    "LowRankOperator",
    "LowRankBilinearForm",
    "InverseHarmonicMeanOperator",
    "EkfacOperator",
    "check_positive_definite",
]


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

    Factorised once (Cholesky ``C + lambda I = L L^T``); every application is
    two triangular solves with the factor.
    """

    def __init__(self, curvature: Array, regularization: float, *, block: str = ""):
        xp = _xp.namespace(curvature)
        self.curvature = curvature
        self.regularization = float(regularization)
        self.block = block
        self._factor = check_positive_definite(
            _xp.cholesky_or_none(_xp.plus_diagonal(curvature, self.regularization, xp=xp), xp=xp),
            curvature,
            self.regularization,
            block,
        )

    @property
    def input_size(self) -> int:
        return int(self.curvature.shape[0])

    def _apply(self, t: Array) -> Array:
        xp = _xp.namespace(t)
        return xp.matrix_transpose(_xp.cho_solve(self._factor, xp.matrix_transpose(t), xp=xp))

    def with_regularization(self, regularization: float) -> DirectOperator:
        return DirectOperator(self.curvature, regularization, block=self.block)


# -- iterative and low-rank operators (on a Curvature) -------------------------


def _damped(curvature: Curvature, regularization: float) -> Callable[[Array], Array]:
    """``v -> v (C + lambda I)`` on rows ``(K, P)``."""

    def matmat(v: Array) -> Array:
        out = curvature.matmat(v)  # a fresh array: updated in place where possible
        return (
            _xp.add_scaled(out, v, scale=regularization, xp=curvature.xp) if regularization else out
        )

    return matmat


def _check_on_failure(on_failure: str) -> None:
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")


@dataclass(frozen=True)
class CgOptions:
    """Options of :class:`CgOperator` (see :class:`~xinfluence.CgInfluence`)."""

    rtol: float = 1e-7
    atol: float = 0.0
    maxiter: int | None = None
    preconditioner: str | None = None
    preconditioner_rank: int = 20
    seed: int = 0
    on_failure: OnFailure = "warn"
    solver: str = "block"

    def __post_init__(self) -> None:
        if self.solver not in ("block", "batched"):
            raise ValueError(f"solver must be 'block' or 'batched', got {self.solver!r}")
        if self.preconditioner not in (None, "jacobi", "nystroem"):
            raise ValueError(
                f"preconditioner must be None, 'jacobi' or 'nystroem', got {self.preconditioner!r}"
            )
        if self.rtol < 0 or self.atol < 0:
            raise ValueError(f"rtol and atol must be >= 0, got {self.rtol}, {self.atol}")
        if self.preconditioner_rank < 1:
            raise ValueError(f"preconditioner_rank must be >= 1, got {self.preconditioner_rank}")
        _check_on_failure(self.on_failure)


@dataclass(frozen=True)
class LissaOptions:
    """Options of :class:`LissaOperator` (see :class:`~xinfluence.LissaInfluence`)."""

    maxiter: int = 1000
    scale: float | None = None
    dampen: float = 0.0
    rtol: float = 1e-4
    batch_size: int | None = None
    seed: int = 0
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        if not 0 <= self.dampen < 1:
            raise ValueError(f"dampen must be in [0, 1), got {self.dampen}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int or None, got {self.batch_size}")
        if self.maxiter < 1:
            raise ValueError(f"maxiter must be >= 1, got {self.maxiter}")
        _check_on_failure(self.on_failure)


@final
class CgOperator(Operator):
    """``(C + lambda I)^-1`` by batched conjugate gradients on curvature products.

    Every application solves all rows together, one pass over the data (one
    batched curvature product) per iteration; see :func:`xinfluence.linalg.cg`.
    ``preconditioner``: None, ``"jacobi"`` (the exact diagonal where the
    provider gives one, else a Hutchinson estimate) or ``"nystroem"`` (a
    rank-``preconditioner_rank`` Nyström sketch of ``C``); both are built once
    and reused for every regularization.
    """

    def __init__(
        self,
        curvature: Curvature,
        regularization: float,
        options: CgOptions | None = None,
        *,
        _sketch: Any = None,
    ):
        self.curvature = curvature
        self.regularization = float(regularization)
        self.options = options = options or CgOptions()
        curvature.prepare_products()  # every solve passes over the data repeatedly
        preconditioner, seed = options.preconditioner, options.seed
        preconditioner_rank = options.preconditioner_rank
        self.last_result: SolverResult | None = None
        if _sketch is None and preconditioner == "jacobi":
            diagonal = curvature.diagonal(seed=seed)
            # Hutchinson estimates (and indefinite Hessians) can put entries at or
            # below zero; a preconditioner only has to be SPD, so floor them.
            xp = curvature.xp
            floor = 1e-3 * float(xp.mean(xp.abs(diagonal)))
            _sketch = xp.clip(diagonal, min=max(floor, 1e-300))
        elif _sketch is None and preconditioner == "nystroem":
            # Sketch the damped operator: a Hessian near a minimum can have small
            # negative eigenvalues that the regularization lifts; the eigenvalues
            # of C are those of C + lambda I less lambda.
            damped = nystroem(
                _damped(curvature, self.regularization),
                curvature.size,
                rank=min(preconditioner_rank, curvature.size),
                seed=seed,
                xp=curvature.xp,
                dtype=curvature.dtype,
                device=curvature.device,
            )
            _sketch = EigenResult(damped.eigenvalues - self.regularization, damped.eigenvectors)
        self._sketch = _sketch
        self._preconditioner: Callable[[Array], Array] | None = None
        if preconditioner == "jacobi":
            self._preconditioner = JacobiPreconditioner(_sketch, self.regularization)
        elif preconditioner == "nystroem":
            self._preconditioner = NystroemPreconditioner(
                _sketch.eigenvalues, _sketch.eigenvectors, self.regularization
            )

    @property
    def input_size(self) -> int:
        return self.curvature.size

    def _apply(self, t: Array) -> Array:
        o = self.options
        solve = block_cg if o.solver == "block" else cg
        result = solve(
            _damped(self.curvature, self.regularization),
            t,
            rtol=o.rtol,
            atol=o.atol,
            maxiter=o.maxiter,
            preconditioner=self._preconditioner,
            on_failure=o.on_failure,
        )
        self.last_result = result
        return result.solution

    def with_regularization(self, regularization: float) -> CgOperator:
        return CgOperator(self.curvature, regularization, self.options, _sketch=self._sketch)


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
        shifted = eigenvalues + self.regularization
        if not float(xp.min(shifted)) > 0:
            where = f" of block {block!r}" if block else ""
            raise NotPositiveDefiniteError(
                f"the low-rank curvature{where} has eigenvalue {float(xp.min(eigenvalues)):.3e}; "
                f"with regularization {self.regularization:g} it is not positive definite: "
                f"use a regularization above {max(-float(xp.min(eigenvalues)), 0.0):.3e}"
            )
        p, k = int(eigenvectors.shape[0]), int(eigenvectors.shape[1])
        if self.woodbury and k < p and self.regularization <= 0:
            raise ValueError(
                "the Woodbury form of a low-rank curvature needs regularization > 0 "
                f"(rank {k} < {p} parameters)"
            )
        self._scale = 1.0 / shifted

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
        coef = self.coefficients(t)
        out = (coef * self._scale) @ xp.matrix_transpose(self.eigenvectors)
        if self.has_complement:
            out = out + (t - coef @ xp.matrix_transpose(self.eigenvectors)) / self.regularization
        return out

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
        left_coef = self._left_coefficients(left, gradient_provider)
        right_coef = gradient_provider.jacobian_prod(
            left if right is None else right, xp.matrix_transpose(op.eigenvectors)
        )
        return left_coef @ xp.matrix_transpose(right_coef)

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


@final
class LissaOperator(Operator):
    """Linear time stochastic second-order approximation (Agarwal et al. 2017).

    Iterates ``h <- b + (1 - dampen) h - (C_S + lambda I) h / scale`` from
    ``h = b``, with ``C_S`` the curvature of a sample of ``batch_size`` training
    points (all of them when ``batch_size`` is None, which makes it a
    deterministic Richardson iteration), and returns ``h / scale``. It
    converges to ``(C + lambda I)^-1 b`` when ``dampen = 0`` and
    ``scale > lambda_max(C + lambda I) / 2``; the default scale is the Lanczos
    estimate of ``lambda_max(C) + lambda`` (times 2 with sampled batches).
    Stops when the largest relative change of a row falls below ``rtol``.
    """

    def __init__(
        self,
        curvature: Curvature,
        regularization: float,
        options: LissaOptions | None = None,
        *,
        _top: float | None = None,
    ):
        self.curvature = curvature
        self.regularization = float(regularization)
        self.options = options = options or LissaOptions()
        scale, batch_size = options.scale, options.batch_size
        self._top = _top
        if batch_size is None or scale is None:
            # repeated full-data passes: the iterations, or the Lanczos scale estimate
            curvature.prepare_products()
        if scale is None:
            scale = (self._top_estimate() + self.regularization) * (2.0 if batch_size else 1.0)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.iterations = 0

    @property
    def input_size(self) -> int:
        return self.curvature.size

    def _sampler(self) -> Callable[[Array], Array]:
        """Curvature products on the full data, or on seeded random samples."""
        batch_size = self.options.batch_size
        if batch_size is None:
            return self.curvature.matmat
        data = list(self.curvature.data)
        xp = self.curvature.xp
        x = xp.concat([b.x for b in data], axis=0)
        y = xp.concat([b.y for b in data], axis=0)
        n = int(x.shape[0])
        rng = np.random.default_rng(self.options.seed)
        curvature = self.curvature

        def matmat(v: Array) -> Array:
            idx = _xp.from_numpy(
                rng.integers(0, n, size=min(batch_size, n)),
                dtype=xp.int64,
                device=curvature.device,
                xp=xp,
            )
            batch = Batch(xp.take(x, idx, axis=0), xp.take(y, idx, axis=0))
            return curvature.batch_matmat(batch, v)

        return matmat

    def _apply(self, t: Array) -> Array:
        xp = _xp.namespace(t)
        o = self.options
        matmat = self._sampler()
        reg, scale, keep = self.regularization, self.scale, 1.0 - o.dampen
        b_norm = _xp.to_numpy(xp.linalg.vector_norm(t, axis=1))
        limit = (10 * scale / reg if reg > 0 else 1e12) * np.maximum(b_norm, 1e-300) + 1e3
        h = t
        change = np.inf
        progress = Reporter("LiSSA", o.maxiter)
        for it in range(1, o.maxiter + 1):
            new = t + keep * h - (matmat(h) + reg * h) / scale
            norms = _xp.to_numpy(xp.linalg.vector_norm(new, axis=1))
            if not np.all(np.isfinite(norms)) or np.any(norms > limit):
                raise DivergenceError(
                    f"LiSSA diverged at iteration {it} (|h| grew to {np.max(norms):.3e}): "
                    f"scale {scale:.4g} is below the top eigenvalue of the damped curvature "
                    f"(the Lanczos estimate is {self._top_estimate():.4g}) or the curvature "
                    f"is not positive definite; raise scale (for example to "
                    f"{2 * self._top_estimate() + reg:.4g}) or the regularization"
                )
            diff = _xp.to_numpy(xp.linalg.vector_norm(new - h, axis=1))
            change = float(np.max(diff / np.maximum(norms, 1e-300)))
            h = new
            if progress.due():
                progress.report(it, f"relative change {change:.3e}")
            if change < o.rtol:
                break
        self.iterations = it
        if change >= o.rtol and o.on_failure != "ignore":
            msg = (
                f"LiSSA did not reach rtol={o.rtol:g} in {o.maxiter} iterations "
                f"(last relative change {change:.3e}); raise maxiter or the regularization"
            )
            if o.on_failure == "raise":
                raise NotConvergedError(msg)
            warnings.warn(msg, NotConvergedWarning, stacklevel=4)
        return h / scale

    def _top_estimate(self) -> float:
        """Lanczos estimate of the largest-magnitude eigenvalue of ``C`` (cached)."""
        if self._top is None:
            c = self.curvature
            top = lanczos(
                c.matmat,
                c.size,
                rank=1,
                krylov_dimension=min(c.size, 30),
                seed=self.options.seed,
                xp=c.xp,
                dtype=c.dtype,
                device=c.device,
            )
            self._top = abs(float(top.eigenvalues[0]))
        return self._top

    def with_regularization(self, regularization: float) -> LissaOperator:
        return LissaOperator(self.curvature, regularization, self.options, _top=self._top)


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
        smallest = float(xp.min(eigenvalues)) + self.regularization
        if not smallest > 0:
            raise NotPositiveDefiniteError(
                f"the EK-FAC curvature of block {block!r} has eigenvalue "
                f"{float(xp.min(eigenvalues)):.3e}; use a regularization > 0"
            )
        self._xp = xp

    @property
    def input_size(self) -> int:
        bias = 0 if self.bias_slice is None else self.n_out
        return self.n_out * self.n_in + bias

    def _to_matrix(self, t: Array) -> Array:
        xp, k = self._xp, t.shape[0]
        w = t[:, self.weight_slice]
        if self.layout == "oi":
            w = xp.reshape(w, (k, self.n_out, self.n_in))
        else:
            w = xp.permute_dims(xp.reshape(w, (k, self.n_in, self.n_out)), (0, 2, 1))
        if self.bias_slice is None:
            return w
        return xp.concat([w, t[:, self.bias_slice][:, :, None]], axis=2)

    def _from_matrix(self, g: Array) -> Array:
        xp, k = self._xp, g.shape[0]
        w = g[:, :, : self.n_in]
        if self.layout == "io":
            w = xp.permute_dims(w, (0, 2, 1))
        pieces = [(self.weight_slice.start, xp.reshape(w, (k, self.n_out * self.n_in)))]
        if self.bias_slice is not None:
            pieces.append((self.bias_slice.start, g[:, :, self.n_in]))
        return xp.concat([p for _, p in sorted(pieces, key=lambda item: item[0])], axis=1)

    def _in_eigenbasis(self, t: Array, scale: Array) -> Array:
        xp = self._xp
        g = self._to_matrix(t)
        rotated = xp.matrix_transpose(self.q_s) @ g @ self.q_a
        back = self.q_s @ (rotated * scale) @ xp.matrix_transpose(self.q_a)
        return self._from_matrix(back)

    def _apply(self, t: Array) -> Array:
        return self._in_eigenbasis(t, 1.0 / (self.eigenvalues + self.regularization))

    def curvature_apply(self, t: Array) -> Array:
        """The (undamped) EK-FAC curvature on rows ``(K, P)``."""
        return self._in_eigenbasis(t, self.eigenvalues)

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
