"""Influence through random projections of the per-sample gradients (TRAK / LoGra).

A seeded linear map ``R`` ``(k, P_b)`` sends each block's per-sample gradient
``g`` to ``R g`` (``k`` numbers). The curvature is taken in the projected space,
``C_R = mean_i (R g_i)(R g_i)^T`` (the empirical Fisher of the projected
gradients, as TRAK and LoGra use it; ``second_order="hessian"`` or
``"gauss_newton"`` give ``R C R^T`` from curvature products instead), a
``(k, k)`` matrix solved exactly by Cholesky:

``I[t, j] = (R g_t)^T (C_R + lambda I_k)^-1 (R g_j)``

(by default, as TRAK and LoGra damp; ``regularization_space="parameter"``
damps with ``lambda R R^T`` instead, the image of ``lambda I``). With that
damping, as an operator on parameter space this is
``B = R^T (R (C + lambda I) R^T)^-1 R``. For an invertible ``R`` (``k = P_b``)
it is exactly ``(C + lambda I)^-1``; for ``k < P_b`` it is a randomized
approximation that improves as ``k`` grows (Johnson-Lindenstrauss).

Two kinds of maps:

* ``projection="dense"``: i.i.d. Gaussian (``N(0, 1/k)``) or Rademacher
  (``+-1/sqrt(k)``) entries. The map is never held whole unless it fits the
  memory budget: it is drawn in tiles of :data:`TILE_COLUMNS` parameter columns,
  tile ``t`` of the ``b``-th block from the counter-based generator
  ``Philox(key=seed, counter=(0, 0, t, b))`` on the host in float64, and
  applied tile by tile (memory ``O(k x chunk)``). The numbers therefore depend
  on the seed only: the same on every backend, device, dtype, batch size and
  memory budget (for the same flat parameter order).
* ``projection="kronecker"`` (LoGra, Choe et al. 2024): for every dense layer
  with inputs ``a`` ``(N, I)`` (plus a column of ones for the bias) and output
  gradients ``s`` ``(N, O)``, two small maps ``R_s`` ``(k_out, O)`` and ``R_a``
  ``(k_in, I + 1)``; the projected gradient of a sample is
  ``(R_s s) (R_a a)^T`` flattened, i.e. ``(R_s kron R_a)`` applied to the
  layer's gradient, computed from the provider's ``kfac_factors`` without ever
  forming per-sample gradients.
"""

from __future__ import annotations

import copy
import math
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, final

import numpy as np

from . import _xp
from ._config import memory_budget
from ._xp import Array, Namespace
from .curvature import Dataset, make_curvature
from .influence import BlockStructure, ComposableInfluence, Regularization
from .operators import DirectOperator
from .types import (
    Batch,
    BilinearForm,
    GradientProvider,
    InfluenceMode,
    KroneckerFactorProvider,
    Operator,
    OperatorGradientComposition,
    contract,
)

__all__ = [
    "TILE_COLUMNS",
    "GradientProjection",
    "DenseProjection",
    "KroneckerProjection",
    "OrthonormalizedProjection",
    "ProjectedOperator",
    "ProjectedInfluence",
]

#: Parameter columns per independently drawn tile of a dense projection. Fixed,
#: so that the map does not depend on how it is chunked.
TILE_COLUMNS = 1024


def _draw(
    shape: tuple[int, int], *, seed: int, tile: int, stream: int, distribution: str
) -> np.ndarray:
    """Float64 host draw of one tile: ``N(0, 1)`` or ``+-1`` entries, row-major."""
    rng = np.random.Generator(np.random.Philox(key=seed, counter=[0, 0, tile, stream]))
    if distribution == "gaussian":
        return rng.standard_normal(shape)
    return rng.integers(0, 2, size=shape).astype(np.float64) * 2.0 - 1.0


def _itemsize(dtype: Any, /, *, xp: Namespace) -> int:
    return int(xp.finfo(dtype).bits) // 8


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**128:
        raise ValueError(f"seed must be an integer in [0, 2**128), got {seed!r}")
    return int(seed)


