"""The one place for array-API quirks.

Everything in xinfluence talks to arrays through the namespace returned by
:func:`namespace`; whatever differs between numpy, array-api-strict, cupy,
torch and jax (a missing linalg routine, random numbers, host transfer) is
handled here and nowhere else. Functions take arrays positional-only and the
namespace keyword-only, and return arrays of the namespace they were given.
The hooks that decide where jax compiles (``maybe_jit``, ``while_loop``,
``compiled``, ...) live in :mod:`xinfluence._compile` and are re-exported here.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, NamedTuple

import array_api_compat
import array_api_extra as xpx
import numpy as np
from array_api_compat import device as device_of  # noqa: F401  (re-exported)

from ._compile import (  # noqa: F401  (re-exported: the namespace hooks that compile)
    committed,
    compiled,
    compiles_per_shape,
    float64_or,
    is_traced,
    jit,
    maybe_jit,
    padded_rows,
    set_rows,
    while_loop,
)
from .errors import NamespaceMismatchError, NonFiniteError

Array = Any
Namespace = Any

__all__ = [
    "Array",
    "Namespace",
    "namespace",
    "namespace_name",
    "namespace_from_name",
    "portable_state",
    "restore_state",
    "same_namespace",
    "compiles_per_shape",
    "jit",
    "maybe_jit",
    "padded_rows",
    "committed",
    "cholesky_checked",
    "check_namespace",
    "device_of",
    "is_floating",
    "as_float",
    "check_finite",
    "any_nonfinite",
    "eye",
    "solve_triangular",
    "cho_solve",
    "cholesky_or_none",
    "to_numpy",
    "from_numpy",
    "random_normal",
    "finfo_eps",
    "psd_rounding_tolerance",
    "symmetrize",
    "scale_shift_checked",
    "set_rows",
    "min_value",
    "argsmallest",
    "is_traced",
    "while_loop",
    "compiled",
    "float64_or",
]


def namespace(*arrays: Array) -> Namespace:
    """Array-API namespace of ``arrays``; a clear error if they come from two."""
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:
        names = sorted({type(a).__module__.split(".")[0] + "." + type(a).__name__ for a in arrays})
        raise NamespaceMismatchError(
            f"expected arrays of a single array-API namespace, got {', '.join(names)}"
        ) from exc


def namespace_name(xp: Namespace) -> str:
    """Short human name of a namespace ("numpy", "torch", "jax", ...)."""
    for name in ("numpy", "cupy", "torch", "jax", "dask", "array_api_strict"):
        check = getattr(array_api_compat, f"is_{name}_namespace")
        if check(xp):
            return name
    return getattr(xp, "__name__", repr(xp))


# The module that :func:`namespace` returns for each library, by short name.
_NAMESPACE_MODULES = {
    "numpy": "array_api_compat.numpy",
    "cupy": "array_api_compat.cupy",
    "torch": "array_api_compat.torch",
    "jax": "jax.numpy",
    "dask": "array_api_compat.dask.array",
    "array_api_strict": "array_api_strict",
}


def namespace_from_name(name: str) -> Namespace:
    """The namespace :func:`namespace` gives for arrays of library ``name``
    (a :func:`namespace_name`): lets pickles store the namespace, a module, by name."""
    try:
        module = _NAMESPACE_MODULES[name]
    except KeyError:
        raise ValueError(
            f"unknown array namespace {name!r}; expected one of {sorted(_NAMESPACE_MODULES)}"
        ) from None
    return importlib.import_module(module)


class _NamespaceRef(NamedTuple):
    """A namespace stored by name in a pickle."""

    name: str


class _JaxDeviceRef(NamedTuple):
    """A jax device (not picklable) stored by platform and id."""

    platform: str
    id: int


def _is_namespace(value: Any) -> bool:
    return (
        type(value).__name__ == "module"
        and namespace_name(value) in _NAMESPACE_MODULES
        and namespace_from_name(namespace_name(value)) is value
    )


def portable_state(state: dict[str, Any], /) -> dict[str, Any]:
    """Copy of an object's ``__dict__`` for pickling: array namespaces (modules) and
    jax devices, which cannot be pickled, become references by name."""
    out = dict(state)
    for key, value in state.items():
        if _is_namespace(value):
            out[key] = _NamespaceRef(namespace_name(value))
        elif type(value).__module__.startswith("jaxlib") and type(value).__name__ == "Device":
            out[key] = _JaxDeviceRef(str(value.platform), int(value.id))
    return out


def restore_state(state: dict[str, Any], /) -> dict[str, Any]:
    """Inverse of :func:`portable_state`. A jax device that this process lacks
    becomes the default device (where jax puts unpickled arrays)."""
    out = dict(state)
    for key, value in state.items():
        if isinstance(value, _NamespaceRef):
            out[key] = namespace_from_name(value.name)
        elif isinstance(value, _JaxDeviceRef):
            import jax

            try:
                candidates = jax.devices(value.platform)
            except RuntimeError:  # no such backend here
                candidates = []
            match = [d for d in candidates if d.id == value.id]
            out[key] = match[0] if match else jax.devices()[0]
    return out


def same_namespace(xp1: Namespace, xp2: Namespace) -> bool:
    """Whether two namespaces are the same library (compat wrappers included)."""
    return namespace_name(xp1) == namespace_name(xp2)


def check_namespace(x: Array, /, *, xp: Namespace, what: str) -> None:
    """Raise :class:`NamespaceMismatchError` unless ``x`` belongs to ``xp``."""
    if not array_api_compat.is_array_api_obj(x):
        raise TypeError(
            f"expected {what} to be an array of namespace {namespace_name(xp)!r}, "
            f"got {type(x).__module__}.{type(x).__name__}"
        )
    other = namespace(x)
    if not same_namespace(other, xp):
        raise NamespaceMismatchError(
            f"expected {what} as {namespace_name(xp)!r} arrays (the namespace of the "
            f"gradient provider's parameters), got {namespace_name(other)!r} arrays"
        )


def is_floating(x: Array, /, *, xp: Namespace) -> bool:
    return bool(xp.isdtype(x.dtype, "real floating"))


def as_float(x: Array, /, *, dtype: Any, xp: Namespace, what: str) -> Array:
    """Cast ``x`` to the parameters' floating ``dtype``.

    Integers and booleans are cast; floats are promoted; a float of higher
    precision than ``dtype`` or a complex array is an error, since the result
    would silently lose precision.
    """
    if x.dtype == dtype:
        return x
    if xp.isdtype(x.dtype, ("integral", "bool")):
        return xp.astype(x, dtype)
    if xp.isdtype(x.dtype, "real floating"):
        if xp.result_type(x.dtype, dtype) == dtype:
            return xp.astype(x, dtype)
        raise TypeError(
            f"{what} has dtype {x.dtype}, which does not fit the parameters' dtype {dtype}; "
            f"cast the inputs or the model to a common floating dtype"
        )
    raise TypeError(f"expected {what} with a real dtype, got {x.dtype}")


# jax compiles a program per shape (20-100 ms) to check an array on the device;
# an array of up to this many entries (inputs, losses, scores) is checked on the
# host instead (a copy of at most 8 MB: about 1 ms on a CPU, the scores of 100
# test and 1,000 training points in 0.1 ms)
_HOST_CHECK_SIZE = 1 << 20


def _not_all_finite(x: Array, /, *, xp: Namespace) -> Array:
    return xp.logical_not(xp.all(xp.isfinite(x)))


def any_nonfinite(x: Array, /, *, xp: Namespace) -> bool:
    if not xp.isdtype(x.dtype, ("real floating", "complex floating")):
        return False
    if compiles_per_shape(xp):
        if math.prod(x.shape) <= _HOST_CHECK_SIZE:  # a copy costs less than a compilation
            return not bool(np.isfinite(np.asarray(x)).all())
        return bool(maybe_jit(_not_all_finite, xp=xp)(x, xp=xp))  # one program per shape
    # A finite sum proves every entry finite (NaN and inf propagate) in one pass
    # without a boolean temporary; only an overflowing sum needs the full check.
    with np.errstate(over="ignore", invalid="ignore"):  # numpy warns on overflow
        total = xp.sum(x) if x.ndim else x
    if bool(xp.isfinite(total)):
        return False
    return not bool(xp.all(xp.isfinite(x)))


def min_value(x: Array, /, *, xp: Namespace) -> float:
    """The smallest entry of a non-empty ``x`` as a Python float (on jax a small
    array is read on the host rather than by a program compiled per shape)."""
    if compiles_per_shape(xp) and math.prod(x.shape) <= _HOST_CHECK_SIZE:
        return float(np.min(np.asarray(x)))
    return float(xp.min(x))


def argsmallest(x: Array, k: int, /, *, xp: Namespace) -> Array:
    """Columns ``(n, k)`` of ``k`` smallest entries in each row of ``x`` ``(n, c)``,
    ``1 <= k <= c``, in no particular order, in O(c) per row. Which of tied
    entries (or of NaN) it picks is unspecified: callers check.

    ``array_api_extra.argpartition`` (numpy's, jax's, a sort elsewhere); on torch
    ``topk``, about 20 times faster than array_api_extra's kthvalue and masked copies.
    """
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.topk(x, k, dim=1, largest=False, sorted=False).indices
    return xpx.argpartition(x, k - 1, axis=1, xp=xp)[:, :k]


def check_finite(x: Array, /, *, xp: Namespace, what: str) -> Array:
    """Return ``x``; raise :class:`NonFiniteError` if it holds NaN or inf."""
    if any_nonfinite(x, xp=xp):
        raise NonFiniteError(f"{what} contains NaN or inf values")
    return x


def finfo_eps(dtype: Any, /, *, xp: Namespace) -> float:
    return float(xp.finfo(dtype).eps)


def psd_rounding_tolerance(dtype: Any, /, size: int, scale: float, *, xp: Namespace) -> float:
    """How far below zero rounding alone puts the computed eigenvalues of a
    positive semi-definite ``size x size`` matrix in ``dtype``:
    ``10 * size * eps * scale``, ``scale`` the magnitude the matrix's entries
    were computed from (at least its largest eigenvalue).

    A backward-stable ``eigh`` errs by ``O(size * eps * |A|)`` and forming ``A``
    adds ``O(eps)`` relative errors per entry; an exact zero eigenvalue (the
    softmax Hessian ``diag(p) - p p^T`` has one) comes back as about
    ``+-eps * scale`` (measured: at most ``5 * eps * scale`` for cross-entropy
    with 2 to 300 classes). Eigenvalues below minus this are genuinely negative.
    """
    return 10.0 * max(int(size), 1) * finfo_eps(dtype, xp=xp) * float(scale)


def eye(n: int, /, *, dtype: Any, device: Any, xp: Namespace) -> Array:
    return xp.eye(n, dtype=dtype, device=device)


def add_scaled(total: Array | None, x: Array, /, *, scale: float, xp: Namespace) -> Array:
    """``total + scale * x`` (``scale * x`` when ``total`` is None), reusing
    ``total``'s memory for torch tensors: summing ``(P, P)`` curvatures batch by
    batch would otherwise allocate a fresh matrix per batch. ``x`` is not kept."""
    if total is None:
        if compiles_per_shape(xp):  # immutable arrays: nothing to own
            return scale_owned(x, scale, xp=xp)
        return scale * x
    if array_api_compat.is_torch_array(total):
        return total.add_(x, alpha=scale)
    if compiles_per_shape(xp):  # one program per shape for every scale
        return maybe_jit(_axpy, xp=xp)(total, x, float(scale), xp=xp)
    return total + scale * x


def _axpy(total: Array, x: Array, scale: Array, /, *, xp: Namespace) -> Array:
    return total + scale * x


def _scale(x: Array, scale: Array, /, *, xp: Namespace) -> Array:
    return scale * x


def add_matmul(out: Array, a: Array, b: Array, /, *, alpha: float, xp: Namespace) -> Array:
    """``out + alpha * (a @ b)``, in ``out``'s memory for torch tensors (which the
    caller must own): the iterative solvers update ``(K, P)`` blocks every step."""
    if array_api_compat.is_torch_array(out):
        return out.addmm_(a, b, alpha=alpha)
    return out + alpha * (a @ b)


def scale_owned(x: Array, /, scale: float, *, xp: Namespace) -> Array:
    """``scale * x``, in ``x``'s memory for torch tensors (the caller owns ``x``)."""
    if array_api_compat.is_torch_array(x):
        return x.mul_(scale)
    if compiles_per_shape(xp):
        return x if scale == 1 else maybe_jit(_scale, xp=xp)(x, float(scale), xp=xp)
    return scale * x


