"""Taps on the convolutions and dense layers of a JAX model: the hooks JAX does
not have.

A torch module can be hooked to read a layer's input and perturb its output; a
JAX model is a function. Here the model is traced once to a jaxpr
(:func:`jax.make_jaxpr`), the ``conv_general_dilated`` or ``dot_general``
equation fed by a declared kernel leaf is located, and the jaxpr is evaluated
again with that equation's input kept and a zero perturbation ``delta`` added to
its output. Then ``d loss / d delta`` is the per-position output gradient ``s``
that the Kronecker factors of the layer need, for any JAX library (flax,
equinox, plain ``lax``). A dense layer's positions are all the axes of its input
but the contracted one (a token axis, say: flax ``Dense`` on ``(N, T, d)``,
equinox ``Linear`` under two ``vmap``); a convolution's are its output
positions. The evaluation is ordinary JAX code: it composes with
:func:`jax.vmap`, :func:`jax.grad` and :func:`jax.jit`.

Equations that do not contain a tapped convolution are bound unchanged (custom
derivative rules included); calls that contain one (``jit``, ``custom_jvp_call``
...) are evaluated inline. A tapped convolution inside a loop or a branch
(``scan``, ``while``, ``cond``) is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

Path = tuple[int, ...]

# unary equations that hand a kernel to the layer's product unchanged in layout
_PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p"})


@dataclass(frozen=True)
class ConvTap:
    """The convolution or dense product a kernel leaf feeds: where it is in the
    jaxpr and how it was called (``params`` of the ``conv_general_dilated`` or
    ``dot_general`` equation).

    ``kind`` is ``"conv"`` or ``"dense"``. For a dense product, ``operand`` is the
    position of the layer's input among the equation's operands (1 when the
    kernel is the left operand, as equinox's ``weight @ x``), ``contract`` the
    input's contracted axis and ``kernel_axis`` the kernel's."""

    path: Path
    params: dict[str, Any]
    rhs_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_dtype: Any
    kind: str = "conv"
    operand: int = 0
    contract: int = -1
    kernel_axis: int = -1


# equations that call a sub-jaxpr once on their own inputs (not loops or branches)
_CALLS = frozenset(
    {
        "pjit",
        "jit",
        "closed_call",
        "core_call",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "checkpoint",
        "remat",
        "remat2",
    }
)


def _aval(v: Any) -> Any:
    return v.aval


def _sub_jaxpr(eqn: Any) -> ClosedJaxpr | None:
    """The one sub-jaxpr of a call-like equation whose inputs are the equation's."""
    if eqn.primitive.name not in _CALLS:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, ClosedJaxpr) and len(sub.jaxpr.invars) == len(eqn.invars):
            return sub
        if isinstance(sub, Jaxpr) and len(sub.invars) == len(eqn.invars):
            return ClosedJaxpr(sub, ())
    return None


def _dense_tap(eqn: Any, here: Path, alias: dict[Any, int], flipped: set[Any]) -> ConvTap | None:
    """The tap of a ``dot_general`` with exactly one operand a kernel leaf (or its
    transpose, in ``flipped``), one contracted axis and no batch axes (a dense
    layer); None otherwise."""
    lhs, rhs = eqn.invars
    is_kernel = [not isinstance(v, Literal) and v in alias for v in (lhs, rhs)]
    if is_kernel[0] == is_kernel[1]:
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    k = 0 if is_kernel[0] else 1
    kernel = (lhs, rhs)[k]
    if lb or rb or len(lc) != 1 or len(rc) != 1 or len(_aval(kernel).shape) != 2:
        return None
    out_aval: Any = eqn.outvars[0].aval
    axis, shape = int((lc, rc)[k][0]), tuple(_aval(kernel).shape)
    if kernel in flipped:  # x @ w.T: the leaf's axes are the other way round
        axis, shape = 1 - axis, shape[::-1]
    return ConvTap(
        here,
        dict(eqn.params),
        shape,
        tuple(out_aval.shape),
        out_aval.dtype,
        kind="dense",
        operand=1 - k,
        contract=int((lc, rc)[1 - k][0]),
        kernel_axis=axis,
    )


