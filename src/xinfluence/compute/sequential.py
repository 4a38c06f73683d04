"""The sequential calculator: one block after the other, in memory or into zarr."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

from .. import _chunking, _xp
from .._xp import Array
from ..types import Batch, InfluenceMode, iter_batches
from . import _store
from ._progress import note, progress_bar
from ._reductions import ColumnSumReducer, TopK, TopKReducer

if TYPE_CHECKING:
    from ..influence import ComposableInfluence

__all__ = ["SequentialInfluenceCalculator", "LazyInfluences"]


@dataclass(frozen=True)
class _Block:
    i: int
    j: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    value: Array


def _peek(data: Iterable[Batch], what: str) -> tuple[Batch, Iterable[Batch]]:
    """The first batch, and an iterable that still yields all of them."""
    if _chunking.is_one_shot(data):
        it = iter(data)
        first = next(it, None)
        if first is None:
            raise ValueError(f"{what}: the data holds no batches")
        return first, itertools.chain([first], it)
    first = next(iter(data), None)
    if first is None:
        raise ValueError(f"{what}: the data holds no batches")
    return first, data


def _n_samples(data: Any) -> int | None:
    """Sample count where it is known without a pass (lists of batches, DataLoaders)."""
    data = getattr(data, "_data", data)  # the source of an iter_batches view
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    if isinstance(data, Batch):
        return len(data)
    if isinstance(data, (list, tuple)):
        total = 0
        for item in data:
            if isinstance(item, Batch):
                total += len(item)
            elif isinstance(item, (list, tuple)) and len(item) == 2 and hasattr(item[0], "shape"):
                total += int(item[0].shape[0])
            else:
                return None
        return total
    return None


def _batches(data: Any) -> Iterable[Batch]:
    """Keep one-shot iterators one-shot (``iter_batches`` would store them)."""
    if _chunking.is_one_shot(data):
        return (_as_batch(item) for item in data)
    return iter_batches(data)


def _as_batch(item: Any) -> Batch:
    if isinstance(item, Batch):
        return item
    batches = iter_batches(item)
    if isinstance(batches, list) and len(batches) == 1:
        return batches[0]
    raise TypeError(f"expected every element to be a Batch or an (x, y) pair, got {type(item)}")


@final
class SequentialInfluenceCalculator:
    """Influences over iterables of batches, one block at a time.

    Wraps a fitted influence model. Both sides take any iterable of batches
    (``Batch``, ``(x, y)`` pairs, a torch ``DataLoader``, chunk iterators of
    numpy, jax or cupy arrays) or one ``Batch`` / ``(x, y)`` pair. They are
    regrouped into chunks of ``test_chunk_size`` and ``train_chunk_size``
    samples (default: from the model's memory budget, see
    :mod:`xinfluence._chunking`); at any time the calculator holds one test
    chunk's factors, one training chunk's gradients and one output block.

    The methods return a :class:`LazyInfluences`: nothing is computed until
    ``compute()`` (an array of the provider's namespace), ``to_zarr(store)``
    (block by block, resumable) or a streaming reduction (``top_k``,
    ``sum``, ``mean``). The training side is passed over once per test chunk:
    it must be re-iterable (a list, a DataLoader) when there is more than one.

    Args:
        model: a fitted influence model.
        progress: show a tqdm bar over blocks (silent without tqdm).
        test_chunk_size, train_chunk_size: samples per chunk, overriding the budget.
    """

    def __init__(
        self,
        model: ComposableInfluence,
        *,
        progress: bool = True,
        test_chunk_size: int | None = None,
        train_chunk_size: int | None = None,
    ):
        from ..influence import ComposableInfluence

        if not isinstance(model, ComposableInfluence):
            raise TypeError(f"expected an influence model, got {type(model).__name__}")
        model._fitted_mapper()  # NotFittedError now, not at compute time
        self.model = model
        self.progress = bool(progress)
        self.test_chunk_size = test_chunk_size
        self.train_chunk_size = train_chunk_size

    def influence_factors(self, test_batches: Any) -> LazyInfluences:
        """Factors ``(H + lambda I)^-1 g_t`` of the test points: ``(N_test, P)``."""
        return LazyInfluences(self, "factors", test_batches, None, InfluenceMode.Up)

    def influences(
        self, test_batches: Any, train_batches: Any, mode: InfluenceMode | str = InfluenceMode.Up
    ) -> LazyInfluences:
        """Influences of the training points on the test points: ``(N_test, N)``
        (up) or ``(N_test, N, *D)`` (perturbation)."""
        return LazyInfluences(
            self, "influences", test_batches, train_batches, InfluenceMode.parse(mode)
        )

    def influences_from_factors(
        self,
        factors: Array | Mapping[str, Array],
        train_batches: Any,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> LazyInfluences:
        """Influences from precomputed factors ``(N_test, P)`` (or a dict by block)."""
        xp = self.model.gradient_provider.xp
        values = factors.values() if isinstance(factors, Mapping) else [factors]
        for value in values:
            _xp.check_namespace(value, xp=xp, what="factors")
        return LazyInfluences(
            self, "from_factors", factors, train_batches, InfluenceMode.parse(mode)
        )

    def self_influence(self, train_batches: Any) -> Array:
        """``I[j, j] = g_j^T (H + lambda I)^-1 g_j`` per training point, ``(N,)``:
        the memorisation (mislabel) score, one chunk at a time, without the
        ``(N, N)`` matrix."""
        model = self.model
        gp = model.gradient_provider
        xp = gp.xp
        mapper = model._fitted_mapper()
        first, data = _peek(_batches(train_batches), "self_influence")
        plan = self._plan(
            gp.prepare_batch(first), InfluenceMode.Up, n_test=_n_samples(train_batches)
        )
        out: list[Array] = []
        bar = progress_bar(self.progress, total=None, desc="self-influence")
        try:
            for _, chunk in _chunking.rebatch(data, plan.test_rows, gp):
                total = None
                for comp in mapper.composable_block_dict.values():
                    grads = comp.gp.flat_grads(chunk)
                    term = xp.sum(comp.op.apply(grads) * grads, axis=-1)
                    total = term if total is None else total + term
                assert total is not None
                out.append(_xp.check_finite(total, xp=xp, what="self-influence"))
                bar.update(1)
        finally:
            bar.close()
        return out[0] if len(out) == 1 else xp.concat(out, axis=0)

    def _plan(
        self, sample: Batch, mode: InfluenceMode, n_test: int | None = None, **kw: Any
    ) -> _chunking.ChunkPlan:
        return _chunking.plan_chunks(
            self.model.gradient_provider,
            sample,
            mode,
            budget=_chunking.model_budget(self.model),
            test_rows=kw.get("test_rows", self.test_chunk_size),
            train_rows=self.train_chunk_size,
            n_test=n_test,
        )


@final
class LazyInfluences:
    """A result of :class:`SequentialInfluenceCalculator`, computed on demand.

    Every call passes over the data again (a one-shot generator serves once).
    ``blocks_computed`` counts the blocks the last call computed.
    """

    def __init__(
        self,
        calc: SequentialInfluenceCalculator,
        kind: str,
        test: Any,
        train: Any,
        mode: InfluenceMode,
    ):
        self.calc, self.kind, self.mode = calc, kind, mode
        self._test = test if kind == "from_factors" else _batches(test)
        self._train = None if train is None else _batches(train)
        self._used = False
        self.blocks_computed = 0
        self.blocks_resumed = 0
        self.blocks_total: int | None = None

    # -- the block loop ------------------------------------------------------
    def _sources(self) -> tuple[Any, Any]:
        one_shot = _chunking.is_one_shot(self._test) or _chunking.is_one_shot(self._train)
        if self._used and one_shot:
            raise ValueError(
                "this result was made from a one-shot generator that is now exhausted: "
                "pass a re-iterable (a list, a DataLoader) to compute it more than once"
            )
        self._used = True
        return self._test, self._train

    def _layout(self) -> tuple[_chunking.ChunkPlan, Any, Any, Batch | None]:
        gp = self.calc.model.gradient_provider
        test, train = self._sources()
        first_train = None
        if train is not None:
            first_train, train = _peek(train, "influences (training points)")
            first_train = gp.prepare_batch(first_train)
        if self.kind == "from_factors":
            n_test = _factor_rows(test)
            assert first_train is not None
            rows = self.calc.test_chunk_size or max(n_test, 1)
            plan = self.calc._plan(first_train, self.mode, test_rows=rows)
        else:
            first, test = _peek(test, "influences (test points)")
            first = gp.prepare_batch(first)
            sample = first_train if first_train is not None else first
            plan = self.calc._plan(sample, self.mode, n_test=_n_samples(self._test))
        return plan, test, train, first_train

    def _test_chunks(self, test: Any, rows: int) -> Iterator[tuple[int, Any]]:
        gp = self.calc.model.gradient_provider
        if self.kind == "from_factors":
            n = _factor_rows(test)
            for r0 in range(0, n, rows):
                r1 = min(r0 + rows, n)
                if isinstance(test, Mapping):
                    yield r0, {k: v[r0:r1, ...] for k, v in test.items()}
                else:
                    yield r0, test[r0:r1, ...]
            return
        trailing = None
        for r0, chunk in _chunking.rebatch(test, rows, gp):
            trailing = _chunking.check_trailing(chunk, trailing, "influences (test points)")
            yield r0, chunk

    def _blocks(
        self,
        plan: _chunking.ChunkPlan,
        test: Any,
        train: Any,
        skip: Callable[[int, int, Any, Batch | None], bool] | None = None,
    ) -> Iterator[_Block]:
        model = self.calc.model
        gp = model.gradient_provider
        xp = gp.xp
        mapper = model._fitted_mapper()
        n_train: int | None = None
        passes = _chunking.PassCheck()
        for i, (r0, tchunk) in enumerate(self._test_chunks(test, plan.test_rows)):
            n_rows = _rows(tchunk)
            if self.kind == "factors":
                if skip is not None and skip(i, 0, tchunk, None):
                    continue
                value = _concat_blocks(mapper.transformed_grads(tchunk), xp)
                self.blocks_computed += 1
                yield _Block(i, 0, (r0, r0 + n_rows), (0, gp.n_parameters), _finite(value, xp))
                continue
            if i > 0 and _chunking.is_one_shot(train):
                raise ValueError(
                    "the training batches are a one-shot generator, but there is more than "
                    "one test chunk, and each passes over the training data: pass a "
                    "re-iterable (a list, a DataLoader), or fewer test points per call"
                )
            factors: Any = tchunk if self.kind == "from_factors" else None
            trailing = None
            count = 0
            for j, (c0, chunk) in enumerate(_chunking.rebatch(train, plan.train_rows, gp)):
                trailing = _chunking.check_trailing(chunk, trailing, "influences (training points)")
                if j == 0:
                    passes.check(chunk)
                count = c0 + len(chunk)
                if skip is not None and skip(i, j, tchunk, chunk):
                    continue
                if factors is None:
                    factors = mapper.transformed_grads(tchunk)
                value = _chunking.sum_blocks(
                    mapper.interactions_from_transformed_grads(factors, chunk, self.mode)
                )
                self.blocks_computed += 1
                yield _Block(i, j, (r0, r0 + n_rows), (c0, count), _finite(value, xp))
            if count == 0:
                raise ValueError("influences: the training data holds no samples")
            if n_train is not None and count != n_train:
                raise ValueError(
                    f"the training data changed between passes ({n_train} samples, then "
                    f"{count}): pass a re-iterable that yields the same batches every time"
                )
            n_train = count

    def _run(self, consume: Callable[[_Block], None]) -> _chunking.ChunkPlan:
        plan, test, train, _ = self._layout()
        self.blocks_computed = 0
        bar = progress_bar(self.calc.progress, total=self._total(plan), desc=self.kind)
        try:
            for block in self._blocks(plan, test, train):
                consume(block)
                bar.update(1)
        finally:
            bar.close()
        return plan

    def _total(self, plan: _chunking.ChunkPlan) -> int | None:
        if self.kind == "from_factors":
            n_test: int | None = _factor_rows(self._test)
        else:
            n_test = _n_samples(self._test)
        if n_test is None:
            return None
        rows = math.ceil(n_test / plan.test_rows)
        if self.kind == "factors":
            return rows
        n = _n_samples(self._train)
        return None if n is None else rows * math.ceil(n / plan.train_rows)

    # -- results ---------------------------------------------------------------
    def compute(self) -> Array:
        """The whole result in memory, an array of the provider's namespace."""
        xp = self.calc.model.gradient_provider.xp
        rows: list[list[Array]] = []
        current = -1

        def consume(block: _Block) -> None:
            nonlocal current
            if block.i != current:
                rows.append([])
                current = block.i
            rows[-1].append(block.value)

        self._run(consume)
        joined = [r[0] if len(r) == 1 else xp.concat(r, axis=1) for r in rows]
        return joined[0] if len(joined) == 1 else xp.concat(joined, axis=0)

    def top_k(self, k: int) -> TopK:
        """The ``k`` most helpful and most harmful training points per test point
        (up mode), streaming: see :class:`~xinfluence.compute.TopK`."""
        self._reduction_check("top_k")
        reducer = TopKReducer(k, self.calc.model.gradient_provider.xp)
        self._run(lambda b: reducer.update(b.i, b.cols[0], b.value))
        return reducer.result()

    def sum(self) -> Array:
        """Sum over the test points per training point, ``(N,)`` (up) or ``(N, *D)``."""
        self._reduction_check("sum")
        reducer = ColumnSumReducer(self.calc.model.gradient_provider.xp)
        self._run(lambda b: reducer.update(b.i, b.cols[0], b.value))
        return reducer.result()

    def mean(self) -> Array:
        """Mean over the test points per training point, ``(N,)`` (up) or ``(N, *D)``."""
        self._reduction_check("mean")
        reducer = ColumnSumReducer(self.calc.model.gradient_provider.xp)
        self._run(lambda b: reducer.update(b.i, b.cols[0], b.value))
        return reducer.result() / reducer.n_rows

    def _reduction_check(self, name: str) -> None:
        if self.kind == "factors":
            raise ValueError(f"{name} reduces influences over test points, not factors")

    def to_zarr(
        self,
        store: Any,
        *,
        overwrite: bool = False,
        on_block: Callable[[int, int], None] | None = None,
    ) -> Any:
        """Write the result block by block to a zarr store and return the zarr array.

        ``store`` is a directory path (a local store, no server needed) or any
        zarr store. A rerun on the same store after an interruption computes only
        the blocks not yet recorded as finished; a store written with other data,
        another model or other options raises
        :class:`~xinfluence.compute.StoreMismatchError` (``overwrite=True``
        starts afresh, but only on a store that xinfluence wrote or an empty
        directory: anything else is refused). ``on_block(i, j)`` is called after
        each block is written and recorded.

        Each finished block is recorded with a checksum of its values; a rerun
        verifies them and recomputes damaged blocks (with a warning), and
        :func:`~xinfluence.compute.open_influences` verifies them on reading. A
        local directory is locked while a run writes to it: a second writer
        raises :class:`~xinfluence.compute.StoreLockedError`. After the call,
        ``blocks_resumed`` counts the blocks that were already done and
        ``blocks_total`` all blocks (None where the data's size is unknown).
        """
        model = self.calc.model
        mapper = model._fitted_mapper()
        plan, test, train, first_train = self._layout()
        trailing: list[int] = []
        if self.mode is InfluenceMode.Perturbation and first_train is not None:
            trailing = [int(d) for d in first_train.x.shape[1:]]
        fingerprint = {
            **_store.options_fingerprint(model, self.kind, self.mode),
            "trailing": trailing,
            "test_rows": plan.test_rows,
            "train_rows": plan.train_rows if self.kind != "factors" else None,
        }
        bs = _store.open_store(store, fingerprint, overwrite=overwrite)
        try:
            return self._write(bs, plan, test, train, first_train, trailing, mapper, on_block)
        finally:
            bs.close()

    def _write(
        self,
        bs: _store.BlockStore,
        plan: _chunking.ChunkPlan,
        test: Any,
        train: Any,
        first_train: Batch | None,
        trailing: list[int],
        mapper: Any,
        on_block: Callable[[int, int], None] | None,
    ) -> Any:
        progress = self.calc.progress
        probe_test, probe_train = self._probe(test, first_train, mapper)
        bs.check_probe(
            "probe_test",
            probe_test,
            "another model, other parameters, another fit or other test data (the factors "
            "of the first test point differ)",
        )
        if probe_train is not None:
            bs.check_probe(
                "probe_train",
                probe_train,
                "other training data or other parameters (the gradient of the first "
                "training point differs)",
            )
        _store.warn_damaged(bs.drop_damaged(), what="the store", stacklevel=3)
        total = self._total(plan)
        self.blocks_resumed = len(bs.done)
        self.blocks_total = total
        of = "" if total is None else f" of {total}"
        if self.blocks_resumed:
            note(progress, f"resuming: {self.blocks_resumed}{of} blocks done")
        # digests of the current test chunk and of the training chunk just checked:
        # _blocks calls skip() right before it computes a block
        last: dict[str, Any] = {"i": -1, "test": "", "train": ""}

        def skip(i: int, j: int, tchunk: Any, chunk: Batch | None) -> bool:
            if last["i"] != i:
                last["i"], last["test"] = i, _digest_test(tchunk)
            last["train"] = "" if chunk is None else _store.digest(chunk)
            return bs.check_done(i, j, last["test"], last["train"])

        self.blocks_computed = 0
        bar = progress_bar(progress, total=total, desc="to_zarr", initial=self.blocks_resumed)
        try:
            for block in self._blocks(plan, test, train, skip):
                record = {
                    "test": last["test"],
                    "train": last["train"],
                    "rows": list(block.rows),
                    "cols": list(block.cols),
                }
                # zarr chunks = blocks (only the last row / column of blocks is shorter)
                rows = block.rows[1] - block.rows[0] if block.i == 0 else plan.test_rows
                cols = block.cols[1] - block.cols[0] if block.j == 0 else plan.train_rows
                chunks = (rows, cols, *trailing)
                value = _xp.to_numpy(block.value)
                bs.write(block.i, block.j, block.rows, block.cols, value, chunks, record)
                if on_block is not None:
                    on_block(block.i, block.j)
                bar.update(1)
        finally:
            bar.close()
        if self.blocks_computed == 0:
            note(progress, f"nothing to compute: all {len(bs.done)} blocks of the store are done")
        records = list(bs.done.values())
        shape = (
            max(r["rows"][1] for r in records),
            max(r["cols"][1] for r in records),
            *trailing,
        )
        return bs.finish(shape)

    def _probe(self, test: Any, first_train: Batch | None, mapper: Any) -> tuple[Any, Any]:
        """Factors of the first test point (or the given first factor row), and the
        gradient of the first training point: the store's check of the model."""
        import numpy as np

        gp = self.calc.model.gradient_provider
        xp = gp.xp
        if self.kind == "from_factors":
            if isinstance(test, Mapping):
                row = _concat_blocks({k: v[:1, ...] for k, v in test.items()}, xp)
            else:
                row = test[:1, ...]
        else:
            first, _ = _peek(test, "influences (test points)")
            first = gp.prepare_batch(first)
            one = Batch(first.x[:1, ...], first.y[:1, ...])
            row = _concat_blocks(mapper.transformed_grads(one), xp)
        train = None
        if first_train is not None:
            one = Batch(first_train.x[:1, ...], first_train.y[:1, ...])
            train = np.ravel(_xp.to_numpy(gp.flat_grads(one)))
        return np.ravel(_xp.to_numpy(row)), train


def _digest_test(tchunk: Any) -> str:
    if isinstance(tchunk, Batch):
        return _store.digest(tchunk)
    values = tchunk.values() if isinstance(tchunk, Mapping) else [tchunk]
    import hashlib

    import numpy as np

    h = hashlib.blake2b(digest_size=16)
    for v in values:
        arr = np.ascontiguousarray(_xp.to_numpy(v))
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _factor_rows(factors: Any) -> int:
    if isinstance(factors, Mapping):
        return int(next(iter(factors.values())).shape[0])
    return int(factors.shape[0])


def _rows(chunk: Any) -> int:
    if isinstance(chunk, Batch):
        return len(chunk)
    return _factor_rows(chunk)


def _concat_blocks(by_block: Mapping[str, Array], xp: Any) -> Array:
    values = list(by_block.values())
    return values[0] if len(values) == 1 else xp.concat(values, axis=-1)


def _finite(value: Array, xp: Any) -> Array:
    return _xp.check_finite(
        value, xp=xp, what="influences (gradients or curvature gave NaN or inf)"
    )
