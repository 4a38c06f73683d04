"""The user-facing influence models.

Every model takes a :class:`~xinfluence.types.GradientProvider` first and
keyword-only options; ``fit`` builds one operator per block, queries map the
spec's compositions over the blocks.

Conventions: with ``H`` the curvature of the mean training loss named by
``second_order`` and ``lambda`` the block's regularization,

* ``"hessian"``: the Hessian;
* ``"gauss_newton"``: the generalized Gauss-Newton matrix
  ``mean_i J_i^T H_i J_i`` (``J_i = d out_i / d theta``, ``H_i = d^2 l / d out^2``
  at sample ``i``'s model output), equal to the Hessian for GLMs with canonical
  links and positive semi-definite for losses convex in the output;
* ``"empirical_fisher"``: ``mean_i g_i g_i^T`` (what ``"gauss_newton"`` meant
  before 0.2),

the influences are

* up: ``I[t, j] = g_t^T (H + lambda I)^-1 g_j``, shape ``(N_test, N)``; removing
  training point ``j`` of ``n`` changes the loss at ``t`` by about ``I[t, j] / n``;
* perturbation: ``I[t, j, ...] = g_t^T (H + lambda I)^-1 d/dx d/dtheta l(z_j)``,
  shape ``(N_test, N, *x.shape[1:])``.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TypeVar, final

import numpy as np

from . import _chunking, _xp
from ._config import memory_budget
from ._state import PicklableState
from ._xp import Array, Namespace
from .blocks import resolve_block_structure, resolve_regularization
from .curvature import Curvature, Dataset, make_curvature
from .errors import NonFiniteError, NotFittedError, StaleFitError
from .linalg import block_lanczos, nystroem
from .linalg.cg import OnFailure
from .operators import (
    CgOperator,
    CgOptions,
    DirectOperator,
    EkfacOperator,
    IdentityOperator,
    InverseHarmonicMeanOperator,
    LissaOperator,
    LissaOptions,
    LowRankOperator,
)
from .types import (
    Batch,
    BlockMapper,
    GradientProvider,
    InfluenceMode,
    KroneckerFactorProvider,
    Operator,
    OperatorGradientComposition,
    iter_batches,
)

__all__ = [
    "ComposableInfluence",
    "DirectInfluence",
    "IdentityInfluence",
    "CgInfluence",
    "LissaInfluence",
    "ArnoldiInfluence",
    "NystroemSketchInfluence",
    "InverseHarmonicMeanInfluence",
    "EkfacInfluence",
]

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
        self._mapper = BlockMapper(comps)
        self._data = dataset
        return self

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
        if x is None or y is None:
            raise ValueError(f"{what}: x and y must be given together")
        batch = self.gradient_provider.prepare_batch(Batch(x, y))
        self._check_losses(batch, what)
        return batch

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
        batch = self._batch(x, y, "influence_factors")
        return self._finite(_chunking.chunked_factors(self, mapper, batch), "influence factors")

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
        left = self._batch(x_test, y_test, "influences (test points)")
        right = None
        if x is not None or y is not None:
            right = _chunking.as_batches(x, y, "influences (training points)")
        return self._finite(
            _chunking.chunked_interactions(self, mapper, left, right, mode), "influences"
        )

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
        right = _chunking.as_batches(x, y, "influences_from_factors")
        return self._finite(
            _chunking.chunked_from_factors(self, mapper, factors, right, mode), "influences"
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
        from . import _io

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
        from . import _io

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


@final
class DirectInfluence(ComposableInfluence):
    """Exact influence: the dense curvature of each block, Cholesky-factorised in
    ``fit``. Memory ``O(P_b^2)`` and time ``O(P_b^3)`` per block.

    ``with_regularization`` refactorises the stored curvature without a new
    pass over the data. A curvature that is not positive definite after
    regularization raises :class:`~xinfluence.errors.NotPositiveDefiniteError`
    with its smallest eigenvalue.
    """

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        curvature = make_curvature(self.second_order, gp, data).dense()
        return DirectOperator(curvature, regularization, block=block)


@final
class IdentityInfluence(ComposableInfluence):
    """No curvature: ``I[t, j] = g_t^T g_j`` (the gradient-similarity baseline).

    ``regularization`` and ``second_order`` have no effect.
    """

    _uses_curvature = False

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        return IdentityOperator(gp.n_parameters)


class _CurvatureInfluence(ComposableInfluence):
    """Models that work through products with the curvature of ``second_order``."""

    def _curvature(self, gp: GradientProvider, data: Dataset) -> Curvature:
        return make_curvature(self.second_order, gp, data)


@final
class CgInfluence(_CurvatureInfluence):
    """``(H + lambda I)^-1`` by conjugate gradients on curvature products.

    ``fit`` only records the data (and builds the preconditioner); every query
    solves for all its right-hand sides together, one pass over the training
    data (one batched curvature product) per iteration. ``solver="block"``
    (default) is block CG: the right-hand sides share one Krylov space, which
    takes far fewer iterations when there are many of them;
    ``solver="batched"`` runs independent CG recurrences side by side. Per-row
    stop: ``|r| <= max(rtol |b|, atol)``.

    Args:
        rtol, atol: tolerances of each solve. ``rtol=None`` (default) depends on
            the dtype: 1e-7 in float64, ``sqrt(eps)`` = 3.45e-4 in float32. The
            relative error of a solution is at most ``rtol * cond(H + lambda I)``;
            below about ``eps * cond`` (float64: 2.2e-16, float32: 1.2e-7 times
            the condition number) no solve in that dtype can go.
        maxiter: iteration cap (default ``10 P``); non-convergence warns with
            :class:`~xinfluence.errors.NotConvergedWarning` (or raises with
            ``on_failure="raise"``), saying whether the solve ran out of
            iterations or stalled at the dtype's precision floor. A curvature
            that is not positive definite raises
            :class:`~xinfluence.errors.NotPositiveDefiniteError` with a
            regularization that suffices (from a Lanczos bound).
        preconditioner: None, ``"jacobi"`` or ``"nystroem"`` (rank
            ``preconditioner_rank``, seeded by ``seed``).
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "hessian",
        rtol: float | None = None,
        atol: float = 0.0,
        maxiter: int | None = None,
        preconditioner: str | None = None,
        preconditioner_rank: int = 20,
        seed: int = 0,
        on_failure: OnFailure = "warn",
        solver: str = "block",
    ):
        super().__init__(
            gradient_provider,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        self._options = CgOptions(
            rtol=rtol,
            atol=atol,
            maxiter=maxiter,
            preconditioner=preconditioner,
            preconditioner_rank=preconditioner_rank,
            seed=seed,
            on_failure=on_failure,
            solver=solver,
        )

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        return CgOperator(self._curvature(gp, data), regularization, self._options)


@final
class LissaInfluence(_CurvatureInfluence):
    """LiSSA: ``h <- b + (1 - dampen) h - (H_S + lambda I) h / scale``, result ``h / scale``.

    ``batch_size`` None uses all fitted data in every iteration (deterministic);
    an int samples that many training points per iteration (seeded). The
    default ``scale`` is the Lanczos estimate of the top eigenvalue plus the
    regularization (doubled with sampled batches), so it converges without
    tuning; a diverging iteration raises
    :class:`~xinfluence.errors.DivergenceError` naming the scale to use, or, where
    ``H + lambda I`` has a negative eigenvalue (no scale helps), the
    regularization that suffices.

    It stops when ``|g - (H + mu I) x| <= rtol |g|`` for every right-hand side
    ``g``, with ``mu = lambda + dampen * scale``; ``rtol=None`` (default) is 1e-6
    in float64 and ``sqrt(eps)`` in float32, and the relative error of ``x`` is
    at most ``rtol * cond(H + mu I)``. On the full data the residual is exact at
    every iteration (it is the step); with ``batch_size`` the full-data residual
    is computed every ``ceil(n / batch_size)`` iterations. Not reaching ``rtol``
    in ``maxiter`` iterations warns with
    :class:`~xinfluence.errors.NotConvergedWarning` and the residual reached.
    ``scale`` must be finite and positive, ``dampen`` in ``[0, 1)``.
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "hessian",
        maxiter: int = 1000,
        scale: float | None = None,
        dampen: float = 0.0,
        rtol: float | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        on_failure: str = "warn",
    ):
        super().__init__(
            gradient_provider,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        self._options = LissaOptions(
            maxiter=maxiter,
            scale=scale,
            dampen=dampen,
            rtol=rtol,
            batch_size=batch_size,
            seed=seed,
            on_failure=on_failure,
        )

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        return LissaOperator(self._curvature(gp, data), regularization, self._options)


@final
class ArnoldiInfluence(_CurvatureInfluence):
    """Low-rank influence from the ``rank`` eigenpairs of largest magnitude of the
    curvature, by block Lanczos with full re-orthogonalisation
    (:func:`~xinfluence.linalg.block_lanczos`; Schioppa et al. 2022 use the
    single-vector Arnoldi iteration).

    ``(H + lambda I)^-1 ~ V diag(1 / (lambda_i + lambda)) V^T``; with
    ``use_woodbury=True`` the directions outside ``V`` get ``1 / lambda`` (the
    exact inverse of the damped low-rank curvature). Influences go through
    ``jacobian_prod``: per-sample gradients of the whole training set are never
    held at once.

    Each Lanczos step is one curvature product with ``block_size`` vectors at
    once (default ``min(rank, 8)``: cheaper per vector than single products;
    larger blocks need a larger Krylov space for the same pairs). A block finds
    an eigenvalue's copies up to ``block_size`` times; one found that often may
    have more, so the default block then reruns with ``rank`` vectors, and an
    explicit one warns. The Krylov space is extended until the Ritz residuals of the
    ``rank`` pairs satisfy ``|H u - theta u| <= tol max|theta|``, or until it
    reaches ``krylov_dimension`` vectors (default ``min(P, max(10 rank, 100))``,
    within the memory budget); then :class:`~xinfluence.errors.NotConvergedWarning`
    names the residuals reached (``on_failure="raise"`` raises instead).

    Args:
        rank: number of eigenpairs.
        krylov_dimension: the largest Krylov space (the budget).
        tol: relative Ritz residual tolerance (default 1e-6: eigenvalues to
            about ``1e-12 |H|^2 / gap``, eigenvectors to ``1e-6 |H| / gap``).
        block_size: vectors per curvature product (default ``min(rank, 8)``).
        use_woodbury: add ``(I - V V^T) / lambda``.
        seed: seed of the start block.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when the budget ends
            before convergence.
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "hessian",
        rank: int = 10,
        krylov_dimension: int | None = None,
        tol: float = 1e-6,
        block_size: int | None = None,
        use_woodbury: bool = False,
        seed: int = 0,
        on_failure: OnFailure = "warn",
    ):
        super().__init__(
            gradient_provider,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size must be >= 1 or None, got {block_size}")
        if on_failure not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
        self.rank, self.krylov_dimension, self.tol, self.seed = rank, krylov_dimension, tol, seed
        self.block_size, self.on_failure = block_size, on_failure
        self.use_woodbury = use_woodbury

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        curvature = self._curvature(gp, data)
        curvature.prepare_products()  # Lanczos: one pass per block of Krylov vectors
        rank = min(self.rank, curvature.size)
        krylov = self.krylov_dimension
        eig = block_lanczos(
            curvature.matmat,
            curvature.size,
            rank=rank,
            block_size=None if self.block_size is None else min(self.block_size, curvature.size),
            krylov_dimension=None if krylov is None else max(min(krylov, curvature.size), rank),
            tol=self.tol,
            seed=self.seed,
            xp=curvature.xp,
            dtype=curvature.dtype,
            device=curvature.device,
            on_failure=self.on_failure,
        )
        op = LowRankOperator(
            eig.eigenvalues,
            eig.eigenvectors,
            regularization,
            woodbury=self.use_woodbury,
            block=block,
        )
        op.eigen_result = eig  # diagnostics: residuals, Krylov dimension, products
        return op


@final
class NystroemSketchInfluence(_CurvatureInfluence):
    """Randomized Nyström sketch ``C ~ U diag(lambda) U^T`` (rank ``rank``, seeded)
    and the exact inverse of the damped sketch by Woodbury:
    ``U diag(1 / (lambda_i + mu)) U^T + (I - U U^T) / mu``.

    Needs a positive semi-definite curvature (``"gauss_newton"`` or ``"empirical_fisher"``,
    or a convex loss) and ``regularization > 0`` below full rank.
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "hessian",
        rank: int = 10,
        seed: int = 0,
    ):
        super().__init__(
            gradient_provider,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank, self.seed = rank, seed

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        curvature = self._curvature(gp, data)
        sketch = nystroem(
            curvature.matmat,
            curvature.size,
            rank=min(self.rank, curvature.size),
            seed=self.seed,
            xp=curvature.xp,
            dtype=curvature.dtype,
            device=curvature.device,
        )
        return LowRankOperator(
            sketch.eigenvalues, sketch.eigenvectors, regularization, woodbury=True, block=block
        )


@final
class InverseHarmonicMeanInfluence(ComposableInfluence):
    """DataInf (Kwon et al. 2024): ``(H + lambda I)^-1`` replaced by the mean of the
    per-sample inverses ``mean_i (g_i g_i^T + lambda I)^-1``, applied in closed
    form by Sherman-Morrison. Needs ``regularization > 0``; it is built from
    gradients only, so ``second_order`` must be ``"empirical_fisher"`` (the default
    here).
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "full",
        second_order: str = "empirical_fisher",
    ):
        if second_order != "empirical_fisher":
            raise ValueError(
                "InverseHarmonicMeanInfluence is built from per-sample gradients only: "
                f"second_order must be 'empirical_fisher', got {second_order!r}"
            )
        super().__init__(
            gradient_provider,
            regularization=regularization,
            block_structure=block_structure,
            second_order=second_order,
        )
        for block, reg in self.regularization.items():
            if not reg > 0:
                raise ValueError(
                    f"InverseHarmonicMeanInfluence needs regularization > 0 (block {block!r})"
                )

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:
        return InverseHarmonicMeanOperator(gp, data, regularization)


