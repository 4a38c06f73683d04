"""One forward and backward pass per batch for all the layer blocks of a model.

The Kronecker-factored models (EK-FAC, LoGra's Kronecker projection) have one
block per dense layer. Each block needs the batch's layer factors (inputs ``a``
and output gradients ``s``, :meth:`KroneckerFactorProvider.kfac_factors`), and
the provider computes those of every layer in one pass of the whole model; a
block asking for them on its own would run the whole model once per layer.

* :class:`SharedFactors` remembers the factors of the last two batches (by the
  identity of ``x`` and ``y``, and the provider's parameter version), so that
  the blocks of one query share one pass per batch (two: a query against other
  data alternates between the test and the training batch);
* :class:`SharedFactorMapper` is the :class:`~xinfluence.types.BlockMapper` of
  such a model; it forgets the factors at the end of each of its calls;
* :class:`LayerGradients` is a layer block's gradient provider whose per-sample
  gradients come from the shared factors, ``G_n = sum_t s_nt a_nt^T`` (``s_n
  a_n^T`` on 2-D inputs), instead of a vectorised backward pass through the
  whole model per block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Generator, Mapping
from typing import Any

from .. import _xp
from .._xp import Array
from ..types import Batch, BlockMapper, InfluenceMode, OperatorGradientComposition

__all__ = ["SharedFactors", "SharedFactorMapper", "LayerGradients"]


class SharedFactors:
    """``provider.kfac_factors(batch)``, remembered for the last two batches."""

    def __init__(self, provider: Any):
        self.provider = provider
        self._memo: list[tuple[Any, Any, Any, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"provider": self.provider, "_memo": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _version(self) -> Any:
        version = getattr(self.provider, "parameter_version", None)
        return version() if callable(version) else None

    def kfac_factors(self, batch: Batch) -> OrderedDict[str, tuple[Array, Array]]:
        version = self._version()
        for x, y, v, out in self._memo:
            if x is batch.x and y is batch.y and v == version:
                return out
        out = self.provider.kfac_factors(batch)
        # strong references to x and y: their ids cannot be reused while remembered
        self._memo = [(batch.x, batch.y, version, out), *self._memo[:1]]
        return out

    def clear(self) -> None:
        self._memo = []


class SharedFactorMapper(BlockMapper):
    """A :class:`~xinfluence.types.BlockMapper` whose blocks share ``shared``: each
    call computes a batch's layer factors once, and forgets them when it ends."""

    def __init__(
        self,
        composable_block_dict: Mapping[str, OperatorGradientComposition],
        shared: SharedFactors,
    ):
        super().__init__(composable_block_dict)
        self.shared = shared

    def generate_transformed_grads(self, batch: Batch) -> Generator[Array, None, None]:
        try:
            yield from super().generate_transformed_grads(batch)
        finally:
            self.shared.clear()

    def generate_interactions(
        self, left_batch: Batch, right_batch: Batch | None, mode: InfluenceMode | str
    ) -> Generator[Array, None, None]:
        try:
            yield from super().generate_interactions(left_batch, right_batch, mode)
        finally:
            self.shared.clear()

    def generate_interactions_from_transformed_grads(
        self,
        left_factors: Array | Mapping[str, Array],
        right_batch: Batch,
        mode: InfluenceMode | str,
    ) -> Generator[Array, None, None]:
        try:
            yield from super().generate_interactions_from_transformed_grads(
                left_factors, right_batch, mode
            )
        finally:
            self.shared.clear()


class LayerGradients:
    """The gradient provider of one layer block, with per-sample gradients from the
    shared layer factors (one pass of the model per batch for all blocks).

    ``flat_grads`` and ``jacobian_prod`` are computed from ``shared``'s factors of
    ``layer``: the weight gradient ``sum_t s_nt a_nt^T`` stored as the layer stores
    its weight (``layout`` ``"oi"``: ``(O, I)``; ``"io"``: ``(I, O)``, Hugging Face
    ``Conv1D`` and flax kernels), the bias gradient ``sum_t s_nt``, at
    ``weight_slice`` and ``bias_slice`` of the block's flat vector. Everything else
    (``flat_mixed_grads``, ``n_parameters``, ``xp``, ...) is the block provider's.
    """

    def __init__(
        self,
        gp: Any,
        shared: SharedFactors,
        layer: str,
        *,
        weight_slice: slice,
        bias_slice: slice | None,
        layout: str,
    ):
        self.gp = gp
        self.shared = shared
        self.layer = layer
        self.weight_slice = weight_slice
        self.bias_slice = bias_slice
        self.layout = layout

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "gp" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["gp"], name)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _factors(self, batch: Batch) -> tuple[Array, Array]:
        return self.shared.kfac_factors(batch)[self.layer]

    def _options(self) -> dict[str, Any]:
        bias = self.bias_slice
        return {
            "layout": self.layout,
            "bias": None if bias is None else (bias.start, bias.stop),
            "weight": (self.weight_slice.start, self.weight_slice.stop),
            "xp": self.gp.xp,
        }

    def flat_grads(self, batch: Batch) -> Array:
        """``(N, P_b)``: the block's per-sample gradients from the layer factors."""
        a, s = self._factors(batch)
        xp = self.gp.xp
        return _xp.maybe_jit(_flat_grads, xp=xp, static_argnames=_STATIC)(a, s, **self._options())

    def jacobian_prod(self, batch: Batch, g: Array) -> Array:
        """``(N, K)``: the per-sample gradients times the rows of ``g`` ``(K, P_b)``
        (weight and bias parts apart: the gradients are not copied into one row)."""
        a, s = self._factors(batch)
        xp = self.gp.xp
        return _xp.maybe_jit(_jacobian_prod, xp=xp, static_argnames=_STATIC)(
            a, s, g, **self._options()
        )

    def grads_then(
        self,
        fn: Any,
        left: Batch,
        right: Batch | None,
        *args: Any,
        static: tuple[tuple[str, Any], ...] = (),
    ) -> Array:
        """``fn(G_left, G_right, *args, xp=xp, **dict(static))`` with the block's
        per-sample gradients of ``left`` and ``right`` (``G_right = G_left`` where
        ``right`` is None) from the layer factors: on jax one compiled program per
        layer shape for the gradients and what ``fn`` does with them (a bilinear
        form's operator and contraction), not one each. ``fn`` is a module-level
        function of arrays; ``static`` its hashable options."""
        a, s = self._factors(left)
        a_r, s_r = (None, None) if right is None else self._factors(right)
        xp = self.gp.xp
        program = _xp.maybe_jit(_grads_then, xp=xp, static_argnames=(*_STATIC, "fn", "static"))
        return program(a, s, a_r, s_r, *args, fn=fn, static=static, **self._options())


