"""The spec's abstract types, written once against the array API.

Shapes use ``N`` (left batch), ``M`` (right batch), ``P`` (parameters of the
block at hand), ``K`` (vectors in a batched product) and ``D`` for the trailing
input dimensions ``x.shape[1:]``.

Conventions: ``l(theta; x, y)`` is the per-sample loss; the curvature ``H`` is
the Hessian of the *mean* loss over the fitted data (or its Gauss-Newton
matrix, or ``mean g g^T``); an :class:`Operator` applies an approximation of
``(H + lambda I)^-1``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar, final, runtime_checkable

from . import _xp
from ._state import PicklableState
from ._xp import Array, Namespace

__all__ = [
    "InfluenceMode",
    "Batch",
    "GradientProvider",
    "KroneckerFactorProvider",
    "BilinearForm",
    "OperatorBilinearForm",
    "Operator",
    "OperatorGradientComposition",
    "BlockMapper",
    "SubsetGradients",
]


class InfluenceMode(str, Enum):
    """Kind of influence: ``Up`` (up-weighting a training point) or ``Perturbation``
    (perturbing its input)."""

    Up = "up"
    Perturbation = "perturbation"

    @classmethod
    def parse(cls, mode: InfluenceMode | str) -> InfluenceMode:
        """The enum member for ``mode``; only the members or exactly ``"up"`` and
        ``"perturbation"`` are accepted."""
        if isinstance(mode, cls):
            return mode
        if isinstance(mode, str):
            for member in cls:
                if mode == member.value:
                    return member
        raise ValueError(
            f"mode must be InfluenceMode.Up, InfluenceMode.Perturbation, 'up' or "
            f"'perturbation', got {mode!r}"
        )


@dataclass(frozen=True)
class Batch:
    """Features ``x`` of shape ``(N, *D)`` and targets ``y`` of length ``N``."""

    x: Array
    y: Array

    def __post_init__(self) -> None:
        if isinstance(self.y, (list, tuple)):  # targets typed in by hand
            object.__setattr__(self, "y", _targets_like(self.x, self.y))
        nx, ny = _length(self.x, "x"), _length(self.y, "y")
        if nx != ny:
            raise ValueError(
                f"x and y must have the same number of samples, got len(x)={nx} and len(y)={ny}"
            )

    def __len__(self) -> int:
        return _length(self.x, "x")


def _targets_like(x: Array, y: Sequence[Any]) -> Array:
    """A list or tuple of targets as an array of ``x``'s namespace and device:
    int64 for integers (class labels), float64 for real numbers."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"expected x to be an array, got {type(x).__name__}")
    import numpy as np

    host = np.asarray(y)
    kinds = {"i": "int64", "u": "int64", "b": "bool", "f": "float64"}
    if host.dtype.kind not in kinds:
        raise TypeError(
            f"expected y as an array, or a list of numbers (class labels or real targets), "
            f"got a list of {host.dtype}"
        )
    xp = _xp.namespace(x)
    dtype = getattr(xp, kinds[host.dtype.kind])
    return _xp.from_numpy(host, dtype=dtype, device=_xp.device_of(x), xp=xp)


def _length(a: Array, name: str) -> int:
    shape = getattr(a, "shape", None)
    if shape is None or len(shape) == 0:
        raise ValueError(f"expected {name} to be an array with a leading sample dimension")
    n = shape[0]
    if n is None:  # lazy arrays
        raise ValueError(f"{name} has an unknown number of samples")
    return int(n)


