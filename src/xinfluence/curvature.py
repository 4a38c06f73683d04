"""Curvature of the mean training loss as linear operators over a dataset.

Both operators average over *samples*: a batch of ``n_b`` samples contributes
with weight ``n_b / n``, so any split of the data into batches (7, 13, 5, ...)
gives the full-data result.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, Literal, final

from . import _xp
from ._progress import Reporter
from ._xp import Array, Namespace
from .linalg import hutchinson_diagonal
from .types import Batch, GradientProvider

__all__ = [
    "Dataset",
    "Curvature",
    "HessianCurvature",
    "EmpiricalFisherCurvature",
    "GaussNewtonCurvature",
    "SecondOrder",
    "make_curvature",
]

SecondOrder = Literal["hessian", "gauss_newton", "empirical_fisher"]


@final
class Dataset:
    """Batches validated for one provider, re-iterable, with the sample count.

    Every batch goes through :meth:`GradientProvider.prepare_batch` (namespace,
    finiteness, shape). Iterative methods pass over the data many times: the
    prepared batches of the first complete pass are kept while they take at
    most ``cache_bytes`` (256 MiB by default; 0 turns this off), so later passes
    neither re-collate a DataLoader nor re-validate. Larger data is streamed
    from the source on every pass.
    """

    def __init__(self, batches: Iterable[Batch], gp: GradientProvider, *, cache_bytes: int = 2**28):
        self._batches = batches
        self._gp = gp
        self._n: int | None = None
        self._cache_bytes = cache_bytes
        # shared with the restrictions made by with_provider: one list, filled once
        self._cache: list[list[Batch]] = []

    def __iter__(self) -> Iterator[Batch]:
        if self._cache:
            if self._n is None:
                self._n = sum(len(b) for b in self._cache[0])
            yield from self._cache[0]
            return
        n, size = 0, 0
        kept: list[Batch] | None = [] if self._cache_bytes > 0 else None
        for batch in self._batches:
            batch = self._gp.prepare_batch(batch)
            n += len(batch)
            if kept is not None:
                size += _nbytes(batch.x) + _nbytes(batch.y)
                if size <= self._cache_bytes:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        self._n = n
        if kept is not None and not self._cache:
            self._cache.append(kept)

    def with_provider(self, gp: GradientProvider) -> Dataset:
        """The same batches for another provider of the same model (a restriction):
        validation and cast are the model's, so the cache is shared."""
        out = Dataset(self._batches, gp, cache_bytes=self._cache_bytes)
        out._n = self._n
        out._cache = self._cache
        return out

    @property
    def cached(self) -> bool:
        """Whether the prepared batches are kept (every pass yields the same objects)."""
        return bool(self._cache)

    @property
    def n_samples(self) -> int:
        if self._n is None:
            for _ in self:
                pass
        assert self._n is not None
        return self._n


def _nbytes(a: Array) -> int:
    """Bytes of an array (8 per element when the dtype does not say)."""
    itemsize = getattr(a.dtype, "itemsize", 8)
    return math.prod(int(d) for d in a.shape) * int(itemsize)


class Curvature(ABC):
    """A symmetric ``(P, P)`` curvature ``C`` of the mean training loss."""

    def __init__(self, gp: GradientProvider, data: Dataset):
        self.gp = gp
        self.data = data
        self._passes = 0  # products so far, for progress reports
        self._progress: Reporter | None = None

    @property
    def size(self) -> int:
        return self.gp.n_parameters

    @property
    def xp(self) -> Namespace:
        return self.gp.xp

    @property
    def dtype(self) -> Any:
        return self.gp.dtype

    @property
    def device(self) -> Any:
        return self.gp.device

    def matmat(self, v: Array, shift: float = 0.0, *, check: bool = True) -> Array:
        """``v @ C`` for ``v`` of shape ``(K, P)`` (``C`` is symmetric): ``(K, P)``;
        ``v @ (C + shift I)`` with ``shift`` (damping, in the same pass).

        :class:`~xinfluence.errors.NonFiniteError` where the product holds NaN or
        inf; ``check=False`` leaves that to a caller that checks what it computes
        from the product anyway (jax: one batch then runs no program here)."""
        if v.ndim != 2 or v.shape[1] != self.size:
            raise ValueError(f"expected shape (K, {self.size}), got {tuple(v.shape)}")
        total = None
        n = first = 0
        for batch in self.data:
            nb = len(batch)
            first = first or nb  # weights relative to the first batch: one batch costs
            # no extra pass over the product (and on jax no extra compiled program)
            scale = nb / first if first else 0.0
            total = _xp.add_scaled(total, self._batch_matmat(batch, v), scale=scale, xp=self.xp)
            n += nb
        self._passes += 1
        if self._progress is None:
            self._progress = Reporter("curvature products", unit="pass over the data")
        if self._progress.due():
            self._progress.report(self._passes, f"{n} samples, {v.shape[0]} vectors")
        if total is None:
            raise ValueError("cannot multiply by the curvature of an empty dataset")
        if not check and first == n and not shift:
            return total
        return _xp.scale_shift_checked(
            total, v, first / n, shift, xp=self.xp, what="the curvature product"
        )

    def prepare_products(self) -> None:
        """Tell the provider that :meth:`matmat` will pass over the data many times
        (iterative solvers call this once): with the batches kept in memory, it
        may precompute per-batch quantities for its products. Streamed data
        (batches made anew on every pass) gets no hint."""
        if self.data.n_samples and self.data.cached:
            for batch in self.data:
                self._prepare_batch_products(batch)

    def _prepare_batch_products(self, batch: Batch) -> None:  # noqa: B027 (optional hook)
        """Per-batch hint of :meth:`prepare_products` (default: none)."""

    def dense(self) -> Array:
        """The dense curvature ``C``, ``(P, P)``."""
        total = None
        n = first = 0
        for batch in self.data:
            nb = len(batch)
            first = first or nb  # weights relative to the first batch, as in matmat
            scale = nb / first if first else 0.0
            total = _xp.add_scaled(total, self._batch_dense(batch), scale=scale, xp=self.xp)
            n += nb
        if total is None:
            raise ValueError("cannot build the curvature of an empty dataset")
        out = _xp.symmetrize(total, xp=self.xp, scale=first / n)
        return _xp.check_finite(out, xp=self.xp, what="the curvature (gradients or Hessian)")

    def batch_matmat(self, batch: Batch, v: Array) -> Array:
        """``v @ C_b`` for one (already prepared) batch: its mean curvature."""
        return self._batch_matmat(batch, v)

    def diagonal(self, *, seed: int = 0, num_samples: int = 64) -> Array:
        """The diagonal of ``C``, ``(P,)``: exact where the provider can give it,
        else Hutchinson's estimate from ``num_samples`` Rademacher probes."""
        total = None
        n = 0
        for batch in self.data:
            d = self._batch_diagonal(batch)
            if d is None:
                return hutchinson_diagonal(
                    self.matmat,
                    self.size,
                    num_samples=num_samples,
                    seed=seed,
                    xp=self.xp,
                    dtype=self.dtype,
                    device=self.device,
                )
            nb = len(batch)
            total = nb * d if total is None else total + nb * d
            n += nb
        assert total is not None
        return total / n

    def _batch_diagonal(self, batch: Batch) -> Array | None:
        return None

    @abstractmethod
    def _batch_matmat(self, batch: Batch, v: Array) -> Array:
        """``v @ C_b`` with ``C_b`` the batch-mean curvature."""

    @abstractmethod
    def _batch_dense(self, batch: Batch) -> Array:
        """The batch-mean curvature ``C_b``."""