def _scale_shift(
    total: Array, scale: Array, v: Array, shift: Array, /, *, xp: Namespace
) -> tuple[Array, Array]:
    out = scale * total + shift * v
    return out, _not_all_finite(out, xp=xp)


def scale_shift_checked(
    total: Array, v: Array, /, scale: float, shift: float, *, xp: Namespace, what: str
) -> Array:
    """``scale * total + shift * v`` (``total``'s memory on torch, which the caller
    owns); :class:`NonFiniteError` if it holds NaN or inf. On jax one compiled
    program per shape computes the result and its check together; inside
    :func:`compiled` the check is the caller's (the solvers flag non-finite values)."""
    if compiles_per_shape(xp):
        out, bad = maybe_jit(_scale_shift, xp=xp)(total, float(scale), v, float(shift), xp=xp)
        if not is_traced(bad) and bool(bad):
            raise NonFiniteError(f"{what} contains NaN or inf values")
        return out
    out = scale_owned(total, scale, xp=xp) if scale != 1 else total
    if shift:
        out = add_scaled(out, v, scale=shift, xp=xp)
    return check_finite(out, xp=xp, what=what)


def plus_diagonal(a: Array, /, value: float, *, xp: Namespace) -> Array:
    """``a + value * I`` for a square ``a``, as a new array (one pass over ``a``)."""
    if array_api_compat.is_torch_array(a):
        copied = a.clone()
        copied.diagonal().add_(value)
        return copied
    if array_api_compat.is_numpy_array(a):
        out = np.array(a, copy=True, order="C")
        out.reshape(-1)[:: a.shape[0] + 1] += value  # the diagonal of a C-ordered copy
        return out
    return a + value * eye(a.shape[0], dtype=a.dtype, device=device_of(a), xp=xp)


