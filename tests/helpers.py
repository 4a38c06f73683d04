"""Small shared test utilities (oracles live in the tests themselves)."""

from __future__ import annotations

import numpy as np

from xinfluence._xp import to_numpy


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (host numpy, float64)."""
    a = np.asarray(to_numpy(actual), dtype=np.float64)
    e = np.asarray(to_numpy(expected), dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    scale = np.max(np.abs(e))
    assert scale > 0, "the reference is identically zero: the comparison would be vacuous"
    return float(np.max(np.abs(a - e)) / scale)


def split(n: int, sizes: list[int]) -> list[slice]:
    """Consecutive slices of the given sizes covering range(n)."""
    assert sum(sizes) == n
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out
