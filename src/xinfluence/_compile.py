"""Where the generic code compiles: the namespace hooks that decide it.

On jax every new array shape, and every eager operation, costs an XLA
compilation; the solvers are written once on the array API and call these
hooks, which compile on jax (``jax.jit``, ``lax.while_loop``, one program per
traced solve) and are plain calls or Python loops on every other namespace.
Re-exported by :mod:`xinfluence._xp`.
"""

from __future__ import annotations

import collections
import functools
import sys
import threading
from collections.abc import Callable
from typing import Any, final

import array_api_compat
from array_api_compat import device as device_of

Array = Any
Namespace = Any


def compiles_per_shape(xp: Namespace) -> bool:
    """Whether every new array shape costs a compilation (jax): loops should then
    keep shapes constant rather than grow arrays step by step."""
    return bool(array_api_compat.is_jax_namespace(xp))


#: XLA options of the library's own programs where jax's default device is a CPU:
#: XLA's classic fusion emitters compile a solver's program in about half the time
#: of the newer ones (linalg.cg's update steps: 0.46 -> 0.23 s; a cold batched-CG
#: query of a 2,410-parameter MLP: 1.7-2.0 -> 1.2-1.3 s of compilation) and run
#: as fast, within the machine's noise (those update steps at P = 10^6: 732 against
#: 699 ms; warm CG, batched CG, EK-FAC and Direct queries alike). Other devices,
#: and a jaxlib that does not know an option, compile with XLA's defaults.
_CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def compiler_options() -> dict[str, Any] | None:
    """The ``compiler_options`` of :func:`jit` (None: XLA's defaults); checked
    once per process by compiling a one-operation program with them."""
    import jax
    import numpy as np

    if not _CPU_COMPILER_OPTIONS or jax.default_backend() != "cpu":
        return None
    options = dict(_CPU_COMPILER_OPTIONS)
    try:
        jax.jit(_negate, compiler_options=options).lower(np.zeros((), np.float32)).compile()
    except Exception:  # an option this jaxlib's XLA does not have (it raises on compile)
        return None
    return options


def _negate(x: Array) -> Array:
    return -x


def jit(fn: Callable[..., Any], /, **kwargs: Any) -> Callable[..., Any]:
    """``jax.jit(fn, **kwargs)`` compiled with the library's :func:`compiler_options`
    when called on arrays; called inside another traced function (jax takes
    options only at the top), the plain ``jax.jit(fn)``, compiled with its caller.
    The jax provider's and the solvers' programs compile through this."""
    import jax

    plain = jax.jit(fn, **kwargs)
    options = compiler_options()
    if options is None:
        return plain
    return _Jitted(plain, jax.jit(fn, compiler_options=options, **kwargs))


@final
class _Jitted:
    """:func:`jit`'s function: ``top`` (with the options) on arrays, ``plain`` on
    tracers; other attributes (``lower``, ``_cache_size``, ...) are ``top``'s."""

    __slots__ = ("_plain", "_top", "__weakref__")  # weakly keyed caches hold it

    def __init__(self, plain: Any, top: Any):
        self._plain, self._top = plain, top

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import jax

        if any(is_traced(a) for a in jax.tree.leaves((args, kwargs))):
            return self._plain(*args, **kwargs)
        return self._top(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._top, name)


@functools.cache
def _jitted(fn: Callable[..., Any], static_argnames: tuple[str, ...]) -> Callable[..., Any]:
    return jit(fn, static_argnames=static_argnames)


def maybe_jit(
    fn: Callable[..., Any], /, *, xp: Namespace, static_argnames: tuple[str, ...] = ("xp",)
) -> Callable[..., Any]:
    """``jax.jit(fn)`` on jax, ``fn`` itself elsewhere: where the generic solvers compile.

    ``fn`` must be a module-level function of arrays without host synchronisation
    (no ``float()``, ``bool()`` or ``to_numpy``); the namespace and other
    hashable options are keyword arguments named in ``static_argnames``. The
    compiled function is cached per ``fn``, so every solve of a problem reuses
    the same programs (one compilation per shape, not per call).
    """
    if compiles_per_shape(xp):
        return _jitted(fn, tuple(static_argnames))
    return fn


def committed(x: Array, /, *, xp: Namespace) -> Array:
    """``x`` placed explicitly on its device (jax): a jitted function compiles once
    for uncommitted and once more for committed arguments, so solvers commit
    their iterates before the first compiled step. ``x`` itself elsewhere."""
    if compiles_per_shape(xp):
        import jax

        return jax.device_put(x, device_of(x))
    return x


