"""Streaming reductions over influence blocks that arrive row chunk by row chunk.

Blocks come as ``(row offset, column offset, block)`` with every block of one
row chunk before the next row chunk, columns increasing (the order of the
calculators). None of them holds the whole ``(N_test, N)`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _xp
from .._xp import Array

__all__ = ["TopK", "TopKReducer", "ColumnSumReducer", "smallest_columns"]


@dataclass(frozen=True)
class TopK:
    """The ``k`` most helpful and most harmful training points per test point.

    ``helpful_indices`` ``(N_test, k)``: training indices in order of decreasing
    influence (the largest first), ties by increasing index, as
    ``argsort(-I, stable=True)[:, :k]``; ``helpful_scores`` their influences.
    ``harmful_indices``: increasing influence (the most negative first), ties by
    increasing index, as ``argsort(I, stable=True)[:, :k]``. ``k`` is capped at
    ``N``.
    """

    helpful_indices: Array
    helpful_scores: Array
    harmful_indices: Array
    harmful_scores: Array


def smallest_columns(key: Array, keep: int, /, *, xp: Any) -> Array:
    """``argsort(key, axis=1, stable=True)[:, :keep]`` of ``key`` ``(n, c)``,
    ``1 <= keep <= c``: per row the columns of the ``keep`` smallest entries by
    increasing value, ties by increasing column, NaN last.

    A partition picks ``keep`` candidates per row in O(c) and only they are
    sorted. A row whose candidates need not be the sort's (an entry left out
    equals the largest candidate, or a candidate is NaN) is sorted in full.
    """
    n, c = int(key.shape[0]), int(key.shape[1])
    if keep >= c:
        return xp.argsort(key, axis=1, stable=True)
    partitioned = _xp.maybe_jit(_partitioned, xp=xp, static_argnames=("keep", "xp"))
    cols, exact = partitioned(key, keep=keep, xp=xp)
    bad = np.flatnonzero(~_xp.to_numpy(exact))
    if bad.size == 0:
        return cols
    if bad.size == n:
        return xp.argsort(key, axis=1, stable=True)[:, :keep]
    device = _xp.device_of(key)
    rows = np.resize(bad, _xp.padded_rows(bad.size, xp=xp))  # jax: few shapes
    rows_x = _xp.from_numpy(rows, dtype=cols.dtype, device=device, xp=xp)
    full = xp.argsort(xp.take(key, rows_x, axis=0), axis=1, stable=True)[:, :keep]
    pos = np.arange(n)
    pos[bad] = n + np.arange(bad.size)
    pos_x = _xp.from_numpy(pos, dtype=cols.dtype, device=device, xp=xp)
    return xp.take(xp.concat([cols, full], axis=0), pos_x, axis=0)


def _partitioned(key: Array, *, keep: int, xp: Any) -> tuple[Array, Array]:
    """Per row, ``keep`` candidate columns in the order of a stable sort and
    whether they are the sort's first ``keep`` (one program on jax)."""
    # in column order, so that a stable sort of the candidates keeps ties by column
    cand = xp.sort(_xp.argsmallest(key, keep, xp=xp), axis=1)
    vals = xp.take_along_axis(key, cand, axis=1)
    order = xp.argsort(vals, axis=1, stable=True)
    kth = xp.take_along_axis(vals, order[:, keep - 1 :], axis=1)  # NaN if any candidate is
    # the candidates are the sort's when they are all the entries <= kth
    exact = xp.count_nonzero(key <= kth, axis=1) == keep
    return xp.take_along_axis(cand, order, axis=1), exact


class TopKReducer:
    """Keeps, per test row, the best ``k`` scores seen so far (both ends)."""

    def __init__(self, k: int, xp: Any):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k, self.xp = k, xp
        self._rows: list[tuple[Array, Array, Array, Array]] = []
        self._row: int | None = None
        self._cur: list[Array] | None = None

    def _select(
        self, cur: tuple[Array, Array] | None, col: int, block: Array, descending: bool
    ) -> tuple[Array, Array]:
        """The best ``k`` of the current ``(values, indices)`` and of ``block``,
        whose columns are the training indices ``col, col + 1, ...``."""
        xp = self.xp
        # current entries precede the block's: ties by position are ties by index
        vals = block if cur is None else xp.concat([cur[0], block], axis=1)
        keep = min(self.k, int(vals.shape[1]))
        cols = smallest_columns(-vals if descending else vals, keep, xp=xp)
        out = xp.take_along_axis(vals, cols, axis=1)
        shift = 0 if cur is None else int(cur[1].shape[1])
        idx = xp.astype(cols, xp.int64) + (col - shift)
        if cur is not None:
            kept = xp.take_along_axis(cur[1], xp.clip(cols, max=shift - 1), axis=1)
            idx = xp.where(cols < shift, kept, idx)
        return out, idx

    def update(self, row: int, col: int, block: Array) -> None:
        if block.ndim != 2:
            raise ValueError(
                f"top-k needs up-mode influences (N_test, N); got blocks of shape "
                f"{tuple(block.shape)}"
            )
        if row != self._row:
            self._flush()
            self._row = row
        cur = self._cur
        hv, hi = self._select(None if cur is None else (cur[0], cur[1]), col, block, True)
        lv, li = self._select(None if cur is None else (cur[2], cur[3]), col, block, False)
        self._cur = [hv, hi, lv, li]

    def _flush(self) -> None:
        if self._cur is not None:
            hv, hi, lv, li = self._cur
            self._rows.append((hi, hv, li, lv))
        self._cur = None

    def result(self) -> TopK:
        self._flush()
        if not self._rows:
            raise ValueError("top-k of an empty influence matrix")
        xp = self.xp
        parts = [xp.concat([r[i] for r in self._rows], axis=0) for i in range(4)]
        return TopK(*parts)


class ColumnSumReducer:
    """Sum over test points per training point: ``(N,)`` (and the row count for
    the mean)."""

    def __init__(self, xp: Any):
        self.xp = xp
        self._cols: dict[int, Array] = {}
        self.n_rows = 0
        self._rows_seen: set[int] = set()

    def update(self, row: int, col: int, block: Array) -> None:
        xp = self.xp
        s = xp.sum(block, axis=0)
        self._cols[col] = s if col not in self._cols else self._cols[col] + s
        if row not in self._rows_seen and col == 0:
            self._rows_seen.add(row)
            self.n_rows += int(block.shape[0])

    def result(self) -> Array:
        if not self._cols:
            raise ValueError("sum over an empty influence matrix")
        return self.xp.concat([self._cols[c] for c in sorted(self._cols)], axis=0)