#: Side of the tiles in which :func:`symmetrize` reads the transpose of large
#: torch and numpy matrices (whole-matrix transposed reads miss the cache).
_SYMMETRIZE_TILE = 256


def symmetrize(a: Array, /, *, xp: Namespace, scale: float = 1.0) -> Array:
    """``scale * (a + a^T) / 2`` for a square ``a``: one program per shape on jax
    (not three); large torch and numpy matrices tile by tile (the same numbers,
    about twice as fast for ``(4096, 4096)``)."""
    if compiles_per_shape(xp):
        return maybe_jit(_symmetrize, xp=xp)(a, float(scale), xp=xp)
    n, t = int(a.shape[0]), _SYMMETRIZE_TILE
    if n <= 4 * t or a.ndim != 2:
        return _symmetrize(a, scale, xp=xp)
    add: Any
    out: Any
    if array_api_compat.is_torch_array(a):
        import torch

        add, out = torch.add, torch.empty_like(a)
    elif array_api_compat.is_numpy_array(a):
        add, out = np.add, np.empty_like(a)
    else:
        return _symmetrize(a, scale, xp=xp)
    for i in range(0, n, t):
        for j in range(0, n, t):
            add(a[i : i + t, j : j + t], a[j : j + t, i : i + t].T, out=out[i : i + t, j : j + t])
    out *= scale / 2
    return out


