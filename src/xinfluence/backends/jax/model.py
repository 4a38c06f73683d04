"""The traced model behind :class:`JaxGradientProvider`: flat parameters,
pytree paths and layer groups, the taps on convolutions and tracked layers.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from ... import _xp
from ..._state import PicklableState, check_picklable_function
from ..._xp import Array
from ...errors import user_stacklevel
from . import taps as _taps

Features = Callable[[Any, Array], Array]


def _key_name(key: Any) -> str:
    if isinstance(key, DictKey):
        return str(key.key)
    if isinstance(key, SequenceKey):
        return str(key.idx)
    if isinstance(key, GetAttrKey):
        return str(key.name)
    if isinstance(key, FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _path_keys(path: Sequence[Any]) -> tuple[str, ...]:
    return tuple(_key_name(k) for k in path)


#: Batches whose gradient pass's losses a model keeps for their loss check.
_REMEMBERED_LOSSES = 4


class _Model(PicklableState):
    """What every restriction of one provider shares: the function, the leaves,
    the names, the dense-layer declarations and the input-shape cache."""

    cast_inputs: bool = True  # x cast to the parameters' dtype (set by the provider)

    def __getstate__(self) -> dict[str, Any]:
        # the user's functions must pickle by name; compiled functions are rebuilt
        check_picklable_function(self.apply_fn, "apply_fn")
        check_picklable_function(self.loss, "the loss")
        for layer, (_, _, _, features) in self.dense.items():
            check_picklable_function(features, f"the features function of layer {layer!r}")
        state = super().__getstate__()
        state.update(_kfac_fns={}, _conv_fns={}, restricted={}, checked=set(), last_losses=())
        return state

    def __init__(
        self,
        apply_fn: Callable[[Any, Array], Any],
        params: Any,
        loss: Callable[[Any, Any], Array],
        dense_layers: Mapping[str, Features] | None,
        input_shape: tuple[int, ...] | None,
        conv_layers: Sequence[str] | None = None,
        tracked: Sequence[str] | None = None,
    ):
        if not callable(apply_fn):
            raise TypeError("apply_fn must be callable: apply_fn(params, x) -> output")
        if not callable(loss):
            raise TypeError("loss must be callable: loss(output, target) -> scalar mean loss")
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        if not flat:
            raise ValueError("params has no array leaves")
        keys = [_path_keys(path) for path, _ in flat]
        # flax nnx Variables flatten to ``.../<param>/value``: the layer is two keys up
        self.wrapped = tuple(
            bool(path) and isinstance(path[-1], GetAttrKey) and path[-1].name == "value"
            for path, _ in flat
        )
        names = ["/".join(k) if k else "root" for k in keys]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter paths joined with '/' are not unique: {names}")
        leaves = []
        for name, (_, leaf) in zip(names, flat, strict=True):
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                raise TypeError(
                    f"parameter {name!r} must be an array, got {type(leaf).__name__}; "
                    "for equinox models use eqx.partition(model, eqx.is_inexact_array)"
                )
            converted = jnp.asarray(leaf)
            if converted.dtype != leaf.dtype:
                warnings.warn(
                    f"parameter {name!r} of dtype {leaf.dtype} became {converted.dtype} in jax; "
                    'enable float64 with jax.config.update("jax_enable_x64", True) first',
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
            leaves.append(converted)
        dtype = leaves[0].dtype
        for name, leaf in zip(names, leaves, strict=True):
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(f"parameter {name!r} must be real floating, got {leaf.dtype}")
            if leaf.dtype != dtype:
                raise TypeError(
                    f"all parameters must share one dtype, got {dtype} and {leaf.dtype} ({name!r})"
                )
        self.apply_fn = apply_fn
        self.loss = loss
        self.params = params
        self.leaves: tuple[Array, ...] = tuple(leaves)
        self.names: tuple[str, ...] = tuple(names)
        self.keys: tuple[tuple[str, ...], ...] = tuple(keys)
        self.shapes: tuple[tuple[int, ...], ...] = tuple(
            tuple(int(d) for d in leaf.shape) for leaf in leaves
        )
        self.dtype = dtype
        self.xp = _xp.namespace(leaves[0])
        self.device = _xp.device_of(leaves[0])
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.accepted: set[tuple[Any, ...]] = set()
        # (weakref to x, weakref to y, per-sample losses) of the last gradient
        # passes, oldest first (remember_losses)
        self.last_losses: tuple[tuple[Any, Any, Array], ...] = ()
        self.accepted_x_shapes: list[tuple[int, ...]] = []
        # restricted providers by parameter names (JaxGradientProvider: typed loosely,
        # the provider module imports this one)
        self.restricted: dict[tuple[str, ...], Any] = {}
        self.dense = self._resolve_dense_layers(dense_layers)
        # layers found by tracing: the declared convolutions, or the tracked layers
        # (dense, 2-D weight, or convolutions); layer -> (weight, bias, layout, O)
        self.traced = self._resolve_conv_layers(conv_layers)
        self.tracked: tuple[str, ...] | None = None
        if tracked is not None:
            if dense_layers is not None or conv_layers is not None:
                raise ValueError(
                    "layers= (tracked layers, found by tracing) replaces dense_layers and "
                    "conv_layers: pass one or the other"
                )
            self.tracked, self.traced = self._resolve_tracked(tracked)
        self._kfac_fns: dict[tuple[str, ...], Callable[..., Any]] = {}
        self._conv_fns: dict[tuple[Any, ...], Any] = {}
        # input signatures whose structured gradients were checked against autodiff
        self.checked: set[tuple[Any, ...]] = set()

    # -- losses of the last gradient passes ---------------------------------
    def remember_losses(self, batch: Any, losses: Array) -> None:
        """Keep the per-sample ``losses`` of ``batch`` for its loss check (weak
        references to its arrays: nothing large is kept alive), for the last
        :data:`_REMEMBERED_LOSSES` batches: a query takes the test gradients, then
        the training chunks', and checks the test losses last. Every restriction
        shares them: all compute the same loss. The tuple is replaced, never
        changed in place, so concurrent queries at worst miss an entry."""
        try:
            entry = (weakref.ref(batch.x), weakref.ref(batch.y), losses)
        except TypeError:  # arrays without weak references
            return
        kept = tuple(e for e in self.last_losses if e[0]() is not batch.x)
        self.last_losses = (*kept[max(0, len(kept) + 1 - _REMEMBERED_LOSSES) :], entry)

    def remembered_losses(self, batch: Any) -> Array | None:
        """The losses kept by :meth:`remember_losses` if they are ``batch``'s."""
        for x_ref, y_ref, losses in reversed(self.last_losses):
            if x_ref() is batch.x and y_ref() is batch.y:
                return losses
        return None

    # -- dense layers ------------------------------------------------------
    def _weight_leaf(self, layer: str, kind: str, expected: str) -> tuple[str, str]:
        """The leaf ``{layer}/kernel`` (layout ``"io"``) or ``{layer}/weight``
        (``"oi"``) of a declared layer; ``expected`` describes them for the error."""
        kernel, weight = f"{layer}/kernel", f"{layer}/weight"
        names = set(self.names)
        if kernel in names and weight in names:
            raise ValueError(f"{kind} layer {layer!r} has both a 'kernel' and a 'weight'")
        if kernel in names:
            return kernel, "io"
        if weight in names:
            return weight, "oi"
        what = expected.format(kernel=kernel, weight=weight)
        raise ValueError(
            f"{kind} layer {layer!r} needs {what}; the parameters are {list(self.names)}"
        )

    def _resolve_dense_layers(
        self, dense_layers: Mapping[str, Features] | None
    ) -> OrderedDict[str, tuple[str, str | None, str, Features]]:
        """layer -> (weight name, bias name or None, "oi" | "io", features)."""
        out: OrderedDict[str, tuple[str, str | None, str, Features]] = OrderedDict()
        if dense_layers is None:
            return out
        if not isinstance(dense_layers, Mapping):
            raise TypeError("dense_layers must be a dict layer name -> features(params, x)")
        index = {n: i for i, n in enumerate(self.names)}
        for layer, features in dense_layers.items():
            if not callable(features):
                raise TypeError(f"dense_layers[{layer!r}] must be callable features(params, x)")
            wname, layout = self._weight_leaf(
                layer, "dense", "a 2-D leaf {kernel!r} (shape (I, O)) or {weight!r} (shape (O, I))"
            )
            wshape = self.shapes[index[wname]]
            if len(wshape) != 2:
                raise ValueError(f"{wname!r} must be 2-D, got shape {wshape}")
            n_out = wshape[1] if layout == "io" else wshape[0]
            bname: str | None = f"{layer}/bias"
            if bname in index:
                if self.shapes[index[bname]] != (n_out,):
                    raise ValueError(
                        f"{bname!r} must have shape ({n_out},), got {self.shapes[index[bname]]}"
                    )
            else:
                bname = None
            out[layer] = (wname, bname, layout, features)
        return out

    def kfac_fn(self, layers: tuple[str, ...]) -> Callable[..., Any]:
        """Jitted ``(leaves, x, y) -> ({layer: (a, s)}, per-sample losses (N,))`` for
        the dense ``layers``, over the full parameter set."""
        if layers in self._kfac_fns:
            return self._kfac_fns[layers]
        index = {n: i for i, n in enumerate(self.names)}
        dense = OrderedDict((k, self.dense[k]) for k in layers)
        treedef, apply_fn, loss = self.treedef, self.apply_fn, self.loss
        # per layer, the leaf whose per-sample gradient yields s
        probe = OrderedDict(
            (layer, index[b if b is not None else w]) for layer, (w, b, _, _) in dense.items()
        )

        def per_sample(sel: dict[str, Array], leaves: tuple[Array, ...], xi, yi):
            full = list(leaves)
            for layer, i in probe.items():
                full[i] = sel[layer]
            params = jax.tree_util.tree_unflatten(treedef, full)
            return jnp.reshape(loss(apply_fn(params, xi[None]), yi[None]), ())

        def fn(leaves, x, y):
            params = jax.tree_util.tree_unflatten(treedef, list(leaves))
            sel = {layer: leaves[i] for layer, i in probe.items()}
            losses, grads = jax.vmap(jax.value_and_grad(per_sample), in_axes=(None, None, 0, 0))(
                sel, leaves, x, y
            )
            out = {}
            for layer, (_, b, layout, features) in dense.items():
                a = features(params, x)
                g = grads[layer]
                if b is not None:
                    s = g
                else:
                    # rank-one g_n = outer(s_n, a_n) ("oi") or outer(a_n, s_n) ("io")
                    ga = (
                        jnp.einsum("noi,ni->no", g, a)
                        if layout == "oi"
                        else jnp.einsum("nio,ni->no", g, a)
                    )
                    aa = jnp.sum(a * a, axis=1, keepdims=True)
                    safe = jnp.where(aa > 0, aa, 1)
                    s = jnp.where(aa > 0, ga / safe, 0)
                out[layer] = (a, s)
            return out, losses

        self._kfac_fns[layers] = _xp.jit(fn)
        return self._kfac_fns[layers]

    # -- convolutions ---------------------------------------------------------
    def _resolve_conv_layers(
        self, conv_layers: Sequence[str] | None
    ) -> OrderedDict[str, tuple[str, str | None, str, int]]:
        """layer -> (kernel name, bias name or None, "oi" | "io", output channels)."""
        out: OrderedDict[str, tuple[str, str | None, str, int]] = OrderedDict()
        if conv_layers is None:
            return out
        if isinstance(conv_layers, str) or not isinstance(conv_layers, Sequence):
            raise TypeError("conv_layers must be a sequence of layer names, e.g. ['Conv_0']")
        index = {n: i for i, n in enumerate(self.names)}
        for layer in conv_layers:
            if not isinstance(layer, str):
                raise TypeError(f"conv_layers must hold layer names (str), got {layer!r}")
            if layer in self.dense or layer in out:
                raise ValueError(f"layer {layer!r} is declared twice")
            wname, layout = self._weight_leaf(
                layer,
                "conv",
                "a leaf {kernel!r} (flax layout (kh, kw, C, O)) or {weight!r} "
                "(torch / equinox layout (O, C, kh, kw))",
            )
            wshape = self.shapes[index[wname]]
            if len(wshape) < 3:
                raise ValueError(f"{wname!r} must have 3 or more axes, got shape {wshape}")
            n_out = wshape[-1] if layout == "io" else wshape[0]
            bname: str | None = f"{layer}/bias"
            if bname in index:
                bshape = self.shapes[index[bname]]
                # flax (O,), equinox (O, 1, 1)
                if not bshape or bshape[0] != n_out or math.prod(bshape) != n_out:
                    raise ValueError(
                        f"{bname!r} must have shape ({n_out},) or ({n_out}, 1, ..., 1), "
                        f"got {bshape}"
                    )
            else:
                bname = None
            out[layer] = (wname, bname, layout, n_out)
        return out

    def _resolve_tracked(
        self, tracked: Sequence[str]
    ) -> tuple[tuple[str, ...], OrderedDict[str, tuple[str, str | None, str, int]]]:
        """``(layer names, layer -> (weight, bias or None, layout, O))`` of the tracked
        layers: nodes holding a 2-D ``kernel`` / ``weight`` (dense) or one of 3 or
        more axes (a convolution), and optionally a ``bias``.

        Raises:
            ValueError: an unknown layer, no layer, or layers of an unsupported
                kind (named, with the leaves they hold).
            TypeError: ``tracked`` does not hold layer names.
        """
        if isinstance(tracked, str):
            tracked = [tracked]
        if not isinstance(tracked, Sequence):
            raise TypeError("layers must be a sequence of layer names, e.g. ['Dense_0']")
        chosen: list[str] = []
        for layer in tracked:
            if not isinstance(layer, str):
                raise TypeError(f"layers must hold layer names (str), got {layer!r}")
            if layer not in chosen:
                chosen.append(layer)
        if not chosen:
            raise ValueError("layers names no layer to track")
        nodes = {"/".join(k[:j]) for k in self.keys for j in range(1, len(k))}
        unknown = [k for k in chosen if k not in nodes]
        if unknown:
            raise ValueError(
                f"tracked layers {unknown} are not nodes of the parameter tree; nodes: "
                f"{sorted(nodes)[:20]}{' ...' if len(nodes) > 20 else ''}"
            )
        index = {n: i for i, n in enumerate(self.names)}
        bad: list[str] = []
        conv: list[str] = []
        out: OrderedDict[str, tuple[str, str | None, str, int]] = OrderedDict()
        for layer in chosen:
            weight = [f"{layer}/{k}" for k in ("kernel", "weight") if f"{layer}/{k}" in index]
            ndim = len(self.shapes[index[weight[0]]]) if len(weight) == 1 else 0
            if ndim < 2:
                held = [n[len(layer) + 1 :] for n in self.names if n.startswith(layer + "/")]
                bad.append(f"{layer!r} (holds {', '.join(held)})")
            elif ndim > 2:
                conv.append(layer)
            else:
                wname, layout = weight[0], "io" if weight[0].endswith("/kernel") else "oi"
                n_out = self.shapes[index[wname]][1 if layout == "io" else 0]
                bname: str | None = f"{layer}/bias"
                if bname not in index:
                    bname = None
                elif self.shapes[index[bname]] != (n_out,):
                    raise ValueError(
                        f"{bname!r} must have shape ({n_out},), got {self.shapes[index[bname]]}"
                    )
                out[layer] = (wname, bname, layout, n_out)
        if bad:
            raise ValueError(
                "tracked layers must be dense layers (a 2-D 'kernel' (I, O) or 'weight' "
                "(O, I), and optionally a 'bias' (O,)) or convolutions (a 'kernel' or "
                f"'weight' of 3 or more axes); unsupported: {', '.join(bad)}"
            )
        out.update(self._resolve_conv_layers(conv))
        return tuple(chosen), OrderedDict((k, out[k]) for k in chosen)

    def tracked_leaves(self) -> tuple[int, ...]:
        """Positions of the leaves a provider differentiates: every leaf, or with
        tracked layers their weights and biases."""
        if self.tracked is None:
            return tuple(range(len(self.names)))
        keep = {n for w, b, _, _ in self.traced.values() for n in (w, b) if n is not None}
        return tuple(i for i, n in enumerate(self.names) if n in keep)

    def is_conv(self, layer: str) -> bool:
        """Whether a traced layer is a convolution (its weight has 3 or more axes)."""
        return len(self.shapes[self.names.index(self.traced[layer][0])]) > 2

    def conv_fn(self, x: Array, *, ggn: bool, layers: tuple[str, ...]) -> Callable[..., Any]:
        """``(leaves, x, y) -> {layer: (a, s)}`` for traced layers (convolutions and
        tracked dense layers), compiled: a convolution's patches ``a`` ``(N, T, I)``
        and output gradients ``s`` ``(N, T, O)``; a dense layer's inputs and output
        gradients at its ``T`` positions (token axes) likewise, or ``(N, I)`` and
        ``(N, O)`` on 2-D inputs; with ``ggn`` the pseudo-gradients ``s``
        ``(N, M, T, O)`` (``(N, M, O)``) and the eigenvalues of the loss Hessians on
        the output ``(N, M)``. Traced once per input shape. The first call per
        input shape checks that each bias gradient is ``sum_t s_t`` (the bias is
        added to that layer's output), else ``ValueError``."""
        key = (tuple(x.shape[1:]), str(x.dtype), ggn, layers)
        if key in self._conv_fns:
            return self._conv_fns[key]
        treedef, apply_fn, loss = self.treedef, self.apply_fn, self.loss
        index = {n: i for i, n in enumerate(self.names)}

        def model(leaves, xb):
            return apply_fn(jax.tree_util.tree_unflatten(treedef, list(leaves)), xb)

        one = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
        closed, out_tree = _taps.traced(model, tuple(self.leaves), one)
        taps: dict[str, _taps.ConvTap] = {}
        perms: dict[str, tuple[int, ...]] = {}
        for layer in layers:
            wname, _, layout, _ = self.traced[layer]
            conv = self.is_conv(layer)
            kind = "conv" if conv else "dense"
            try:
                tap = _taps.find_conv_taps(closed, [index[wname]])[index[wname]]
                if tap.kind != kind:
                    raise ValueError(f"it feeds a {tap.kind} product, not a {kind} one")
                found, perm = _taps.kernel_layout(tap) if conv else (_taps.dense_layout(tap), ())
            except ValueError as exc:
                raise ValueError(f"{kind} layer {layer!r} ({wname!r}): {exc}") from exc
            if found != layout:
                raise ValueError(
                    f"{kind} layer {layer!r}: {wname!r} is used with its output-feature axis "
                    f"{'first' if found == 'oi' else 'last'}; a 'weight' must have it first "
                    "and a 'kernel' last"
                )
            taps[layer], perms[layer] = tap, perm
        # dense layers on 2-D inputs (one position) give (N, I), (N, O) factors, as
        # declared ones do; tokens folded into the batch axis, (T, I), keep T
        flat = {
            k
            for k, t in taps.items()
            if t.kind == "dense"
            and len(t.out_shape) == 2
            and math.prod(t.out_shape) == self.traced[k][3]
        }
        biases = {k: index[b] for k in layers if (b := self.traced[k][1]) is not None}

        def tapped(leaves, deltas, bias, xi):
            full = list(leaves)
            for k, i in biases.items():
                full[i] = bias[k]
            outs, ops = _taps.evaluate_with_taps(
                closed, [*full, xi], {taps[k].path: d for k, d in deltas.items()}
            )
            inputs = {}
            for k, t in taps.items():
                if t.kind == "dense":
                    inputs[k] = _taps.dense_inputs(ops[t.path][t.operand], t)
                else:
                    patches = _taps.conv_patches(ops[t.path][0], t)[0]
                    inputs[k] = _taps.reorder_features(patches, t, perms[k])
            return jax.tree_util.tree_unflatten(out_tree, outs), inputs

        def zeros():
            return {k: jnp.zeros(t.out_shape, t.out_dtype) for k, t in taps.items()}

        def positions(k, z):  # one sample's (1, ...) in out layout -> (T, O)
            t = taps[k]
            if t.kind == "dense":
                return _taps.dense_positions(z, t)
            return _taps.to_positions(z, t.params["dimension_numbers"].out_spec)[0]

        def bias_check(k, gb, s):  # bias gradient vs sum_t s_t: (error, scale)
            gb = jnp.reshape(gb, s.shape[:-2] + s.shape[-1:])
            err = jnp.max(jnp.abs(gb - jnp.sum(s, axis=-2)))
            return err, jnp.maximum(jnp.max(jnp.abs(gb)), jnp.max(jnp.sum(jnp.abs(s), axis=-2)))

        def gradient_one(leaves, xi, yi):
            def per_sample(deltas, bias):
                out, inputs = tapped(leaves, deltas, bias, xi[None])
                return jnp.reshape(loss(out, yi[None]), ()), inputs

            bias0 = {k: leaves[i] for k, i in biases.items()}
            (s, gb), inputs = jax.grad(per_sample, argnums=(0, 1), has_aux=True)(zeros(), bias0)
            s = {k: positions(k, s[k]) for k in taps}
            checks = {k: bias_check(k, gb[k], s[k]) for k in biases}
            return {k: (inputs[k], s[k]) for k in taps}, checks

        def out_loss(oi, yi):
            return jnp.reshape(loss(oi[None], yi[None]), ())

        def ggn_one(leaves, xi, yi):
            def sample_out(deltas, bias):
                out, inputs = tapped(leaves, deltas, bias, xi[None])
                return out[0], inputs

            bias0 = {k: leaves[i] for k, i in biases.items()}
            out, pull, inputs = jax.vjp(sample_out, zeros(), bias0, has_aux=True)
            m = math.prod(out.shape)
            h = jnp.reshape(jax.hessian(out_loss)(out, yi), (m, m))
            lam, vec = jnp.linalg.eigh((h + h.T) / 2)
            root = vec * jnp.sqrt(jnp.maximum(lam, 0))[None, :]  # (M, C), H = root root^T
            cols = jnp.reshape(root.T, (m, *out.shape))
            s, gb = jax.vmap(pull)(cols)
            s = {k: jax.vmap(lambda z, k=k: positions(k, z))(s[k]) for k in taps}
            checks = {k: bias_check(k, gb[k], s[k]) for k in biases}
            return ({k: (inputs[k], s[k]) for k in taps}, lam), checks

        def batched(leaves, x, y):
            out, checks = jax.vmap(ggn_one if ggn else gradient_one, in_axes=(None, 0, 0))(
                leaves, x, y
            )
            result = out[0] if ggn else out
            for k in flat:
                a, s = result[k]
                result[k] = (a[:, 0], s[:, :, 0] if ggn else s[:, 0])
            checks = {k: (jnp.max(e), jnp.max(c)) for k, (e, c) in checks.items()}
            return out, checks

        jitted = _xp.jit(batched)
        eps = float(jnp.finfo(self.dtype).eps)

        def fn(leaves, x, y):
            out, checks = jitted(leaves, x, y)
            if ("taps", *key) not in self.checked and x.shape[0] > 0:
                for k, (err, scale) in checks.items():
                    err, scale = float(err), float(scale)
                    # non-finite values are reported downstream
                    if math.isfinite(scale) and not err <= 100 * math.sqrt(eps) * scale:
                        raise ValueError(
                            f"layer {k!r}: the gradient of {self.traced[k][1]!r} is not the "
                            f"sum over positions of the output gradients (error {err:.3g} "
                            f"against {scale:.3g}): the bias must be added to the output of "
                            "the layer's product, before anything else uses it"
                        )
                self.checked.add(("taps", *key))
            return out

        self._conv_fns[key] = fn
        return fn


