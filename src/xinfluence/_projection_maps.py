"""The seeded random maps of :mod:`xinfluence.projection`: dense (tiled, counter-based
draws), Kronecker (LoGra, per dense layer) and orthonormalized wrappers.

Imported and re-exported by :mod:`xinfluence.projection`; see its docstring for
the formulas.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, final

import numpy as np

from . import _xp
from ._config import memory_budget
from ._state import PicklableState
from ._xp import Array, Namespace
from .types import (
    Batch,
    GradientProvider,
    KroneckerFactorProvider,
)

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


class GradientProjection(PicklableState, ABC):
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

    def project_grads(
        self, gp: GradientProvider, batch: Batch, *, factors: Mapping[str, Any] | None = None
    ) -> Array:
        """Projected per-sample gradients ``R g_i`` of one prepared batch: ``(N, k)``.
        ``factors``: the batch's ``kfac_factors`` where the caller has them (used by
        the Kronecker map, ignored by the others)."""
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
        times = _xp.maybe_jit(_times_transposed, xp=xp)  # jax: one program, not two
        for start, stop, r in self._pieces():
            part = times(v[:, start:stop], r, xp=xp)
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

    def project_grads(
        self, gp: GradientProvider, batch: Batch, *, factors: Mapping[str, Any] | None = None
    ) -> Array:
        """``outer(R_s s_n, R_a [a_n, 1])`` per layer, from ``kfac_factors`` (``factors``
        where the caller has them, else a pass of the model): ``(N, k)``; for a dense
        layer on a token axis or a convolution, the sum of these over the positions
        (each position's factors projected before the sum)."""
        xp = self.xp
        if factors is None:
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

    def project_grads(
        self, gp: GradientProvider, batch: Batch, *, factors: Mapping[str, Any] | None = None
    ) -> Array:
        return self._whiten(self.base.project_grads(gp, batch, factors=factors))

    def gram(self) -> Array:
        return _xp.eye(self.output_size, dtype=self.dtype, device=self.device, xp=self.xp)


def _times_transposed(v: Array, r: Array, /, *, xp: Namespace) -> Array:
    """``v r^T``: (N, p), (k, p) -> (N, k)."""
    return v @ xp.matrix_transpose(r)
