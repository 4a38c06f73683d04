"""Chunked queries: sizes from the memory budget, re-batching, the chunked loop.

The in-memory query methods of :class:`~xinfluence.influence.ComposableInfluence`
and the calculators of :mod:`xinfluence.compute` share this module. A query
holds at most one test chunk's factors, one training chunk's gradients and one
output block at a time (plus the result it returns).

Chunk sizes come from bytes, not sample counts: per sample, the provider's
:meth:`~xinfluence.types.GradientProvider.bytes_per_sample` (gradients and
activations) and, for the test side, the influence factors and the solver's
work arrays. Half the budget goes to the test chunk, half to a training chunk
and its output block.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ._config import memory_budget
from ._xp import Array
from .types import Batch, BlockMapper, GradientProvider, InfluenceMode, iter_batches

__all__ = ["ChunkPlan", "plan_chunks", "rebatch", "as_batches", "chunked_interactions"]

#: Arrays of ``(n, P)`` one test sample costs at once: its gradients, its factors
#: and an iterative solver's work vectors (block CG keeps about four).
_TEST_COPIES = 6
#: Largest test chunk when the number of test points is not known in advance.
MAX_TEST_ROWS = 8192


class QueryModel(Protocol):
    """What the chunked queries use of an influence model
    (:class:`~xinfluence.influence.ComposableInfluence`), so that this module need
    not import :mod:`xinfluence.influence`."""

    @property
    def gradient_provider(self) -> GradientProvider: ...

    def _check_losses(self, batch: Batch, what: str, *, offset: int = 0) -> None: ...


def model_budget(model: Any) -> int:
    """The model's ``memory_budget`` option if it has one, else the global budget."""
    own = getattr(model, "memory_budget", None)
    return int(own) if own is not None else memory_budget()


@dataclass(frozen=True)
class ChunkPlan:
    """Samples per test chunk and per training chunk."""

    test_rows: int
    train_rows: int