# one compiled program per layer shape on jax (not one per eager operation)
_STATIC = ("layout", "bias", "weight", "xp")


def _grads_then(
    a: Array,
    s: Array,
    a_r: Array | None,
    s_r: Array | None,
    /,
    *args: Any,
    fn: Any,
    static: tuple[tuple[str, Any], ...],
    layout: str,
    bias: Any,
    weight: Any,
    xp: Any,
) -> Array:
    options = {"layout": layout, "bias": bias, "weight": weight, "xp": xp}
    left = _flat_grads(a, s, **options)
    right = left if a_r is None or s_r is None else _flat_grads(a_r, s_r, **options)
    return fn(left, right, *args, xp=xp, **dict(static))


def _parts(a: Array, s: Array, /, *, layout: str, bias: Any, xp: Any) -> tuple[Array, Array | None]:
    """The weight gradients ``(N, O I)`` in the weight's layout and the bias
    gradients ``(N, O)`` (None without a bias) from ``a`` ``(N, [T,] I)`` and ``s``
    ``(N, [T,] O)``."""
    n = int(a.shape[0])
    n_out, n_in = int(s.shape[-1]), int(a.shape[-1])
    # the weight gradient in the weight's own layout, without a transposed copy
    if a.ndim == 2 and layout == "oi":
        w = s[:, :, None] * a[:, None, :]
    elif a.ndim == 2:
        w = a[:, :, None] * s[:, None, :]
    elif layout == "oi":
        w = xp.matrix_transpose(s) @ a
    else:
        w = xp.matrix_transpose(a) @ s
    w = xp.reshape(w, (n, n_out * n_in))
    if bias is None:
        return w, None
    return w, (s if s.ndim == 2 else xp.sum(s, axis=1))


def _flat_grads(a: Array, s: Array, /, *, layout: str, bias: Any, weight: Any, xp: Any) -> Array:
    w, b = _parts(a, s, layout=layout, bias=bias, xp=xp)
    if b is None:
        return w
    return xp.concat([w, b] if weight[0] < bias[0] else [b, w], axis=1)


def _jacobian_prod(
    a: Array, s: Array, g: Array, /, *, layout: str, bias: Any, weight: Any, xp: Any
) -> Array:
    w, b = _parts(a, s, layout=layout, bias=bias, xp=xp)
    out = w @ xp.matrix_transpose(g[:, weight[0] : weight[1]])
    if b is not None:
        out = out + b @ xp.matrix_transpose(g[:, bias[0] : bias[1]])
    return out


def shared_query_sizes(gp: Any, blocks: Mapping[str, Any], sample: Batch) -> dict[str, int]:
    """Chunk sizes of a model whose blocks take their gradients from shared layer
    factors (:func:`xinfluence._chunking.plan_chunks`): a sample holds the
    gradients of one block at a time (twice: gradients and factors), the
    activations of one pass (the provider's estimate, twice: forward and backward,
    where it has one) and its features; a test sample also holds its influence
    factors, ``P`` numbers (``test_copies=1``)."""
    import math

    itemsize = int(getattr(gp.dtype, "itemsize", 8) or 8)
    width = max((int(c.op.input_size) for c in blocks.values()), default=0)
    features = math.prod(int(d) for d in sample.x.shape[1:]) * itemsize
    activations = getattr(gp, "_activation_bytes", None)
    acts = 2 * int(activations(sample.x)) if callable(activations) and len(sample) else 0
    return {"per_sample": 2 * width * itemsize + features + acts, "test_copies": 1}
