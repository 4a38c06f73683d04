"""The torch provider's base: construction, pickling, input checks, the
forward pass and the per-sample losses, flattening, the per-module locks.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ... import _xp
from ..._state import check_picklable_function, fingerprint
from ..._xp import Namespace
from ...errors import user_stacklevel
from ...types import Batch, GradientProvider
from . import linear as _linear
from . import sequential as _sequential
from .layers import resolve_tracked_layers

# The first forward-mode product makes torch import its jvp decompositions, which
# call the deprecated torch.jit.script (a DeprecationWarning from torch itself, not
# actionable by users, and an error under ``-W error``): import them quietly now.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import torch._decomp.decompositions_for_jvp  # noqa: F401
    except ImportError:  # pragma: no cover - private module moved
        pass

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


# One re-entrant lock per nn.Module, shared by every provider wrapping it (and
# their restrictions). ``functional_call`` swaps the module's parameters while it
# runs, the structured path and ``kfac_factors`` register forward hooks on its
# layers, and torch.func's transforms over one module are not thread-safe, so
# derivative calls on one module run one at a time.
_MODULE_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODULE_LOCKS_GUARD = threading.Lock()

# Forward-mode AD levels are global to the process: two threads in ``jvp`` at
# once (on any modules) break each other's dual tensors. Always taken after a
# module lock, never before one.
_FORWARD_AD_LOCK = threading.RLock()

_F = TypeVar("_F", bound=Callable[..., Any])

# torch's NotImplementedError for an operation without a forward-mode rule: "Trying
# to use forward AD with aten::...", "... to use it with forward mode AD"
_FORWARD_AD_MISSING = re.compile(r"forward[ -](mode )?AD|\bjvp\b", re.IGNORECASE)


class _MathAttention:
    """Selects torch's math attention kernel and turns off the fused fast path of
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` while a provider
    call runs (models with ``nn.MultiheadAttention``, or whose call failed in a
    fused kernel).

    The fused CPU kernel (flash attention) has no second derivatives, so Hessian
    products of a ``TransformerEncoder`` fail under the default; the eval-mode
    fast path (``aten::_transformer_encoder_layer_fwd``, taken when no input
    requires grad, as inside ``jvp``) has no forward-mode rule. The flags are
    global to the process, so concurrent calls count their entries: the first
    sets the flags, the last one out restores the caller's."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._users = 0
        self._context: contextlib.AbstractContextManager[Any] | None = None
        self._fastpath = True

    def __enter__(self) -> None:
        with self._guard:
            if self._users == 0:
                context = sdpa_kernel(SDPBackend.MATH)
                context.__enter__()
                self._context = context
                self._fastpath = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
            self._users += 1

    def __exit__(self, *exc: object) -> None:
        with self._guard:
            self._users -= 1
            if self._users == 0 and self._context is not None:
                context, self._context = self._context, None
                torch.backends.mha.set_fastpath_enabled(self._fastpath)
                context.__exit__(None, None, None)


_MATH_ATTENTION = _MathAttention()


def _module_lock(module: nn.Module) -> threading.RLock:
    with _MODULE_LOCKS_GUARD:
        lock = _MODULE_LOCKS.get(module)
        if lock is None:
            lock = _MODULE_LOCKS[module] = threading.RLock()
        return lock


def _serialised(method: _F) -> _F:
    """Run ``method`` under the lock of the provider's module, after checking that
    the model is in eval mode (it may have been switched since construction)."""

    def attempt(self: _ProviderBase, *args: Any, **kwargs: Any) -> Any:
        if self._math_attention:
            with _MATH_ATTENTION:
                return method(self, *args, **kwargs)
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as exc:
            # a fused attention kernel without the derivative asked for
            # (attention outside nn.MultiheadAttention): math from now on
            if "scaled_dot_product" not in str(exc):
                raise
            self._math_attention = True
        with _MATH_ATTENTION:
            return method(self, *args, **kwargs)

    @functools.wraps(method)
    def locked(self: _ProviderBase, *args: Any, **kwargs: Any) -> Any:
        with _module_lock(self.model):
            self._check_eval_mode()
            try:
                try:
                    return attempt(self, *args, **kwargs)
                except NotImplementedError as exc:
                    # an operation of the model without a forward-mode rule: the
                    # same products in reverse mode from now on (a call fails as a
                    # whole, so the retry starts afresh)
                    if not self.forward_ad or not _FORWARD_AD_MISSING.search(str(exc)):
                        raise
                    self._forward_ad_unsupported(exc)
                return attempt(self, *args, **kwargs)
            except RuntimeError as exc:
                if "randomness" not in str(exc):
                    raise
                raise RuntimeError(
                    f"the model draws random numbers inside a vectorised derivative "
                    f"({_first_line(exc)}); put it in eval mode (model.eval()) so that "
                    "dropout and other random layers are off"
                ) from exc

    return locked  # type: ignore[return-value]


class _ProviderBase(GradientProvider):
    """Part of :class:`TorchGradientProvider` (layout: :mod:`xinfluence.backends.torch`)."""

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        *,
        input_shape: Sequence[int] | None = None,
        chunk_size: int | None = None,
        forward_ad: bool = True,
        cast_inputs: bool = True,
        output_fn: Callable[[Any], Tensor] | None = None,
        layers: Sequence[str | type[nn.Module]] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(
                "loss must be callable: loss(output, target) -> scalar (mean reduction)"
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        trainable: OrderedDict[str, Tensor] = OrderedDict()
        constants: dict[str, Tensor] = {}
        # under the module's lock: another provider's call swaps the parameters
        with _module_lock(model):
            for name, p in model.named_parameters():
                if p.requires_grad:
                    trainable[name] = p.detach()
                else:
                    constants[name] = p.detach()
            for name, b in model.named_buffers():
                constants[name] = b.detach()
        if not trainable:
            raise ValueError("the model has no parameter that requires grad")
        dtypes = {p.dtype for p in trainable.values()}
        if len(dtypes) != 1:
            raise TypeError(
                f"all trainable parameters must share one dtype, got {sorted(map(str, dtypes))}"
            )
        dtype = dtypes.pop()
        if not dtype.is_floating_point:
            raise TypeError(f"trainable parameters must be real floating, got {dtype}")
        if dtype in (torch.float16, torch.bfloat16):
            # 8 (bfloat16) or 11 (float16) significant bits cannot resolve a
            # curvature's spectrum, and torch has no Cholesky or eigh for them
            raise TypeError(
                f"the model's parameters are {dtype}: influence functions need float32 or "
                "float64 (half precision has no Cholesky or eigendecomposition in torch and "
                "too few digits for the curvature); convert a copy of the model with "
                "model.float() (or model.double()) and build the provider on it"
            )
        devices = {p.device for p in trainable.values()}
        if len(devices) != 1:
            raise ValueError(
                f"all trainable parameters must be on one device, got {sorted(map(str, devices))}"
            )
        if output_fn is not None and not callable(output_fn):
            raise TypeError(
                "output_fn must be callable: output_fn(model_output) -> the tensor the loss "
                f"takes, got {type(output_fn).__name__}"
            )
        # BatchNorm and Dropout layers: checked for training mode at every query
        self._coupled = tuple(
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
        )
        self._math_attention = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        if _training_layers(self._coupled):
            warnings.warn(
                "the model is in training mode and has BatchNorm or Dropout layers; "
                "per-sample derivatives need model.eval() (queries in training mode "
                "raise an error)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        first = next(iter(trainable.values()))
        self.model = model
        self.loss = loss
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.chunk_size = chunk_size
        self.forward_ad = bool(forward_ad)
        self.cast_inputs = bool(cast_inputs)
        self.output_fn = output_fn
        self._xp_ns = _xp.namespace(first)
        self._dtype = dtype
        self._device = first.device
        self._trainable = trainable
        self._constants = constants
        self._checked: set[tuple[Any, ...]] = set()  # shared with restrictions
        # (activation bytes, multiply-adds) per input shape, shared with restrictions
        self._activation_cache: dict[tuple[Any, ...], tuple[int, int]] = {}
        self._set_active(tuple(trainable))
        # tracked layers: the provider is restricted to their parameters
        self.tracked_layers: tuple[str, ...] | None = None
        self.untracked_parameters: tuple[str, ...] = ()
        if layers is not None:
            self.tracked_layers, names = resolve_tracked_layers(model, layers, trainable)
            self.untracked_parameters = tuple(n for n in trainable if n not in names)
            self._set_active(names)

    def __getstate__(self) -> dict[str, Any]:
        check_picklable_function(self.loss, "the loss")
        if self.output_fn is not None:
            check_picklable_function(self.output_fn, "output_fn")
        keep = (
            "model",
            "loss",
            "input_shape",
            "chunk_size",
            "forward_ad",
            "cast_inputs",
            "output_fn",
            "_math_attention",
            "tracked_layers",
            "untracked_parameters",
        )
        state = {k: self.__dict__[k] for k in (*keep, "_names", "_checked")}
        state["_trainable_names"] = tuple(self._trainable)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        trainable_names = state.pop("_trainable_names")
        active = state.pop("_names")
        self.__dict__.update(state)
        params = dict(self.model.named_parameters())
        self._trainable = OrderedDict((n, params[n].detach()) for n in trainable_names)
        self._constants = {n: p.detach() for n, p in params.items() if n not in trainable_names}
        self._constants.update((n, b.detach()) for n, b in self.model.named_buffers())
        first = next(iter(self._trainable.values()))
        self._xp_ns, self._dtype, self._device = _xp.namespace(first), first.dtype, first.device
        self._coupled = tuple(
            (name, m)
            for name, m in self.model.named_modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
        )
        self._activation_cache = {}
        self._set_active(active)

    def parameter_version(self) -> tuple[int, ...]:
        """Version counters of the parameters and buffers (in-place updates bump them)."""
        return tuple(t._version for t in self._trainable.values()) + tuple(
            t._version for t in self._constants.values()
        )

    def parameter_checksum(self) -> bytes:
        """Per parameter and buffer, the float64 sum and 2-norm of its values (two
        reductions on its device, one transfer of ``16 * n_tensors`` bytes).

        Catches what the version counters miss: updates through ``p.data`` or
        under ``torch.no_grad`` on a detached alias. About 0.36 ms on a
        1M-parameter float64 MLP on one CPU thread (``benchmarks/state_checks.py``).
        A change that keeps both the sum and the norm of every tensor (a
        permutation of a tensor's entries) is not detected.
        """
        sums = []
        for t in (*self._trainable.values(), *self._constants.values()):
            t = t.detach()
            if t.is_complex():
                t = torch.view_as_real(t)
            if not t.is_floating_point():
                t = t.to(torch.float64)
            sums.append(t.sum(dtype=torch.float64))
            sums.append(torch.linalg.vector_norm(t, dtype=torch.float64))
        # bytes, not floats: a NaN parameter compares equal to itself
        return torch.stack(sums).cpu().numpy().tobytes() if sums else b""

    def parameter_fingerprint(self) -> str:
        """SHA-256 of the trainable parameters, then the frozen ones and buffers."""
        tensors = [*self._trainable.items(), *sorted(self._constants.items())]
        return fingerprint(
            (f"{n}|{tuple(t.shape)}|{t.dtype}", t.detach().reshape(-1).view(torch.uint8))
            for n, t in tensors
        )

    @_serialised
    def per_sample_losses(self, batch: Batch) -> Tensor:
        """Per-sample losses ``(N,)``; those of the batch that the last layer-factor
        pass (:meth:`kfac_factors`) ran on come from that pass (no second forward)."""
        last = self._last_losses
        if (
            last is not None
            and last[0]() is batch.x
            and last[1]() is batch.y
            and last[2] == self.parameter_version()
        ):
            return last[3]
        with torch.no_grad():
            return self._losses(self._active, batch.x, batch.y)

    def _remember_losses(self, batch: Batch, losses: Tensor) -> None:
        """Keep ``losses`` for :meth:`per_sample_losses` of ``batch`` (weak references
        to its arrays, so nothing large is kept alive)."""
        try:
            refs = (weakref.ref(batch.x), weakref.ref(batch.y))
        except TypeError:
            return
        self._last_losses: tuple[Any, ...] | None = (
            *refs,
            self.parameter_version(),
            losses.detach(),
        )

    def _set_active(self, names: tuple[str, ...]) -> None:
        self._names = names
        active = set(names)
        self._active: Params = {n: self._trainable[n] for n in names}  # plain dict: a pytree
        fixed = dict(self._constants)
        fixed.update((n, p) for n, p in self._trainable.items() if n not in active)
        self._fixed = fixed
        # Second derivatives from nn.Linear layer structure (``linear``):
        # None until checked, then whether the model has it.
        self._linear_structure: bool | None = None
        self._layout: _linear.LinearLayout | None = None
        # id(x) -> (weakref to x, y, parameter versions, factors or None, bytes)
        self._factor_cache: dict[int, tuple[Any, ...]] = {}
        # id(x) -> (weakref to x, y, parameter versions, pullback or None, bytes):
        # the general path's second-order graph of batches announced by
        # prepare_products (rebuilding it cost about a fifth of a 10-vector product)
        self._pullback_cache: dict[int, tuple[Any, ...]] = {}
        # (weakref to x, weakref to y, parameter versions, losses) of the last
        # layer-factor pass: the losses of the batch for per_sample_losses
        self._last_losses = None
        self._workspace = _linear.Workspace()
        # Products of sequential convolutional networks (``sequential``): None
        # until checked, then whether the structured path holds.
        self._conv_structure: bool | None = None
        self._conv_layout: _sequential.SequentialLayout | None = None

    # -- the model ------------------------------------------------------------
    @property
    def xp(self) -> Namespace:
        return self._xp_ns

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def parameter_shapes(self) -> OrderedDict[str, tuple[int, ...]]:
        return OrderedDict((n, tuple(p.shape)) for n, p in self._active.items())

    def layer_groups(self) -> OrderedDict[str, list[str]]:
        """Parameter names grouped by owning module (``"root"`` for the model's own)."""
        groups: OrderedDict[str, list[str]] = OrderedDict()
        for name in self._names:
            module, _, _ = name.rpartition(".")
            groups.setdefault(module or "root", []).append(name)
        return groups

    # -- batches --------------------------------------------------------------
    def check_input_shape(self, batch: Batch) -> None:
        if self.input_shape is not None and tuple(batch.x.shape[1:]) != self.input_shape:
            dims = ", ".join(map(str, ("N", *self.input_shape)))
            raise ValueError(f"expected x of shape ({dims}), got {tuple(batch.x.shape)}")

    @_serialised
    def prepare_batch(self, batch: Batch) -> Batch:
        """Check namespace, finiteness, device and shape; detach; cast ``x`` (and
        floating ``y``) to the parameters' dtype. Integer targets are kept."""
        batch = super().prepare_batch(batch)
        x, y = batch.x.detach(), batch.y.detach()
        for a, what in ((x, "x"), (y, "y")):
            if a.device != self._device:
                raise ValueError(
                    f"expected {what} on the model's device {self._device}, got {what} on "
                    f"{a.device}; move the data with .to({str(self._device)!r})"
                )
        x_dtype = x.dtype
        if self.cast_inputs:
            x = _xp.as_float(x, dtype=self._dtype, xp=self.xp, what="x")
        if y.is_floating_point():
            y = _xp.as_float(y, dtype=self._dtype, xp=self.xp, what="y")
        self._probe(x, y, x_dtype)
        return Batch(x, y)

    def _forward_ad_unsupported(self, exc: NotImplementedError) -> None:
        """Switch this provider to reverse mode (``forward_ad=False``) after the
        model met an operation without a forward-mode rule; warns once."""
        self.forward_ad = False
        warnings.warn(
            f"the model has an operation without forward-mode derivatives ({_first_line(exc)}); "
            "this provider computes its products in reverse mode from now on (pass "
            "forward_ad=False to choose this from the start)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def _check_eval_mode(self) -> None:
        training = _training_layers(self._coupled)
        if training:
            raise ValueError(
                f"the model is in training mode with layers that couple samples or draw "
                f"random numbers ({', '.join(training)}): per-sample derivatives need "
                "model.eval()"
            )

    def _probe(self, x: Tensor, y: Tensor, x_dtype: torch.dtype) -> None:
        """Run model and loss on one sample for each new input signature, and say
        what went wrong: the model's own exception, with the likely cause."""
        key = (tuple(x.shape[1:]), x.dtype, tuple(y.shape[1:]), y.dtype)
        if key in self._checked or x.shape[0] == 0:
            return
        with torch.no_grad():
            try:
                raw = functional_call(self.model, {**self._fixed, **self._active}, (x[:1],))
            except Exception as exc:
                raise ValueError(self._model_error(x, x_dtype, exc)) from exc
            out = raw
            if self.output_fn is not None:
                try:
                    out = self.output_fn(raw)
                except Exception as exc:
                    raise ValueError(
                        f"output_fn failed on the model's output ({_describe(raw)}): "
                        f"{type(exc).__name__}: {_first_line(exc)}"
                    ) from exc
            if not isinstance(out, Tensor):
                if self.output_fn is None:
                    raise TypeError(
                        f"the model returns {_describe(raw)}, not a tensor; pass output_fn= to "
                        "select the tensor the loss takes, e.g. output_fn=lambda out: out[0] "
                        'or output_fn=lambda out: out["logits"]'
                    )
                raise TypeError(f"output_fn must return a tensor, got {_describe(out)}")
            try:
                value = self.loss(out, y[:1])
            except Exception as exc:
                raise ValueError(
                    f"the loss rejects targets y of shape {tuple(y.shape)} (dtype {y.dtype}) "
                    f"for model outputs of shape (N, {', '.join(map(str, out.shape[1:]))}): "
                    f"{type(exc).__name__}: {_first_line(exc)}"
                ) from exc
        if not isinstance(value, Tensor) or value.ndim != 0:
            raise ValueError(
                f"loss(output, target) must return a scalar tensor (mean reduction), got "
                f"{_describe(value)}"
            )
        self._checked.add(key)

    def _model_error(self, x: Tensor, x_dtype: torch.dtype, exc: Exception) -> str:
        """The message for a model that fails on one sample of ``x``."""
        cast = f"{x_dtype}, cast to {x.dtype}" if x.dtype != x_dtype else f"{x.dtype}"
        text = (
            f"the model raised {type(exc).__name__} on one sample of x (shape "
            f"{tuple(x.shape)}, dtype {cast}): {_first_line(exc)}"
        )
        if x.dtype != x_dtype and not x_dtype.is_floating_point:
            return (
                f"{text}. x holds integers, which the provider casts to {x.dtype}; for token "
                "ids (nn.Embedding) or other integer inputs pass cast_inputs=False"
            )
        if not self.cast_inputs and x.dtype != self._dtype:
            return (
                f"{text}. With cast_inputs=False, x keeps its dtype {x.dtype} while the "
                f"parameters are {self._dtype}; pass cast_inputs=True or cast x yourself"
            )
        return f"expected x of shape {self._expected_x()}, got x of shape {tuple(x.shape)}: {text}"

    def _expected_x(self) -> str:
        if self.input_shape is not None:
            return "(" + ", ".join(map(str, ("N", *self.input_shape))) + ")"
        for m in self.model.modules():
            if isinstance(m, nn.Linear) and m.weight.ndim == 2:
                n_in = m.weight.shape[1]
                return f"(N, ..., {n_in}) (the first nn.Linear has {n_in} inputs)"
            if isinstance(m, nn.modules.conv._ConvNd):
                c = m.in_channels
                return f"(N, {c}, ...) (the first convolution has {c} input channels)"
        return "that the model accepts (pass input_shape=... for a precise check)"

    # -- functional pieces ----------------------------------------------------
    def _forward(self, active: Params, x: Tensor) -> Tensor:
        out = functional_call(self.model, {**self._fixed, **active}, (x,))
        return out if self.output_fn is None else self.output_fn(out)

    def _sample_loss(self, active: Params, x: Tensor, y: Tensor) -> Tensor:
        """``l(theta; x_i, y_i)`` for one unbatched sample."""
        return self.loss(self._forward(active, x.unsqueeze(0)), y.unsqueeze(0))

    def _output_losses(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses ``(N,)`` from the batch outputs ``(N, ...)``."""
        return vmap(lambda o, t: self.loss(o.unsqueeze(0), t.unsqueeze(0)))(out, y)

    def _losses(self, active: Params, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses ``(N,)``: the model runs once on the whole batch (its
        samples are independent in eval mode), the loss per sample."""
        return self._output_losses(self._forward(active, x), y)

    def _mean_loss(self, active: Params, x: Tensor, y: Tensor) -> Tensor:
        return self._losses(active, x, y).mean()

    def _flatten(self, tree: Params, lead: tuple[int, ...]) -> Tensor:
        """Dict of ``(*lead, *shape)`` tensors -> ``(*lead, P)``."""
        parts = [tree[n].reshape(*lead, -1) for n in self._names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _unflatten(self, flat: Tensor) -> Params:
        """``(K, P)`` -> dict of ``(K, *shape)`` tensors."""
        k = flat.shape[0]
        out: Params = {}
        start = 0
        for n, p in self._active.items():
            stop = start + p.numel()
            out[n] = flat[:, start:stop].reshape(k, *p.shape)
            start = stop
        return out

    def _check_vectors(self, v: Tensor, what: str) -> Tensor:
        _xp.check_namespace(v, xp=self.xp, what=what)
        p = self.n_parameters
        if v.ndim != 2 or v.shape[1] != p:
            raise ValueError(f"expected {what} of shape (K, {p}), got {tuple(v.shape)}")
        if v.device != self._device:
            raise ValueError(f"expected {what} on device {self._device}, got {v.device}")
        return _xp.as_float(v.detach(), dtype=self._dtype, xp=self.xp, what=what)

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self._dtype, device=self._device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _training_layers(layers: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Those of the (name, BatchNorm or Dropout layer) pairs in training mode
    (dropout with p > 0), as ``'name' (Type)``."""
    return [
        f"{name or 'the model'!r} ({type(m).__name__})"
        for name, m in layers
        if m.training and not (isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0)
    ]


def _describe(obj: Any) -> str:
    """``a tuple of 2``, ``a dict with keys ['logits']``, ``a Tensor of shape (3,)``."""
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return f"a {type(obj).__name__} with keys {list(obj)[:8]}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} elements"
    return f"a {type(obj).__name__}"