def padded_rows(k: int, /, *, xp: Namespace) -> int:
    """The number of rows a block of ``k`` vectors is padded to before compiled
    code sees it: ``k`` where shapes are free; on jax ``1, 2, 4, 8`` then
    multiples of 8, so that few shapes compile and little work is wasted."""
    if not compiles_per_shape(xp) or k <= 0:
        return k
    if k <= 8:
        return 1 << (k - 1).bit_length()
    return -(-k // 8) * 8


def set_rows(store: Array, start: int, rows: Array, /, *, xp: Namespace) -> Array:
    """``store`` (m, P) with ``store[start : start + k] = rows`` (k, P): in place
    where the namespace allows; on jax one compiled program per shape, with
    ``start`` a traced argument (a slice of Python ints compiles per offset)."""
    if compiles_per_shape(xp):
        return _jitted(_dynamic_set_rows, ())(store, rows, start)
    store[start : start + int(rows.shape[0]), :] = rows
    return store


def _dynamic_set_rows(store: Array, rows: Array, start: Array) -> Array:
    import jax

    return jax.lax.dynamic_update_slice(store, rows, (start, 0))


def is_traced(x: Array, /) -> bool:
    """Whether ``x`` is a jax tracer (inside :func:`compiled`): its values cannot
    be read on the host, so checks that would raise on them are left to the caller."""
    core = sys.modules.get("jax.core")
    return core is not None and isinstance(x, core.Tracer)


def while_loop(
    cond: Callable[[tuple[Array, ...]], Array],
    body: Callable[[tuple[Array, ...]], tuple[Array, ...]],
    state: tuple[Array, ...],
    /,
    *,
    xp: Namespace,
    observe: Callable[[tuple[Array, ...]], None] | None = None,
) -> tuple[Array, ...]:
    """``while cond(state): state = body(state)``; the last ``state``.

    ``state`` is a tuple of arrays whose shapes and dtypes ``body`` keeps; ``cond``
    returns a 0-d boolean array. Inside :func:`compiled` on jax this is
    ``jax.lax.while_loop``: the whole loop runs in the compiled program, without
    a host synchronisation per iteration (``observe`` is not called). Elsewhere a
    Python loop reads ``cond`` on the host and calls ``observe(state)`` after
    every step (progress reports).
    """
    if compiles_per_shape(xp) and any(is_traced(a) for a in state):
        import jax

        loop: Any = jax.lax.while_loop  # typed for pytrees, not for tuples
        return tuple(loop(cond, lambda s: tuple(body(s)), tuple(state)))
    while bool(cond(state)):
        state = tuple(body(state))
        if observe is not None:
            observe(state)
    return state


#: :func:`compiled`'s programs by the text of their traced computation (a few per
#: problem; the oldest are dropped beyond this many)
_PROGRAMS: collections.OrderedDict[Any, Any] = collections.OrderedDict()
_MAX_PROGRAMS = 64
_PROGRAMS_LOCK = threading.Lock()


def compiled(fn: Callable[..., tuple[Array, ...]], /, *args: Array, xp: Namespace) -> Any:
    """``fn(*args)`` for arrays ``args``: on jax one compiled program, elsewhere a call.

    ``fn`` may be a closure (a solver's loop over an operator given as a callable):
    it is traced on every call (cheap: the jitted functions it calls keep their
    traces) and the arrays it captures become arguments of a program cached by
    the text of the traced computation, so the next solve with the same shapes
    and constants reuses it although ``fn`` is a new function. A ``fn`` that
    reads values on the host (an operator that synchronises) cannot be traced
    and runs as a call, operation by operation. Loops inside go through
    :func:`while_loop`.
    """
    if not compiles_per_shape(xp):
        return fn(*args)
    import jax

    try:
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerIntegerConversionError,
    ):
        return fn(*args)
    # jitted functions called inside are keyed by their traced jaxpr's identity (jax
    # keeps one per function and shapes, with the arrays it closed over), kept
    # alive with the program; the rest by structure
    kept: list[Any] = []
    key = _structure(closed.jaxpr, kept)
    with _PROGRAMS_LOCK:  # queries may run in threads
        entry = _PROGRAMS.get(key)
        if entry is None:
            entry = jit(functools.partial(_evaluate, closed.jaxpr)), kept
            _PROGRAMS[key] = entry
            while len(_PROGRAMS) > _MAX_PROGRAMS:
                _PROGRAMS.popitem(last=False)
        else:
            _PROGRAMS.move_to_end(key)
    program = entry[0]
    out = program(closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(shapes), out)


def _structure(jaxpr: Any, kept: list[Any]) -> tuple[Any, ...]:
    """A hashable key of a traced jax computation: equal keys compute the same
    function of the same arguments (the text, without printing it: 10-40 ms per
    solve for a model's products). The jaxprs of jitted functions called count by
    identity (appended to ``kept``), the constants of other nested ones too."""
    from jax.extend import core

    names: dict[Any, int] = {}

    def var(v: Any) -> Any:
        if isinstance(v, core.Literal):
            return ("literal", repr(v.val), v.aval)
        return names.setdefault(v, len(names)), v.aval

    def param(name: str, value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return tuple(param(name, v) for v in value)
        if isinstance(value, core.ClosedJaxpr):
            if name == "jaxpr":  # a jitted function's (jax caches it)
                kept.append(value)
                return ("jitted", id(value))
            kept.extend(value.consts)
            return ("closed", tuple(id(c) for c in value.consts), walk(value.jaxpr))
        if isinstance(value, core.Jaxpr):
            return walk(value)
        try:
            hash(value)
        except TypeError:
            return repr(value)
        return value

    def walk(j: Any) -> tuple[Any, ...]:
        head = tuple(var(v) for v in (*j.constvars, *j.invars))
        eqns = tuple(
            (
                e.primitive.name,
                tuple(var(v) for v in e.invars),
                tuple(var(v) for v in e.outvars),
                tuple((k, param(k, v)) for k, v in sorted(e.params.items())),
            )
            for e in j.eqns
        )
        return head, eqns, tuple(var(v) for v in j.outvars)

    return walk(jaxpr)


def _evaluate(jaxpr: Any, consts: list[Array], args: list[Array]) -> list[Array]:
    import jax

    return jax.core.eval_jaxpr(jaxpr, consts, *args)


def float64_or(dtype: Any, /, *, xp: Namespace) -> Any:
    """``float64`` where the namespace computes in it (jax: only with
    ``jax_enable_x64``), else ``dtype``: for tolerance tests inside compiled
    loops, which the host would otherwise make in float64."""
    if compiles_per_shape(xp):
        import jax

        if not jax.config.read("jax_enable_x64"):
            return dtype
    return xp.float64