class GradientProjection(ABC):
    """A linear map ``R`` from one block's flat parameter space ``(P,)`` to ``(k,)``."""

    #: whether the rows are orthonormal (``R R^T = I_k``)
    orthonormal: bool = False

    def __init__(self, *, xp: Namespace, dtype: Any, device: Any):
        self.xp, self.dtype, self.device = xp, dtype, device

    @property
    @abstractmethod
    def input_size(self) -> int:
        """``P``: the size of the block's flat parameter vector."""

    @property
    @abstractmethod
    def output_size(self) -> int:
        """``k``: the projected dimension."""

    @abstractmethod
    def _project(self, v: Array) -> Array:
        """``v @ R^T`` for ``v`` ``(M, P)``: ``(M, k)``."""

    @abstractmethod
    def _transpose(self, u: Array) -> Array:
        """``u @ R`` for ``u`` ``(M, k)``: ``(M, P)``."""

    def project(self, v: Array) -> Array:
        """``R v`` along the trailing dimension: ``(..., P) -> (..., k)``."""
        return self._rows(v, self.input_size, self._project)

    def transpose(self, u: Array) -> Array:
        """``R^T u`` along the trailing dimension: ``(..., k) -> (..., P)``."""
        return self._rows(u, self.output_size, self._transpose)

    def _rows(self, v: Array, size: int, fn: Any) -> Array:
        if v.shape[-1] != size:
            raise ValueError(
                f"expected a trailing dimension of size {size}, got shape {tuple(v.shape)}"
            )
        if v.ndim == 2:
            return fn(v)
        lead = tuple(v.shape[:-1])
        out = fn(self.xp.reshape(v, (math.prod(lead), size)))
        return self.xp.reshape(out, (*lead, out.shape[-1]))

    def project_grads(self, gp: GradientProvider, batch: Batch) -> Array:
        """Projected per-sample gradients ``R g_i`` of one prepared batch: ``(N, k)``."""
        return self._project(gp.flat_grads(batch))

    def matrix(self) -> Array:
        """The dense map ``R`` ``(k, P)`` (for inspection and tests on small blocks)."""
        eye = _xp.eye(self.output_size, dtype=self.dtype, device=self.device, xp=self.xp)
        return self._transpose(eye)

    def orthonormalized(self) -> GradientProjection:
        """The map ``Q = L^-1 R`` (``R R^T = L L^T``): rows orthonormal, same span."""
        return OrthonormalizedProjection(self)

    def gram(self) -> Array:
        """``R R^T`` ``(k, k)``, a few rows of ``R`` at a time."""
        xp, k, p = self.xp, self.output_size, self.input_size
        rows = max(1, min(k, memory_budget() // max(1, 4 * p * _itemsize(self.dtype, xp=xp))))
        eye = _xp.eye(k, dtype=self.dtype, device=self.device, xp=xp)
        parts = [
            self._project(self._transpose(eye[start : start + rows, :]))
            for start in range(0, k, rows)
        ]
        return _xp.symmetrize(xp.concat(parts, axis=0), xp=xp)


@final
class DenseProjection(GradientProjection):
    """``R`` with i.i.d. entries, ``N(0, 1/k)`` (``"gaussian"``) or ``+-1/sqrt(k)``
    (``"rademacher"``), so that ``E[R^T R] = I``.

    Tile ``t`` (columns ``t * TILE_COLUMNS`` onwards) comes from
    ``Philox(key=seed, counter=(0, 0, t, stream))``. The tiles are applied in
    chunks whose size follows the memory budget; the whole map is kept on the
    device after its first use when it takes at most half the budget, else it
    is drawn again on every application.
    """

    def __init__(
        self,
        input_size: int,
        k: int,
        *,
        seed: int,
        stream: int = 0,
        distribution: str = "gaussian",
        xp: Namespace,
        dtype: Any,
        device: Any,
    ):
        super().__init__(xp=xp, dtype=dtype, device=device)
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(
                f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}"
            )
        self._p, self._k = int(input_size), int(k)
        self.seed, self.stream, self.distribution = _check_seed(seed), int(stream), distribution
        self._full: Array | None = None

    @property
    def input_size(self) -> int:
        return self._p

    @property
    def output_size(self) -> int:
        return self._k

    def _itemsize(self) -> int:
        return _itemsize(self.dtype, xp=self.xp)

    def _chunks(self) -> list[tuple[int, int]]:
        """Column ranges ``[start, stop)`` of whole tiles; host float64 draw and the
        device copy of one chunk take at most a quarter of the budget."""
        per_column = self._k * (8 + self._itemsize())
        tiles = max(1, memory_budget() // (4 * per_column * TILE_COLUMNS))
        width = tiles * TILE_COLUMNS
        return [(s, min(s + width, self._p)) for s in range(0, self._p, width)]

    def _block(self, start: int, stop: int) -> Array:
        """Columns ``[start, stop)`` of ``R`` (tile-aligned start), ``(k, stop - start)``."""
        parts = []
        for tile_start in range(start, stop, TILE_COLUMNS):
            width = min(TILE_COLUMNS, self._p - tile_start)
            parts.append(
                _draw(
                    (self._k, width),
                    seed=self.seed,
                    tile=tile_start // TILE_COLUMNS,
                    stream=self.stream,
                    distribution=self.distribution,
                )
            )
        host = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        host *= 1.0 / math.sqrt(self._k)
        return _xp.from_numpy(host, dtype=self.dtype, device=self.device, xp=self.xp)

    def _pieces(self) -> Iterator[tuple[int, int, Array]]:
        """Column ranges of ``R`` with their blocks, drawn one at a time (lazily)."""
        if self._full is None and 2 * self._k * self._p * self._itemsize() <= memory_budget():
            self._full = self._block(0, self._p)
        if self._full is not None:
            yield 0, self._p, self._full
            return
        for a, b in self._chunks():
            yield a, b, self._block(a, b)

    def _project(self, v: Array) -> Array:
        xp = self.xp
        total = None
        for start, stop, r in self._pieces():
            part = v[:, start:stop] @ xp.matrix_transpose(r)
            total = part if total is None else total + part
        assert total is not None
        return total

    def _transpose(self, u: Array) -> Array:
        parts = [u @ r for _, _, r in self._pieces()]
        return parts[0] if len(parts) == 1 else self.xp.concat(parts, axis=1)

    def gram(self) -> Array:
        xp = self.xp
        total = None
        for _, _, r in self._pieces():
            total = _xp.add_scaled(total, r @ xp.matrix_transpose(r), scale=1.0, xp=xp)
        assert total is not None
        return _xp.symmetrize(total, xp=xp)


def _kronecker_dims(k: int | tuple[int, int], n_out: int, n_in: int) -> tuple[int, int]:
    """``(k_out, k_in)`` of one layer with ``n_out`` outputs and ``n_in`` (augmented)
    inputs: a pair is taken as given (capped by the layer's sizes); an int ``k``
    is split as evenly as the layer allows, ``k_out * k_in <= k``, the smaller
    side first (so ``k >= n_out * n_in`` keeps the full size)."""
    if isinstance(k, tuple):
        return min(int(k[0]), n_out), min(int(k[1]), n_in)
    root = math.isqrt(k)
    if n_out <= n_in:
        k_out = min(n_out, root)
        return k_out, min(n_in, k // k_out)
    k_in = min(n_in, root)
    return min(n_out, k // k_in), k_in


@final
class KroneckerProjection(GradientProjection):
    """LoGra's map: per dense layer ``R_s kron R_a`` on the layer's gradient.

    For a layer with weight ``W`` ``(O, I)`` (or a ``(I, O)`` kernel) and bias
    ``b``, the gradient is viewed as the ``(O, I + 1)`` matrix ``[dW, db]`` and
    mapped to ``R_s [dW, db] R_a^T`` ``(k_out, k_in)``; per sample that is
    ``outer(R_s s, R_a [a, 1])``. ``R_s`` and ``R_a`` are Gaussian or Rademacher,
    scaled by ``1/sqrt(k_out)`` and ``1/sqrt(k_in)``, drawn from
    ``Philox(key=seed, counter=(0, 0, 0, 2 l))`` and ``(0, 0, 0, 2 l + 1)`` for the
    ``l``-th layer of the provider's ``kfac_layers()`` (positions, not names, so
    that torch and jax versions of a model draw the same maps). The block's
    projection is the concatenation over its layers, in layer order.
    """

    #: the map this one was orthonormalized from (see :meth:`orthonormalized`)
    base: KroneckerProjection | None = None

    def __init__(
        self,
        provider: GradientProvider,
        layers: list[str],
        block_gp: GradientProvider,
        k: int | tuple[int, int],
        *,
        seed: int,
        distribution: str = "gaussian",
    ):
        super().__init__(xp=provider.xp, dtype=provider.dtype, device=provider.device)
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(
                f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}"
            )
        assert isinstance(provider, KroneckerFactorProvider)
        self._provider = provider
        seed = _check_seed(seed)
        kfac = provider.kfac_layers()
        layouts = provider.kfac_layouts() if hasattr(provider, "kfac_layouts") else {}
        shapes = block_gp.parameter_shapes
        slices = block_gp.parameter_slices
        self._p = block_gp.n_parameters
        self._names = list(block_gp.parameter_names)
        # layer -> (weight, bias, layout, O, I, k_out, k_in, R_s, R_a)
        self._layers: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        offset = 0
        for layer in layers:
            weight, bias = kfac[layer]
            layout = layouts.get(layer, "oi")
            wshape = shapes[weight]
            # a convolution's kernel ravels as (O, C*kh*kw) ("oi") or (kh*kw*C, O) ("io")
            n_out = wshape[0] if layout == "oi" else wshape[-1]
            n_in = math.prod(wshape) // n_out
            aug = n_in + (bias is not None)
            k_out, k_in = _kronecker_dims(k, n_out, aug)
            position = list(kfac).index(layer)
            r_s, r_a = (
                _xp.from_numpy(
                    _draw(
                        shape,
                        seed=seed,
                        tile=0,
                        stream=2 * position + role,
                        distribution=distribution,
                    )
                    / math.sqrt(shape[0]),
                    dtype=self.dtype,
                    device=self.device,
                    xp=self.xp,
                )
                for shape, role in (((k_out, n_out), 0), ((k_in, aug), 1))
            )
            self._layers[layer] = (
                slices[weight],
                None if bias is None else slices[bias],
                layout,
                n_out,
                n_in,
                k_out,
                k_in,
                r_s,
                r_a,
                slice(offset, offset + k_out * k_in),
            )
            offset += k_out * k_in
        self._k = offset
        owner = {}
        for layer, (ws, bs, *_rest) in self._layers.items():
            owner[ws.start] = (layer, "w")
            if bs is not None:
                owner[bs.start] = (layer, "b")
        self._order = [owner[slices[name].start] for name in self._names]

    @property
    def input_size(self) -> int:
        return self._p

    @property
    def output_size(self) -> int:
        return self._k

    @property
    def layer_dims(self) -> OrderedDict[str, tuple[int, int]]:
        """``(k_out, k_in)`` of each layer."""
        return OrderedDict((k, (v[5], v[6])) for k, v in self._layers.items())

    def _project(self, v: Array) -> Array:
        xp = self.xp
        m = v.shape[0]
        parts = []
        for ws, bs, layout, n_out, n_in, k_out, k_in, r_s, r_a, _ in self._layers.values():
            w = v[:, ws]
            if layout == "oi":
                mat = xp.reshape(w, (m, n_out, n_in))
            else:
                mat = xp.permute_dims(xp.reshape(w, (m, n_in, n_out)), (0, 2, 1))
            if bs is not None:
                mat = xp.concat([mat, v[:, bs][:, :, None]], axis=2)
            out = (r_s @ mat) @ xp.matrix_transpose(r_a)  # (m, k_out, k_in)
            parts.append(xp.reshape(out, (m, k_out * k_in)))
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def _transpose(self, u: Array) -> Array:
        xp = self.xp
        m = u.shape[0]
        pieces: dict[tuple[str, str], Array] = {}
        for layer, (
            _,
            bs,
            layout,
            n_out,
            n_in,
            k_out,
            k_in,
            r_s,
            r_a,
            cols,
        ) in self._layers.items():
            mat = xp.reshape(u[:, cols], (m, k_out, k_in))
            full = (xp.matrix_transpose(r_s) @ mat) @ r_a  # (m, O, I + bias)
            w = full[:, :, :n_in]
            if layout != "oi":
                w = xp.permute_dims(w, (0, 2, 1))
            pieces[(layer, "w")] = xp.reshape(w, (m, n_out * n_in))
            if bs is not None:
                pieces[(layer, "b")] = full[:, :, n_in]
        parts = [pieces[key] for key in self._order]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)

    def orthonormalized(self) -> KroneckerProjection:
        """``Q_s kron Q_a`` per layer with ``Q = L^-1 R`` for each factor: the gram
        ``R R^T`` is block diagonal with ``(R_s R_s^T) kron (R_a R_a^T)`` blocks, whose
        Cholesky factor is ``L_s kron L_a``; so orthonormalizing the small factors
        orthonormalizes the map, at no cost per sample. ``base`` is the original."""
        xp = self.xp
        out = copy.copy(self)
        out.base, out.orthonormal = self, True
        out._layers = OrderedDict()
        for layer, entry in self._layers.items():
            factors = []
            for r in entry[7:9]:
                chol = _xp.cholesky_or_none(r @ xp.matrix_transpose(r), xp=xp)
                if chol is None:
                    raise ValueError(
                        f"the Kronecker factors of layer {layer!r} have linearly dependent "
                        "rows: use regularization_space='projected'"
                    )
                factors.append(_xp.solve_triangular(chol, r, lower=True, xp=xp))
            out._layers[layer] = (*entry[:7], *factors, entry[9])
        return out

    def gram(self) -> Array:
        """Block diagonal over the layers, ``(R_s R_s^T) kron (R_a R_a^T)`` each."""
        xp, k = self.xp, self._k
        rows = []
        for _, _, _, _, _, k_out, k_in, r_s, r_a, cols in self._layers.values():
            gs, ga = r_s @ xp.matrix_transpose(r_s), r_a @ xp.matrix_transpose(r_a)
            kron = xp.reshape(gs[:, None, :, None] * ga[None, :, None, :], (k_out * k_in,) * 2)
            zeros = [
                xp.zeros((k_out * k_in, width), dtype=self.dtype, device=self.device)
                for width in (cols.start, k - cols.stop)
            ]
            rows.append(xp.concat([zeros[0], kron, zeros[1]], axis=1))
        return rows[0] if len(rows) == 1 else xp.concat(rows, axis=0)

    def project_grads(self, gp: GradientProvider, batch: Batch) -> Array:
        """``outer(R_s s_n, R_a [a_n, 1])`` per layer, from ``kfac_factors``: ``(N, k)``;
        for a convolution the sum of these over the output positions."""
        xp = self.xp
        factors = self._provider.kfac_factors(batch)
        parts = []
        for layer, (_, bs, _, _, _, k_out, k_in, r_s, r_a, _) in self._layers.items():
            a, s = factors[layer]  # (N, I), (N, O); convolutions (N, T, I), (N, T, O)
            n = a.shape[0]
            if bs is not None:
                ones = xp.ones((*a.shape[:-1], 1), dtype=a.dtype, device=_xp.device_of(a))
                a = xp.concat([a, ones], axis=-1)
            ps, pa = s @ xp.matrix_transpose(r_s), a @ xp.matrix_transpose(r_a)
            if a.ndim == 2:
                mat = ps[:, :, None] * pa[:, None, :]
            else:
                mat = xp.matrix_transpose(ps) @ pa  # sum over positions
            parts.append(xp.reshape(mat, (n, k_out * k_in)))
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)


@final
class OrthonormalizedProjection(GradientProjection):
    """``Q = L^-1 R`` for ``R R^T = L L^T`` (Cholesky): the rows of ``R``
    orthonormalized, ``Q Q^T = I_k``, spanning the same subspace.

    ``Q^T (Q C Q^T + lambda I_k)^-1 Q = R^T (R C R^T + lambda R R^T)^-1 R``: damping
    ``lambda I_k`` after ``Q`` is damping ``lambda R R^T``, the image of
    ``lambda I`` in parameter space, after ``R``.
    """

    orthonormal = True

    def __init__(self, base: GradientProjection):
        super().__init__(xp=base.xp, dtype=base.dtype, device=base.device)
        self.base = base
        factor = _xp.cholesky_or_none(base.gram(), xp=base.xp)
        if factor is None:
            raise ValueError(
                "the projection's rows are linearly dependent (R R^T is singular): lower k "
                "or use regularization_space='projected'"
            )
        self.factor = factor

    @property
    def input_size(self) -> int:
        return self.base.input_size

    @property
    def output_size(self) -> int:
        return self.base.output_size

    def _whiten(self, u: Array) -> Array:
        """``u @ L^-T`` for rows ``u`` ``(M, k)``."""
        xp = self.xp
        return xp.matrix_transpose(
            _xp.solve_triangular(self.factor, xp.matrix_transpose(u), lower=True, xp=xp)
        )

    def _project(self, v: Array) -> Array:
        return self._whiten(self.base._project(v))

    def _transpose(self, u: Array) -> Array:
        xp = self.xp
        lu = xp.matrix_transpose(
            _xp.solve_triangular(
                xp.matrix_transpose(self.factor), xp.matrix_transpose(u), lower=False, xp=xp
            )
        )  # u @ L^-1
        return self.base._transpose(lu)

    def project_grads(self, gp: GradientProvider, batch: Batch) -> Array:
        return self._whiten(self.base.project_grads(gp, batch))

    def gram(self) -> Array:
        return _xp.eye(self.output_size, dtype=self.dtype, device=self.device, xp=self.xp)


@final
class ProjectedOperator(Operator):
    """``B = R^T (C_R + lambda I_k)^-1 R`` for a projection ``R`` and a ``(k, k)``
    projected curvature ``C_R`` (Cholesky-factorised once)."""

    def __init__(
        self,
        projection: GradientProjection,
        curvature: Array,
        regularization: float,
        *,
        block: str = "",
    ):
        self.projection = projection
        self.inner = DirectOperator(curvature, regularization, block=block)
        self.block = block

    @property
    def input_size(self) -> int:
        return self.projection.input_size

    def _apply(self, t: Array) -> Array:
        return self.projection.transpose(self.inner.apply(self.projection.project(t)))

    def as_bilinear_form(self) -> BilinearForm:
        return _ProjectedBilinearForm(self)

    def with_regularization(self, regularization: float) -> ProjectedOperator:
        return ProjectedOperator(
            self.projection, self.inner.curvature, regularization, block=self.block
        )


@final
class _ProjectedBilinearForm(BilinearForm):
    """``<u, v> = (R u)^T (C_R + lambda I)^-1 (R v)``: both sides are projected first
    (``O(k)`` per pair); gradients go through the projection's ``project_grads``."""

    def __init__(self, op: ProjectedOperator):
        self.op = op

    def inner_prod(self, left: Array, right: Array | None) -> Array:
        proj = self.op.projection
        pl = proj.project(left)
        pr = pl if right is None else proj.project(right)
        return contract(self.op.inner.apply(pl), pr, xp=proj.xp)

    def grads_inner_prod(
        self, left: Batch, right: Batch | None, gradient_provider: GradientProvider
    ) -> Array:
        proj = self.op.projection
        pl = proj.project_grads(gradient_provider, left)
        pr = pl if right is None else proj.project_grads(gradient_provider, right)
        return contract(self.op.inner.apply(pl), pr, xp=proj.xp)

    def mixed_grads_inner_prod(
        self, left: Batch, right: Batch | None, gradient_provider: GradientProvider
    ) -> Array:
        proj = self.op.projection
        pl = proj.project_grads(gradient_provider, left)
        mixed = gradient_provider.flat_mixed_grads(left if right is None else right)
        return contract(self.op.inner.apply(pl), proj.project(mixed), xp=proj.xp)


class _ProjectedComposition(OperatorGradientComposition):
    """Factors ``R^T (C_R + lambda I)^-1 R g`` from projected gradients (the
    Kronecker map never forms per-sample gradients)."""

    op: ProjectedOperator
    _gram_factor: Array | None = None
    _last_coordinates: tuple[weakref.ref[Any], Array | None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_last_coordinates", None)  # a weak reference does not pickle
        return state

    def transformed_grads(self, batch: Batch) -> Array:
        proj = self.op.projection
        return proj.transpose(self.op.inner.apply(proj.project_grads(self.gp, batch)))

    def _coordinates(self, factors: Array) -> Array | None:
        """``u`` with ``R^T u = factors`` (rows ``(N, P)`` -> ``(N, k)``), or None where
        a row is not in the span of ``R``'s rows (factors that this model did not make)."""
        proj, xp = self.op.projection, self.gp.xp
        u = proj.project(factors)  # R f = R R^T u
        if not proj.orthonormal:
            if self._gram_factor is None:
                self._gram_factor = _xp.cholesky_or_none(proj.gram(), xp=xp)
            if self._gram_factor is None:
                return None
            u = xp.matrix_transpose(_xp.cho_solve(self._gram_factor, xp.matrix_transpose(u), xp=xp))
        residual = xp.linalg.vector_norm(proj.transpose(u) - factors, axis=-1)
        scale = xp.linalg.vector_norm(factors, axis=-1)
        tol = math.sqrt(_xp.finfo_eps(factors.dtype, xp=xp))
        if bool(xp.any(residual > tol * scale)):
            return None
        return u

    def interactions_from_transformed_grads(
        self, left_factors: Array, right_batch: Batch, mode: InfluenceMode | str
    ) -> Array:
        """Up: ``u^T (R g_j)`` with ``R^T u`` the factors, from the projected training
        gradients (the Kronecker map never forms per-sample gradients): ``O(k)`` per
        pair instead of ``O(P)``. Factors outside the span of ``R^T`` (not made by this
        model) and perturbation take the generic path."""
        if InfluenceMode.parse(mode) is InfluenceMode.Up:
            # the calculators pass the same factors for every training chunk; a weak
            # reference keeps no large array alive and cannot match a new one
            cached = self._last_coordinates
            if cached is not None and cached[0]() is left_factors:
                u = cached[1]
            else:
                u = self._coordinates(left_factors)
                try:
                    self._last_coordinates = (weakref.ref(left_factors), u)
                except TypeError:  # arrays without weak references: no reuse
                    self._last_coordinates = None
            if u is not None:
                pg = self.op.projection.project_grads(self.gp, right_batch)
                return contract(u, pg, xp=self.gp.xp)
        return super().interactions_from_transformed_grads(left_factors, right_batch, mode)


@final
class ProjectedInfluence(ComposableInfluence):
    """Influence in a random ``k``-dimensional projection of the gradients (TRAK,
    Park et al. 2023; LoGra, Choe et al. 2024), solved exactly there.

    Per block, ``I[t, j] = (R g_t)^T (C_R + lambda D)^-1 (R g_j)`` with ``R`` a
    seeded ``(k, P_b)`` map and ``C_R`` the curvature in the projected space:
    by default (``second_order="empirical_fisher"``) the empirical Fisher of
    the projected gradients ``mean_i (R g_i)(R g_i)^T``, built in one pass over
    the data with ``O(k^2)`` memory; with ``"hessian"`` (or ``"gauss_newton"``
    where the provider offers it) ``R C R^T`` from ``k`` curvature products.

    The damping ``D`` (``regularization_space``):

    * ``"parameter"``: ``D = R R^T``, the image of ``lambda I`` in
      parameter space, so ``C_R + lambda D = R (C + lambda I) R^T`` and the
      operator ``R^T (R (C + lambda I) R^T)^-1 R`` is the restriction of ``(C +
      lambda I)^-1`` to the rows of ``R`` (Galerkin). ``lambda`` means what it
      means for every other model; at ``k = P_b`` (an invertible ``R``) the
      scores equal :class:`~xinfluence.DirectInfluence` with the same curvature
      for every ``lambda``. Computed as ``lambda I_k`` after orthonormalizing the
      rows of ``R`` (dense: :class:`OrthonormalizedProjection`, a ``(k, k)``
      Cholesky factor of ``R R^T`` and one triangular solve per projected batch,
      ``k / P_b`` of the projection's cost; Kronecker: the small factors ``R_s``
      and ``R_a`` orthonormalized, at no cost per sample).
    * ``"projected"`` (default): ``D = I_k``, as TRAK and LoGra damp. Since ``E[R R^T] =
      (P_b / k) I_k``, this is about ``lambda k / P_b`` in parameter space: at
      ``k = P_b`` it differs from Direct unless ``lambda = 0`` (measured on a
      2-layer MLP at ``k = P``: 0.195 relative with the empirical Fisher, 0.40
      with the Hessian); for ``k < P_b`` it damps ``P_b / k`` times less than
      ``"parameter"``. It stays the default: it is what TRAK and LoGra users
      expect, and at the same ``lambda`` it gave the higher LDS on the digits
      MLP at ``k = 64`` (0.371 against 0.257, empirical Fisher; docs/methods.md).

    Args:
        k: projected dimension of each block (``"dense"``; capped at the block's
            size ``P_b``, beyond which ``C_R`` could only lose rank), or per dense layer
            (``"kronecker"``: an int ``k`` is split into ``k_out * k_in <= k``
            as evenly as the layer allows, a pair ``(k_out, k_in)`` is used as
            given, both capped at the layer's sizes).
        projection: ``"dense"`` (any provider; per-sample gradients projected
            tile by tile) or ``"kronecker"`` (LoGra; needs a provider with
            ``kfac_layers`` and ``kfac_factors`` whose dense layers cover every
            parameter; per-sample gradients are never formed).
        distribution: ``"gaussian"`` or ``"rademacher"`` entries.
        seed: the map depends on ``seed`` and the positions of the blocks (dense)
            or dense layers (kronecker) only: the same numbers on every backend,
            device, dtype and memory budget, for the same flat parameter order.
        regularization_space: ``"parameter"`` (``lambda R R^T``) or
            ``"projected"`` (``lambda I_k``), above. With ``"parameter"``,
            :meth:`projections` and :meth:`projected_curvatures` return the
            orthonormalized map ``Q`` and ``Q C Q^T``.

    Memory: ``O(k^2)`` for the curvature; the dense map is applied in chunks of
    ``O(k x chunk)`` sized from :func:`xinfluence.memory_budget`.
    ``influence_factors`` returns parameter-space factors ``R^T (C_R + lambda
    D)^-1 R g`` ``(N, P)``; ``influences`` never leaves the projected space, and
    ``influences_from_factors`` (the calculators' path) maps such factors back to
    their ``k`` coordinates and scores them against ``R g_j`` (``O(k)`` per pair,
    the Kronecker map without per-sample gradients).
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        k: int | tuple[int, int],
        projection: str = "dense",
        distribution: str = "gaussian",
        seed: int = 0,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "empirical_fisher",
        regularization_space: str = "projected",
    ):
        if regularization_space not in ("parameter", "projected"):
            raise ValueError(
                "regularization_space must be 'parameter' or 'projected', got "
                f"{regularization_space!r}"
            )
        if projection not in ("dense", "kronecker"):
            raise ValueError(f"projection must be 'dense' or 'kronecker', got {projection!r}")
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(
                f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}"
            )
        if isinstance(k, tuple):
            if projection != "kronecker" or len(k) != 2:
                raise ValueError(
                    "k may be a pair (k_out, k_in) only with projection='kronecker'; got "
                    f"k={k!r} with projection={projection!r}"
                )
            if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in k):
                raise ValueError(f"k must hold positive integers, got {k!r}")
        elif isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        gp = gradient_provider
        if projection == "kronecker":
            if not isinstance(gp, KroneckerFactorProvider):
                raise TypeError(
                    f"projection='kronecker' needs a provider with kfac_layers() and "
                    f"kfac_factors(); {type(gp).__name__} has none"
                )
            layers = gp.kfac_layers()
            covered = {n for w, b in layers.values() for n in (w, b) if n is not None}
            uncovered = [n for n in gp.parameter_names if n not in covered]
            if not layers or uncovered:
                raise ValueError(
                    f"projection='kronecker' needs every parameter in a dense layer; not "
                    f"covered: {uncovered}. Freeze them, restrict the provider to the dense "
                    f"layers, or use projection='dense'"
                )
        super().__init__(
            gp,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        self.k = k if isinstance(k, tuple) else int(k)
        self.projection = projection
        self.distribution = distribution
        self.seed = _check_seed(seed)
        self.regularization_space = regularization_space
        if projection == "kronecker":
            self._block_layers = self._layers_of_blocks()

    def _layers_of_blocks(self) -> dict[str, list[str]]:
        gp = self.gradient_provider
        assert isinstance(gp, KroneckerFactorProvider)
        out: dict[str, list[str]] = {}
        for block, names in self.blocks.items():
            members = set(names)
            out[block] = []
            for layer, (w, b) in gp.kfac_layers().items():
                inside = [n in members for n in (w, b) if n is not None]
                if any(inside) and not all(inside):
                    raise ValueError(
                        f"projection='kronecker': block {block!r} holds only part of the "
                        f"dense layer {layer!r} (weight {w!r}, bias {b!r}); put a layer's "
                        "weight and bias in the same block"
                    )
                if all(inside):
                    out[block].append(layer)
        return out

    def make_projection(self, block: str, gp: GradientProvider) -> GradientProjection:
        """The projection of ``block`` (``gp``: the block's provider)."""
        if self.projection == "kronecker":
            return KroneckerProjection(
                self.gradient_provider,
                self._block_layers[block],
                gp,
                self.k,
                seed=self.seed,
                distribution=self.distribution,
            )
        assert isinstance(self.k, int)
        return DenseProjection(
            gp.n_parameters,
            min(self.k, gp.n_parameters),
            seed=self.seed,
            stream=list(self.blocks).index(block),
            distribution=self.distribution,
            xp=gp.xp,
            dtype=gp.dtype,
            device=gp.device,
        )

    def _projected_curvature(
        self, projection: GradientProjection, gp: GradientProvider, data: Dataset
    ) -> Array:
        xp = gp.xp
        if self.second_order == "empirical_fisher":
            total, n = None, 0
            for batch in data:
                pg = projection.project_grads(gp, batch)  # (N_b, k)
                total = _xp.add_scaled(total, xp.matrix_transpose(pg) @ pg, scale=1.0, xp=xp)
                n += len(batch)
            if total is None or n == 0:
                raise ValueError("cannot fit on an empty dataset")
            return _xp.symmetrize(total / n, xp=xp)
        # R C R^T from curvature products with the rows of R, a few rows at a time
        curvature = make_curvature(self.second_order, gp, data)
        curvature.prepare_products()
        k, p = projection.output_size, projection.input_size
        itemsize = _itemsize(gp.dtype, xp=xp)
        rows = max(1, min(k, memory_budget() // max(1, 4 * p * itemsize)))
        eye = _xp.eye(k, dtype=gp.dtype, device=gp.device, xp=xp)
        parts = []
        for start in range(0, k, rows):
            r_rows = projection.transpose(eye[start : start + rows, :])  # (rows, P)
            parts.append(projection.project(curvature.matmat(r_rows)))  # (rows, k)
        return _xp.symmetrize(xp.concat(parts, axis=0), xp=xp)

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        projection = self.make_projection(block, gp)
        if self.regularization_space == "parameter":
            projection = projection.orthonormalized()
        curvature = _xp.check_finite(
            self._projected_curvature(projection, gp, data),
            xp=gp.xp,
            what=f"the projected curvature of block {block!r}",
        )
        return ProjectedOperator(projection, curvature, regularization, block=block)

    def fit(self, data: Any) -> ProjectedInfluence:
        super().fit(data)
        mapper = self._fitted_mapper()
        for block, comp in mapper.composable_block_dict.items():
            mapper.composable_block_dict[block] = _ProjectedComposition(comp.op, comp.gp)
        return self

    def projections(self) -> Mapping[str, GradientProjection]:
        """The fitted projection of every block."""
        mapper = self._fitted_mapper()
        out: OrderedDict[str, GradientProjection] = OrderedDict()
        for block, comp in mapper.composable_block_dict.items():
            assert isinstance(comp.op, ProjectedOperator)
            out[block] = comp.op.projection
        return out

    def projected_curvatures(self) -> Mapping[str, Array]:
        """The ``(k, k)`` projected curvature ``C_R`` of every block (without damping)."""
        mapper = self._fitted_mapper()
        out: OrderedDict[str, Array] = OrderedDict()
        for block, comp in mapper.composable_block_dict.items():
            assert isinstance(comp.op, ProjectedOperator)
            out[block] = comp.op.inner.curvature
        return out