def _symmetrize(a: Array, scale: float, /, *, xp: Namespace) -> Array:
    return (a + xp.matrix_transpose(a)) * (scale / 2)


def cholesky_or_none(a: Array, /, *, xp: Namespace) -> Array | None:
    """Lower Cholesky factor of ``a`` (P, P), or None where it is not positive definite.

    Backends disagree on failure: numpy and torch raise, jax returns NaN.
    """
    if array_api_compat.is_torch_array(a):  # reports failure without raising
        import torch

        factor, info = torch.linalg.cholesky_ex(a)
        if bool(info.any()):
            return None
    else:
        try:
            factor = xp.linalg.cholesky(a)
        except Exception:  # LinAlgError and friends, one per backend
            return None
    if any_nonfinite(factor, xp=xp):
        return None
    return factor


def cholesky_checked(a: Array, /, *, xp: Namespace) -> tuple[Array, Array]:
    """``(L, ok)``: the lower Cholesky factor of ``a`` (P, P) and a 0-d boolean
    array, False where ``a`` is not positive definite (``L`` is then garbage).

    Unlike :func:`cholesky_or_none` it does not synchronise with the host, so it
    runs inside compiled (jax) code; numpy and array-api-strict raise on failure,
    which becomes ``ok`` False and a NaN factor.
    """
    if array_api_compat.is_torch_array(a):
        import torch

        factor, info = torch.linalg.cholesky_ex(a)
        return factor, (info == 0) & xp.all(xp.isfinite(factor))
    if compiles_per_shape(xp):
        factor = xp.linalg.cholesky(a)  # NaN where it fails
        return factor, xp.all(xp.isfinite(factor))
    try:
        factor = xp.linalg.cholesky(a)
    except Exception:  # LinAlgError and friends, one per backend
        factor = xp.full(a.shape, float("nan"), dtype=a.dtype, device=device_of(a))
    return factor, xp.all(xp.isfinite(factor))


