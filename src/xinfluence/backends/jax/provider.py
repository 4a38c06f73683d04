"""The public :class:`JaxGradientProvider`."""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, final

import jax
import jax.numpy as jnp

from ... import _xp
from ..._state import fingerprint
from ..._xp import Array, Namespace
from ...types import Batch, GradientProvider
from .gauss_newton import _GaussNewton
from .model import _along_rows, _Model, _pad_rows

#: Hessian columns computed together by the dense Hessian (forward-mode tangents
#: in one vectorised pass; 16 and 32 measured equally fast, 256 and all at once
#: slower on a CPU)
_HESSIAN_CHUNK = 16

#: Per-sample gradients of up to this many numbers (samples x parameters, 16 MB
#: in float32) are cheap to form: for such a batch one program, the gradient
#: pass, also serves its loss check and ``jacobian_prod`` (``grads @ g^T``), so
#: that a cold fit and query compile it once per batch shape instead of three
#: programs (each 0.2-0.35 s on a CPU for a 2,410-parameter MLP; its gradients
#: of 1,000 samples take 2 ms, a forward pass 0.2 ms)
_SMALL_GRADIENTS = 1 << 22

#: Batches of one small row count padded to a larger compiled program before that
#: count gets its own: padding wastes at most this many larger passes (16 MB of
#: gradients each, at most), about what compiling its own program costs
_PADDED_USES = 8


def _pad_batch(x: Array, y: Array, rows: int) -> tuple[Array, Array]:
    """``x`` and ``y`` with copies of their first row appended up to ``rows``."""

    def pad(a: Array) -> Array:
        extra = jnp.broadcast_to(a[:1], (rows - a.shape[0], *a.shape[1:]))
        return jnp.concatenate([a, extra], axis=0)

    return pad(x), pad(y)


if TYPE_CHECKING:
    from .model import Features


