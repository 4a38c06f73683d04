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

import math
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, final

import numpy as np

from . import _io, _xp
from ._config import memory_budget
from ._projection_maps import (  # noqa: F401  (re-exported: public import paths unchanged)
    TILE_COLUMNS,
    DenseProjection,
    GradientProjection,
    KroneckerProjection,
    OrthonormalizedProjection,
    _check_seed,
    _draw,
    _itemsize,
    _kronecker_dims,
)
from ._xp import Array, Namespace
from .curvature import Dataset, make_curvature
from .influence import BlockStructure, ComposableInfluence, Regularization
from .influence._shared import SharedFactorMapper, SharedFactors, shared_query_sizes
from .operators import DirectOperator
from .types import (
    Batch,
    BilinearForm,
    BlockMapper,
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

    def __init__(
        self, op: ProjectedOperator, gp: GradientProvider, shared: SharedFactors | None = None
    ):
        super().__init__(op, gp)
        #: the layer factors shared by the blocks of the model (Kronecker maps)
        self.shared = shared

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_last_coordinates", None)  # a weak reference does not pickle
        return state

    def _project_grads(self, batch: Batch) -> Array:
        """``R g_i`` ``(N, k)``; a Kronecker map takes the batch's layer factors from
        the pass that the model's blocks share."""
        proj = self.op.projection
        shared = self.__dict__.get("shared")
        if shared is not None and isinstance(proj, KroneckerProjection):
            return proj.project_grads(self.gp, batch, factors=shared.kfac_factors(batch))
        return proj.project_grads(self.gp, batch)

    def transformed_grads(self, batch: Batch) -> Array:
        proj = self.op.projection
        u = self.op.inner.apply(self._project_grads(batch))
        factors = proj.transpose(u)
        # their coordinates are u: a query that scores these factors against
        # training chunks next need not recover them (a (k, k) solve with R R^T)
        try:
            self._last_coordinates = (weakref.ref(factors), u)
        except TypeError:  # arrays without weak references: no reuse
            self._last_coordinates = None
        return factors

    def interactions(
        self, left_batch: Batch, right_batch: Batch | None, mode: InfluenceMode | str
    ) -> Array:
        if InfluenceMode.parse(mode) is not InfluenceMode.Up:
            return super().interactions(left_batch, right_batch, mode)
        pl = self._project_grads(left_batch)
        pr = pl if right_batch is None else self._project_grads(right_batch)
        return contract(self.op.inner.apply(pl), pr, xp=self.gp.xp)

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
                return contract(u, self._project_grads(right_batch), xp=self.gp.xp)
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
        if isinstance(k, list) and len(k) == 2:
            k = (k[0], k[1])  # a pair read back from JSON (saved files, stores)
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
                    f"covered: {uncovered}. Track the dense layers (TorchGradientProvider(model, "
                    "loss, layers=[...])), restrict the provider to them, "
                    "or use projection='dense'"
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
                gram = _xp.maybe_jit(_gram, xp=xp)(pg, xp=xp)
                total = _xp.add_scaled(total, gram, scale=1.0, xp=xp)
                n += len(batch)
            if total is None or n == 0:
                raise ValueError("cannot fit on an empty dataset")
            return _xp.symmetrize(total, xp=xp, scale=1 / n)
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
        return self

    def _restore_block(
        self, block: str, gp: GradientProvider, inner: DirectOperator
    ) -> _ProjectedComposition:
        """A block of a saved model (:mod:`xinfluence._io`): the map drawn again from the
        options (it depends on them only), the projected curvature's operator read."""
        projection = self.make_projection(block, gp)
        if self.regularization_space == "parameter":
            projection = projection.orthonormalized()
        op = ProjectedOperator.__new__(ProjectedOperator)
        op.projection, op.inner, op.block = projection, inner, block
        return _ProjectedComposition(op, gp)

    def _create_operators(self, dataset: Dataset) -> OrderedDict[str, OperatorGradientComposition]:
        """Kronecker maps with the empirical Fisher: every block's projected curvature
        from one pass over the data, each batch's layer factors computed once for
        all the layer blocks (the generic path runs the model once per block)."""
        if self.projection != "kronecker" or self.second_order != "empirical_fisher":
            return super()._create_operators(dataset)
        gp = self.gradient_provider
        assert isinstance(gp, KroneckerFactorProvider)
        xp = gp.xp
        gps, projections = {}, {}
        for block, names in self.blocks.items():
            gps[block] = self._block_provider(names)
            projection = self.make_projection(block, gps[block])
            if self.regularization_space == "parameter":
                projection = projection.orthonormalized()
            projections[block] = projection
        # projected gradients are kept until about k rows per block (within a quarter
        # of the memory budget) before they update the (k, k) sums: one product
        # with many rows instead of a pass over the (k, k) sum per batch
        widths = {block: p.output_size for block, p in projections.items()}
        itemsize = _itemsize(gp.dtype, xp=xp)
        rows = max(
            1, min(max(widths.values()), memory_budget() // (4 * itemsize * sum(widths.values())))
        )
        totals: dict[str, Array] = {}
        held: dict[str, list[Array]] = {block: [] for block in projections}
        n = n_held = 0

        def flush() -> None:
            for block, parts in held.items():
                if parts:
                    pg = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
                    totals[block] = _xp.add_scaled(
                        totals.get(block), xp.matrix_transpose(pg) @ pg, scale=1.0, xp=xp
                    )
                    parts.clear()

        for batch in dataset:
            try:
                factors = gp.kfac_factors(batch)
            except (IndexError, RuntimeError):  # name the samples whose loss fails
                self._check_losses(batch, "the training data passed to fit", offset=n)
                raise
            # NaN losses would give finite but meaningless curvatures (the losses
            # of this batch come from the pass just made, where the provider keeps them)
            self._check_losses(batch, "the training data passed to fit", offset=n)
            for block, projection in projections.items():
                held[block].append(projection.project_grads(gps[block], batch, factors=factors))
            del factors
            n += len(batch)
            n_held += len(batch)
            if n_held >= rows:
                flush()
                n_held = 0
        flush()
        if n == 0:
            raise ValueError("cannot fit on an empty dataset")
        comps: OrderedDict[str, OperatorGradientComposition] = OrderedDict()
        for block, projection in projections.items():
            curvature = _xp.check_finite(
                _xp.symmetrize(totals[block] / n, xp=xp),
                xp=xp,
                what=f"the projected curvature of block {block!r}",
            )
            op = ProjectedOperator(projection, curvature, self.regularization[block], block=block)
            comps[block] = OperatorGradientComposition(op, gps[block])
        return comps

    def _query_sizes(self, sample: Batch) -> dict[str, int]:
        if self.projection != "kronecker":
            return {}
        mapper = self._mapper
        blocks = {} if mapper is None else mapper.composable_block_dict
        return shared_query_sizes(self.gradient_provider, blocks, sample)

    def _compose(self, comps: OrderedDict[str, OperatorGradientComposition]) -> BlockMapper:
        """Projected compositions; Kronecker maps share each batch's layer factors
        among the blocks (one pass of the model per batch)."""
        shared = SharedFactors(self.gradient_provider) if self.projection == "kronecker" else None
        out: OrderedDict[str, OperatorGradientComposition] = OrderedDict(
            (block, _ProjectedComposition(comp.op, comp.gp, shared))  # type: ignore[arg-type]
            for block, comp in comps.items()
        )
        return BlockMapper(out) if shared is None else SharedFactorMapper(out, shared)

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


# save / load: the projected curvature is saved, the seeded map drawn again on load
_io.WRAPPED_OPERATORS["projected"] = ProjectedOperator


def _gram(pg: Array, /, *, xp: Namespace) -> Array:
    """``pg^T pg``: (N, k) -> (k, k)."""
    return xp.matrix_transpose(pg) @ pg