@final
class HessianCurvature(Curvature):
    """``H = (1/n) sum_i d^2 l(z_i) / d theta^2`` through the provider's ``hvp``."""

    def _batch_matmat(self, batch: Batch, v: Array) -> Array:
        return self.gp.hvp(batch, v)

    def _prepare_batch_products(self, batch: Batch) -> None:
        self.gp.prepare_products(batch)

    def _batch_dense(self, batch: Batch) -> Array:
        return self.gp.hessian(batch)

    def _batch_diagonal(self, batch: Batch) -> Array | None:
        return self.gp.hessian_diagonal(batch)


@final
class EmpiricalFisherCurvature(Curvature):
    """``G = (1/n) sum_i g_i g_i^T`` with ``g_i`` the per-sample gradients.

    Positive semi-definite by construction.
    """

    def _batch_matmat(self, batch: Batch, v: Array) -> Array:
        grads = self.gp.flat_grads(batch)  # (N, P)
        return (v @ self.xp.matrix_transpose(grads)) @ grads / grads.shape[0]

    def _batch_dense(self, batch: Batch) -> Array:
        grads = self.gp.flat_grads(batch)
        return self.xp.matrix_transpose(grads) @ grads / grads.shape[0]

    def _batch_diagonal(self, batch: Batch) -> Array | None:
        grads = self.gp.flat_grads(batch)
        return self.xp.mean(grads * grads, axis=0)


@final
class GaussNewtonCurvature(Curvature):
    """The generalized Gauss-Newton matrix ``G = (1/n) sum_i J_i^T H_i J_i``.

    ``J_i = d out_i / d theta`` is the Jacobian of sample ``i``'s model output and
    ``H_i = d^2 l / d out^2`` the Hessian of its loss with respect to that
    output, through the provider's :meth:`~GradientProvider.ggn_matmat`. It
    drops the term of the Hessian that holds the model's second derivatives, so
    it is positive semi-definite whenever the loss is convex in the output
    (squared error, cross-entropy), and equals the Hessian for generalized
    linear models with canonical links.
    """

    def __init__(self, gp: GradientProvider, data: Dataset):
        if not gp.supports_gauss_newton:
            raise NotImplementedError(gp._no_output_message())
        super().__init__(gp, data)

    def _batch_matmat(self, batch: Batch, v: Array) -> Array:
        return self.gp.ggn_matmat(batch, v)

    def _batch_dense(self, batch: Batch) -> Array:
        return self.gp.ggn(batch)

    def _batch_diagonal(self, batch: Batch) -> Array | None:
        return self.gp.ggn_diagonal(batch)


def make_curvature(second_order: str, gp: GradientProvider, data: Dataset) -> Curvature:
    """The curvature named by ``second_order``: ``"hessian"``, ``"gauss_newton"``
    (``mean_i J_i^T H_out,i J_i``) or ``"empirical_fisher"`` (``mean_i g_i g_i^T``)."""
    if second_order == "hessian":
        return HessianCurvature(gp, data)
    if second_order == "empirical_fisher":
        return EmpiricalFisherCurvature(gp, data)
    if second_order == "gauss_newton":
        return GaussNewtonCurvature(gp, data)
    raise ValueError(
        "second_order must be 'hessian', 'gauss_newton' or 'empirical_fisher', "
        f"got {second_order!r}"
    )