def _augmented(a: Array, /, *, xp: Namespace, bias: bool) -> Array:
    """The layer inputs ``a`` (..., I), with a trailing 1 where the layer has a bias."""
    if not bias:
        return a
    ones = xp.ones((*a.shape[:-1], 1), dtype=a.dtype, device=_xp.device_of(a))
    return xp.concat([a, ones], axis=-1)


def _kfac_accumulate(
    a: Array, s: Array, previous: tuple[Array, Array] | None, /, *, xp: Namespace, bias: bool
) -> tuple[Array, Array]:
    """The K-FAC sums ``(sum a a^T, sum s s^T / T)`` of one batch added to ``previous``.

    Dense layers give a (N, I), s (N, C, O); convolutions (KFC) the patches and
    output gradients at T positions, a (N, T, I), s (N, C, T, O), with the
    per-sample weight gradients sum_t s_nct a_nt^T: A = mean_n sum_t a a^T,
    S = mean_n (1/T) sum_{c,t} s s^T. C = 1 for the empirical Fisher.
    """
    a = _augmented(a, xp=xp, bias=bias)
    positions = 1 if a.ndim == 2 else int(a.shape[1])
    a2 = xp.reshape(a, (-1, a.shape[-1]))
    s2 = xp.reshape(s, (-1, s.shape[-1]))  # all C columns (and T positions)
    a_cov = xp.matrix_transpose(a2) @ a2
    s_cov = xp.matrix_transpose(s2) @ s2 / positions
    if previous is None:
        return a_cov, s_cov
    return previous[0] + a_cov, previous[1] + s_cov


