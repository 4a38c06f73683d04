"""Concrete operators approximating ``(C + lambda I)^-1`` on one block."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import numpy as np

from . import _xp
from ._progress import Reporter
from ._structured_operators import (  # noqa: F401  (re-exported: public import paths unchanged)
    EkfacOperator,
    InverseHarmonicMeanOperator,
    LowRankBilinearForm,
    LowRankOperator,
    _ekfac_in_eigenbasis,
)
from ._xp import Array, Namespace
from .curvature import Curvature
from .errors import (
    DivergenceError,
    NonFiniteError,
    NotConvergedError,
    NotConvergedWarning,
    NotPositiveDefiniteError,
    warn,
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
from .linalg._util import default_rtol, padded_with_norms, round_up_2
from .linalg.cg import OnFailure
from .linalg.lanczos import positive_definite_shift
from .types import (
    Batch,
    Operator,
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
        f"{regularization:g}; use a regularization of about {suggestion:.1e} or larger, or a "
        "positive semi-definite curvature: second_order='gauss_newton' or 'empirical_fisher'"
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
        d = _xp.to_numpy(xp.linalg.diagonal(factor))  # (P,): read once on the host
        lo, hi = float(np.min(d)), float(np.max(d))
        eps = _xp.finfo_eps(curvature.dtype, xp=xp)
        if lo > 0 and (lo / hi) ** 2 > 10 * curvature.shape[0] * eps:
            return factor
    raise _not_pd_error(curvature, regularization, block)


def _damped_cholesky(
    curvature: Array, regularization: float, /, *, xp: Namespace
) -> tuple[Array, Array]:
    """``(L, ok)``: the Cholesky factor of ``C + lambda I`` and whether it exists."""
    return _xp.cholesky_checked(_xp.plus_diagonal(curvature, regularization, xp=xp), xp=xp)


def _cho_solve_rows(factor: Array, t: Array, /, *, xp: Namespace) -> Array:
    """``t (L L^T)^-1`` on rows ``(K, P)``."""
    return xp.matrix_transpose(_xp.cho_solve(factor, xp.matrix_transpose(t), xp=xp))


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
        # jax: the shift and the factorisation are one compiled program
        damped = _xp.maybe_jit(_damped_cholesky, xp=xp)
        factor, ok = damped(curvature, self.regularization, xp=xp)
        self._factor = check_positive_definite(
            factor if bool(ok) else None, curvature, self.regularization, block
        )

    @property
    def input_size(self) -> int:
        return int(self.curvature.shape[0])

    def _apply(self, t: Array) -> Array:
        xp = _xp.namespace(t)
        return _xp.maybe_jit(_cho_solve_rows, xp=xp)(self._factor, t, xp=xp)

    def with_regularization(self, regularization: float) -> DirectOperator:
        return DirectOperator(self.curvature, regularization, block=self.block)


# -- iterative and low-rank operators (on a Curvature) -------------------------


def _damped(curvature: Curvature, regularization: float) -> Callable[[Array], Array]:
    """``v -> v (C + lambda I)`` on rows ``(K, P)``."""

    def matmat(v: Array) -> Array:
        return curvature.matmat(v, regularization)

    return matmat


def _check_on_failure(on_failure: str) -> None:
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")


# LiSSA's iteration counter is an int32 array (jax's default integer width).
_MAX_COUNT = 2**31 - 1

#: CgInfluence's default relative residual tolerance in float64.
CG_FLOAT64_RTOL = 1e-7
#: LissaInfluence's default relative residual tolerance in float64.
LISSA_FLOAT64_RTOL = 1e-6


@dataclass(frozen=True)
class CgOptions:
    """Options of :class:`CgOperator` (see :class:`~xinfluence.CgInfluence`).

    ``rtol=None`` is the dtype's default: :data:`CG_FLOAT64_RTOL` in float64,
    ``sqrt(eps)`` in narrower dtypes (float32: 3.45e-4).
    """

    rtol: float | None = None
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
        rtol = 0.0 if self.rtol is None else self.rtol
        if not (_is_real(rtol) and _is_real(self.atol)) or not (
            math.isfinite(rtol) and math.isfinite(self.atol) and rtol >= 0 and self.atol >= 0
        ):
            raise ValueError(
                f"rtol and atol must be finite and >= 0, got {self.rtol!r}, {self.atol!r}"
            )
        object.__setattr__(self, "atol", float(self.atol))
        if self.rtol is not None:
            object.__setattr__(self, "rtol", float(self.rtol))
        if self.preconditioner_rank < 1:
            raise ValueError(f"preconditioner_rank must be >= 1, got {self.preconditioner_rank}")
        _check_on_failure(self.on_failure)


@dataclass(frozen=True)
class LissaOptions:
    """Options of :class:`LissaOperator` (see :class:`~xinfluence.LissaInfluence`)."""

    maxiter: int = 1000
    scale: float | None = None
    dampen: float = 0.0
    rtol: float | None = None
    batch_size: int | None = None
    seed: int = 0
    on_failure: str = "warn"

    def __post_init__(self) -> None:
        if not (_is_real(self.dampen) and 0 <= self.dampen < 1):
            raise ValueError(f"dampen must be a real number in [0, 1), got {self.dampen!r}")
        if self.scale is not None and not (
            _is_real(self.scale) and math.isfinite(self.scale) and self.scale > 0
        ):
            raise ValueError(
                f"scale must be a finite number > 0 (or None for the Lanczos estimate), "
                f"got {self.scale!r}"
            )
        if self.rtol is not None and not (
            _is_real(self.rtol) and math.isfinite(self.rtol) and self.rtol >= 0
        ):
            raise ValueError(f"rtol must be a finite number >= 0 or None, got {self.rtol!r}")
        if self.batch_size is not None and not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int or None, got {self.batch_size!r}")
        if not (_is_int(self.maxiter) and self.maxiter >= 1):
            raise ValueError(f"maxiter must be an int >= 1, got {self.maxiter!r}")
        _check_on_failure(self.on_failure)
        # numpy scalars would leak into array arithmetic (array-api-strict refuses them)
        for name in ("scale", "dampen", "rtol"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))


def _is_real(value: Any) -> bool:
    """A real scalar (Python, numpy or 0-d array), not a bool and not NaN."""
    if isinstance(value, bool):
        return False
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    return not math.isnan(value)


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


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
            try:
                damped = nystroem(
                    _damped(curvature, self.regularization),
                    curvature.size,
                    rank=min(preconditioner_rank, curvature.size),
                    seed=seed,
                    xp=curvature.xp,
                    dtype=curvature.dtype,
                    device=curvature.device,
                )
            except NotPositiveDefiniteError as error:
                raise self._not_positive_definite(str(error)) from error
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

    @property
    def rtol(self) -> float:
        """The relative residual tolerance in use (``options.rtol`` or the dtype's default)."""
        if self.options.rtol is not None:
            return float(self.options.rtol)
        c = self.curvature
        return default_rtol(c.dtype, xp=c.xp, float64_rtol=CG_FLOAT64_RTOL)

    def _apply(self, t: Array) -> Array:
        o = self.options
        solve = block_cg if o.solver == "block" else cg
        try:
            result = solve(
                _damped(self.curvature, self.regularization),
                t,
                rtol=self.rtol,
                atol=o.atol,
                maxiter=o.maxiter,
                preconditioner=self._preconditioner,
                on_failure=o.on_failure,
            )
        except NotPositiveDefiniteError as error:
            shift = getattr(error, "suggested_shift", None)
            if shift is None:  # the preconditioner, not the curvature
                raise
            raise self._not_positive_definite(
                str(error).split(": the operator")[0],
                getattr(error, "smallest_eigenvalue", None),
                shift,
            ) from error
        self.last_result = result
        return result.solution

    def _not_positive_definite(
        self, what: str, lowest: float | None = None, shift: float | None = None
    ) -> NotPositiveDefiniteError:
        """The error for a damped curvature that is not positive definite, with a
        regularization that suffices (a Lanczos bound, verified; see
        :func:`~xinfluence.linalg.lanczos.positive_definite_shift`)."""
        c, reg = self.curvature, self.regularization
        if shift is None:
            lowest, shift = positive_definite_shift(
                _damped(c, reg), c.size, xp=c.xp, dtype=c.dtype, device=c.device
            )
        suggestion = round_up_2(reg + shift)
        error = NotPositiveDefiniteError(
            f"{what}: the curvature plus regularization {reg:g} is not positive definite "
            f"(its smallest eigenvalue is about {lowest:.3e}, by Lanczos); use "
            f"regularization={suggestion:.2g} or more, or a positive semi-definite "
            "curvature: second_order='gauss_newton' or 'empirical_fisher'"
        )
        error.smallest_eigenvalue = lowest  # type: ignore[attr-defined]
        error.suggested_regularization = suggestion  # type: ignore[attr-defined]
        return error

    def with_regularization(self, regularization: float) -> CgOperator:
        return CgOperator(self.curvature, regularization, self.options, _sketch=self._sketch)


def _lissa_step(
    t: Array, h: Array, product: Array, reg: float, keep: float, scale: float, /, *, xp: Namespace
) -> tuple[Array, Array]:
    """One LiSSA iteration from ``product = C h``: ``new = t + keep h - (C h + reg h) / scale``
    and the row norms of ``new`` and of ``new - h`` (the exact residual), concatenated."""
    new = t + keep * h - (product + reg * h) / scale
    norms = xp.concat([xp.linalg.vector_norm(new, axis=1), xp.linalg.vector_norm(new - h, axis=1)])
    return new, norms


def _lissa_solution(h: Array, scale: float, /, *, xp: Namespace, n_rows: int) -> Array:
    """``x = h / scale`` without the padding rows."""
    return h[:n_rows, :] / scale


@final
class LissaOperator(Operator):
    """Linear time stochastic second-order approximation (Agarwal et al. 2017).

    Iterates ``h <- b + (1 - dampen) h - (C_S + lambda I) h / scale`` from
    ``h = b``, with ``C_S`` the curvature of a sample of ``batch_size`` training
    points (all of them when ``batch_size`` is None, which makes it a
    deterministic Richardson iteration), and returns ``x = h / scale``. Its
    fixed point solves ``(C + mu I) x = b`` with ``mu = lambda + dampen * scale``
    (``dampen`` adds regularization); it converges when
    ``scale > lambda_max(C + mu I) / 2``. The default scale is the Lanczos
    estimate of ``lambda_max(C) + lambda`` (times 2 with sampled batches).

    Stopping rule: the residual ``|b - (C + mu I) x| <= rtol |b|`` for every row
    (``rtol=None``: 1e-6 in float64, ``sqrt(eps)`` in narrower dtypes), so the
    relative error of ``x`` is at most ``rtol * cond(C + mu I)``. On the full
    data the residual of the previous iterate is the step itself,
    ``b - (C + mu I) h / scale = h_new - h``, and is checked at every iteration
    at no extra cost. With sampled batches the step only estimates it (with the
    sample's curvature), so the full-data residual is computed every
    ``ceil(n / batch_size)`` iterations (one extra pass over the data per epoch of
    samples, at most doubling the cost); sampled LiSSA fluctuates at a noise
    floor set by the batch size, which may lie above ``rtol``. If ``maxiter``
    iterations end above ``rtol``, :class:`~xinfluence.errors.NotConvergedWarning`
    (or :class:`~xinfluence.errors.NotConvergedError` with ``on_failure="raise"``)
    reports the residual reached.

    On jax, the iterations on the full data run as one compiled program
    (``jax.lax.while_loop``); sampled batches are drawn on the host, one
    iteration at a time.
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
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        self.scale = float(scale)
        self.iterations = 0
        #: host (K,) relative residuals |b - (C + mu I) x| / |b| of the last application
        self.last_relative_residuals: np.ndarray | None = None

    @property
    def input_size(self) -> int:
        return self.curvature.size

    @property
    def rtol(self) -> float:
        """The residual tolerance in use (``options.rtol`` or the dtype's default)."""
        if self.options.rtol is not None:
            return float(self.options.rtol)
        c = self.curvature
        return default_rtol(c.dtype, xp=c.xp, float64_rtol=LISSA_FLOAT64_RTOL)

    def _sampler(self) -> tuple[Callable[[Array], Array], int]:
        """Curvature products on the full data, or on seeded random samples; and the
        number of iterations between full-data residual checks."""
        batch_size = self.options.batch_size
        if batch_size is None:
            return self.curvature.matmat, 1
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

        return matmat, max(1, math.ceil(n / batch_size))

    def _divergence(self, iteration: int, norm: float) -> DivergenceError:
        """The error for a diverged iteration, with its cause: a negative eigenvalue
        of ``C + lambda I`` (no scale helps: the regularization that suffices, as
        Direct and CG give it), else a scale below the top eigenvalue."""
        c, reg, scale = self.curvature, self.regularization, self.scale
        # the leftmost eigenvalue of the damped curvature (a short Lanczos run and a
        # verified shift; only on this error path)
        lowest, shift = positive_definite_shift(
            _damped(c, reg), c.size, xp=c.xp, dtype=c.dtype, device=c.device
        )
        head = f"LiSSA diverged at iteration {iteration} (|h| grew to {norm:.3e})"
        if lowest < -1e-8 * scale:
            suggestion = round_up_2(reg + shift)
            error = DivergenceError(
                f"{head}: the curvature plus regularization {reg:g} has a negative "
                f"eigenvalue (about {lowest:.3e}, by Lanczos), so the iteration diverges at "
                f"any scale; raise the regularization to at least {suggestion:.2g}, or use a "
                "positive semi-definite curvature: second_order='gauss_newton' or "
                "'empirical_fisher'"
            )
            error.smallest_eigenvalue = lowest  # type: ignore[attr-defined]
            error.suggested_regularization = suggestion  # type: ignore[attr-defined]
            return error
        top = self._top_estimate()
        return DivergenceError(
            f"{head}: scale {scale:.4g} is below the top eigenvalue of the damped curvature "
            f"(the Lanczos estimate is {top + reg:.4g}); raise scale (for example to "
            f"{2 * top + reg:.4g}) or leave scale=None (estimated)"
        )

    def _apply(self, t: Array) -> Array:
        xp = _xp.namespace(t)
        o = self.options
        matmat, cadence = self._sampler()
        sampled = o.batch_size is not None
        reg, scale, keep = self.regularization, self.scale, 1.0 - o.dampen
        rtol = self.rtol
        # jax: zero rows pad t to a few fixed counts (they stay zero), so that every
        # query of a problem runs the same compiled programs
        n_rows = int(t.shape[0])
        start = _xp.maybe_jit(padded_with_norms, xp=xp, static_argnames=("xp", "n_padded"))
        t, t_norms = start(t, xp=xp, n_padded=_xp.padded_rows(n_rows, xp=xp))
        b_norm = np.asarray(_xp.to_numpy(t_norms), dtype=np.float64)
        tol = rtol * b_norm
        limit = (10 * scale / reg if reg > 0 else 1e12) * np.maximum(b_norm, 1e-300) + 1e3
        progress = Reporter("LiSSA", o.maxiter)
        step = _xp.maybe_jit(_lissa_step, xp=xp)
        k, device = int(t.shape[0]), _xp.device_of(t)
        # the tests of the host (in float64) as arrays, for loops compiled on jax
        wide = _xp.float64_or(t.dtype, xp=xp)
        tol_a = _xp.from_numpy(tol, dtype=wide, device=device, xp=xp)
        floor_a = _xp.from_numpy(np.maximum(tol, 1e-300), dtype=wide, device=device, xp=xp)
        limit_a = _xp.from_numpy(limit, dtype=wide, device=device, xp=xp)
        t = _xp.committed(t, xp=xp)

        def body(state: tuple[Array, ...]) -> tuple[Array, ...]:
            """One iteration: ``(h, best h, its worst residual / tol, its residuals,
            count, status, max |h_new|)``, status 0 going, 1 converged, 2 diverged, 3
            a non-finite product; ``best`` is the iterate with the smallest known
            worst relative residual."""
            h, best, best_ratio, best_residuals, count, _, _ = state
            product = matmat(h)
            new, stats = step(t, h, product, reg, keep, scale, xp=xp)
            count = count + 1
            stats = xp.astype(stats, wide)
            norms = stats[:k]
            bad = xp.any(~xp.isfinite(norms)) | xp.any(norms > limit_a)
            residuals, known = stats[k:], True
            if sampled:  # never compiled: the samples are drawn on the host
                if int(count) % cadence:
                    known = False
                else:
                    full = self.curvature.matmat(h) + reg * h
                    r = t - o.dampen * h - full / scale
                    residuals = xp.astype(xp.linalg.vector_norm(r, axis=1), wide)
            ratio = xp.max(residuals / floor_a)
            better = ~bad & (ratio < best_ratio) if known else xp.zeros_like(bad)
            best = xp.where(better, h, best)
            best_ratio = xp.where(better, ratio, best_ratio)
            best_residuals = xp.where(better, residuals, best_residuals)
            converged = ~bad & xp.all(residuals <= tol_a) if known else xp.zeros_like(bad)
            status = 2 * xp.astype(bad, xp.int32) + xp.astype(converged, xp.int32)
            if not sampled:  # the full data's products are checked (not inside compiled code)
                status = xp.where(xp.any(~xp.isfinite(product)), xp.full_like(status, 3), status)
            h = xp.where(status == 0, new, h)
            return h, best, best_ratio, best_residuals, count, status, xp.max(norms)

        def going(state: tuple[Array, ...]) -> Array:
            return (state[5] == 0) & (state[4] < min(o.maxiter, _MAX_COUNT))

        def observe(state: tuple[Array, ...]) -> None:
            if progress.due():
                best_ratio = float(_xp.to_numpy(state[2]))
                progress.report(int(state[4]), f"best relative residual / rtol {best_ratio:.3e}")

        def run(t: Array) -> tuple[Array, ...]:
            inf = xp.full((), math.inf, dtype=wide, device=device)
            zero = xp.zeros((), dtype=xp.int32, device=device)
            best_residuals = xp.full((k,), math.inf, dtype=wide, device=device)
            state = (t, t, inf, best_residuals, zero, zero, inf)
            return _xp.while_loop(going, body, state, xp=xp, observe=observe)

        # the full data: one compiled program on jax (sampled batches come from the host)
        state = run(t) if sampled else _xp.compiled(run, t, xp=xp)
        h, best, best_ratio = state[0], state[1], float(_xp.to_numpy(state[2]))
        it, status = int(_xp.to_numpy(state[4])), int(_xp.to_numpy(state[5]))
        if status == 3:
            raise NonFiniteError("the curvature product contains NaN or inf values")
        if status == 2:
            raise self._divergence(it, float(_xp.to_numpy(state[6])))
        self.iterations = it
        best_residuals: np.ndarray | None = None
        if best_ratio < math.inf:
            best_residuals = np.asarray(_xp.to_numpy(state[3]), dtype=np.float64)
        if best_residuals is None:  # never measured: measure the last iterate
            full = self.curvature.matmat(h) + reg * h
            best = h
            best_residuals = np.asarray(
                _xp.to_numpy(xp.linalg.vector_norm(t - o.dampen * h - full / scale, axis=1)),
                dtype=np.float64,
            )
        best_residuals, b_norm, tol = best_residuals[:n_rows], b_norm[:n_rows], tol[:n_rows]
        relative = best_residuals / np.maximum(b_norm, 1e-300)
        self.last_relative_residuals = relative
        if np.any(best_residuals > tol) and o.on_failure != "ignore":
            where = (
                "on the full data"
                if not sampled
                else f"of the full data, checked every {cadence} sampled iterations; sampled "
                "LiSSA fluctuates at a noise floor set by batch_size, which a larger "
                "batch_size (or None, the full data) lowers"
            )
            msg = (
                f"LiSSA did not reach |b - (C + mu I) x| <= rtol |b| (rtol={rtol:g}) in "
                f"{o.maxiter} iterations: the largest relative residual is "
                f"{float(np.max(relative)):.3e} ({where}); raise maxiter or the "
                "regularization, or use CgInfluence"
            )
            if o.on_failure == "raise":
                raise NotConvergedError(msg)
            warn(msg, NotConvergedWarning)
        finish = _xp.maybe_jit(_lissa_solution, xp=xp, static_argnames=("xp", "n_rows"))
        return finish(best, scale, xp=xp, n_rows=n_rows)

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
            self._top = abs(float(_xp.to_numpy(top.eigenvalues)[0]))  # no indexing program
        return self._top

    def with_regularization(self, regularization: float) -> LissaOperator:
        return LissaOperator(self.curvature, regularization, self.options, _top=self._top)