@final
class JaxGradientProvider(_GaussNewton, GradientProvider):
    """Per-sample derivatives of a JAX model, all through :func:`jax.jit`.

    Args:
        apply_fn:
            ``apply_fn(params, x) -> output`` for a batch ``x`` of shape ``(N, *D)``;
            a pure, jittable function treating samples independently.
        params:
            Any pytree of floating arrays sharing one dtype (nested dicts, flax
            ``params``, the array part of an equinox model). Its leaves, in pytree
            order and raveled row-major, form the flat parameter vector.
        loss:
            ``loss(output, target) -> scalar``, the *mean* over the batch. The
            per-sample loss is ``loss(apply_fn(params, x_i[None]), y_i[None])``.
        dense_layers:
            Optional ``{layer_name: features(params, x) -> (N, I)}`` declaring dense
            layers for :meth:`kfac_factors` (see the module docstring).
        conv_layers:
            Optional names of convolution layers for :meth:`kfac_factors`, each a
            node holding a ``"kernel"`` (flax layout ``(kh, kw, C, O)``) or a
            ``"weight"`` (torch / equinox layout ``(O, C, kh, kw)``) fed to one
            ``lax.conv_general_dilated``, and optionally a ``"bias"`` added to its
            output. Found by tracing the model (see the module docstring).
        layers:
            Tracked layers, found by tracing like ``conv_layers`` (instead of
            ``dense_layers`` and ``conv_layers``): layer names (pytree nodes,
            ``"Block_0/Dense_1"``) holding a ``"kernel"`` or ``"weight"`` and
            optionally a ``"bias"``. A 2-D weight is a dense layer: a flax ``Dense``
            (kernel ``(I, O)``) or an equinox ``Linear`` (weight ``(O, I)``) on
            inputs ``(N, I)`` or ``(N, *S, I)`` (a token axis), fed to one
            ``dot_general``; more axes a convolution. The provider then covers
            only these layers' weights and biases, as :meth:`restrict` to them
            would: the other leaves are left out of the curvature and of the
            scores on purpose and listed in :attr:`untracked_parameters` (and the
            repr); :attr:`tracked_layers` holds the layer names. Nodes of another
            kind (an embedding, a LayerNorm) are a ``ValueError`` that names
            them; a weight used otherwise than in one product is one at the first
            trace. This is how the structured methods (``EkfacInfluence``,
            ``ProjectedInfluence(projection="kronecker")``) run on transformers.
        input_shape:
            Optional per-sample shape ``D`` of ``x``; when given, other shapes are a
            ``ValueError`` before the model runs. Otherwise a shape is checked by
            tracing the model on it once (:func:`jax.eval_shape`).
        cast_inputs:
            Cast ``x`` to the parameters' dtype (default). Token ids for
            ``nn.Embed`` and other integer inputs pass ``False``: ``x`` then keeps
            its dtype (perturbation influences, which differentiate in ``x``, need
            floating inputs).

    Shapes: ``flat_grads`` ``(N, P)`` (vmapped reverse mode, or from the declared
    layers' factors when they hold every leaf and include a convolution);
    ``flat_mixed_grads``
    ``(N, *D, P)`` (forward mode over the per-sample gradient in ``x``);
    ``jacobian_prod(batch, g)`` ``(N, K)`` (forward mode along each row of
    ``g``, the ``(N, P)`` gradients are never formed, or from the factors as
    ``flat_grads``); ``hvp(batch, v)``
    ``(K, P)`` (forward over reverse on the batch-mean loss); ``hessian``
    ``(P, P)`` (:func:`jax.hessian` of the batch-mean loss).

    :meth:`restrict` returns a provider differentiating only the named leaves
    (the others enter as constants), so blockwise methods compute only their
    block's derivatives.
    """

    def __init__(
        self,
        apply_fn: Callable[[Any, Array], Any],
        params: Any,
        loss: Callable[[Any, Any], Array],
        *,
        dense_layers: Mapping[str, Features] | None = None,
        conv_layers: Sequence[str] | None = None,
        layers: Sequence[str] | None = None,
        input_shape: Sequence[int] | None = None,
        cast_inputs: bool = True,
    ):
        model = _Model(
            apply_fn,
            params,
            loss,
            dense_layers,
            None if input_shape is None else tuple(input_shape),
            conv_layers,
            layers,
        )
        model.cast_inputs = bool(cast_inputs)
        self._setup(model, model.tracked_leaves())

    def __getstate__(self) -> dict[str, Any]:  # the jitted functions are rebuilt on load
        return {"_model": self._model, "_active": self._active}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["_model"], state["_active"])

    @classmethod
    def _restricted(cls, model: _Model, active: tuple[int, ...]) -> JaxGradientProvider:
        self = cls.__new__(cls)
        self._setup(model, active)
        return self

    def _setup(self, model: _Model, active: tuple[int, ...]) -> None:
        self._model = model
        self._active = active
        active_set = set(active)
        self._fixed_idx = tuple(i for i in range(len(model.names)) if i not in active_set)
        self._fixed = tuple(model.leaves[i] for i in self._fixed_idx)
        self._theta = jnp.concatenate([jnp.ravel(model.leaves[i]) for i in active])
        self._build()

    # -- the parametrisation -------------------------------------------------
    def _build(self) -> None:
        """Create the jitted derivatives once; :func:`jax.jit` caches per shape."""
        model = self._model
        active, fixed_idx = self._active, self._fixed_idx
        shapes = [model.shapes[i] for i in active]
        offsets = [0]
        for s in shapes:
            offsets.append(offsets[-1] + math.prod(s))
        treedef, apply_fn, loss = model.treedef, model.apply_fn, model.loss
        n_leaves = len(model.names)
        along_rows = functools.partial(_along_rows, device=model.device)

        def params_of(theta, fixed):
            leaves: list[Any] = [None] * n_leaves
            for j, i in enumerate(active):
                leaves[i] = jnp.reshape(theta[offsets[j] : offsets[j + 1]], shapes[j])
            for j, i in enumerate(fixed_idx):
                leaves[i] = fixed[j]
            return jax.tree_util.tree_unflatten(treedef, leaves)

        def per_sample(theta, fixed, xi, yi):
            out = loss(apply_fn(params_of(theta, fixed), xi[None]), yi[None])
            return jnp.reshape(out, ())

        def losses(theta, fixed, x, y):
            return jax.vmap(per_sample, in_axes=(None, None, 0, 0))(theta, fixed, x, y)

        def mean_loss(theta, fixed, x, y):
            return jnp.mean(losses(theta, fixed, x, y))

        sample_grad = jax.grad(per_sample)

        sample_value_grad = jax.value_and_grad(per_sample)

        def grads(theta, fixed, x, y):
            # the losses come with the forward pass: the loss check of a batch whose
            # gradients were taken then compiles and runs no program of its own
            losses, g = jax.vmap(sample_value_grad, in_axes=(None, None, 0, 0))(theta, fixed, x, y)
            return g, losses

        def mixed(theta, fixed, x, y):
            def one(xi, yi):
                jac = jax.jacfwd(sample_grad, argnums=2)(theta, fixed, xi, yi)  # (P, *D)
                return jnp.moveaxis(jac, 0, -1)

            return jax.vmap(one)(x, y)

        def jac_prod(theta, fixed, x, y, g):
            def along(gk):
                return jax.jvp(lambda t: losses(t, fixed, x, y), (theta,), (gk,))[1]

            # the losses too, for the batch's loss check (one forward pass more)
            prods = jnp.transpose(along_rows(along, g, samples=x.shape[0]))  # (N, K)
            return prods, losses(theta, fixed, x, y)

        mean_grad = jax.grad(mean_loss)

        def hvp(theta, fixed, x, y, v):
            def along(vk):
                return jax.jvp(lambda t: mean_grad(t, fixed, x, y), (theta,), (vk,))[1]

            return along_rows(along, v, samples=x.shape[0])

        def hessian(theta, fixed, x, y):
            # columns H e_j by forward over reverse, _HESSIAN_CHUNK at a time:
            # jax.hessian pushes all P tangents through the batch at once, whose
            # (P, N, ...) intermediates fall out of cache (2410 parameters, 1000
            # samples: 2x the time on a CPU, float32 and float64)
            p = theta.shape[0]
            if p == 0:
                return jnp.zeros((0, 0), dtype=theta.dtype)

            def column(j):
                e_j = jax.nn.one_hot(j, p, dtype=theta.dtype)
                return jax.jvp(lambda t: mean_grad(t, fixed, x, y), (theta,), (e_j,))[1]

            # whole chunks (zero tangents past P): a remainder chunk would be a
            # second copy of the body to compile (0.6 -> 1.0 s on the MLP above)
            n = -(-p // _HESSIAN_CHUNK) * _HESSIAN_CHUNK
            return jax.lax.map(column, jnp.arange(n), batch_size=_HESSIAN_CHUNK)[:p]

        self._params_of = params_of
        self._jit_losses = _xp.jit(losses)
        self._jit_grads = _xp.jit(grads)
        self._jit_mixed = _xp.jit(mixed)
        self._jit_jac_prod = _xp.jit(jac_prod)
        self._jit_times_transpose = _xp.jit(lambda grads, g: grads @ g.T)  # jacobian_prod
        # _gradient_pass on a batch padded to a compiled row count m (tiny programs)
        self._jit_pad_rows = _xp.jit(lambda x, y, m: _pad_batch(x, y, m), static_argnums=2)
        self._jit_first_rows = _xp.jit(
            lambda grads, losses, n: (grads[:n], losses[:n]), static_argnums=2
        )
        # row counts whose small-gradient program is compiled, by the batch's kind
        self._grad_rows: dict[tuple[Any, ...], dict[int, int]] = {}
        self._jit_hvp = _xp.jit(hvp)
        self._jit_hessian = _xp.jit(hessian)

    # -- the model -------------------------------------------------------
    @property
    def tracked_layers(self) -> tuple[str, ...] | None:
        """The tracked layers (``layers=``), or None when the provider was built
        without them."""
        return self._model.tracked

    @property
    def untracked_parameters(self) -> tuple[str, ...]:
        """Leaves left out of the curvature and the scores because they belong to no
        tracked layer (empty without ``layers=``)."""
        m = self._model
        kept = set(m.tracked_leaves())
        return tuple(n for i, n in enumerate(m.names) if i not in kept)

    @property
    def xp(self) -> Namespace:
        return self._model.xp

    @property
    def dtype(self) -> Any:
        return self._model.dtype

    @property
    def device(self) -> Any:
        return self._model.device

    @property
    def parameter_shapes(self) -> OrderedDict[str, tuple[int, ...]]:
        m = self._model
        return OrderedDict((m.names[i], m.shapes[i]) for i in self._active)

    def parameter_fingerprint(self) -> str:
        """SHA-256 of every leaf (active or held fixed)."""
        m = self._model
        return fingerprint(zip(m.names, m.leaves))

    def parameter_version(self) -> int:
        """Constant: the provider holds its own jax arrays, which are immutable."""
        return 0

    @property
    def params(self) -> Any:
        """The parameter pytree the provider was built with."""
        return self._model.params

    @property
    def flat_params(self) -> Array:
        """The (active) parameters as one flat vector ``(P,)``."""
        return self._theta

    def unravel(self, flat: Array) -> OrderedDict[str, Array]:
        """Split a flat ``(P,)`` vector (a factor, say) into the parameters' shapes."""
        if tuple(flat.shape) != (self.n_parameters,):
            raise ValueError(f"expected shape ({self.n_parameters},), got {tuple(flat.shape)}")
        out: OrderedDict[str, Array] = OrderedDict()
        slices = self.parameter_slices
        for name, shape in self.parameter_shapes.items():
            out[name] = jnp.reshape(flat[slices[name]], shape)
        return out

    def layer_groups(self) -> OrderedDict[str, list[str]]:
        """Leaves grouped by their key path without the last key (root leaves:
        ``"root"``): ``Dense_0`` for flax linen's ``Dense_0/kernel``, ``layers/0``
        for equinox's ``layers/0/weight``; the ``value`` attribute of a flax nnx
        Variable is not a level (``l1/kernel/value`` is in layer ``l1``)."""
        m = self._model
        groups: OrderedDict[str, list[str]] = OrderedDict()
        for i in self._active:
            keys = m.keys[i][:-1] if m.wrapped[i] else m.keys[i]
            layer = "/".join(keys[:-1]) if len(keys) > 1 else "root"
            groups.setdefault(layer, []).append(m.names[i])
        return groups

    def restrict(self, names: Sequence[str]) -> JaxGradientProvider:
        """A provider differentiating only the leaves ``names`` (the others fixed).

        The flat order follows :attr:`parameter_names`, not ``names``.
        """
        if isinstance(names, str):
            names = [names]
        mine = self.parameter_names
        unknown = [n for n in names if n not in mine]
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; known: {list(mine)}")
        if not names:
            raise ValueError("restrict needs at least one parameter name")
        wanted = set(names)
        m = self._model
        active = tuple(i for i in self._active if m.names[i] in wanted)
        if active == self._active:
            return self
        key = tuple(m.names[i] for i in active)
        if key not in m.restricted:
            m.restricted[key] = JaxGradientProvider._restricted(m, active)
        return m.restricted[key]

    # -- batches ---------------------------------------------------------
    def check_input_shape(self, batch: Batch) -> None:
        expected = self._model.input_shape
        if expected is not None and tuple(batch.x.shape[1:]) != expected:
            raise ValueError(
                f"expected x of shape (N, {', '.join(map(str, expected))}), "
                f"got {tuple(batch.x.shape)}"
            )

    def prepare_batch(self, batch: Batch) -> Batch:
        """Check namespace, finiteness and shape; cast ``x`` (and a floating ``y``)
        to the parameters' dtype."""
        batch = super().prepare_batch(batch)
        xp, dtype = self.xp, self.dtype
        x = batch.x
        if self.cast_inputs:
            x = _xp.as_float(x, dtype=dtype, xp=xp, what="x")
        y = batch.y
        if xp.isdtype(y.dtype, "real floating"):
            y = _xp.as_float(y, dtype=dtype, xp=xp, what="y")
        self._probe(x, y, batch.x.dtype)
        return Batch(x, y)

    @property
    def cast_inputs(self) -> bool:
        """Whether :meth:`prepare_batch` casts ``x`` to the parameters' dtype
        (``cast_inputs=False`` keeps token ids integer, for ``nn.Embed``)."""
        return bool(getattr(self._model, "cast_inputs", True))

    def _probe(self, x: Array, y: Array, x_dtype: Any = None) -> None:
        """Trace model and loss once per input signature (shapes only, no computation)
        on a batch of two: the model must accept ``x`` and the loss must reduce."""
        m = self._model
        sig = (tuple(x.shape[1:]), str(x.dtype), tuple(y.shape[1:]), str(y.dtype))
        if sig in m.accepted:
            return
        xs = jax.ShapeDtypeStruct((2, *x.shape[1:]), x.dtype)
        ys = jax.ShapeDtypeStruct((2, *y.shape[1:]), y.dtype)
        try:
            out = jax.eval_shape(self._batch_loss, self._theta, self._fixed, xs, ys)
        except Exception as exc:  # shape errors surface as TypeError, ValueError, ...
            seen = [m.input_shape] if m.input_shape is not None else m.accepted_x_shapes
            expected = (
                " or ".join(f"(N, {', '.join(map(str, s))})" for s in seen)
                if seen
                else "(N, *D) that apply_fn accepts"
            )
            hint = ""
            if x_dtype is not None and x_dtype != x.dtype and jnp.issubdtype(x_dtype, jnp.integer):
                hint = (
                    f" (x holds integers, which the provider casts to {x.dtype}; for token "
                    "ids (nn.Embed) or other integer inputs pass cast_inputs=False)"
                )
            raise ValueError(
                f"expected x of shape {expected}, got {tuple(x.shape)} (with y of shape "
                f"{tuple(y.shape)}): apply_fn or loss failed with {type(exc).__name__}: "
                f"{exc}{hint}"
            ) from exc
        if math.prod(getattr(out, "shape", (0,))) != 1:
            raise ValueError(
                "loss(output, target) must return a scalar, the mean over the batch; on a "
                f"batch of 2 it returned shape {getattr(out, 'shape', type(out).__name__)} "
                "(add .mean() to a per-example loss such as optax's)"
            )
        m.accepted.add(sig)
        if tuple(x.shape[1:]) not in m.accepted_x_shapes:
            m.accepted_x_shapes.append(tuple(x.shape[1:]))

    def _batch_loss(self, theta, fixed, x, y):
        m = self._model
        return m.loss(m.apply_fn(self._params_of(theta, fixed), x), y)

    # -- derivatives -----------------------------------------------------
    def _check_vectors(self, v: Array, what: str) -> Array:
        _xp.check_namespace(v, xp=self.xp, what=what)
        if v.ndim != 2 or v.shape[1] != self.n_parameters:
            raise ValueError(
                f"expected {what} of shape (K, {self.n_parameters}), got {tuple(v.shape)}"
            )
        return _xp.as_float(v, dtype=self.dtype, xp=self.xp, what=what)

    def losses(self, batch: Batch) -> Array:
        """Per-sample losses ``(N,)``: those of a batch whose gradients (or their
        products, or layer factors) were taken lately come from that pass; where
        its gradients are small (:data:`_SMALL_GRADIENTS`) from a gradient pass,
        whose program the batch's queries use (one compilation, not two); else
        from a forward pass."""
        remembered = self._model.remembered_losses(batch)
        if remembered is not None:
            return remembered
        if self._small_gradients(batch):
            return self._gradient_pass(batch)[1]
        return self._jit_losses(self._theta, self._fixed, batch.x, batch.y)

    def _small_gradients(self, batch: Batch, *, reverse_mode: bool = True) -> bool:
        """Whether ``batch``'s per-sample gradients hold at most
        :data:`_SMALL_GRADIENTS` numbers (and, with ``reverse_mode``, are formed
        by reverse mode, not from declared layers' factors)."""
        small = 0 < int(batch.x.shape[0]) * self.n_parameters <= _SMALL_GRADIENTS
        return small and (not reverse_mode or self._structured_layers() is None)

    def _gradient_pass(self, batch: Batch) -> tuple[Array, Array]:
        """Per-sample gradients ``(N, P)`` and losses ``(N,)`` by vmapped reverse
        mode; the losses are kept for the batch's loss check.

        Small gradients (:data:`_SMALL_GRADIENTS`) of ``N`` samples, where the
        program of a larger batch of the same kind is compiled, are computed by
        that program on the batch padded with copies of its first sample (a test
        batch of 100 by the training batch's program of 1,000: 2 ms more than its
        own, against 0.3 s to compile it), for the first :data:`_PADDED_USES`
        batches of ``N`` samples; later ones compile their own."""
        x, y = batch.x, batch.y
        n = int(x.shape[0])
        # row count -> batches padded so far, or -1 where its program is compiled
        rows = self._grad_rows.setdefault(
            (tuple(x.shape[1:]), str(x.dtype), tuple(y.shape[1:]), str(y.dtype)), {}
        )
        small = self._small_gradients(batch, reverse_mode=False)  # callers decided the mode
        m = n
        if small and 0 <= rows.get(n, 0) < _PADDED_USES:
            m = min((r for r, uses in rows.items() if uses < 0 and r > n), default=n)
        if m == n:
            grads, losses = self._jit_grads(self._theta, self._fixed, x, y)
            if small:
                rows[n] = -1
        else:
            rows[n] = rows.get(n, 0) + 1
            padded = self._jit_pad_rows(x, y, m)
            grads, losses = self._jit_first_rows(
                *self._jit_grads(self._theta, self._fixed, *padded), n
            )
        self._model.remember_losses(batch, losses)
        return grads, losses

    def per_sample_losses(self, batch: Batch) -> Array:
        return self.losses(batch)

    def flat_grads(self, batch: Batch) -> Array:
        """Per-sample gradients ``(N, P)``.

        When every differentiated leaf is the weight or bias of a declared dense
        or convolution layer, and one of the layers is a convolution, they are
        assembled from :meth:`kfac_factors`
        (``outer(s_n, a_n)``, ``sum_t outer(s_nt, a_nt)``): one batched product
        per layer instead of vmapped reverse mode, which differentiates each
        sample's convolution kernels separately (a grouped convolution, slow
        on CPU). The first batch of each input shape is checked against reverse
        mode on two of its samples; a mismatch (a ``features`` function that
        does not return the layer's inputs, a bias not added to the layer's
        output) raises ``ValueError``.
        """
        if self._structured_layers() is None or batch.x.shape[0] == 0:
            return self._gradient_pass(batch)[0]
        grads = self._structured_grads(batch)
        m = self._model
        key = (tuple(batch.x.shape[1:]), str(batch.x.dtype), self._active)
        if key not in m.checked:
            few = Batch(batch.x[:2], batch.y[:2])
            ref = self._jit_grads(self._theta, self._fixed, few.x, few.y)[0]
            err = float(jnp.max(jnp.abs(grads[:2] - ref)))
            scale = float(jnp.max(jnp.abs(ref)))
            if not math.isfinite(scale):  # non-finite gradients are reported downstream
                return grads
            if not err <= 100 * math.sqrt(float(jnp.finfo(self.dtype).eps)) * max(scale, 1e-300):
                worst = max(
                    self.parameter_slices.items(),
                    key=lambda kv: float(jnp.max(jnp.abs(grads[:2, kv[1]] - ref[:, kv[1]]))),
                )[0]
                raise ValueError(
                    "the declared layers do not reproduce the model's per-sample gradients "
                    f"(max error {err:.3g} against {scale:.3g}, worst in {worst!r}): check that "
                    "each dense_layers features function returns that layer's inputs and that "
                    "each bias is added to its layer's output"
                )
            m.checked.add(key)
        return grads

    def _structured_layers(self) -> OrderedDict[str, tuple[str, str | None]] | None:
        """:meth:`kfac_layers` when they hold every differentiated leaf and one of
        them is a convolution, else None (``vmap(grad)`` of dense layers is as fast
        as their factors)."""
        layers = self.kfac_layers()
        m = self._model
        if not any(layer in m.traced and m.is_conv(layer) for layer in layers):
            return None
        covered = {n for w, b in layers.values() for n in (w, b) if n is not None}
        return layers if covered == set(self.parameter_names) else None

    def _structured_grads(self, batch: Batch) -> Array:
        layers = self._structured_layers()
        assert layers is not None
        layouts = self.kfac_layouts()
        factors = self.kfac_factors(batch)
        n = batch.x.shape[0]
        parts: dict[str, Array] = {}
        for layer, (w, b) in layers.items():
            a, s = factors[layer]
            if a.ndim == 2:  # dense: one position
                a, s = a[:, None, :], s[:, None, :]
            if layouts[layer] == "oi":
                g = jnp.einsum("nto,nti->noi", s, a, precision=jax.lax.Precision.HIGHEST)
            else:
                g = jnp.einsum("nti,nto->nio", a, s, precision=jax.lax.Precision.HIGHEST)
            parts[w] = jnp.reshape(g, (n, -1))
            if b is not None:
                parts[b] = jnp.sum(s, axis=1)
        return jnp.concatenate([parts[name] for name in self.parameter_names], axis=1)

    def flat_mixed_grads(self, batch: Batch) -> Array:
        if not jnp.issubdtype(batch.x.dtype, jnp.floating):
            raise TypeError(
                f"flat_mixed_grads needs floating inputs x (perturbation influences "
                f"differentiate in x), got dtype {batch.x.dtype}"
            )
        return self._jit_mixed(self._theta, self._fixed, batch.x, batch.y)

    def jacobian_prod(self, batch: Batch, g: Array) -> Array:
        """``(N, K)`` products of the per-sample gradients with the rows of ``g``:
        forward mode along each row; or the gradients times ``g^T`` where they
        hold at most :data:`_SMALL_GRADIENTS` numbers (one program for the
        batch's gradients, products and loss check); or, when every leaf is in a
        declared layer and one of them is a convolution, the structured
        :meth:`flat_grads` in chunks of samples that fit
        :func:`xinfluence.memory_budget` times ``g^T`` (one factor pass instead of
        ``K`` forward passes)."""
        g = self._check_vectors(g, "g")
        k = g.shape[0]
        n = batch.x.shape[0]
        if self._structured_layers() is not None and n > 0:
            from ..._config import memory_budget

            per_sample = 3 * self.n_parameters * batch.x.dtype.itemsize
            step = max(1, min(n, memory_budget() // max(1, per_sample)))
            rows = [
                self.flat_grads(Batch(batch.x[lo : lo + step], batch.y[lo : lo + step])) @ g.T
                for lo in range(0, n, step)
            ]
            return rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=0)
        if self._small_gradients(batch):  # the gradient pass's program (see losses)
            return self._jit_times_transpose(self._gradient_pass(batch)[0], g)
        out, losses = self._jit_jac_prod(self._theta, self._fixed, batch.x, batch.y, _pad_rows(g))
        self._model.remember_losses(batch, losses)
        return out[:, :k]

    def hvp(self, batch: Batch, v: Array) -> Array:
        v = self._check_vectors(v, "v")
        k = v.shape[0]
        return self._jit_hvp(self._theta, self._fixed, batch.x, batch.y, _pad_rows(v))[:k]

    def hessian(self, batch: Batch) -> Array:
        h = self._jit_hessian(self._theta, self._fixed, batch.x, batch.y)
        return _xp.symmetrize(h, xp=self.xp)

    # -- Kronecker factors ---------------------------------------------------
    def kfac_layers(self) -> OrderedDict[str, tuple[str, str | None]]:
        """Declared dense and conv layers whose weight this provider differentiates,
        in the order ``dense_layers`` or ``layers`` (tracked layers) declares
        them, or in parameter order when ``conv_layers`` are declared:
        ``layer -> (weight name, bias name or None)``.

        The bias name is None when the layer has no bias or the bias is not
        among this provider's parameters. Empty without ``dense_layers``,
        ``conv_layers`` and ``layers``. (A Kronecker projection draws each
        layer's maps by its position here: tracked layers listed in a torch
        model's module order draw the torch provider's maps.)
        """
        m = self._model
        mine = set(self.parameter_names)
        declared = [(layer, w, b) for layer, (w, b, _, _) in m.dense.items()]
        if m.tracked is not None:
            declared = [(layer, w, b) for layer, (w, b, _, _) in m.traced.items()]
        elif m.traced:  # dense layers alone keep their declared order (projection streams)
            declared += [(layer, w, b) for layer, (w, b, _, _) in m.traced.items()]
            declared.sort(key=lambda t: m.names.index(t[1]))
        out: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        for layer, w, b in declared:
            if w in mine:
                out[layer] = (w, b if b in mine else None)
        return out

    def kfac_layouts(self) -> OrderedDict[str, str]:
        """Weight layout per layer of :meth:`kfac_layers`: ``"oi"`` for a torch-style
        ``weight`` ``(O, I)`` (gradient ``outer(s, a)``), ``"io"`` for a flax-style
        ``kernel`` ``(I, O)`` (gradient ``outer(a, s)``)."""
        m = self._model
        return OrderedDict(
            (layer, (m.dense[layer] if layer in m.dense else m.traced[layer])[2])
            for layer in self.kfac_layers()
        )

    def kfac_factors(self, batch: Batch) -> OrderedDict[str, tuple[Array, Array]]:
        """Per layer of :meth:`kfac_layers`: the inputs ``a`` ``(N, I)`` and the
        pre-activation gradients ``s = dl_n/dz_n`` ``(N, O)``.

        The per-sample weight gradient is ``outer(s_n, a_n)`` (``"weight"``) or
        ``outer(a_n, s_n)`` (``"kernel"``); the bias gradient is ``s_n``. For a
        convolution, per output position (``T`` of them, row-major): the patches
        ``a`` ``(N, T, I)`` (features in the order of the kernel's raveled input
        axes: ``(C, kh, kw)`` for a ``"weight"``, ``(kh, kw, C)`` for a
        ``"kernel"``) and the output gradients ``s`` ``(N, T, O)``; the weight
        gradient is ``sum_t outer(s_nt, a_nt)`` (or its transpose) and the bias
        gradient ``sum_t s_nt``. A tracked dense layer (``layers=``) on inputs
        ``(N, *S, I)`` (a token axis) likewise keeps its ``T = prod(S)`` positions
        (row-major): ``a`` ``(N, T, I)``, ``s`` ``(N, T, O)``; on inputs ``(N, I)``
        it gives ``(N, I)`` and ``(N, O)``. EK-FAC and the Kronecker projections
        then use Grosse & Martens' "expand" factors, ``A = mean_n sum_t a_nt
        a_nt^T`` and ``S = mean_n (1/T) sum_t s_nt s_nt^T``, as the torch provider
        does (see :class:`~xinfluence.EkfacInfluence`).
        """
        layers = self.kfac_layers()
        if not layers:
            return OrderedDict()
        m = self._model
        # only this provider's layers: a restriction to one layer taps one layer
        dense = tuple(k for k in layers if k in m.dense)
        conv = tuple(k for k in layers if k in m.traced)  # convolutions, tracked layers
        out: dict[str, Any] = {}
        if dense:
            out, losses = m.kfac_fn(dense)(m.leaves, batch.x, batch.y)
            m.remember_losses(batch, losses)
        if conv:
            out.update(m.conv_fn(batch.x, ggn=False, layers=conv)(m.leaves, batch.x, batch.y))
        result: OrderedDict[str, tuple[Array, Array]] = OrderedDict()
        for layer, (w, _) in layers.items():
            if layer in m.traced:
                result[layer] = out[layer]
                continue
            a, s = out[layer]
            shape = m.shapes[m.names.index(w)]
            n_in, n_out = (shape[0], shape[1]) if m.dense[layer][2] == "io" else shape[::-1]
            n = len(batch)
            if tuple(a.shape) != (n, n_in):
                raise ValueError(
                    f"features of dense layer {layer!r} must have shape ({n}, {n_in}), "
                    f"got {tuple(a.shape)}; a dense layer on a token axis (N, *S, {n_in}) is "
                    "found by tracing instead: JaxGradientProvider(..., layers=[...])"
                )
            result[layer] = (_xp.as_float(a, dtype=self.dtype, xp=self.xp, what="features"), s)
            assert tuple(s.shape) == (n, n_out)
        return result

    def __repr__(self) -> str:
        tracked = ""
        if self.tracked_layers is not None:
            tracked = (
                f", tracked_layers={list(self.tracked_layers)}, "
                f"untracked_parameters={list(self.untracked_parameters)}"
            )
        return (
            f"JaxGradientProvider(n_parameters={self.n_parameters}, "
            f"parameters={list(self.parameter_names)}, dtype={self.dtype}{tracked})"
        )