def _pad_rows(v: Array) -> Array:
    """Zero rows up to :func:`~xinfluence._xp.padded_rows` (1, 2, 4, 8, then multiples
    of 8): solvers call with a varying number of vectors, and each new shape would
    compile anew; multiples of 8 waste less than powers of two (100 -> 104, not 128)."""
    k = int(v.shape[0])
    target = _xp.padded_rows(k, xp=jnp)
    if target == k:
        return v
    return jnp.concatenate([v, jnp.zeros((target - k, v.shape[1]), dtype=v.dtype)], axis=0)


#: Tangents pushed together through the batch by the Hessian- and Gauss-Newton-
#: vector products and ``jacobian_prod`` on a CPU: all of them at once keep
#: ``(K, N, ...)`` intermediates that fall out of cache (104 tangents, 1,000
#: samples, 2,410 parameters: 38 -> 16 ms per product; 4 to 16 at a time
#: measured within 25% of each other, 1 and 32 slower). Other devices push all
#: of them at once, in parallel.
_CPU_TANGENT_CHUNK = 8

#: Below this many ``K * N * P`` the intermediates fit in cache and the chunks'
#: loop only adds compile time (0.1 s per product on 24 tangents, 200 samples,
#: 1,210 parameters, for no faster run).
_CPU_CHUNK_MIN_WORK = 1 << 24


def _along_rows(fn: Any, v: Array, /, *, samples: int, device: Any) -> Array:
    """``vmap(fn)(v)`` over the rows ``(K, P)`` of ``v`` for a batch of ``samples``
    samples; on a CPU, where ``K * samples * P`` reaches ``_CPU_CHUNK_MIN_WORK``,
    in chunks of ``_CPU_TANGENT_CHUNK`` rows (:func:`jax.lax.map`). Rows come
    padded by :func:`_pad_rows`: a multiple of the chunk when there are more."""
    k, p = v.shape
    if (
        str(getattr(device, "platform", "cpu")) != "cpu"
        or k <= _CPU_TANGENT_CHUNK
        or k * samples * p < _CPU_CHUNK_MIN_WORK
    ):
        return jax.vmap(fn)(v)
    return jax.lax.map(fn, v, batch_size=_CPU_TANGENT_CHUNK)
