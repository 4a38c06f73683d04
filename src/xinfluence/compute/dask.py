"""The dask calculator: blocks as tasks, on local schedulers or a cluster."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, final

import numpy as np

from .. import _chunking, _xp
from .._xp import Array
from ..types import Batch, InfluenceMode

if TYPE_CHECKING:
    from ..influence import ComposableInfluence

__all__ = ["DaskInfluenceCalculator"]


def _dask() -> Any:
    try:
        import dask
        import dask.array
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DaskInfluenceCalculator needs dask: pip install 'xinfluence[dask]'"
        ) from e
    return dask


def _enable_x64() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)


class _EnableX64:
    """Unpickles by turning on ``jax_enable_x64`` in the receiving process."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_enable_x64, ())


def _unship(_: None, model: ComposableInfluence) -> ComposableInfluence:
    return model


class _Shipped:
    """A float64 jax model as sent to dask workers: it unpickles as the model
    itself, but turns on ``jax_enable_x64`` first, so that the worker neither
    truncates the model's arrays nor the chunks to float32 (pickle builds the
    arguments of ``_unship`` in order: the switch, then the model)."""

    def __init__(self, model: ComposableInfluence):
        self.model = model

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unship, (_EnableX64(), self.model))


def _shipped(model: ComposableInfluence) -> Any:
    """What goes into the graph for ``model``."""
    import array_api_compat

    gp = model.gradient_provider
    if array_api_compat.is_jax_namespace(gp.xp) and np.dtype(str(gp.dtype)) == np.float64:
        return _Shipped(model)
    return model


def _unwrap(model: Any) -> ComposableInfluence:
    # a threaded or synchronous scheduler passes the object without pickling it
    return model.model if isinstance(model, _Shipped) else model


def _to_provider(model: ComposableInfluence, a: Any) -> Array:
    """A chunk (numpy or cupy) as an array of the provider's namespace and device."""
    gp = model.gradient_provider
    xp = gp.xp
    try:
        _xp.check_namespace(a, xp=xp, what="chunk")
        return a
    except TypeError:
        pass
    host = _xp.to_numpy(a)
    dtype = gp.dtype if host.dtype.kind == "f" else None
    if dtype is None:
        dtype = {"i": xp.int64, "u": xp.int64, "b": xp.bool}.get(host.dtype.kind)
    return _xp.from_numpy(host, dtype=dtype, device=gp.device, xp=xp)


def _to_chunk(model: ComposableInfluence, a: Array) -> Any:
    """A result block as a dask chunk: numpy, or cupy for cupy providers."""
    import array_api_compat

    if array_api_compat.is_cupy_array(a) or isinstance(a, np.ndarray):
        return a
    return _xp.to_numpy(a)


def _factors_task(model: ComposableInfluence, x: Any, y: Any) -> Any:
    model = _unwrap(model)
    mapper = model._fitted_mapper()
    batch = model.gradient_provider.prepare_batch(
        Batch(_to_provider(model, x), _to_provider(model, y))
    )
    return mapper.transformed_grads(batch)


def _block_task(model: ComposableInfluence, factors: Any, x: Any, y: Any, mode: str) -> Any:
    model = _unwrap(model)
    mapper = model._fitted_mapper()
    gp = model.gradient_provider
    batch = gp.prepare_batch(Batch(_to_provider(model, x), _to_provider(model, y)))
    value = _chunking.sum_blocks(
        mapper.interactions_from_transformed_grads(factors, batch, InfluenceMode.parse(mode))
    )
    value = _xp.check_finite(value, xp=gp.xp, what="influences (gradients or curvature)")
    return _to_chunk(model, value)


def _factors_out(model: ComposableInfluence, factors: Any) -> Any:
    model = _unwrap(model)
    gp = model.gradient_provider
    values = list(factors.values())
    value = values[0] if len(values) == 1 else gp.xp.concat(values, axis=-1)
    return _to_chunk(model, value)