def plan_chunks(
    gp: GradientProvider,
    sample: Batch,
    mode: InfluenceMode,
    *,
    budget: int,
    test_rows: int | None = None,
    train_rows: int | None = None,
    n_test: int | None = None,
    per_sample: int | None = None,
    test_copies: int = _TEST_COPIES,
) -> ChunkPlan:
    """Chunk sizes for one query on batches shaped like ``sample``.

    Per test sample: ``bytes_per_sample`` plus ``_TEST_COPIES * P * itemsize``;
    per training sample: ``bytes_per_sample`` (times ``prod(D)`` for the mixed
    derivatives of the perturbation mode) plus its column of the output block.
    Explicit ``test_rows`` / ``train_rows`` win over the budget. The test chunk
    is at most ``n_test`` rows (the number of test points, where known; else at
    most :data:`MAX_TEST_ROWS`), so that the output block of a few test points
    does not starve the training chunk. A model that knows better passes
    ``per_sample`` (bytes one sample's derivatives hold) and ``test_copies``
    (:func:`query_sizes`).
    """
    itemsize = int(getattr(gp.dtype, "itemsize", 8) or 8)
    p = gp.n_parameters
    trailing = (
        math.prod(int(d) for d in sample.x.shape[1:]) if mode is InfluenceMode.Perturbation else 1
    )
    if per_sample is None:
        per_sample = max(int(gp.bytes_per_sample(sample)), p * itemsize)
    if test_rows is None:
        test_rows = max(1, (budget // 2) // (per_sample + test_copies * p * itemsize))
        test_rows = min(test_rows, n_test if n_test is not None else MAX_TEST_ROWS)
    if train_rows is None:
        per_train = per_sample * trailing + test_rows * trailing * itemsize
        train_rows = max(1, (budget // 2) // per_train)
    for name, value in (("test_rows", test_rows), ("train_rows", train_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return ChunkPlan(int(test_rows), int(train_rows))


def query_sizes(model: Any, sample: Batch) -> dict[str, int]:
    """``per_sample`` and ``test_copies`` for :func:`plan_chunks` from the model's
    ``_query_sizes(sample)`` where it has one (models whose blocks hold less than
    ``P`` numbers per sample at once), else the defaults (none)."""
    fn = getattr(model, "_query_sizes", None)
    return dict(fn(sample)) if callable(fn) else {}


def is_one_shot(data: Any) -> bool:
    """Whether iterating ``data`` consumes it (a generator or other iterator)."""
    return isinstance(data, Iterator)


def as_batches(x: Any, y: Any, what: str) -> Iterable[Batch]:
    """The training side of a query: arrays ``(x, y)``, or in ``x`` with ``y=None``
    anything ``fit`` accepts (a Batch, an ``(x, y)`` pair, an iterable of those)."""
    if y is not None:
        if x is None:
            raise ValueError(f"{what}: x and y must be given together (y without x)")
        return [Batch(x, y)]
    if x is None:
        raise ValueError(f"{what}: no training data given")
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        raise ValueError(
            f"{what}: x and y must be given together (x without y); or pass a Batch, an "
            "(x, y) pair or an iterable of batches (a DataLoader) as x alone"
        )
    return iter_batches(x)


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return Batch(batch.x[start:stop, ...], batch.y[start:stop, ...])


def _concat(parts: list[Batch], xp: Any) -> Batch:
    if len(parts) == 1:
        return parts[0]
    return Batch(xp.concat([p.x for p in parts], axis=0), xp.concat([p.y for p in parts], axis=0))


def rebatch(
    batches: Iterable[Batch], rows: int, gp: GradientProvider
) -> Iterator[tuple[int, Batch]]:
    """Regroup ``batches`` into prepared chunks of exactly ``rows`` samples (the last
    may be shorter): yields ``(offset of the chunk's first sample, chunk)``.

    Large batches are sliced, small ones concatenated, so the chunk layout depends
    only on ``rows`` and the total count, not on how the source was batched.
    """
    xp = gp.xp
    parts: list[Batch] = []
    held = 0
    offset = 0
    for raw in batches:
        batch = gp.prepare_batch(raw)
        start, n = 0, len(batch)
        while start < n:
            take = min(rows - held, n - start)
            parts.append(
                batch if (start == 0 and take == n) else _slice(batch, start, start + take)
            )
            held += take
            start += take
            if held == rows:
                yield offset, _concat(parts, xp)
                offset += held
                parts, held = [], 0
    if held:
        yield offset, _concat(parts, xp)


def check_trailing(batch: Batch, expected: tuple[int, ...] | None, what: str) -> tuple[int, ...]:
    """Every chunk of one side must have the same trailing shape ``x.shape[1:]``."""
    shape = tuple(int(d) for d in batch.x.shape[1:])
    if expected is not None and shape != expected:
        raise ValueError(
            f"{what}: every batch must have x of trailing shape {expected}, got a batch with "
            f"x.shape[1:] = {shape}"
        )
    return shape


def digest(batch: Batch) -> str:
    """Content hash of a chunk's ``x`` and ``y`` (values, shapes, dtypes)."""
    import hashlib

    import numpy as np

    from ._xp import to_numpy

    h = hashlib.blake2b(digest_size=16)
    for a in (batch.x, batch.y):
        arr = np.ascontiguousarray(to_numpy(a))
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


class PassCheck:
    """Every pass over the training data must yield the same samples: the first
    chunk of each pass is compared by content (a shuffling DataLoader would
    silently permute the columns of later row chunks)."""

    def __init__(self) -> None:
        self._first: str | None = None

    def check(self, first_chunk: Batch) -> None:
        d = digest(first_chunk)
        if self._first is None:
            self._first = d
        elif d != self._first:
            raise ValueError(
                "the training data changed between passes (a DataLoader with shuffle=True?): "
                "each test chunk passes over it again, so it must yield the same batches "
                "in the same order every time"
            )


def sum_blocks(by_block: Mapping[str, Array]) -> Array:
    values = iter(by_block.values())
    total = next(values)
    for v in values:
        total = total + v
    return total


def checked(model: QueryModel, chunk: Batch, what: str, offset: int, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on a chunk (test or training side), with the chunk's losses
    checked (:meth:`~xinfluence.influence.ComposableInfluence._check_losses`) after
    it: the pass that computed the chunk's gradients may have left its losses with
    the provider (no second forward pass; on jax no program of its own). Where
    ``fn`` raises (a loss that cannot be computed, a solver that met NaN
    gradients), the check runs first, so that the samples at fault are named."""
    try:
        out = fn(*args)
    except (IndexError, RuntimeError, FloatingPointError):
        model._check_losses(chunk, what, offset=offset)
        raise
    model._check_losses(chunk, what, offset=offset)
    return out


def chunked_interactions(
    model: QueryModel,
    mapper: BlockMapper,
    left: Batch,
    x: Any,
    y: Any,
    mode: InfluenceMode,
) -> OrderedDict[str, Array]:
    """Per-block influences of the training side ``(x, y)`` (both None: ``left``
    itself; else as :func:`as_batches` takes them) on ``left``, chunked by the
    model's budget. One chunk on each side takes the unchunked path (the numbers
    of the plain query); otherwise test factors are computed once per test chunk
    and contracted with each training chunk."""
    right = None
    if x is not None or y is not None:
        right = as_batches(x, y, "influences (training points)")
    gp = model.gradient_provider
    xp = gp.xp
    plan = plan_chunks(
        gp,
        left,
        mode,
        budget=model_budget(model),
        n_test=max(len(left), 1),
        **query_sizes(model, left),
    )
    if right is None:
        right_batches: Iterable[Batch] = [left]
    else:
        right_batches = right
    single = (
        isinstance(right_batches, list)  # one Batch of arrays (iter_batches gives no list)
        and len(right_batches) == 1
        and len(right_batches[0]) <= plan.train_rows
        and len(left) <= plan.test_rows
    )
    if single:
        assert isinstance(right_batches, list)
        other = None if right is None else gp.prepare_batch(right_batches[0])
        if other is None:
            return mapper.interactions(left, other, mode)
        return checked(
            model, other, "influences (training points)", 0, mapper.interactions, left, other, mode
        )
    rows: OrderedDict[str, list[Array]] = OrderedDict((k, []) for k in mapper.composable_block_dict)
    trailing: tuple[int, ...] | None = None
    passes = PassCheck()
    for _, test_chunk in rebatch([left], plan.test_rows, gp):
        factors = mapper.transformed_grads(test_chunk)
        cols: OrderedDict[str, list[Array]] = OrderedDict((k, []) for k in rows)
        for offset, chunk in rebatch(right_batches, plan.train_rows, gp):
            if offset == 0 and len(left) > plan.test_rows:
                passes.check(chunk)
            trailing = check_trailing(chunk, trailing, "influences (training points)")
            if right is not None:
                out = checked(
                    model,
                    chunk,
                    "influences (training points)",
                    offset,
                    mapper.interactions_from_transformed_grads,
                    factors,
                    chunk,
                    mode,
                )
            else:
                out = mapper.interactions_from_transformed_grads(factors, chunk, mode)
            for k, v in out.items():
                cols[k].append(v)
        if not cols[next(iter(cols))]:
            raise ValueError("influences: the training data holds no samples")
        for k, v in cols.items():
            rows[k].append(v[0] if len(v) == 1 else xp.concat(v, axis=1))
    return OrderedDict((k, v[0] if len(v) == 1 else xp.concat(v, axis=0)) for k, v in rows.items())


def chunked_factors(
    model: QueryModel, mapper: BlockMapper, batch: Batch
) -> OrderedDict[str, Array]:
    """Per-block influence factors of ``batch``, in test chunks sized by the budget."""
    gp = model.gradient_provider
    plan = plan_chunks(
        gp,
        batch,
        InfluenceMode.Up,
        budget=model_budget(model),
        n_test=max(len(batch), 1),
        **query_sizes(model, batch),
    )
    if len(batch) <= plan.test_rows:
        return mapper.transformed_grads(batch)
    parts: OrderedDict[str, list[Array]] = OrderedDict(
        (k, []) for k in mapper.composable_block_dict
    )
    for _, chunk in rebatch([batch], plan.test_rows, gp):
        for k, v in mapper.transformed_grads(chunk).items():
            parts[k].append(v)
    return OrderedDict((k, gp.xp.concat(v, axis=0)) for k, v in parts.items())


def chunked_from_factors(
    model: QueryModel,
    mapper: BlockMapper,
    factors: Array | Mapping[str, Array],
    x: Any,
    y: Any,
    mode: InfluenceMode,
) -> OrderedDict[str, Array]:
    """Per-block influences of the training side ``(x, y)`` (as :func:`as_batches`
    takes them) from test factors, one training chunk at a time."""
    right = as_batches(x, y, "influences_from_factors")
    gp = model.gradient_provider
    xp = gp.xp
    right = list(right) if is_one_shot(right) else right
    first = next(iter(right), None)
    if first is None:
        raise ValueError("influences_from_factors: the training data holds no batches")
    n_test = (
        int(next(iter(factors.values())).shape[0])
        if isinstance(factors, Mapping)
        else int(factors.shape[0])
    )
    sample = gp.prepare_batch(first)
    plan = plan_chunks(
        gp,
        sample,
        mode,
        budget=model_budget(model),
        test_rows=max(n_test, 1),
        **query_sizes(model, sample),
    )
    cols: OrderedDict[str, list[Array]] = OrderedDict((k, []) for k in mapper.composable_block_dict)
    trailing: tuple[int, ...] | None = None
    for offset, chunk in rebatch(right, plan.train_rows, gp):
        trailing = check_trailing(chunk, trailing, "influences_from_factors (training points)")
        out = checked(
            model,
            chunk,
            "influences_from_factors (training points)",
            offset,
            mapper.interactions_from_transformed_grads,
            factors,
            chunk,
            mode,
        )
        for k, v in out.items():
            cols[k].append(v)
    return OrderedDict((k, v[0] if len(v) == 1 else xp.concat(v, axis=1)) for k, v in cols.items())