def solve_triangular(a: Array, b: Array, /, *, lower: bool, xp: Namespace) -> Array:
    """Solve ``a @ x = b`` for triangular ``a`` (P, P), ``b`` (P, K).

    The array API has no triangular solve: use the backend's own where it
    exists and fall back to a general solve otherwise (same result, more work).
    """
    name = namespace_name(xp)
    if name == "torch":
        import torch

        return torch.linalg.solve_triangular(a, b, upper=not lower)
    if name == "jax":
        import jax.scipy.linalg

        return jax.scipy.linalg.solve_triangular(a, b, lower=lower)
    if name == "cupy":
        import cupyx.scipy.linalg

        return cupyx.scipy.linalg.solve_triangular(a, b, lower=lower)
    if name == "numpy":
        try:
            import scipy.linalg
        except ImportError:  # scipy is optional
            return xp.linalg.solve(a, b)
        return xp.asarray(scipy.linalg.solve_triangular(a, b, lower=lower, check_finite=False))
    return xp.linalg.solve(a, b)


def cho_solve(factor: Array, b: Array, /, *, xp: Namespace) -> Array:
    """Solve ``(L L^T) x = b`` from the lower Cholesky factor ``L`` (P, P), ``b`` (P, K)."""
    name = namespace_name(xp)
    if name == "torch":
        import torch

        return torch.cholesky_solve(b, factor)
    if name == "jax":
        import jax.scipy.linalg

        return jax.scipy.linalg.cho_solve((factor, True), b)
    if name == "numpy":
        try:
            import scipy.linalg
        except ImportError:  # scipy is optional
            pass
        else:
            return xp.asarray(scipy.linalg.cho_solve((factor, True), b, check_finite=False))
    y = solve_triangular(factor, b, lower=True, xp=xp)
    return solve_triangular(xp.matrix_transpose(factor), y, lower=False, xp=xp)


def to_numpy(x: Array, /) -> np.ndarray:
    """Host copy of any array as a numpy array (for tests, reports and RNG)."""
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if isinstance(x, np.ndarray):
        return x
    xp = array_api_compat.array_namespace(x)
    if array_api_compat.is_array_api_strict_namespace(xp):
        # its extra devices refuse numpy conversion: go through the default one
        x = x.to_device(xp.Device("CPU_DEVICE"))
    return np.asarray(x)


def from_numpy(x: np.ndarray, /, *, dtype: Any, device: Any, xp: Namespace) -> Array:
    """Array of namespace ``xp`` on ``device`` from a host numpy array."""
    if array_api_compat.is_jax_namespace(xp):
        import jax

        # cast on the host: a cast on the device compiles a program per shape
        out = xp.asarray(
            np.asarray(x, dtype=None if dtype is None else np.dtype(dtype)), dtype=dtype
        )
        return jax.device_put(out, device) if device is not None else out
    return xp.asarray(x, dtype=dtype, device=device)


def random_normal(
    shape: tuple[int, ...],
    /,
    *,
    seed: int | np.random.Generator | None,
    dtype: Any,
    device: Any,
    xp: Namespace,
) -> Array:
    """Standard normal samples, the same numbers on every namespace and device.

    Drawn on the host with numpy's PCG64 so that a seed means one thing across
    backends, then moved once; the draws are small next to curvature products.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return from_numpy(rng.standard_normal(shape), dtype=dtype, device=device, xp=xp)