class GradientProvider(PicklableState, ABC):
    """Per-sample derivatives of the per-sample loss ``l(theta; x_i, y_i)``.

    A provider holds the model parameters ``theta`` (a flat vector of ``P``
    entries, the parameters' flattenings concatenated in :attr:`parameter_names`
    order) and computes derivatives for one :class:`Batch` at a time. Results
    are arrays of the parameters' namespace, dtype and device.

    Providers pickle and deep-copy (the namespace is stored by name); user
    functions they hold must be module-level functions for the standard pickler.
    """

    # -- the model -------------------------------------------------------
    @property
    @abstractmethod
    def xp(self) -> Namespace:
        """Array namespace of the parameters."""

    @property
    @abstractmethod
    def dtype(self) -> Any:
        """Floating dtype of the parameters (and of every result)."""

    @property
    @abstractmethod
    def device(self) -> Any:
        """Device of the parameters (and of every result)."""

    @property
    @abstractmethod
    def parameter_shapes(self) -> OrderedDict[str, tuple[int, ...]]:
        """Ordered parameter names and shapes; the flat vector follows this order."""

    def restrict(self, names: Sequence[str]) -> GradientProvider:
        """A provider over the parameters ``names`` only (others held fixed).

        The flat order of the result follows :attr:`parameter_names`, not ``names``.
        The default slices the full derivatives (:class:`SubsetGradients`);
        backends that can compute only the block override it.
        """
        return SubsetGradients(self, names)

    def layer_groups(self) -> OrderedDict[str, list[str]]:
        """Parameters grouped by layer (for ``block_structure="layer"``).

        The default groups names by their prefix before the last ``"."`` or ``"/"``;
        names without a prefix form one group named ``"root"``.
        """
        groups: OrderedDict[str, list[str]] = OrderedDict()
        for name in self.parameter_names:
            cut = max(name.rfind("."), name.rfind("/"))
            groups.setdefault(name[:cut] if cut > 0 else "root", []).append(name)
        return groups

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(self.parameter_shapes)

    def parameter_fingerprint(self) -> str | None:
        """SHA-256 of the values the derivatives depend on (parameters, and buffers
        where the model has them), or None where the provider cannot say. Saved
        with a fitted model and checked on load."""
        return None

    def parameter_checksum(self) -> Any:
        """A cheap summary of the parameter values, compared at every query where
        :meth:`parameter_version` cannot see every change (torch's ``p.data``
        updates bypass the version counters), or None (default: no check)."""
        return None

    def parameter_version(self) -> Any:
        """A cheap token that changes whenever the parameters change: a fitted
        model compares it at every query and raises
        :class:`~xinfluence.errors.StaleFitError` on a change. Default: the
        fingerprint (None: no check)."""
        return self.parameter_fingerprint()

    @property
    def parameter_slices(self) -> OrderedDict[str, slice]:
        """Slice of the flat parameter vector that each parameter occupies."""
        out: OrderedDict[str, slice] = OrderedDict()
        start = 0
        for name, shape in self.parameter_shapes.items():
            stop = start + math.prod(shape)
            out[name] = slice(start, stop)
            start = stop
        return out

    @property
    def n_parameters(self) -> int:
        return sum(math.prod(s) for s in self.parameter_shapes.values())

    # -- derivatives -----------------------------------------------------
    @abstractmethod
    def flat_grads(self, batch: Batch) -> Array:
        """Per-sample gradients ``d l(z_i) / d theta``, shape ``(N, P)``."""

    @abstractmethod
    def flat_mixed_grads(self, batch: Batch) -> Array:
        """Per-sample mixed derivatives ``d/dx d/dtheta l(z_i)``, shape ``(N, *D, P)``."""

    def jacobian_prod(self, batch: Batch, g: Array) -> Array:
        """``(grad l(z_i))^T g_k`` for each sample ``i`` and row ``g_k``: ``(N, K)``.

        ``g`` has shape ``(K, P)``. Backends that can should override this
        without materialising the ``(N, P)`` gradients.
        """
        return self.flat_grads(batch) @ self.xp.matrix_transpose(g)

    @abstractmethod
    def hvp(self, batch: Batch, v: Array) -> Array:
        """Hessian of the batch's *mean* loss applied to each row of ``v``.

        ``v`` has shape ``(K, P)``; the result has shape ``(K, P)``.
        """

    def hessian(self, batch: Batch) -> Array:
        """Dense Hessian of the batch's mean loss, ``(P, P)``.

        The default applies :meth:`hvp` to the identity; backends with a
        cheaper route override it.
        """
        xp = self.xp
        p = self.n_parameters
        h = self.hvp(batch, _xp.eye(p, dtype=self.dtype, device=self.device, xp=xp))
        return _xp.symmetrize(h, xp=xp)

    def hessian_diagonal(self, batch: Batch) -> Array | None:
        """Exact diagonal of the batch-mean Hessian, ``(P,)``, or None where the
        provider cannot give it cheaply (then a Hutchinson estimate is used)."""
        return None

    # -- generalized Gauss-Newton (optional) ---------------------------------
    @property
    def supports_gauss_newton(self) -> bool:
        """Whether :meth:`ggn_matmat` is available (the provider sees the model
        output ``out_i`` and the loss as a function of it)."""
        return False

    def ggn_matmat(self, batch: Batch, v: Array) -> Array:
        """Generalized Gauss-Newton matrix of the batch's *mean* loss applied to each
        row of ``v``: ``(K, P) -> (K, P)``.

        ``G_b = (1/N) sum_i J_i^T H_i J_i`` with ``J_i = d out_i / d theta``
        (``(M, P)``, ``M`` the size of one sample's model output) and
        ``H_i = d^2 l / d out^2`` at ``out_i`` (``(M, M)``). Positive
        semi-definite when the loss is convex in the output; equal to the
        Hessian for generalized linear models with canonical links.

        Raises:
            NotImplementedError: the provider has no model output (the default).
        """
        raise NotImplementedError(self._no_output_message())

    def _no_output_message(self) -> str:
        return (
            f"this provider has no model output: {type(self).__name__} only sees the "
            "per-sample loss, so it cannot form the Gauss-Newton matrix J^T H_out J; use "
            "second_order='hessian' or 'empirical_fisher', or a provider of the model and "
            "its loss (torch, jax, or the array-API linear models)"
        )

    def ggn(self, batch: Batch) -> Array:
        """Dense Gauss-Newton matrix of the batch's mean loss, ``(P, P)``.

        The default applies :meth:`ggn_matmat` to chunks of the identity, each
        chunk sized from :func:`xinfluence.memory_budget`.
        """
        if not self.supports_gauss_newton:
            raise NotImplementedError(self._no_output_message())
        from ._config import memory_budget

        xp, p = self.xp, self.n_parameters
        itemsize = int(getattr(self.dtype, "itemsize", 8))
        # a chunk holds the unit vectors, their products and about N copies of
        # an output-sized intermediate per vector; count 4 P per vector
        step = max(1, min(p, memory_budget() // max(1, 4 * p * itemsize)))
        eye = _xp.eye(p, dtype=self.dtype, device=self.device, xp=xp)
        parts = [self.ggn_matmat(batch, eye[lo : lo + step, :]) for lo in range(0, p, step)]
        g = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
        return _xp.symmetrize(g, xp=xp)

    def ggn_diagonal(self, batch: Batch) -> Array | None:
        """Exact diagonal of the batch-mean Gauss-Newton matrix, ``(P,)``, or None where
        the provider cannot give it cheaply (then a Hutchinson estimate is used)."""
        return None

    def per_sample_losses(self, batch: Batch) -> Array | None:
        """Per-sample losses ``(N,)`` of a prepared batch, or None where the provider
        cannot give them. Fitted models check them for NaN and inf (a label out of
        range, say) at ``fit`` and at every query."""
        return None

    def prepare_products(self, batch: Batch) -> None:  # noqa: B027 (optional hook)
        """Hint: :meth:`hvp` will be called on this (prepared, kept) batch many
        times, e.g. by an iterative solver. A provider may precompute what makes
        those products cheaper; the default does nothing. The numbers must not
        depend on whether this was called."""

    def bytes_per_sample(self, batch: Batch) -> int:
        """Bytes that computing the derivatives of one sample of ``batch`` holds
        (its gradient and the activations behind it); chunked queries size their
        chunks from it (:mod:`xinfluence._chunking`).

        The default is conservative for models without large activations: twice
        the gradient (``2 P itemsize``) plus the sample's features. Providers
        whose activations dominate (convolutions) should override it.
        """
        itemsize = int(getattr(self.dtype, "itemsize", 8) or 8)
        features = math.prod(int(d) for d in batch.x.shape[1:]) * itemsize
        return 2 * self.n_parameters * itemsize + features

    def prepare_batch(self, batch: Batch) -> Batch:
        """Validate a batch for this provider and bring it to the parameters' dtype.

        Checks the namespace of ``x`` and ``y``, finiteness, and (through
        :meth:`check_input_shape`) the feature shape. Returns a possibly cast batch.
        """
        xp = self.xp
        _xp.check_namespace(batch.x, xp=xp, what="x")
        _xp.check_namespace(batch.y, xp=xp, what="y")
        _xp.check_finite(batch.x, xp=xp, what="x")
        _xp.check_finite(batch.y, xp=xp, what="y")
        self.check_input_shape(batch)
        return batch

    def check_input_shape(self, batch: Batch) -> None:  # noqa: B027 (optional hook)
        """Raise ``ValueError`` if ``batch`` does not fit the model (default: no check)."""


@runtime_checkable
class KroneckerFactorProvider(Protocol):
    """Optional provider capability for EK-FAC: dense layers whose per-sample
    weight gradient is the outer product ``s_n a_n^T``, or convolutions whose
    per-sample weight gradient is ``sum_t s_nt a_nt^T`` over output positions.

    For ``second_order="gauss_newton"`` a provider also offers
    ``kfac_ggn_factors(batch)``: layer -> inputs ``a`` ``(N, I)`` and
    pseudo-gradients ``s`` ``(N, C, O)``, the columns ``c`` of a square root
    ``H_i = L_i L_i^T`` of the loss Hessian on the model output, back-propagated
    to the layer's outputs (``s_ic = J_{out <- z}^T L_i[:, c]``), so that the
    layer's Gauss-Newton block is ``mean_i sum_c (s_ic s_ic^T) (x) (a_i a_i^T)``
    exactly.
    """

    def kfac_layers(self) -> OrderedDict[str, tuple[str, str | None]]:
        """Layer name -> (weight parameter name, bias parameter name or None)."""
        ...

    def kfac_factors(self, batch: Batch) -> OrderedDict[str, tuple[Array, Array]]:
        """Layer name -> inputs ``a`` ``(N, I)`` and per-sample loss gradients
        ``s`` ``(N, O)`` at the layer's outputs; for a convolution, per output
        position: patches ``a`` ``(N, T, I)`` and gradients ``s`` ``(N, T, O)``."""
        ...


class BilinearForm(ABC):
    """A symmetric bilinear form ``<u, v>_B = u^T B v`` on parameter space.

    The trailing dimension is contracted: ``(N, P) x (M, *D, P) -> (N, M, *D)``.
    """

    @abstractmethod
    def inner_prod(self, left: Array, right: Array | None) -> Array:
        """``left`` (N, P), ``right`` (M, *D, P) or None (then ``left``): ``(N, M, *D)``."""

    def grads_inner_prod(
        self, left: Batch, right: Batch | None, gradient_provider: GradientProvider
    ) -> Array:
        """``<grad l(z_i), grad l(z_j)>_B`` for ``z_i`` in ``left`` and ``z_j`` in ``right``:
        ``(N, M)``."""
        left_grads = gradient_provider.flat_grads(left)
        right_grads = None if right is None else gradient_provider.flat_grads(right)
        return self.inner_prod(left_grads, right_grads)

    def mixed_grads_inner_prod(
        self, left: Batch, right: Batch | None, gradient_provider: GradientProvider
    ) -> Array:
        """``<grad l(z_i), d/dx grad l(z_j)>_B``: ``(N, M, *D)``."""
        left_grads = gradient_provider.flat_grads(left)
        right_mixed = gradient_provider.flat_mixed_grads(left if right is None else right)
        return self.inner_prod(left_grads, right_mixed)


def contract(left: Array, right: Array, /, *, xp: Namespace) -> Array:
    """``left`` (N, P) against the trailing dimension of ``right`` (M, *D, P): (N, M, *D)."""
    return _xp.maybe_jit(_contract, xp=xp)(left, right, xp=xp)  # jax: one program


def _contract(left: Array, right: Array, /, *, xp: Namespace) -> Array:
    lead = tuple(right.shape[:-1])
    flat = xp.reshape(right, (math.prod(lead), right.shape[-1]))
    return xp.reshape(left @ xp.matrix_transpose(flat), (left.shape[0], *lead))


class Operator(PicklableState, ABC):
    """A linear operator on parameter space, applied along the trailing dimension.

    Operators pickle and deep-copy (a namespace they hold is stored by name)."""

    @property
    @abstractmethod
    def input_size(self) -> int:
        """Size ``P`` of the trailing dimension it accepts."""

    @abstractmethod
    def _apply(self, t: Array) -> Array:
        """Apply to the rows of a 2-D array ``(K, P) -> (K, P)``."""

    def apply(self, t: Array) -> Array:
        """Apply to ``t`` of shape ``(..., P)``; returns the same shape."""
        if t.shape[-1] != self.input_size:
            raise ValueError(
                f"expected a trailing dimension of size {self.input_size}, "
                f"got shape {tuple(t.shape)}"
            )
        xp = _xp.namespace(t)
        if t.ndim == 2:
            return self._apply(t)
        lead = tuple(t.shape[:-1])
        flat = xp.reshape(t, (math.prod(lead), self.input_size))
        return xp.reshape(self._apply(flat), (*lead, self.input_size))

    def as_bilinear_form(self) -> BilinearForm:
        return OperatorBilinearForm(self)

    def with_regularization(self, regularization: float) -> Operator | None:
        """The same operator with another damping, or None where that needs a refit."""
        return None


class OperatorBilinearForm(BilinearForm):
    """``<u, v> = op(u)^T v``: the operator applied to the left factor."""

    def __init__(self, operator: Operator):
        self.operator = operator

    def inner_prod(self, left: Array, right: Array | None) -> Array:
        xp = _xp.namespace(left)
        transformed = self.operator.apply(left)
        return contract(transformed, left if right is None else right, xp=xp)


class OperatorGradientComposition:
    """An operator ``B`` and a gradient provider, giving interactions between batches.

    up: ``g(z_i)^T B g(z_j)``; perturbation: ``g(z_i)^T B d/dx g(z_j)``.
    """

    def __init__(self, op: Operator, gp: GradientProvider):
        if op.input_size != gp.n_parameters:
            raise ValueError(
                f"operator input size {op.input_size} does not match the provider's "
                f"{gp.n_parameters} parameters"
            )
        self.op = op
        self.gp = gp

    def interactions(
        self, left_batch: Batch, right_batch: Batch | None, mode: InfluenceMode | str
    ) -> Array:
        """``(N, M)`` for up, ``(N, M, *D)`` for perturbation (``right=None``: left)."""
        mode = InfluenceMode.parse(mode)
        form = self.op.as_bilinear_form()
        if mode is InfluenceMode.Up:
            return form.grads_inner_prod(left_batch, right_batch, self.gp)
        return form.mixed_grads_inner_prod(left_batch, right_batch, self.gp)

    def transformed_grads(self, batch: Batch) -> Array:
        """``B g(z_i)``: ``(N, P)``."""
        return self.op.apply(self.gp.flat_grads(batch))

    def interactions_from_transformed_grads(
        self, left_factors: Array, right_batch: Batch, mode: InfluenceMode | str
    ) -> Array:
        """``f_i^T g(z_j)`` (up, ``(N, M)``) or ``f_i^T d/dx g(z_j)`` (``(N, M, *D)``)."""
        mode = InfluenceMode.parse(mode)
        xp = self.gp.xp
        if mode is InfluenceMode.Up:
            return xp.matrix_transpose(self.gp.jacobian_prod(right_batch, left_factors))
        return contract(left_factors, self.gp.flat_mixed_grads(right_batch), xp=xp)


T = TypeVar("T")


class BlockMapper(Generic[T]):
    """Maps the composition methods over named blocks (an ordered dict)."""

    def __init__(self, composable_block_dict: Mapping[str, OperatorGradientComposition]):
        self.composable_block_dict: OrderedDict[str, OperatorGradientComposition] = OrderedDict(
            composable_block_dict
        )

    def _split(self, factors: Array | Mapping[str, Array]) -> OrderedDict[str, Array]:
        if isinstance(factors, Mapping):
            missing = set(self.composable_block_dict) - set(factors)
            if missing:
                raise ValueError(f"factors are missing the blocks {sorted(missing)}")
            return OrderedDict((k, factors[k]) for k in self.composable_block_dict)
        sizes = [c.op.input_size for c in self.composable_block_dict.values()]
        if factors.ndim != 2 or factors.shape[-1] != sum(sizes):
            raise ValueError(
                f"expected factors of shape (N, {sum(sizes)}), got {tuple(factors.shape)}"
            )
        out: OrderedDict[str, Array] = OrderedDict()
        start = 0
        for name, size in zip(self.composable_block_dict, sizes):
            out[name] = factors[:, start : start + size]
            start += size
        return out

    def generate_transformed_grads(self, batch: Batch) -> Generator[Array, None, None]:
        for comp in self.composable_block_dict.values():
            yield comp.transformed_grads(batch)

    def generate_interactions(
        self, left_batch: Batch, right_batch: Batch | None, mode: InfluenceMode | str
    ) -> Generator[Array, None, None]:
        for comp in self.composable_block_dict.values():
            yield comp.interactions(left_batch, right_batch, mode)

    def generate_interactions_from_transformed_grads(
        self,
        left_factors: Array | Mapping[str, Array],
        right_batch: Batch,
        mode: InfluenceMode | str,
    ) -> Generator[Array, None, None]:
        split = self._split(left_factors)
        for name, comp in self.composable_block_dict.items():
            yield comp.interactions_from_transformed_grads(split[name], right_batch, mode)

    def transformed_grads(self, batch: Batch) -> OrderedDict[str, Array]:
        return OrderedDict(zip(self.composable_block_dict, self.generate_transformed_grads(batch)))

    def interactions(
        self, left_batch: Batch, right_batch: Batch | None, mode: InfluenceMode | str
    ) -> OrderedDict[str, Array]:
        return OrderedDict(
            zip(
                self.composable_block_dict,
                self.generate_interactions(left_batch, right_batch, mode),
            )
        )

    def interactions_from_transformed_grads(
        self,
        left_factors: Array | Mapping[str, Array],
        right_batch: Batch,
        mode: InfluenceMode | str,
    ) -> OrderedDict[str, Array]:
        return OrderedDict(
            zip(
                self.composable_block_dict,
                self.generate_interactions_from_transformed_grads(left_factors, right_batch, mode),
            )
        )


def iter_batches(data: Any) -> Iterable[Batch]:
    """Normalise ``data`` (a Batch, an ``(x, y)`` pair, or an iterable of those)."""
    if isinstance(data, Batch):
        return [data]
    if _is_pair(data):
        return [Batch(data[0], data[1])]
    if not isinstance(data, Iterable):
        raise TypeError(
            f"expected a Batch, an (x, y) pair of arrays or an iterable of those, got {type(data)}"
        )
    return _BatchIterable(data)


def _is_pair(obj: Any) -> bool:
    """``(x, y)`` with array ``x`` and array, list or tuple ``y``."""
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        return False
    x, y = obj
    return (
        hasattr(x, "shape")
        and hasattr(x, "dtype")
        and (hasattr(y, "shape") and hasattr(y, "dtype") or isinstance(y, (list, tuple)))
    )


class _BatchIterable:
    """Re-iterable view of an iterable of batches; one-shot iterators are stored."""

    def __init__(self, data: Iterable[Any]):
        self._data = list(data) if isinstance(data, Iterator) else data

    def __iter__(self):
        empty = True
        for item in self._data:
            empty = False
            if isinstance(item, Batch):
                yield item
            elif _is_pair(item):
                yield Batch(item[0], item[1])
            else:
                raise TypeError(
                    "expected the data to be a Batch, an (x, y) pair (x an array, y an array "
                    f"or a list of targets), or an iterable of those; got an element of type "
                    f"{type(item).__name__}"
                )
        if empty:
            raise ValueError("the data holds no batches")


@final
class SubsetGradients(GradientProvider):
    """The derivatives of a provider restricted to some of its parameters.

    Generic fallback: derivatives are computed for all parameters and sliced;
    the Hessian block ``H[S, S]`` comes from products with vectors that vanish
    outside ``S``. Backends override :meth:`GradientProvider.restrict` where
    they can compute only the block.
    """

    def __init__(self, base: GradientProvider, names: Sequence[str]):
        unknown = [n for n in names if n not in base.parameter_shapes]
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; known: {list(base.parameter_names)}")
        self.base = base
        self._names = tuple(n for n in base.parameter_names if n in set(names))
        slices = base.parameter_slices
        self._slices = [slices[n] for n in self._names]

    @property
    def xp(self) -> Namespace:
        return self.base.xp

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    @property
    def device(self) -> Any:
        return self.base.device

    @property
    def parameter_shapes(self) -> OrderedDict[str, tuple[int, ...]]:
        shapes = self.base.parameter_shapes
        return OrderedDict((n, shapes[n]) for n in self._names)

    def parameter_fingerprint(self) -> str | None:
        return self.base.parameter_fingerprint()

    def per_sample_losses(self, batch: Batch) -> Array | None:
        return self.base.per_sample_losses(batch)

    def parameter_version(self) -> Any:
        return self.base.parameter_version()

    def parameter_checksum(self) -> Any:
        return self.base.parameter_checksum()

    def restrict(self, names: Sequence[str]) -> SubsetGradients:
        unknown = [n for n in names if n not in self._names]
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; known: {list(self._names)}")
        return SubsetGradients(self.base, names)

    def layer_groups(self) -> OrderedDict[str, list[str]]:
        out: OrderedDict[str, list[str]] = OrderedDict()
        for layer, members in self.base.layer_groups().items():
            kept = [m for m in members if m in self._names]
            if kept:
                out[layer] = kept
        return out

    def _take(self, a: Array) -> Array:
        if len(self._slices) == 1:
            return a[..., self._slices[0]]
        return self.xp.concat([a[..., s] for s in self._slices], axis=-1)

    def _embed(self, v: Array) -> Array:
        """``(K, P_S) -> (K, P)`` with zeros outside the subset."""
        xp = self.xp
        k = v.shape[0]
        pieces, start = [], 0
        mine = dict(zip(self._names, self._slices))
        for name, sl in self.base.parameter_slices.items():
            width = sl.stop - sl.start
            if name in mine:
                pieces.append(v[:, start : start + width])
                start += width
            else:
                pieces.append(xp.zeros((k, width), dtype=v.dtype, device=self.device))
        return xp.concat(pieces, axis=1)

    def flat_grads(self, batch: Batch) -> Array:
        return self._take(self.base.flat_grads(batch))

    def flat_mixed_grads(self, batch: Batch) -> Array:
        return self._take(self.base.flat_mixed_grads(batch))

    def jacobian_prod(self, batch: Batch, g: Array) -> Array:
        return self.base.jacobian_prod(batch, self._embed(g))

    def hvp(self, batch: Batch, v: Array) -> Array:
        return self._take(self.base.hvp(batch, self._embed(v)))

    def hessian_diagonal(self, batch: Batch) -> Array | None:
        d = self.base.hessian_diagonal(batch)
        return None if d is None else self._take(d)

    def prepare_products(self, batch: Batch) -> None:
        self.base.prepare_products(batch)  # products go through the base provider

    # -- generalized Gauss-Newton: the diagonal block G[S, S] of the base's
    @property
    def supports_gauss_newton(self) -> bool:
        return self.base.supports_gauss_newton

    def ggn_matmat(self, batch: Batch, v: Array) -> Array:
        return self._take(self.base.ggn_matmat(batch, self._embed(v)))

    def ggn_diagonal(self, batch: Batch) -> Array | None:
        d = self.base.ggn_diagonal(batch)
        return None if d is None else self._take(d)

    def prepare_batch(self, batch: Batch) -> Batch:
        return self.base.prepare_batch(batch)