def find_conv_taps(closed: ClosedJaxpr, leaf_positions: Sequence[int]) -> dict[int, ConvTap]:
    """For each input position in ``leaf_positions`` (a kernel leaf), the one
    convolution it feeds as the kernel, or (a 2-D kernel) the one ``dot_general``
    it feeds as a dense layer's matrix (directly or transposed, ``x @ w.T``).

    Raises:
        ValueError: a kernel that feeds no convolution or dense product, more
            than one, or enters any other computation (its gradient would not be
            ``sum_t s_t a_t^T``).
    """
    wanted = set(leaf_positions)
    found: dict[int, list[ConvTap]] = {i: [] for i in wanted}
    other: dict[int, set[str]] = {i: set() for i in wanted}
    flipped: set[Any] = set()  # variables holding a 2-D kernel transposed

    def walk(jaxpr: Jaxpr, alias: dict[Any, int], path: Path) -> None:
        for k, eqn in enumerate(jaxpr.eqns):
            here = path + (k,)
            leaves = {alias[v] for v in eqn.invars if not isinstance(v, Literal) and v in alias}
            if not leaves:
                continue
            name = eqn.primitive.name
            if name in _PASS_THROUGH and len(eqn.invars) == 1:
                alias[eqn.outvars[0]] = alias[eqn.invars[0]]
                if eqn.invars[0] in flipped:
                    flipped.add(eqn.outvars[0])
                continue
            if (
                name == "transpose"
                and len(_aval(eqn.invars[0]).shape) == 2
                and tuple(eqn.params["permutation"]) == (1, 0)
            ):
                alias[eqn.outvars[0]] = alias[eqn.invars[0]]
                if eqn.invars[0] not in flipped:
                    flipped.add(eqn.outvars[0])
                continue
            if name == "conv_general_dilated":
                lhs, rhs = eqn.invars
                if (
                    not isinstance(rhs, Literal)
                    and rhs in alias
                    and rhs not in flipped
                    and not (not isinstance(lhs, Literal) and lhs in alias)
                ):
                    out_aval: Any = eqn.outvars[0].aval
                    found[alias[rhs]].append(
                        ConvTap(
                            here,
                            dict(eqn.params),
                            tuple(_aval(rhs).shape),
                            tuple(out_aval.shape),
                            out_aval.dtype,
                        )
                    )
                    continue
            if name == "dot_general":
                tap = _dense_tap(eqn, here, alias, flipped)
                if tap is not None:
                    found[alias[eqn.invars[1 - tap.operand]]].append(tap)
                    continue
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                inner = {
                    sv: alias[v]
                    for v, sv in zip(eqn.invars, sub.jaxpr.invars, strict=True)
                    if not isinstance(v, Literal) and v in alias
                }
                flipped.update(
                    sv
                    for v, sv in zip(eqn.invars, sub.jaxpr.invars, strict=True)
                    if not isinstance(v, Literal) and v in flipped
                )
                walk(sub.jaxpr, inner, here)
                continue
            for leaf in leaves:
                loop = any(isinstance(v, (ClosedJaxpr, Jaxpr)) for v in eqn.params.values())
                other[leaf].add(f"a {name} (loops and branches cannot be tapped)" if loop else name)

    walk(closed.jaxpr, {closed.jaxpr.invars[i]: i for i in wanted}, ())
    out: dict[int, ConvTap] = {}
    for i in sorted(wanted):
        if other[i]:
            raise ValueError(
                f"the kernel enters computations other than one convolution or dense product "
                f"({', '.join(sorted(other[i]))}); its per-sample gradient is then not "
                "sum_t s_t a_t^T"
            )
        if len(found[i]) != 1:
            raise ValueError(
                "the kernel must feed exactly one lax.conv_general_dilated as its kernel "
                "(rhs), or one dot_general with one contracted axis and no batch axes as a "
                f"dense layer's matrix; it feeds {len(found[i])}"
            )
        tap = found[i][0]
        p = tap.params
        if tap.kind == "conv" and (p["feature_group_count"] != 1 or p["batch_group_count"] != 1):
            raise ValueError(
                "grouped convolutions (feature_group_count or batch_group_count > 1) "
                "have no single Kronecker factor pair"
            )
        out[i] = tap
    return out


