""":class:`ComposableInfluence`, the base of every influence model, and the
option types shared by the models.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import numpy as np

from .. import _chunking, _io, _xp
from .._state import PicklableState
from .._xp import Array
from ..blocks import resolve_block_structure, resolve_regularization
from ..curvature import Curvature, Dataset, make_curvature
from ..errors import NonFiniteError, NotFittedError, StaleFitError
from ..types import (
    Batch,
    BlockMapper,
    GradientProvider,
    InfluenceMode,
    Operator,
    OperatorGradientComposition,
    iter_batches,
)

BlockStructure = str | Mapping[str, Sequence[str]]
Regularization = float | Mapping[str, float]
_M = TypeVar("_M", bound="ComposableInfluence")


class _Never:
    """A fit version no provider gives: a copy of a stale model stays stale."""

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__


_NEVER = _Never()


class ComposableInfluence(PicklableState, ABC):
    """An influence model assembled from per-block operator-gradient compositions.

    Subclasses say how to build the operator of one block in
    :meth:`_create_operator`; everything else (data handling, blocks, modes,
    validation) lives here.

    The parameters are frozen at ``fit``: a query after they changed (an
    optimizer step, ``load_state_dict``) raises
    :class:`~xinfluence.errors.StaleFitError`. Fitted models pickle and
    deep-copy; :meth:`save` and :meth:`load` write and read the fitted state
    without pickle.

    Queries work in chunks sized from a memory budget (bytes): the attribute
    ``memory_budget`` (None: :func:`xinfluence.memory_budget`, 1 GiB by
    default). They hold the result plus one test chunk's factors, one training
    chunk's gradients and one output block, never all ``(N, P)`` gradients.
    With iterative solvers (CG, LiSSA), test points solved in separate chunks
    agree with one joint solve to the solver's tolerance.
    """

    #: Bytes one chunk of a query may hold; None uses the global budget.
    memory_budget: int | None = None

    # whether second_order matters (IdentityInfluence has no curvature)
    _uses_curvature = True
    _init_kwargs: dict[str, Any]
    _fit_version: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # __new__ below takes (*args, **kwargs): give each model the signature of its
        # own __init__ (for inspect.signature, help() and the command line's checks)
        super().__init_subclass__(**kwargs)
        sig = inspect.signature(cls.__init__)
        cls.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore[attr-defined]
        # the public models, by the name a saved file records, for load()
        package = __package__.partition(".")[0] + "."  # xinfluence.influence, .projection
        if cls.__module__.startswith(package) and not cls.__name__.startswith("_"):
            _io.MODELS[cls.__name__] = cls

    def __new__(cls: type[_M], *args: Any, **kwargs: Any) -> _M:
        # the keyword options, for save(): load() calls the constructor with them
        self = super().__new__(cls)
        self._init_kwargs = dict(kwargs)
        return self

    # Setting the fitted mapper (in fit, or a subclass's fit) records the
    # parameters' version, which every query compares.
    @property
    def _mapper(self) -> BlockMapper | None:
        return self.__dict__.get("_fitted")

    @_mapper.setter
    def _mapper(self, mapper: BlockMapper | None) -> None:
        self._fitted = mapper
        self._fit_version = None if mapper is None else self._parameter_state()

    def _parameter_state(self) -> tuple[Any, Any]:
        """The provider's version token and value checksum (see :meth:`_is_fresh`)."""
        gp = self.gradient_provider
        return gp.parameter_version(), gp.parameter_checksum()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_stale"] = self._mapper is not None and not self._is_fresh()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        stale = state.pop("_stale", False)
        super().__setstate__(state)
        if self._mapper is not None:  # torch version counters restart in a copy
            self._fit_version = _NEVER if stale else self._parameter_state()

    def _is_fresh(self) -> bool:
        # the version first (cheap, and enough for most changes); the checksum for
        # what versions miss (torch: updates through p.data)
        fit = self._fit_version
        if not isinstance(fit, tuple) or len(fit) != 2:
            return False
        gp = self.gradient_provider
        return bool(gp.parameter_version() == fit[0]) and bool(gp.parameter_checksum() == fit[1])

    def _check_fresh(self) -> None:
        if not self._is_fresh():
            raise StaleFitError(
                f"the model's parameters changed after {type(self).__name__}.fit (an optimizer "
                "step, load_state_dict or an update through p.data, say): the fitted "
                "curvature belongs to the old parameters and the gradients would come from "
                "the new ones. Call fit(data) again (or build the provider from a copy of "
                "the model to keep training it)"
            )

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "hessian",
    ):
        if not isinstance(gradient_provider, GradientProvider):
            raise TypeError(
                "expected a GradientProvider as first argument, got "
                f"{type(gradient_provider).__name__}"
            )
        if second_order not in ("hessian", "gauss_newton", "empirical_fisher"):
            raise ValueError(
                "second_order must be 'hessian', 'gauss_newton' or 'empirical_fisher', "
                f"got {second_order!r}"
            )
        if (
            second_order == "gauss_newton"
            and self._uses_curvature
            and not gradient_provider.supports_gauss_newton
        ):
            raise NotImplementedError(gradient_provider._no_output_message())
        self.gradient_provider = gradient_provider
        self.blocks = resolve_block_structure(gradient_provider, block_structure)
        self.regularization = resolve_regularization(regularization, self.blocks)
        self.second_order = second_order
        self._mapper = None
        self._data: Dataset | None = None

    # -- fitting -----------------------------------------------------------
    @abstractmethod
    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        """The operator approximating ``(C + regularization I)^-1`` on one block."""

    def _block_provider(self, names: tuple[str, ...]) -> GradientProvider:
        gp = self.gradient_provider
        return gp if names == gp.parameter_names else gp.restrict(names)

    def fit(self, data: Any) -> ComposableInfluence:
        """Fit the curvature on ``data``: a Batch, an ``(x, y)`` pair, or an iterable
        of those (a torch DataLoader, say). Averages are over samples."""
        dataset = Dataset(iter_batches(data), self.gradient_provider)
        self._mapper = self._compose(self._create_operators(dataset))
        self._data = dataset
        return self

    def _create_operators(self, dataset: Dataset) -> OrderedDict[str, OperatorGradientComposition]:
        """The operator of every block with its block provider, after a pass that
        checks the losses (one pass over the data per block; models that serve all
        blocks from one pass override this, and check the losses in it)."""
        n = 0
        for batch in dataset:  # NaN losses would give finite but meaningless curvatures
            self._check_losses(batch, "the training data passed to fit", offset=n)
            n += len(batch)
        if n == 0:
            raise ValueError("cannot fit on an empty dataset")
        comps: OrderedDict[str, OperatorGradientComposition] = OrderedDict()
        for block, names in self.blocks.items():
            gp = self._block_provider(names)
            op = self._create_operator(
                block, gp, dataset.with_provider(gp), self.regularization[block]
            )
            comps[block] = OperatorGradientComposition(op, gp)
        return comps

    def _compose(self, comps: OrderedDict[str, OperatorGradientComposition]) -> BlockMapper:
        """The fitted (or loaded) blocks as the mapper that queries use; models whose
        blocks share work per batch override this."""
        return BlockMapper(comps)

    @property
    def is_fitted(self) -> bool:
        return self._mapper is not None

    def with_regularization(self, regularization: Regularization) -> ComposableInfluence:
        """Change the damping; operators that can are updated without a new pass
        over the data, the others are rebuilt from the fitted data."""
        new = resolve_regularization(regularization, self.blocks)
        if self._mapper is not None:
            self._check_fresh()
            for block, comp in self._mapper.composable_block_dict.items():
                if new[block] == self.regularization[block]:
                    continue
                op = comp.op.with_regularization(new[block])
                if op is None:
                    if self._data is None:
                        raise ValueError(
                            f"block {block!r} needs the training data to change its "
                            "regularization, and this model has none: fit it again"
                        )
                    op = self._create_operator(
                        block, comp.gp, self._data.with_provider(comp.gp), new[block]
                    )
                comp.op = op
        self.regularization = new
        return self

    # -- queries -----------------------------------------------------------
    def _fitted_mapper(self) -> BlockMapper:
        if self._mapper is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit(data) first")
        self._check_fresh()
        return self._mapper

    def _batch(self, x: Any, y: Any, what: str) -> Batch:
        """The prepared batch of a query's test side; its losses are checked after
        its gradients are taken (:func:`~xinfluence._chunking.checked`)."""
        if x is None or y is None:
            raise ValueError(f"{what}: x and y must be given together")
        return self.gradient_provider.prepare_batch(Batch(x, y))

    def _check_losses(self, batch: Batch, what: str, *, offset: int = 0) -> None:
        """:class:`NonFiniteError` naming the samples whose loss is NaN or inf."""
        gp = self.gradient_provider
        if len(batch) == 0:
            return
        try:
            losses = gp.per_sample_losses(batch)
        except (IndexError, RuntimeError) as e:
            self._raise_failing_samples(batch, what, offset, e)
        if losses is None or not _xp.any_nonfinite(losses, xp=gp.xp):
            return
        bad = np.flatnonzero(~np.isfinite(_xp.to_numpy(losses))) + offset
        raise NonFiniteError(
            f"{what}: the loss is NaN or inf at sample(s) {_indices(bad)} (a class label "
            "out of range for the model's outputs, say, or an input the model cannot take); "
            "their gradients (and a curvature fitted on them) would be meaningless. Fix or drop "
            "those samples"
        )

    def _raise_failing_samples(
        self, batch: Batch, what: str, offset: int, error: Exception
    ) -> NoReturn:
        """The batch's loss raised (torch's cross-entropy on a class label out of
        range: ``index 5 is out of bounds``): find the samples whose own loss raises,
        one at a time, and name them in a :class:`NonFiniteError`, as for a NaN loss.
        Where every sample fails alone (or none, or the first 16), the error is not
        about samples: it propagates unchanged."""
        gp = self.gradient_provider
        bad = []
        for i in range(len(batch)):
            try:
                gp.per_sample_losses(Batch(batch.x[i : i + 1, ...], batch.y[i : i + 1, ...]))
            except (IndexError, RuntimeError):
                bad.append(i)
            if len(bad) == i + 1 == 16:  # the first 16 all fail: not about samples
                raise error
        if not bad or len(bad) == len(batch):
            raise error
        raise NonFiniteError(
            f"{what}: the loss cannot be computed at sample(s) "
            f"{_indices(np.asarray(bad) + offset)} ({type(error).__name__}: {error}); a "
            "class label out of range for the model's outputs, say (labels must lie in "
            "0 .. n_classes - 1). Fix or drop those samples"
        ) from error

    def _finite(self, results: OrderedDict[str, Array], what: str) -> OrderedDict[str, Array]:
        xp = self.gradient_provider.xp
        for block, value in results.items():
            if not _xp.any_nonfinite(value, xp=xp):
                continue
            bad = ~np.isfinite(_xp.to_numpy(value))
            rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
            where = f"first-argument sample(s) {_indices(rows)}"
            if what == "influences" and bad.ndim >= 2:
                cols = np.flatnonzero(bad.reshape(*bad.shape[:2], -1).any(axis=(0, 2)))
                where = f"test point(s) {_indices(rows)} and training point(s) {_indices(cols)}"
            raise NonFiniteError(
                f"{what} of block {block!r} contain NaN or inf at {where}: their gradients "
                "or the fitted curvature are not finite"
            )
        return results

    def influence_factors_by_block(self, x: Array, y: Array) -> OrderedDict[str, Array]:
        """``(H_b + lambda_b I)^-1 g_i`` per block: ``(N, P_b)`` each."""
        mapper = self._fitted_mapper()
        what = "influence_factors"
        batch = self._batch(x, y, what)
        factors = _chunking.checked(
            self, batch, what, 0, _chunking.chunked_factors, self, mapper, batch
        )
        return self._finite(factors, "influence factors")

    def influence_factors(self, x: Array, y: Array) -> Array:
        """The per-block factors concatenated in block order: ``(N, P)``."""
        by_block = self.influence_factors_by_block(x, y)
        values = list(by_block.values())
        if len(values) == 1:
            return values[0]
        return self.gradient_provider.xp.concat(values, axis=-1)

    def influences_by_block(
        self,
        x_test: Array,
        y_test: Array,
        x: Array | None = None,
        y: Array | None = None,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> OrderedDict[str, Array]:
        """Per-block influences of ``(x, y)`` (default: the test points themselves)
        on the test points: ``(N_test, N)`` (up) or ``(N_test, N, *D)``.

        The training side may also be anything ``fit`` accepts, passed as ``x``
        with ``y=None``: a Batch, an ``(x, y)`` pair, or an iterable of those (a
        DataLoader); its batches are processed in chunks."""
        mode = InfluenceMode.parse(mode)
        mapper = self._fitted_mapper()
        what = "influences (test points)"
        left = self._batch(x_test, y_test, what)
        scores = _chunking.checked(
            self, left, what, 0, _chunking.chunked_interactions, self, mapper, left, x, y, mode
        )
        return self._finite(scores, "influences")

    def influences(
        self,
        x_test: Array,
        y_test: Array,
        x: Array | None = None,
        y: Array | None = None,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> Array:
        """Sum of :meth:`influences_by_block` over the blocks."""
        return _sum(self.influences_by_block(x_test, y_test, x, y, mode))

    def influences_from_factors_by_block(
        self,
        factors: Array | Mapping[str, Array],
        x: Any,
        y: Array | None = None,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> OrderedDict[str, Array]:
        """Per-block influences from precomputed factors (``(N_test, P)`` or a dict).

        The training side is ``(x, y)``, or anything ``fit`` accepts as ``x`` with
        ``y=None``; it is processed in chunks."""
        mode = InfluenceMode.parse(mode)
        mapper = self._fitted_mapper()
        xp = self.gradient_provider.xp
        for value in factors.values() if isinstance(factors, Mapping) else [factors]:
            _xp.check_namespace(value, xp=xp, what="factors")
        return self._finite(
            _chunking.chunked_from_factors(self, mapper, factors, x, y, mode), "influences"
        )

    def influences_from_factors(
        self,
        factors: Array | Mapping[str, Array],
        x: Any,
        y: Array | None = None,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> Array:
        """Sum of :meth:`influences_from_factors_by_block` over the blocks."""
        return _sum(self.influences_from_factors_by_block(factors, x, y, mode))

    # -- saving ----------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the fitted state to ``path`` as one ``.npz`` file, without pickle.

        Saved: the options, blocks and regularizations, the parameter names,
        shapes, dtype and a SHA-256 fingerprint of their values, and each block's
        operator: the dense curvature and its Cholesky factor (Direct),
        eigenpairs (Arnoldi, Nyström), Kronecker bases and eigenvalues (EK-FAC).
        Models that solve at query time from the training data (CG, LiSSA,
        DataInf) save that data (the prepared batches), so the file holds the
        training set. Load with :meth:`load` or :func:`xinfluence.load`.

        Raises:
            NotFittedError: before ``fit``.
            StaleFitError: the parameters changed since ``fit``.
        """
        _io.save(self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        gradient_provider: GradientProvider,
        /,
        *,
        on_mismatch: str = "raise",
    ) -> ComposableInfluence:
        """Read a model written by :meth:`save`, for ``gradient_provider`` (the model
        with the parameters it was fitted on). It answers queries as the saved
        model did, bit for bit on the same backend and device.

        Args:
            path: the file written by :meth:`save`.
            gradient_provider: a provider of the same parameters (names, shapes,
                dtype) as the saved one.
            on_mismatch: what to do when the parameter values differ from the
                saved fingerprint: ``"raise"`` (default), ``"warn"`` or ``"ignore"``.

        Raises:
            ValueError: not a saved model, or parameter names, shapes or dtype differ.
            CorruptFileError: the file is empty, truncated or damaged, or an array or
                the metadata differ from the digests recorded at save (a ValueError).
            TypeError: the file holds another model class than ``cls``.
            StaleFitError: the parameter values differ (``on_mismatch="raise"``).
        """
        expected = None if cls is ComposableInfluence else cls
        return _io.load(path, gradient_provider, expected=expected, on_mismatch=on_mismatch)

    def __repr__(self) -> str:
        state = "fitted" if self.is_fitted else "not fitted"
        return (
            f"{type(self).__name__}(blocks={list(self.blocks)}, "
            f"second_order={self.second_order!r}, {state})"
        )


def _indices(idx: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return f"[{shown}{', ...' if len(idx) > limit else ''}] ({len(idx)} in all)"


def _sum(by_block: OrderedDict[str, Array]) -> Array:
    values = iter(by_block.values())
    total = next(values)
    for v in values:
        total = total + v
    return total


class _CurvatureInfluence(ComposableInfluence):
    """Models that work through products with the curvature of ``second_order``."""

    def _curvature(self, gp: GradientProvider, data: Dataset) -> Curvature:
        return make_curvature(self.second_order, gp, data)