@final
class DaskInfluenceCalculator:
    """Influences over dask arrays, one task per block.

    Inputs are dask arrays chunked along samples only (one chunk across the
    feature dimensions), with the same chunks for ``x`` and ``y`` of a side.
    The fitted model is put into the graph once (scattered to the workers once
    with ``dask.distributed``); each test chunk's factors are one task shared by
    the blocks of its row. Results are lazy dask arrays of numpy chunks (cupy
    chunks for cupy providers): ``.compute()`` them or ``.to_zarr(path)``.

    Chunks are numpy (or cupy) arrays, converted in the tasks to the
    provider's namespace, device and dtype. ``da.from_array`` does not take a
    torch tensor (dask cannot read torch dtypes: "Cannot interpret
    'torch.float64' as a data type"): pass ``tensor.cpu().numpy()``. A float64
    jax model turns on ``jax_enable_x64`` in the worker processes that
    receive it (before its arrays are unpickled), so neither it nor the chunks
    are truncated to float32 there.

    Unlike :meth:`SequentialInfluenceCalculator.influences(...).to_zarr
    <LazyInfluences.to_zarr>`, the dask arrays' own ``to_zarr`` records no
    finished blocks and no checksums: an interrupted run starts again.

    Args:
        model: a fitted influence model (numpy, torch on CPU, jax or cupy
            provider; it must pickle for a distributed cluster).
        client: a ``dask.distributed.Client``; None uses the current default
            scheduler (a local one unless a client is active).
    """

    def __init__(self, model: ComposableInfluence, *, client: Any = None):
        from ..influence import ComposableInfluence

        if not isinstance(model, ComposableInfluence):
            raise TypeError(f"expected an influence model, got {type(model).__name__}")
        model._fitted_mapper()
        self.model = model
        self.client = client
        self._model_ref: Any = None

    def _model(self) -> Any:
        """The model in the graph: a scattered future on a cluster, else one
        delayed object (one key, shared by all tasks)."""
        if self._model_ref is None:
            dask = _dask()
            if self.client is not None:
                self._model_ref = self.client.scatter(
                    _shipped(self.model), broadcast=True, hash=False
                )
            else:
                self._model_ref = dask.delayed(_shipped(self.model), pure=True)
        return self._model_ref

    def _check(self, x: Any, y: Any, what: str) -> tuple[Any, Any]:
        dask = _dask()
        da = dask.array
        for name, a in (("x", x), ("y", y)):
            if not isinstance(a, da.Array):
                raise TypeError(
                    f"{what}: {name} must be a dask array chunked along samples, got "
                    f"{type(a).__name__}"
                )
            if any(len(c) != 1 for c in a.chunks[1:]):
                raise ValueError(
                    f"{what}: {name} must be chunked along samples only (one chunk over the "
                    f"other dimensions), got chunks {a.chunks}"
                )
        if x.chunks[0] != y.chunks[0]:
            raise ValueError(
                f"{what}: x and y must have the same chunks along samples, got {x.chunks[0]} "
                f"and {y.chunks[0]}: rechunk one of them"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{what}: no samples")
        return x, y

    def _factor_tasks(self, x_test: Any, y_test: Any) -> list[Any]:
        dask = _dask()
        x_test, y_test = self._check(x_test, y_test, "test points")
        model = self._model()
        xs = x_test.to_delayed().ravel()
        ys = y_test.to_delayed().ravel()
        task = dask.delayed(_factors_task, pure=True)
        return [task(model, xc, yc) for xc, yc in zip(xs, ys)]

    def influence_factors(self, x_test: Any, y_test: Any) -> Any:
        """Lazy factors ``(N_test, P)``."""
        dask = _dask()
        da = dask.array
        model = self._model()
        dtype = _np_dtype(self.model)
        p = self.model.gradient_provider.n_parameters
        out = dask.delayed(_factors_out, pure=True)
        parts = [
            da.from_delayed(out(model, f), shape=(n, p), dtype=dtype)
            for f, n in zip(self._factor_tasks(x_test, y_test), x_test.chunks[0])
        ]
        return da.concatenate(parts, axis=0)

    def influences(
        self,
        x_test: Any,
        y_test: Any,
        x: Any,
        y: Any,
        mode: InfluenceMode | str = InfluenceMode.Up,
    ) -> Any:
        """Lazy influences ``(N_test, N)`` (up) or ``(N_test, N, *D)`` (perturbation),
        one task per (test chunk, training chunk) block."""
        dask = _dask()
        da = dask.array
        mode = InfluenceMode.parse(mode)
        x, y = self._check(x, y, "training points")
        factors = self._factor_tasks(x_test, y_test)
        model = self._model()
        task = dask.delayed(_block_task, pure=True)
        trailing = tuple(int(d) for d in x.shape[1:]) if mode is InfluenceMode.Perturbation else ()
        dtype = _np_dtype(self.model)
        xs, ys = x.to_delayed().ravel(), y.to_delayed().ravel()
        rows = []
        for f, n in zip(factors, x_test.chunks[0]):
            rows.append(
                [
                    da.from_delayed(
                        task(model, f, xc, yc, mode.value), shape=(n, m, *trailing), dtype=dtype
                    )
                    for xc, yc, m in zip(xs, ys, x.chunks[0])
                ]
            )
        return da.block(rows) if not trailing else _block_nd(da, rows)


def _block_nd(da: Any, rows: list[list[Any]]) -> Any:
    return da.concatenate([da.concatenate(r, axis=1) for r in rows], axis=0)


def _np_dtype(model: ComposableInfluence) -> Any:
    gp = model.gradient_provider
    probe = gp.xp.zeros((1,), dtype=gp.dtype, device=gp.device)
    return _xp.to_numpy(probe).dtype