def _kfac_eigenbases(
    a_cov: Array, s_cov: Array, n: float, /, *, xp: Namespace
) -> tuple[Array, Array, Array]:
    """``(Q_S, Q_A, lambda_S lambda_A^T)`` from the K-FAC sums over ``n`` samples."""
    lam_a, q_a = xp.linalg.eigh(_xp.symmetrize(a_cov / n, xp=xp))
    lam_s, q_s = xp.linalg.eigh(_xp.symmetrize(s_cov / n, xp=xp))
    # covariances are PSD: rounding's slightly negative eigenvalues are zeros
    lam_s, lam_a = xp.clip(lam_s, min=0.0), xp.clip(lam_a, min=0.0)
    return q_s, q_a, lam_s[:, None] * lam_a[None, :]


def _ekfac_accumulate_diagonal(
    a: Array,
    s: Array,
    q_s: Array,
    q_a: Array,
    previous: Array | None,
    /,
    *,
    xp: Namespace,
    bias: bool,
) -> Array:
    """The corrected eigenvalue sums of one batch, ``sum_n (Q_S^T G_n Q_A)**2``
    (O, I'), added to ``previous``."""
    a_rot, s_rot = _augmented(a, xp=xp, bias=bias) @ q_a, s @ q_s
    if a.ndim == 2:
        # Lambda[o, i] = mean_n sum_c (Q_S^T s_nc)[o]^2 (Q_A^T a_n)[i]^2
        s_sq = xp.sum(s_rot * s_rot, axis=1)
        term = xp.matrix_transpose(s_sq) @ (a_rot * a_rot)
    else:
        term = _rotated_gradient_squares(s_rot[:, 0, ...], a_rot, xp=xp)
        for c in range(1, s_rot.shape[1]):
            term = term + _rotated_gradient_squares(s_rot[:, c, ...], a_rot, xp=xp)
    return term if previous is None else previous + term


