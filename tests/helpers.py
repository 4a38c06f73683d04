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


def sigmoid(z):
    """The logistic function, stable for both signs (host numpy)."""
    return 0.5 * (1 + np.tanh(z / 2))


def logistic_losses(theta, xa, y):
    """Per-sample logistic losses ``log(1 + e^z) - y z``, ``z = xa @ theta`` (host numpy)."""
    z = xa @ theta
    return np.logaddexp(0, z) - y * z


def split(n: int, sizes: list[int]) -> list[slice]:
    """Consecutive slices of the given sizes covering range(n)."""
    assert sum(sizes) == n
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


def kronecker_basis(op) -> np.ndarray:
    """The Kronecker eigenbasis of an EK-FAC block ``op`` as a dense ``(P_b, P_b)``
    matrix: columns ``vec(q_s[:, o] q_a[:, i]^T)`` in the block's flat order,
    ``(o, i)`` row-major (asserted orthonormal)."""
    q_s, q_a = to_numpy(op.q_s), to_numpy(op.q_a)
    cols = []
    for o in range(q_s.shape[1]):
        for i in range(q_a.shape[1]):
            m = np.outer(q_s[:, o], q_a[:, i])  # (O, I') in s a^T layout
            t = np.zeros(op.input_size)
            wpart = m[:, : op.n_in]
            t[op.weight_slice] = (wpart if op.layout == "oi" else wpart.T).ravel()
            if op.bias_slice is not None:
                t[op.bias_slice] = m[:, op.n_in]
            cols.append(t)
    basis = np.array(cols).T
    assert np.abs(basis.T @ basis - np.eye(basis.shape[1])).max() <= 1e-10
    return basis
