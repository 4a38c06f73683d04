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
from typing import Any

import numpy as np

from .types import GradientProvider, SubsetGradients

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