def _rotated_gradient_squares(s_rot: Array, a_rot: Array, *, xp: Namespace) -> Array:
    """``sum_n (s_n^T a_n)**2`` ``(O, I)`` for ``s_rot`` ``(N, T, O)`` and ``a_rot``
    ``(N, T, I)`` (the rotated per-sample gradients of a convolution), over
    chunks of samples so that the ``(chunk, O, I)`` gradients fit the memory
    budget."""
    n, o, i = s_rot.shape[0], s_rot.shape[2], a_rot.shape[2]
    per_sample = 2 * o * i * (xp.finfo(s_rot.dtype).bits // 8)
    step = max(1, min(n, memory_budget() // max(per_sample, 1)))
    total = xp.zeros((o, i), dtype=s_rot.dtype, device=_xp.device_of(s_rot))
    for lo in range(0, n, step):
        g = xp.matrix_transpose(s_rot[lo : lo + step]) @ a_rot[lo : lo + step]
        total = total + xp.sum(g * g, axis=0)
    return total


@final
class EkfacInfluence(ComposableInfluence):
    """EK-FAC (George et al. 2018): per dense layer, the layer's block of the
    curvature in the Kronecker eigenbasis of its input and output-gradient
    covariances, with eigenvalues corrected on the data (``update_diagonal=True``)
    or taken as products of the factors' eigenvalues (plain K-FAC).

    ``second_order`` names the curvature whose layer blocks are approximated:

    * ``"gauss_newton"`` (default): the generalized Gauss-Newton matrix
      ``mean_i J_i^T H_i J_i``. Its layer block is exactly
      ``mean_i sum_c (s_ic s_ic^T) (x) (a_i a_i^T)``, with ``a_i`` the layer's
      input and ``s_ic`` the ``c``-th column of a square root ``H_i = L_i L_i^T``
      of the loss Hessian on the model output, back-propagated to the layer's
      output (``M`` pseudo-gradients per sample, ``M`` the output size); needs a
      loss convex in the output and the provider's ``kfac_ggn_factors``;
    * ``"empirical_fisher"``: ``mean_i g_i g_i^T``, one true gradient
      ``s_i = d l_i / d z`` per sample (the behaviour before 0.2).

    With ``update_diagonal`` the eigenvalues are the exact diagonal of the
    layer's curvature block in the Kronecker eigenbasis.

    The provider must offer the Kronecker factors: ``kfac_layers()`` (layer ->
    ``(weight name, bias name or None)``) and ``kfac_factors(batch)`` (layer ->
    inputs ``a`` ``(N, I)`` and output gradients ``s`` ``(N, O)``), plus
    ``kfac_ggn_factors(batch)`` (``s`` ``(N, C, O)``) for the Gauss-Newton
    curvature, as the torch provider does for ``nn.Linear`` layers, the jax
    provider for declared dense layers and the array-API GLMs for their one
    layer. Blocks are the layers; every parameter must belong to one (freeze or
    restrict the others). ``fit`` makes one pass over the data for the factors
    and, with ``update_diagonal``, a second one for the eigenvalues.
    inputs ``a`` ``(N, I)`` and output gradients ``s`` ``(N, O)``), as the torch
    provider does for ``nn.Linear`` layers, the jax provider for declared dense
    layers and the array-API GLMs for their one layer. Blocks are the layers;
    every parameter must belong to one (freeze or restrict the others).

    Convolutions (the torch provider's ``nn.Conv2d`` layers, the jax provider's
    declared ``conv_layers``) give their factors
    per output position, ``a`` ``(N, T, I)`` and ``s`` ``(N, T, O)``; their
    factors follow KFC (Grosse & Martens 2016): ``A = mean_n sum_t a_nt a_nt^T``,
    ``S = mean_n (1/T) sum_t s_nt s_nt^T``, and the corrected eigenvalues are
    ``mean_n (Q_S^T G_n Q_A)**2`` with the exact per-sample gradients
    ``G_n = sum_t s_nt a_nt^T`` (summed over the ``C`` pseudo-gradients
    ``s_nct`` for the Gauss-Newton curvature).
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "layer",
        second_order: str = "gauss_newton",
        update_diagonal: bool = True,
    ):
        gp = gradient_provider
        if not isinstance(gp, KroneckerFactorProvider):
            raise TypeError(
                f"EkfacInfluence needs a provider with kfac_layers() and kfac_factors(); "
                f"{type(gp).__name__} has none"
            )
        if block_structure != "layer":
            raise ValueError(
                "EkfacInfluence works on dense-layer blocks only: block_structure must be "
                f"'layer', got {block_structure!r}"
            )
        if second_order not in ("gauss_newton", "empirical_fisher"):
            raise ValueError(
                "EK-FAC approximates a positive semi-definite curvature: second_order must be "
                f"'gauss_newton' or 'empirical_fisher', got {second_order!r}"
            )
        if second_order == "gauss_newton" and not callable(getattr(gp, "kfac_ggn_factors", None)):
            raise TypeError(
                f"EkfacInfluence with second_order='gauss_newton' needs a provider with "
                f"kfac_ggn_factors(); {type(gp).__name__} has none (pass "
                "second_order='empirical_fisher' to use its kfac_factors)"
            )
        layers = gp.kfac_layers()
        covered = {n for w, b in layers.values() for n in (w, b) if n is not None}
        uncovered = [n for n in gp.parameter_names if n not in covered]
        if not layers or uncovered:
            raise ValueError(
                f"EkfacInfluence needs every parameter in a dense layer; not covered: "
                f"{uncovered}. Freeze them or restrict the provider to the dense layers"
            )
        custom = OrderedDict((k, tuple(n for n in v if n is not None)) for k, v in layers.items())
        super().__init__(
            gp,
            regularization=regularization,
            block_structure=custom,
            second_order=second_order,
        )
        self.update_diagonal = bool(update_diagonal)
        self._factors: KroneckerFactorProvider = gp

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:  # pragma: no cover - fit builds all layers in one pass
        raise NotImplementedError

    def fit(self, data: Any) -> EkfacInfluence:
        gp = self.gradient_provider
        xp = gp.xp
        dataset = Dataset(iter_batches(data), gp)
        factors = self._factors
        layers = factors.kfac_layers()
        layouts = gp.kfac_layouts() if hasattr(gp, "kfac_layouts") else {}

        # Dense layers give a (N, I), s (N, C, O); convolutions (KFC) the patches
        # and output gradients at T positions, a (N, T, I), s (N, C, T, O), with
        # the per-sample weight gradients sum_t s_nct a_nt^T: A = mean_n sum_t a a^T,
        # S = mean_n (1/T) sum_{c,t} s s^T. C = 1 for the empirical Fisher.
        def layer_factors(batch: Batch) -> OrderedDict[str, tuple[Array, Array]]:
            if self.second_order == "gauss_newton":
                out = gp.kfac_ggn_factors(batch)  # type: ignore[attr-defined]
            else:
                out = OrderedDict(
                    (k, (a, s[:, None, ...])) for k, (a, s) in factors.kfac_factors(batch).items()
                )
            missing = [k for k in layers if k not in out]
            if missing:
                raise ValueError(
                    f"EkfacInfluence: the provider gave no factors for layers {missing} "
                    f"(second_order={self.second_order!r}); use second_order="
                    "'empirical_fisher' for them"
                )
            return out

        # jax: each pass is one compiled program per layer (and batch shape)
        accumulate = _xp.maybe_jit(_kfac_accumulate, xp=xp, static_argnames=("xp", "bias"))
        eigenbases = _xp.maybe_jit(_kfac_eigenbases, xp=xp)
        diagonal = _xp.maybe_jit(_ekfac_accumulate_diagonal, xp=xp, static_argnames=("xp", "bias"))
        cov: dict[str, tuple[Array, Array]] = {}
        n = 0
        for batch in dataset:
            for layer, (a, s) in layer_factors(batch).items():
                has_bias = layers[layer][1] is not None
                cov[layer] = accumulate(a, s, cov.get(layer), xp=xp, bias=has_bias)
            n += len(batch)
        if n == 0:
            raise ValueError("cannot fit on an empty dataset")
        bases = {
            layer: eigenbases(a_cov, s_cov, float(n), xp=xp)
            for layer, (a_cov, s_cov) in cov.items()
        }
        if self.update_diagonal:
            corrected: dict[str, Array] = {}
            for batch in dataset:
                for layer, (a, s) in layer_factors(batch).items():
                    q_s, q_a, _ = bases[layer]
                    has_bias = layers[layer][1] is not None
                    corrected[layer] = diagonal(
                        a, s, q_s, q_a, corrected.get(layer), xp=xp, bias=has_bias
                    )
            bases = {k: (q_s, q_a, corrected[k] / n) for k, (q_s, q_a, _) in bases.items()}
        comps: OrderedDict[str, OperatorGradientComposition] = OrderedDict()
        for layer, names in self.blocks.items():
            block_gp = self._block_provider(names)
            slices = block_gp.parameter_slices
            weight, bias = layers[layer]
            q_s, q_a, eigenvalues = bases[layer]
            op = EkfacOperator(
                q_s,
                q_a,
                _xp.check_finite(eigenvalues, xp=xp, what=f"EK-FAC eigenvalues of {layer!r}"),
                self.regularization[layer],
                weight_slice=slices[weight],
                bias_slice=None if bias is None else slices[bias],
                layout=layouts.get(layer, "oi"),
                block=layer,
            )
            comps[layer] = OperatorGradientComposition(op, block_gp)
        self._mapper = BlockMapper(comps)
        self._data = dataset
        return self
