"""Block structures: which parameters share a curvature block.

A block structure is resolved against a provider into an ordered dict
``block name -> parameter names``; the curvature is replaced by its
block-diagonal, and influences are sums of per-block influences.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, final

import numpy as np

from ._xp import Array, Namespace
from .types import Batch, GradientProvider

__all__ = ["IGNORE", "SubsetGradients", "resolve_block_structure", "resolve_regularization"]

BLOCK_STRUCTURES = ("full", "layer", "parameter")
#: Block name of a ``block_structure`` dict whose parameters are left out of the
#: curvature and of the influences (held fixed), on purpose.
IGNORE = "ignore"


def resolve_block_structure(
    gp: GradientProvider, block_structure: str | Mapping[str, Sequence[str]]
) -> OrderedDict[str, tuple[str, ...]]:
    """``"full"`` (one block named ``"full"``), ``"layer"``, ``"parameter"`` or a
    dict ``block name -> parameter names``, as an ordered dict of parameter tuples
    (each in the provider's parameter order).

    A dict must place every parameter of the provider in exactly one block; the
    parameters listed under the block ``"ignore"`` are left out of the curvature
    and of the influences (as if frozen).

    Raises:
        ValueError: an unknown structure or parameter, a parameter in no block or
            in two, a block without parameters.
    """
    names = gp.parameter_names
    if isinstance(block_structure, str):
        if block_structure == "full":
            return OrderedDict(full=names)
        if block_structure == "parameter":
            return OrderedDict((n, (n,)) for n in names)
        if block_structure == "layer":
            return OrderedDict((k, tuple(v)) for k, v in gp.layer_groups().items())
        raise ValueError(
            f"block_structure must be one of {BLOCK_STRUCTURES} or a dict block name -> "
            f"parameter names, got {block_structure!r}"
        )
    if not isinstance(block_structure, Mapping):
        raise TypeError(
            f"block_structure must be a string or a dict, got {type(block_structure).__name__}"
        )
    if not block_structure:
        raise ValueError("block_structure dict must name at least one block")
    known = set(names)
    seen: dict[str, str] = {}
    out: OrderedDict[str, tuple[str, ...]] = OrderedDict()
    for block, members in block_structure.items():
        if not isinstance(block, str):
            raise TypeError(f"block names must be strings, got {block!r}")
        if isinstance(members, str):
            members = [members]
        members = list(members)
        if not members:
            raise ValueError(f"block {block!r} names no parameter")
        for m in members:
            if m not in known:
                raise ValueError(
                    f"block {block!r} names unknown parameter {m!r}; the provider's "
                    f"parameters are {list(names)}"
                )
            if m in seen:
                where = f"twice in block {block!r}" if seen[m] == block else "in two blocks"
                raise ValueError(
                    f"parameter {m!r} is {where}: {seen[m]!r} and {block!r}; every parameter "
                    "must be in exactly one block"
                )
            seen[m] = block
        if block != IGNORE:
            out[block] = tuple(n for n in names if n in set(members))
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(
            f"block_structure leaves out the parameters {missing}: every trainable parameter "
            f"must be in exactly one block. To leave parameters out of the curvature and the "
            f"influences on purpose, list them under the block {IGNORE!r}"
        )
    if not out:
        raise ValueError(f"block_structure puts every parameter in {IGNORE!r}: nothing is left")
    return out


def _check_reg(value: Any, where: str) -> float:
    """Any real scalar >= 0: a Python or numpy number, or a 0-d array of any namespace."""
    expected = f"regularization{where} must be a finite float >= 0"
    dtype = str(getattr(value, "dtype", ""))  # numpy scalars, arrays of any namespace
    if isinstance(value, (bool, np.bool_)) or "bool" in dtype:
        raise TypeError(f"{expected}, got the boolean {value!r}")
    if isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        raise TypeError(f"{expected}, got the complex number {value!r}")
    if not isinstance(value, numbers.Real):
        shape = getattr(value, "shape", None)
        if shape is None:
            raise TypeError(f"{expected} (a Python or numpy number, or a 0-d array), got {value!r}")
        if tuple(shape) != ():
            raise TypeError(f"{expected}, got an array of shape {tuple(shape)}; pass a scalar")
        if "complex" in dtype:
            raise TypeError(f"{expected}, got a complex array {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{expected}, got {value!r}") from exc
    if math.isnan(number):
        raise ValueError(f"{expected}, got NaN")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{expected}, got {number!r}")
    return number


def resolve_regularization(
    regularization: float | Mapping[str, float], blocks: Mapping[str, Any]
) -> OrderedDict[str, float]:
    """A float for every block, from one float or a dict naming every block."""
    if isinstance(regularization, Mapping):
        unknown = [k for k in regularization if k not in blocks]
        if unknown:
            raise ValueError(
                f"regularization names unknown blocks {unknown}; the blocks are {list(blocks)}"
            )
        missing = [k for k in blocks if k not in regularization]
        if missing:
            raise ValueError(
                f"regularization dict must give a value for every block; missing {missing}"
            )
        return OrderedDict((k, _check_reg(regularization[k], f"[{k!r}]")) for k in blocks)
    value = _check_reg(regularization, "")
    return OrderedDict((k, value) for k in blocks)


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