def _bind(eqn: Any, invals: list[Any]) -> Any:
    """``eqn``'s primitive applied to ``invals``, as :func:`jax.core.eval_jaxpr` does."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns: tuple[Any, ...] = ()
    if isinstance(params, tuple):  # jax < 0.7: (subfuns, params)
        subfuns, params = params
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is None:
        return eqn.primitive.bind(*subfuns, *invals, **params)
    with ctx:
        return eqn.primitive.bind(*subfuns, *invals, **params)


def evaluate_with_taps(
    closed: ClosedJaxpr, args: Sequence[Any], deltas: dict[Path, Any]
) -> tuple[list[Any], dict[Path, Any]]:
    """Evaluate ``closed`` on ``args`` with ``deltas[path]`` added to the output of
    the convolution or dense product at ``path``; returns the outputs and each
    tapped equation's operands (a convolution's input is the first, a dense
    layer's the one that is not the kernel: :attr:`ConvTap.operand`)."""
    captured: dict[Path, Any] = {}
    prefixes = {p[:j] for p in deltas for j in range(1, len(p))}

    def run(jaxpr: Jaxpr, consts: Sequence[Any], vals: Sequence[Any], path: Path) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            return v.val if isinstance(v, Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = c
        for v, a in zip(jaxpr.invars, vals, strict=True):
            env[v] = a
        for k, eqn in enumerate(jaxpr.eqns):
            here = path + (k,)
            invals = [read(v) for v in eqn.invars]
            if here in prefixes:
                sub = _sub_jaxpr(eqn)
                if sub is None:
                    raise ValueError(
                        f"a tapped layer is inside a {eqn.primitive.name!r}; convolutions and "
                        "dense layers in loops or branches (scan, while, cond) cannot be tapped"
                    )
                outs = run(sub.jaxpr, sub.consts, invals, here)
            else:
                result = _bind(eqn, invals)
                outs = list(result) if eqn.primitive.multiple_results else [result]
                if here in deltas:
                    captured[here] = tuple(invals)
                    outs = [outs[0] + deltas[here]]
            for v, o in zip(eqn.outvars, outs, strict=True):
                env[v] = o
        return [read(v) for v in jaxpr.outvars]

    return run(closed.jaxpr, closed.consts, list(args), ()), captured


def to_positions(z: Any, spec: Sequence[int]) -> Any:
    """An array in a convolution's output layout (``spec = out_spec``: batch,
    feature, spatial axes) as ``(batch, T, features)``, positions row-major."""
    b, f, *spatial = spec
    moved = jnp.transpose(z, (b, *spatial, f))
    return jnp.reshape(moved, (moved.shape[0], -1, moved.shape[-1]))


def conv_patches(lhs: Any, tap: ConvTap) -> Any:
    """The patches a convolution multiplies by its kernel, ``(batch, T, C*k0*k1...)``,
    features ordered channel first, then the kernel's spatial axes in the order
    of ``rhs_spec[2:]``."""
    p = tap.params
    dn = p["dimension_numbers"]
    filter_shape = tuple(tap.rhs_shape[d] for d in dn.rhs_spec[2:])
    patches = lax.conv_general_dilated_patches(
        lhs,
        filter_shape,
        p["window_strides"],
        p["padding"],
        lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"],
        dimension_numbers=dn,
        precision=lax.Precision.HIGHEST,
    )
    return to_positions(patches, dn.out_spec)


def dense_inputs(operand: Any, tap: ConvTap) -> Any:
    """A dense layer's input (one sample's operand) as ``(T, I)``: the contracted
    axis last, the other axes (the sample's batch axis of one, token axes)
    flattened row-major into ``T`` positions."""
    moved = jnp.moveaxis(operand, tap.contract, -1)
    return jnp.reshape(moved, (-1, moved.shape[-1]))


def dense_positions(z: Any, tap: ConvTap) -> Any:
    """A dense product's output (or its gradient) as ``(T, O)``, positions in the
    order of :func:`dense_inputs`: ``dot_general`` puts the input's free axes
    first when the kernel is the right operand, after the output axis when it is
    the left one."""
    if tap.operand == 1:
        z = jnp.moveaxis(z, 0, -1)
    return jnp.reshape(z, (-1, z.shape[-1]))


def dense_layout(tap: ConvTap) -> str:
    """``"io"`` when the kernel's contracted axis is its first (flax ``(I, O)``),
    ``"oi"`` when it is its second (torch / equinox ``(O, I)``)."""
    return "io" if tap.kernel_axis == 0 else "oi"


def kernel_layout(tap: ConvTap) -> tuple[str, tuple[int, ...]]:
    """How the kernel leaf ravels: ``"oi"`` (output axis first, as torch's
    ``(O, C, kh, kw)``) or ``"io"`` (output axis last, as flax's ``(kh, kw, C, O)``),
    and the permutation taking the patches' feature axes ``(C, k0, k1, ...)`` to
    the order of the leaf's other axes.

    Raises:
        ValueError: the output axis is neither first nor last.
    """
    rhs_spec = tap.params["dimension_numbers"].rhs_spec
    ndim = len(rhs_spec)
    o_axis = rhs_spec[0]
    if o_axis == 0:
        layout = "oi"
    elif o_axis == ndim - 1:
        layout = "io"
    else:
        raise ValueError(
            f"the kernel's output-feature axis is axis {o_axis} of {ndim}; it must be the "
            "first (torch layout) or the last (flax layout)"
        )
    # role of each kernel axis in the patches' feature order: 0 = channel, 1+j = spatial j
    role = {rhs_spec[1]: 0, **{d: 1 + j for j, d in enumerate(rhs_spec[2:])}}
    perm = tuple(role[a] for a in range(ndim) if a != o_axis)
    return layout, perm


def reorder_features(a: Any, tap: ConvTap, perm: tuple[int, ...]) -> Any:
    """``a`` ``(..., C*k0*k1)`` in the patches' order, permuted to the kernel's."""
    dn = tap.params["dimension_numbers"]
    sizes = (tap.rhs_shape[dn.rhs_spec[1]], *(tap.rhs_shape[d] for d in dn.rhs_spec[2:]))
    if perm == tuple(range(len(perm))):
        return a
    lead = a.shape[:-1]
    split = jnp.reshape(a, (*lead, *sizes))
    n = len(lead)
    moved = jnp.transpose(split, (*range(n), *(n + q for q in perm)))
    return jnp.reshape(moved, (*lead, -1))


def traced(fn: Any, *args: Any) -> tuple[ClosedJaxpr, Any]:
    """``jax.make_jaxpr`` with the output tree."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    return closed, jax.tree_util.tree_structure(shape)
