"""Streaming reductions over influence blocks that arrive row chunk by row chunk.

Blocks come as ``(row offset, column offset, block)`` with every block of one
row chunk before the next row chunk, columns increasing (the order of the
calculators). None of them holds the whole ``(N_test, N)`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _xp
from .._xp import Array

__all__ = ["TopK", "TopKReducer", "ColumnSumReducer"]


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


class TopKReducer:
    """Keeps, per test row, the best ``k`` scores seen so far (both ends)."""

    def __init__(self, k: int, xp: Any):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self.k, self.xp = k, xp
        self._rows: list[tuple[Array, Array, Array, Array]] = []
        self._row: int | None = None
        self._cur: list[Array] | None = None

    def _select(self, vals: Array, idx: Array, descending: bool) -> tuple[Array, Array]:
        xp = self.xp
        keep = min(self.k, int(vals.shape[1]))  # strict namespaces refuse stops past the end
        order = xp.argsort(-vals if descending else vals, axis=1, stable=True)[:, :keep]
        return xp.take_along_axis(vals, order, axis=1), xp.take_along_axis(idx, order, axis=1)

    def update(self, row: int, col: int, block: Array) -> None:
        if block.ndim != 2:
            raise ValueError(
                f"top-k needs up-mode influences (N_test, N); got blocks of shape "
                f"{tuple(block.shape)}"
            )
        xp = self.xp
        if row != self._row:
            self._flush()
            self._row = row
        n, m = int(block.shape[0]), int(block.shape[1])
        idx = xp.arange(col, col + m, dtype=xp.int64, device=_xp.device_of(block))
        idx = xp.broadcast_to(idx[None, :], (n, m))
        if self._cur is None:
            hv, hi = self._select(block, idx, True)
            lv, li = self._select(block, idx, False)
        else:
            chv, chi, clv, cli = self._cur
            # current entries precede the block's: a stable sort keeps ties by index
            hv, hi = self._select(
                xp.concat([chv, block], axis=1), xp.concat([chi, idx], axis=1), True
            )
            lv, li = self._select(
                xp.concat([clv, block], axis=1), xp.concat([cli, idx], axis=1), False
            )
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
