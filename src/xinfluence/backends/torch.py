"""Gradient provider for PyTorch models, built on :mod:`torch.func`.

:class:`TorchGradientProvider` wraps an ``nn.Module`` and a loss
``loss(output, target)`` with *mean* reduction (``torch.nn.functional.cross_entropy``,
``mse_loss``, ...). The per-sample loss is the loss of the model on one sample,

    ``l_i(theta) = loss(model(x_i[None]; theta), y_i[None])``,

and every derivative is computed with ``functional_call``, ``vmap``, ``grad``,
``jvp`` and ``vjp``: there is no Python loop over samples.

Conventions (shapes use ``N`` samples, ``P`` parameters of the provider, ``K``
vectors, ``D = x.shape[1:]``):

* parameters are the model's parameters that require grad, in
  ``named_parameters()`` order; frozen parameters (``requires_grad=False``) and
  buffers (BatchNorm running statistics, ...) are held fixed;
* the flat parameter vector concatenates the parameters flattened row-major;
* block names are parameter names (``"0.weight"``); ``block_structure="layer"``
  groups them by the module that owns them (root-level parameters: ``"root"``);
* results are torch tensors on the parameters' device and dtype.

The model is evaluated as it is: put it in ``eval()`` mode first, so that
BatchNorm uses its running statistics and dropout is off (every query checks
this and refuses a BatchNorm or Dropout layer in training mode). Models that
return a tuple, a dict or an output object take ``output_fn``; integer inputs
(token ids) take ``cast_inputs=False``. Attention runs on torch's math kernel
inside the provider's calls (the fused CPU kernel has no second derivatives).
Parameters must be float32 or float64. Each sample must be
processed independently of the others: per-sample gradients run the model on
single samples, while ``jacobian_prod``, ``hvp``, ``hessian`` and
``kfac_factors`` run it once on the whole batch and apply the loss per sample
(so a loss with class weights still gives the unweighted per-sample loss, as
``loss`` does on one sample).

Importing :mod:`xinfluence` does not import torch; importing this module does.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import _xp
from .._config import memory_budget
from .._state import check_picklable_function, fingerprint
from .._xp import Namespace
from ..errors import user_stacklevel
from ..types import Batch, GradientProvider
from . import _torch_conv as _conv
from . import _torch_linear as _lin

__all__ = ["TorchGradientProvider"]

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

_PAIRS_PER_CHUNK = 2**16
# Copies of a sample's activations that one (sample, vector) pair of a vectorised
# product holds at its peak (values, tangents, cotangents and their tangents,
# temporaries), and that one sample of the per-sample gradients holds; calibrated
# by peak-memory measurements (benchmarks/run_large_models.py).
_PRODUCT_ACTIVATION_COPIES = 6
_GRAD_ACTIVATION_COPIES = 4
# jacobian_prod with K vectors takes per-sample gradients instead of K
# forward-mode products once K times the weight reuse exceeds this. Measured on
# 2 CPU cores, batches of 250: 97k-parameter CNN (reuse 13) break-even at K = 5,
# 99k MLP (reuse 1) near K = 100 (benchmarks/README.md).
_JVP_PER_SAMPLE_GRADS = 100

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

    def attempt(self: TorchGradientProvider, *args: Any, **kwargs: Any) -> Any:
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
    def locked(self: TorchGradientProvider, *args: Any, **kwargs: Any) -> Any:
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


class TorchGradientProvider(GradientProvider):
    """Per-sample derivatives of a torch model's loss through :mod:`torch.func`.

    Args:
        model:
            An ``nn.Module`` mapping a batch ``x`` of shape ``(N, *D)`` to outputs
            ``(N, ...)``. Its trainable parameters (``requires_grad=True``) must share
            one floating dtype (float32 or float64; float16 and bfloat16 models are
            refused: use ``model.float()``) and one device. They are read at construction as
            detached views, so in-place updates (optimizer steps, ``load_state_dict``)
            are seen; build a new provider after ``model.to(...)``.
        loss:
            ``loss(output, target) -> scalar`` with mean reduction over the batch.
        input_shape:
            Optional per-sample input shape ``D``; when given, inputs of another
            shape are rejected before the model runs. Without it, the first batch of
            each new shape is checked by running the model on one sample.
        chunk_size:
            Vectors per vectorised chunk in the products over ``K`` vectors
            (``jacobian_prod``, ``hvp``, ``hessian``). Default: as many as
            :func:`xinfluence.memory_budget` holds, counting the activations of the
            ``N`` samples for each vector (measured once per input shape by a
            forward pass on one sample), and at most about ``2**16 / N``. The
            per-sample gradients are chunked over samples by the same budget.
        forward_ad:
            Use forward-mode products (``jvp``) for ``jacobian_prod`` and
            ``flat_mixed_grads``, and the nn.Linear fast path of ``hvp`` and
            ``hessian`` (default). ``False`` switches to reverse mode only, for
            models whose operations lack forward-mode rules; a provider whose model
            meets such an operation (a ``NotImplementedError`` from forward mode)
            switches by itself, with a warning, and repeats the call. The general
            ``hvp`` is reverse-over-reverse either way: against forward-over-reverse it was
            11-41% faster on two MLPs and, on a small convolutional net, 13% faster
            for 200 vectors and 3% slower for 50.
        cast_inputs:
            Cast integer inputs and floating inputs of lower precision to the
            parameters' dtype (default). ``False`` passes ``x`` unchanged (for models
            taking integer ids; ``flat_mixed_grads`` then needs floating ``x``).
        output_fn:
            Optional ``output_fn(model(x)) -> Tensor`` applied to the model's output
            before the loss, for models that return a tuple, a dict or an output
            object (HuggingFace style): ``output_fn=lambda out: out["logits"]`` or
            ``lambda out: out[0]``. It must act on every sample independently.

    The model must be in eval mode whenever it is queried: a query while a
    BatchNorm or Dropout layer is in training mode raises a ``ValueError``
    (batch statistics couple the samples, dropout makes the derivatives random).

    Thread safety: the provider's calls on one module (through any number of
    providers) run one at a time, under a lock per module, and forward-mode
    products (``jvp``, whose levels torch keeps per process) one at a time across
    all modules, so that concurrent queries give the serial results. Other code
    that runs or changes the module at the same time (training in another
    thread) is not synchronised, and attention elsewhere in the process runs on
    torch's math kernel while a provider call is in progress.

    Shapes: ``flat_grads`` ``(N, P)``; ``flat_mixed_grads`` ``(N, *D, P)``;
    ``jacobian_prod(batch, g)`` with ``g`` ``(K, P)`` gives ``(N, K)`` without
    materialising the gradients; ``hvp(batch, v)`` ``(K, P)`` (Hessian of the
    batch's mean loss); ``hessian`` ``(P, P)``.

    Models whose trainable parameters all belong to ``nn.Linear`` layers (MLPs)
    get their Hessian and Hessian-vector products from per-sample layer
    quantities instead of nested autodiff (same numbers, 2-3 times faster; see
    :meth:`hessian`). For products, those quantities are kept per batch while
    the batch is alive and the parameters unchanged (at most 256 MiB per
    provider), so repeated passes over cached data (CG, Lanczos) reuse them;
    the iterative solvers announce such passes (:meth:`prepare_products`), so
    that the quantities are ready for the first product.

    ``nn.Sequential`` models of ``nn.Conv2d`` (``groups=1``, zero padding),
    ``nn.Linear`` and parameter-free layers (activations, pooling, flatten) get
    their products with several vectors from per-layer forward-over-reverse
    products, the convolutions as matrix products over the patches of all the
    vectors' tangents at once (:mod:`xinfluence.backends._torch_conv`), checked
    once against autodiff; other models take the general path.

    For EK-FAC, :meth:`kfac_layers` and :meth:`kfac_factors` expose the inputs
    and output gradients of the model's ``nn.Linear`` layers and the unfolded
    input patches and output gradients of its ``nn.Conv2d`` layers (KFC).
    """

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

    # -- pickling: tensors are re-read from the model (they are views of its
    # parameters), caches start empty; copy.copy (restrict) shares everything.
    def __copy__(self) -> TorchGradientProvider:
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

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
        with torch.no_grad():
            return self._losses(self._active, batch.x, batch.y)

    def _set_active(self, names: tuple[str, ...]) -> None:
        self._names = names
        active = set(names)
        self._active: Params = {n: self._trainable[n] for n in names}  # plain dict: a pytree
        fixed = dict(self._constants)
        fixed.update((n, p) for n, p in self._trainable.items() if n not in active)
        self._fixed = fixed
        # Second derivatives from nn.Linear layer structure (``_torch_linear``):
        # None until checked, then whether the model has it.
        self._linear_structure: bool | None = None
        self._layout: _lin.LinearLayout | None = None
        # id(x) -> (weakref to x, y, parameter versions, factors or None, bytes)
        self._factor_cache: dict[int, tuple[Any, ...]] = {}
        # id(x) -> (weakref to x, y, parameter versions, pullback or None, bytes):
        # the general path's second-order graph of batches announced by
        # prepare_products (rebuilding it cost about a fifth of a 10-vector product)
        self._pullback_cache: dict[int, tuple[Any, ...]] = {}
        self._workspace = _lin.Workspace()
        # Products of sequential convolutional networks (``_torch_conv``): None
        # until checked, then whether the structured path holds.
        self._conv_structure: bool | None = None
        self._conv_layout: _conv.SequentialLayout | None = None

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

    def restrict(self, names: Sequence[str]) -> TorchGradientProvider:
        """A provider over ``names`` only; the other parameters are held fixed.

        Only that block's derivatives are computed. The flat order follows
        ``named_parameters()``, not ``names``.
        """
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in self._active]
        if unknown:
            raise ValueError(f"unknown parameters {unknown}; known: {list(self._names)}")
        if not names:
            raise ValueError("restrict needs at least one parameter name")
        keep = set(names)
        out = copy.copy(self)
        out._set_active(tuple(n for n in self._names if n in keep))
        return out

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

    # -- derivatives ----------------------------------------------------------
    @_serialised
    def loss_values(self, batch: Batch) -> Tensor:
        """Per-sample losses ``(N,)`` (for checks and leave-one-out tests)."""
        batch = self.prepare_batch(batch)
        with torch.no_grad():
            return self._losses(self._active, batch.x, batch.y)

    @_serialised
    def flat_grads(self, batch: Batch) -> Tensor:
        x, y = batch.x, batch.y
        if x.shape[0] == 0:
            return self._zeros(0, self.n_parameters)
        g = vmap(grad(self._sample_loss), in_dims=(None, 0, 0), chunk_size=self._sample_chunk(x))(
            self._active, x, y
        )
        return self._flatten(g, (x.shape[0],))

    @_serialised
    def flat_mixed_grads(self, batch: Batch) -> Tensor:
        x, y = batch.x, batch.y
        n, dims, p = x.shape[0], tuple(x.shape[1:]), self.n_parameters
        if not x.is_floating_point():
            raise TypeError(f"flat_mixed_grads needs floating inputs x, got dtype {x.dtype}")
        if n == 0:
            return self._zeros(0, *dims, p)
        active = self._active
        d = math.prod(dims)

        if self.forward_ad:
            basis = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, *dims)

            def one(xi: Tensor, yi: Tensor) -> Tensor:  # (d, P)
                # reverse-over-forward: d/dtheta of the directional derivative
                # along x (forward-over-reverse hits a torch bug with mse_loss)
                def along(e: Tensor) -> Tensor:
                    def directional(params: Params) -> Tensor:
                        return jvp(lambda xx: self._sample_loss(params, xx, yi), (xi,), (e,))[1]

                    return self._flatten(grad(directional)(active), ())

                return vmap(along)(basis)

        else:

            def one(xi: Tensor, yi: Tensor) -> Tensor:  # (P, *D) -> (d, P)
                def flat_grad(xx: Tensor) -> Tensor:
                    return self._flatten(grad(self._sample_loss)(active, xx, yi), ())

                return jacrev(flat_grad)(xi).reshape(p, d).transpose(0, 1)

        with _FORWARD_AD_LOCK:
            out = vmap(one)(x, y)  # (N, d, P)
        return out.reshape(n, *dims, p)

    @_serialised
    def jacobian_prod(self, batch: Batch, g: Tensor) -> Tensor:
        """``(N, K)``: per-sample gradients times the rows of ``g`` ``(K, P)``.

        By one forward-mode product per row (vectorised in budget-sized chunks),
        unless ``forward_ad`` is off or ``K`` times the weight reuse of the model (multiply-adds per
        sample over parameters: about 1 for MLPs, the output positions for
        convolutions) exceeds ``_JVP_PER_SAMPLE_GRADS``: then per-sample
        gradients of budget-sized sample chunks and one matrix product.
        """
        g = self._check_vectors(g, "g")
        x, y = batch.x, batch.y
        if x.shape[0] == 0 or g.shape[0] == 0:
            return self._zeros(x.shape[0], g.shape[0])
        if not self.forward_ad or g.shape[0] * self._weight_reuse(x) > _JVP_PER_SAMPLE_GRADS:
            # Without forward mode, or for many vectors through layers that reuse
            # their weights (convolutions, where this costs less than one
            # forward-mode pass per vector): per-sample gradients in chunks within
            # the memory budget, then one matrix product.
            out = self._zeros(x.shape[0], g.shape[0])
            step = self._sample_chunk(x)
            for lo in range(0, x.shape[0], step):
                part = Batch(x[lo : lo + step], y[lo : lo + step])
                torch.mm(self.flat_grads(part), g.T, out=out[lo : lo + step])
            return out
        active = self._active

        def losses(params: Params) -> Tensor:
            return self._losses(params, x, y)

        def one(t: Params) -> Tensor:  # (N,)
            return jvp(losses, (active,), (t,))[1]

        with _FORWARD_AD_LOCK:
            return vmap(one, chunk_size=self._chunk(x))(self._unflatten(g)).T

    def _chunk(self, x: Tensor) -> int:
        """Vectors per vectorised chunk over the batch ``x``: ``chunk_size``, or as
        many as the memory budget holds, counting for each vector the
        activations of all samples (:meth:`_activation_bytes`, times
        ``_PRODUCT_ACTIVATION_COPIES``) and two parameter-sized rows, and at most
        about ``2**16`` sample-vector pairs (larger chunks gain no speed)."""
        if self.chunk_size is not None:
            return self.chunk_size
        n = max(int(x.shape[0]), 1)
        per_vector = (
            n * self._activation_bytes(x) * _PRODUCT_ACTIVATION_COPIES
            + 2 * self.n_parameters * x.element_size()
        )
        return max(1, min(_PAIRS_PER_CHUNK // n, memory_budget() // per_vector))

    def _sample_chunk(self, x: Tensor) -> int:
        """Samples per vectorised chunk of the per-sample gradients: as many as the
        memory budget holds (each sample's activations times
        ``_GRAD_ACTIVATION_COPIES``, and its gradient row twice)."""
        per_sample = (
            self._activation_bytes(x) * _GRAD_ACTIVATION_COPIES
            + 2 * self.n_parameters * x.element_size()
        )
        return max(1, memory_budget() // per_sample)

    def _activation_bytes(self, x: Tensor) -> int:
        """Bytes of one sample's activations: its input and the outputs of every
        leaf module, measured by one forward pass on one sample with hooks (once
        per input shape and dtype)."""
        return self._forward_profile(x)[0]

    def _weight_reuse(self, x: Tensor) -> float:
        """Multiply-adds of one sample's forward pass through the ``nn.Linear`` and
        convolution layers, per trainable parameter of this provider: about 1 for
        an MLP, the number of output positions for a convolution."""
        return self._forward_profile(x)[1] / max(self.n_parameters, 1)

    def _forward_profile(self, x: Tensor) -> tuple[int, int]:
        """(activation bytes, multiply-adds of the Linear and convolution layers)
        of one sample, from one hooked forward pass (once per input shape, dtype)."""
        key = (tuple(x.shape[1:]), x.dtype)
        cached = self._activation_cache.get(key)
        if cached is not None:
            return cached
        total = [x[:1].numel() * x.element_size(), 0]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, Tensor):
                    total[0] += t.numel() * t.element_size()
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))
                and isinstance(weight, Tensor)
                and isinstance(output, Tensor)
            ):
                channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
                total[1] += weight.numel() * (output.numel() // max(int(channels), 1))

        leaves = [m for m in self.model.modules() if not any(True for _ in m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad():
                self._forward(self._active, x[:1])
        finally:
            for h in handles:
                h.remove()
        self._activation_cache[key] = (total[0], total[1])
        return total[0], total[1]

    @_serialised
    def prepare_products(self, batch: Batch) -> None:
        """Compute and keep the batch's layer factors now (``nn.Linear`` models,
        within the cache budget), so that the first product is already a
        structured one; see :meth:`hvp`."""
        if batch.x.shape[0] > 0 and self._structured_factors(batch, 0, reuse=True) is None:
            x = batch.x
            hit = self._pullback_cache.get(id(x))
            if hit is None or hit[0]() is not x:
                entry = (batch.y, self.parameter_version(), None, 0)
                self._remember(x, entry, self._pullback_cache)

    @_serialised
    def hvp(self, batch: Batch, v: Tensor) -> Tensor:
        v = self._check_vectors(v, "v")
        if batch.x.shape[0] > 0 and v.shape[0] > 0:
            factors = self._structured_factors(batch, v.shape[0])
            if factors is not None and self._layout is not None:
                return _lin.linear_hvp(self._layout, factors, v, self._workspace)
            # one vector: the general path's single reverse-over-reverse product
            # was faster (benchmarks/run_large_models.py)
            structured = self._sequential_hvp(batch, v) if v.shape[0] > 1 else None
            if structured is not None:
                return structured
        return self._hvp(batch, v)

    def _sequential_hvp(self, batch: Batch, v: Tensor) -> Tensor | None:
        """``V H`` by the per-layer forward-over-reverse products of
        :mod:`xinfluence.backends._torch_conv` for an ``nn.Sequential`` with
        convolutions, or ``None`` for the general path. The first use is checked
        against one autodiff product."""
        if self._conv_structure is False or not self.forward_ad:
            return None
        if self._conv_layout is None:
            try:
                self._conv_layout = _conv.SequentialLayout.build(
                    self.model, self._active, self.parameter_slices
                )
            except _conv.NotSequentialStructured:
                self._conv_structure = False
                return None
        layout, x, y = self._conv_layout, batch.x, batch.y
        n = int(x.shape[0])
        per_vector, fixed = _conv.sequential_bytes(layout, x)
        per_vector = max(per_vector, 1)
        budget = memory_budget()
        # Samples per pass: the whole batch unless one vector over it exceeds the
        # budget; then sub-batches, whose mean-loss Hessians are averaged.
        rows = n if self.chunk_size is not None else max(1, min(n, budget // (fixed + per_vector)))
        chunk = self.chunk_size or max(1, (budget - rows * fixed) // (rows * per_vector))

        def matmat(w: Tensor) -> Tensor:
            with _FORWARD_AD_LOCK:  # forward-mode levels are global to the process
                if rows >= n:
                    return _conv.sequential_hvp(layout, self._output_losses, x, y, w, chunk, budget)
                total: Tensor | None = None
                for lo in range(0, n, rows):
                    xs, ys = x[lo : lo + rows], y[lo : lo + rows]
                    part = _conv.sequential_hvp(
                        layout, self._output_losses, xs, ys, w, chunk, budget
                    )
                    part.mul_(xs.shape[0] / n)
                    total = part if total is None else total.add_(part)
                assert total is not None
                return total

        if self._conv_structure is None:
            gen = torch.Generator(device=self._device).manual_seed(0)
            probe = torch.randn(
                1, self.n_parameters, generator=gen, dtype=self._dtype, device=self._device
            )
            ref = self._hvp(batch, probe)
            err = torch.linalg.vector_norm(matmat(probe) - ref) / torch.linalg.vector_norm(
                ref
            ).clamp_min(torch.finfo(self._dtype).tiny)
            self._conv_structure = bool(err <= max(1e-6, 1e4 * torch.finfo(self._dtype).eps))
            if not self._conv_structure:
                return None
        return matmat(v)

    def _hvp(self, batch: Batch, v: Tensor) -> Tensor:
        """``V H`` by reverse-over-reverse products (``H`` is symmetric, so its
        vector-Jacobian products are ``H v``), vectorised over chunks of rows."""
        x, y = batch.x, batch.y
        if x.shape[0] == 0 or v.shape[0] == 0:
            return self._zeros(*v.shape)
        pullback = self._pullback(x, y)
        if v.shape[0] == 1:
            # One vector (Lanczos steps): skips vmap's batching overhead, about
            # 2-3 times faster here.
            single = pullback({k: t[0] for k, t in self._unflatten(v).items()})[0]
            return self._flatten({k: t[None] for k, t in single.items()}, (1,))

        def one(t: Params) -> Params:
            return pullback(t)[0]

        return self._rows_by_chunks(one, v, self._chunk(x))

    def _rows_by_chunks(self, fn: Callable[[Params], Params], v: Tensor, chunk: int) -> Tensor:
        """``vmap(fn)`` over ``(chunk, P)`` row blocks of ``v`` ``(K, P)``, each written
        into one ``(K, P)`` result as it comes: ``vmap(..., chunk_size=)`` would
        concatenate the chunks' results and ``_flatten`` concatenate them again,
        three copies of the result at the peak (1.2 GB for 50 vectors of the 1M
        MLP)."""
        k = v.shape[0]
        if k <= chunk:
            return self._flatten(vmap(fn)(self._unflatten(v)), (k,))
        out = torch.empty_like(v)
        slices = self.parameter_slices
        for lo in range(0, k, chunk):
            part = vmap(fn, chunk_size=chunk)(self._unflatten(v[lo : lo + chunk]))  # one chunk
            rows = out[lo : lo + chunk]
            for name in self._names:
                rows[:, slices[name]] = part[name].reshape(rows.shape[0], -1)
            del part
        return out

    def _pullback(self, x: Tensor, y: Tensor) -> Callable[[Params], tuple[Params]]:
        """The vector-Jacobian product of the batch's mean-loss gradient, ``t -> t H``.
        Kept for a batch announced by :meth:`prepare_products` while the batch
        lives, the parameters are unchanged and all kept graphs fit in
        ``FACTOR_CACHE_BYTES`` (estimated as four copies of the activations)."""
        versions = self.parameter_version()
        hit = self._pullback_cache.get(id(x))
        if hit is not None and (hit[0]() is not x or hit[1] is not y):
            hit = None
        if hit is not None and hit[2] == versions and hit[3] is not None:
            return hit[3]  # type: ignore[no-any-return]

        def grad_mean(params: Params) -> Params:
            return grad(self._mean_loss)(params, x, y)

        pullback = vjp(grad_mean, self._active)[1]
        if hit is not None:  # announced: keep it if it fits
            size = int(x.shape[0]) * self._activation_bytes(x) * _GRAD_ACTIVATION_COPIES
            fits = self._kept_bytes(x) + size <= _lin.FACTOR_CACHE_BYTES
            entry = (y, versions, pullback, size) if fits else (y, versions, None, 0)
            self._remember(x, entry, self._pullback_cache)
        return pullback  # type: ignore[no-any-return]

    @_serialised
    def hessian(self, batch: Batch) -> Tensor:
        """Dense Hessian of the batch's mean loss, ``(P, P)``.

        When every parameter of the provider is the weight or bias of an
        ``nn.Linear`` layer (MLPs), the Hessian is assembled from per-sample
        layer quantities (:mod:`xinfluence.backends._torch_linear`) with a few
        large matrix products, about 3 times faster than autodiff; the result is
        checked against one autodiff product with a random vector, and a model
        that fails the check takes the general path.

        The general path: reverse-over-reverse products with the identity,
        vectorised in chunks (``chunk_size``, or sized by the memory budget).
        """
        if batch.x.shape[0] > 0:
            h = self._structured_hessian(batch)
            if h is not None:
                return h
        p = self.n_parameters
        eye = torch.eye(p, dtype=self._dtype, device=self._device)
        h = self._sequential_hvp(batch, eye) if batch.x.shape[0] > 0 else None
        if h is None:
            h = self._hvp(batch, eye)
        return (h + h.T) / 2

    def _linear_layout(self) -> _lin.LinearLayout | None:
        """The layer layout when every parameter sits in an ``nn.Linear`` layer and
        the structure has not failed a check, else ``None``."""
        if self._linear_structure is False or not self.forward_ad:
            return None
        if self._layout is None:
            layers = _lin.linear_param_layers(self.model, self._active)
            covered = {n for _, w, b in layers.values() for n in (w, b) if n is not None}
            if covered != set(self._names):
                self._linear_structure = False
                return None
            self._layout = _lin.LinearLayout.build(layers, self.parameter_slices)
        return self._layout

    def _structure_holds(self, batch: Batch, matmat: Callable[[Tensor], Tensor]) -> bool:
        """Check ``matmat`` (the structured ``V -> V H``) against one autodiff product
        with a random vector: this catches uses of the weights that the layer
        hooks cannot see (a weight read outside its module, for example)."""
        gen = torch.Generator(device=self._device).manual_seed(0)
        v = torch.randn(1, self.n_parameters, generator=gen, dtype=self._dtype, device=self._device)
        ref = self._hvp(batch, v)
        err = torch.linalg.vector_norm(matmat(v) - ref) / torch.linalg.vector_norm(ref).clamp_min(
            torch.finfo(self._dtype).tiny
        )
        holds = bool(err <= max(1e-6, 1e4 * torch.finfo(self._dtype).eps))
        self._linear_structure = holds
        return holds

    def _structured_hessian(self, batch: Batch) -> Tensor | None:
        layout = self._linear_layout()
        if layout is None:
            return None
        try:
            with _FORWARD_AD_LOCK:
                h = _lin.linear_hessian(self, layout, batch, self._workspace)
        except _lin.NotLinearStructured:
            self._linear_structure = False
            return None
        return h if self._structure_holds(batch, lambda v: v @ h) else None

    def _structured_factors(
        self, batch: Batch, n_vectors: int, *, reuse: bool = False
    ) -> _lin.LinearFactors | None:
        """The batch's layer factors for products (kept while the batch lives and
        the parameters are unchanged), or ``None`` for the general path.
        ``reuse``: the caller said the batch comes back (:meth:`prepare_products`)."""
        layout = self._linear_layout()
        x, y = batch.x, batch.y
        if layout is None or layout.factor_elements(x.shape[0]) > _lin.FACTOR_ELEMENTS:
            return None
        versions = self.parameter_version()
        hit = self._factor_cache.get(id(x))
        if hit is not None and hit[0]() is not x:
            hit = None
        if hit is not None and hit[1] is y and hit[2] == versions and hit[3] is not None:
            return hit[3]
        # The factors cost about as much as 3 S products (S = sum of layer
        # widths), a structured product less than half a general one: worth it
        # for many vectors at once, or for a batch that comes back (announced by
        # prepare_products, or seen before: cached data).
        worth_once = n_vectors >= 8 * layout.width
        if not (worth_once or reuse) and hit is None:
            self._remember(x, (y, versions, None, 0))
            return None
        size = layout.factor_elements(x.shape[0]) * self._dtype.itemsize
        fits = self._kept_bytes(x) + size <= _lin.FACTOR_CACHE_BYTES
        if not (worth_once or fits):
            return None
        try:
            with _FORWARD_AD_LOCK:
                f = _lin.linear_factors(self, layout, x, y, x.shape[0])
        except _lin.NotLinearStructured:
            self._linear_structure = False
            return None
        if not self._structure_holds(
            batch, lambda v: _lin.linear_hvp(layout, f, v, self._workspace)
        ):
            return None
        if fits:
            self._remember(x, (y, versions, f, size))
        return f

    def _kept_bytes(self, x: Tensor) -> int:
        """Bytes the factor and pullback caches keep for batches other than ``x``
        (what is kept for ``x`` is replaced); both share ``FACTOR_CACHE_BYTES``."""
        # snapshots: the finalizers of freed batches pop entries from any thread
        entries = [*self._factor_cache.values(), *self._pullback_cache.values()]
        return sum(entry[4] for entry in entries if entry[0]() is not x)

    def _remember(
        self, x: Tensor, entry: tuple[Any, ...], cache: dict[int, tuple[Any, ...]] | None = None
    ) -> None:
        """Keep ``(y, parameter versions, factors/pullback or None, their bytes)``
        for ``x`` in ``cache`` (default: the factor cache)."""
        cache = self._factor_cache if cache is None else cache
        key = id(x)
        if key not in cache:  # forget the entry when x is freed
            weakref.finalize(x, cache.pop, key, None)
        cache[key] = (weakref.ref(x), *entry)

    # -- EK-FAC support -------------------------------------------------------
    def _kfac_modules(self) -> OrderedDict[str, tuple[nn.Module, str, str | None]]:
        """The ``nn.Linear`` and supported ``nn.Conv2d`` layers whose weight is a
        parameter of this provider, in module order."""
        layers: dict[str, tuple[nn.Module, str | None, str | None]] = {
            **_lin.linear_param_layers(self.model, self._active),
            **_conv.conv_param_layers(self.model, self._active),
        }
        order = {name or "root": i for i, (name, _) in enumerate(self.model.named_modules())}
        return OrderedDict(
            (k, (m, w, b))
            for k, (m, w, b) in sorted(layers.items(), key=lambda kv: order[kv[0]])
            if w is not None
        )

    def kfac_layers(self) -> OrderedDict[str, tuple[str, str | None]]:
        """The ``nn.Linear`` and ``nn.Conv2d`` layers whose weight is a parameter of
        this provider: layer name (module name, ``"root"`` for the model itself) ->
        ``(weight name, bias name or None)``. A frozen bias is ``None``; layers
        whose weight or bias is tied to another module are left out (their
        gradients are not one Kronecker product), and so are convolutions with
        ``groups > 1`` or a padding mode other than zeros."""
        return OrderedDict((k, (w, b)) for k, (_, w, b) in self._kfac_modules().items())

    @_serialised
    def kfac_factors(self, batch: Batch) -> OrderedDict[str, tuple[Tensor, Tensor]]:
        """Per-sample Kronecker factors of each layer in :meth:`kfac_layers`.

        Returns layer name -> ``(a, s)``. For ``nn.Linear``: ``a`` the layer
        inputs ``(N, in)`` and ``s = d l_n / d out_n`` the gradient of the
        per-sample loss with respect to the layer's output ``(N, out)``, so that
        the per-sample weight gradient is ``outer(s_n, a_n)`` and the bias
        gradient ``s_n``. For ``nn.Conv2d``: ``a`` the unfolded input patches
        ``(N, T, C*kh*kw)`` and ``s`` the output gradients ``(N, T, O)`` at the
        ``T`` output positions, so that the weight gradient (flattened to
        ``(O, C*kh*kw)``) is ``s_n^T a_n`` and the bias gradient ``sum_t s_nt``.
        Linear layers must be applied once per forward pass to 2-D inputs. The
        model runs once on the whole batch (eval mode: samples independent).
        """
        layers = self._kfac_modules()
        x, y = batch.x, batch.y
        if not layers or x.shape[0] == 0:
            return OrderedDict(
                (k, _empty_factors(m, self._zeros)) for k, (m, _, _) in layers.items()
            )
        store: dict[str, tuple[Tensor, Tensor]] = {}

        def make_hook(layer: str) -> Callable[..., Tensor]:
            return _factor_hook(store, layer, "kfac_factors")

        handles = [
            module.register_forward_hook(make_hook(layer))
            for layer, (module, _, _) in layers.items()
        ]
        try:
            with torch.enable_grad():
                out = self._forward(self._active, x)
                losses = self._output_losses(out, y)
                missing = [k for k in layers if k not in store]
                if missing:
                    raise ValueError(f"kfac_factors: layers {missing} were not called by the model")
                deltas = [store[k][1] for k in layers]
                grads = torch.autograd.grad(losses.sum(), deltas, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        result: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        for layer, s in zip(layers, grads, strict=True):
            a, delta = store[layer]
            s = torch.zeros_like(delta) if s is None else s.detach()
            result[layer] = (a, _conv.output_grads(s) if s.ndim == 4 else s)
        return result

    # -- generalized Gauss-Newton -------------------------------------------------
    # G = (1/N) sum_i J_i^T H_i J_i with J_i = d out_i / d theta (the model output
    # of sample i, from _forward) and H_i = d^2 l_i / d out_i^2 (the loss on the
    # output, as _output_losses applies it).
    @property
    def supports_gauss_newton(self) -> bool:
        return True

    def _output_hessians(self, out: Tensor, y: Tensor) -> Tensor:
        """``H_i = d^2 l / d out^2`` at each sample's output, ``(N, M, M)`` with ``M``
        the size of one output (reverse over reverse: forward-mode rules of some
        losses, mse_loss among them, are unreliable)."""
        n, m = out.shape[0], out[0].numel()

        def sample_loss(o: Tensor, t: Tensor) -> Tensor:
            return self.loss(o.unsqueeze(0), t.unsqueeze(0))

        h = vmap(jacrev(jacrev(sample_loss)))(out.detach(), y)
        return h.reshape(n, m, m)

    def _output_hessian_root(self, out: Tensor, y: Tensor) -> Tensor:
        """``L_i`` with ``H_i = L_i L_i^T``, ``(N, M, M)``, from an eigendecomposition
        (computed in float64: torch's float32 ``eigh`` returns NaN or fails to
        converge on the nearly-zero ``H_i`` of confidently classified samples);
        eigenvalues that rounding put below zero are clipped to zero.

        Raises:
            ValueError: the loss is not convex in the output: an eigenvalue of
                some ``H_i`` below ``-10 M eps max(1, |H|)`` (``eps`` of the
                parameters' dtype, :func:`xinfluence._xp.psd_rounding_tolerance`;
                ``|H|`` the largest eigenvalue magnitude over the batch).
        """
        h = self._output_hessians(out, y)
        work = torch.float64 if h.device.type != "mps" else h.dtype  # mps has no float64
        lam, vec = torch.linalg.eigh(((h + h.transpose(1, 2)) / 2).to(work))
        top = float(lam.abs().amax()) if lam.numel() else 0.0
        # the entries of H_i carry absolute rounding errors of about eps times the
        # terms they are formed from (for cross-entropy the probabilities, O(1)
        # however small H_i is for confidently classified samples): scale >= 1
        tol = _xp.psd_rounding_tolerance(h.dtype, h.shape[-1], max(top, 1.0), xp=self.xp)
        if lam.numel() and float(lam.min()) < -tol:
            raise ValueError(
                "the loss Hessian on the model output has negative eigenvalues "
                f"(smallest {float(lam.min()):.3e}, largest magnitude {top:.3e}, rounding "
                f"tolerance {tol:.1e}): the loss is not convex in the output, so "
                "the Gauss-Newton matrix has no factorisation into pseudo-gradients; use "
                "second_order='empirical_fisher' for EK-FAC"
            )
        return (vec * lam.clamp_min(0).sqrt()[:, None, :]).to(h.dtype)

    @_serialised
    def ggn_matmat(self, batch: Batch, v: Tensor) -> Tensor:
        """``V G`` for the batch's mean loss: ``J v`` by a forward-mode product through
        the model (``forward_ad=False``: by the transpose of a reverse product),
        ``H_i`` applied by a reverse-over-reverse product of the loss on the
        output, ``J^T`` by one reverse product; vectorised over chunks of rows.

        Keeping the per-sample output Jacobians of batches that come back does not
        pay for MLPs: ``J`` has ``M`` (outputs) times more entries per sample than
        the weights a forward pass touches (measured on the 1,810-parameter
        benchmark network: 1-4 times slower than these products for 10 and 100
        vectors, ``benchmarks/curvature_products.py``)."""
        v = self._check_vectors(v, "v")
        x, y = batch.x, batch.y
        n = x.shape[0]
        if n == 0 or v.shape[0] == 0:
            return self._zeros(*v.shape)
        active = self._active

        def out_fn(params: Params) -> Tensor:
            return self._forward(params, x)

        out, pullback = vjp(out_fn, active)[:2]
        out = out.detach()

        def grad_out(o: Tensor) -> Tensor:
            return grad(lambda oo: self._output_losses(oo, y).sum())(o)

        hess_pull = vjp(grad_out, out)[1]  # H_i is symmetric: its vjp is H_i u

        if self.forward_ad:

            def push(t: Params) -> Tensor:
                return jvp(out_fn, (active,), (t,))[1]

        else:
            # J v as the vjp of the linear map u -> J^T u
            transpose = vjp(lambda u: pullback(u)[0], torch.zeros_like(out))[1]

            def push(t: Params) -> Tensor:
                return transpose(t)[0]

        def one(t: Params) -> Params:
            return pullback(hess_pull(push(t))[0] / n)[0]

        with _FORWARD_AD_LOCK:  # forward-mode levels are global to the process
            if v.shape[0] == 1:
                single = one({k: t[0] for k, t in self._unflatten(v).items()})
                return self._flatten({k: t[None] for k, t in single.items()}, (1,))
            return self._rows_by_chunks(one, v, self._chunk(x))

    def _ggn_jacobians(self, batch: Batch) -> Iterator[tuple[Tensor, Tensor]]:
        """``(J, H)`` for chunks of ``k`` samples: the per-sample output Jacobians
        ``(k, M, P)`` (reverse mode, ``M`` cotangents per sample) and the loss
        Hessians on the output ``(k, M, M)``, chunks sized from the memory budget."""
        from .._config import memory_budget

        x, y = batch.x, batch.y
        active, p = self._active, self.n_parameters

        def sample_out(params: Params, xi: Tensor) -> Tensor:
            return self._forward(params, xi.unsqueeze(0))[0]

        jac_fn = vmap(jacrev(sample_out), in_dims=(None, 0))
        with torch.no_grad():
            m = self._forward(active, x[:1])[0].numel()
        step = max(1, memory_budget() // max(1, 4 * m * p * x.element_size()))
        for lo in range(0, x.shape[0], step):
            xs, ys = x[lo : lo + step], y[lo : lo + step]
            k = xs.shape[0]
            per_param = {name: t.reshape(k * m, -1) for name, t in jac_fn(active, xs).items()}
            jac = self._flatten(per_param, (k * m,)).reshape(k, m, p)
            with torch.no_grad():
                out = self._forward(active, xs)
            yield jac, self._output_hessians(out, ys)

    @_serialised
    def ggn(self, batch: Batch) -> Tensor:
        """Dense Gauss-Newton matrix ``(1/N) sum_i J_i^T H_i J_i``, ``(P, P)``, from
        per-sample output Jacobians (chunked by :func:`xinfluence.memory_budget`)."""
        p = self.n_parameters
        g = self._zeros(p, p)
        for jac, h in self._ggn_jacobians(batch):
            g.addmm_(jac.reshape(-1, p).T, torch.bmm(h, jac).reshape(-1, p))
        g /= max(batch.x.shape[0], 1)
        return (g + g.T) / 2

    @_serialised
    def ggn_diagonal(self, batch: Batch) -> Tensor:
        d = self._zeros(self.n_parameters)
        for jac, h in self._ggn_jacobians(batch):
            d += (jac * torch.bmm(h, jac)).sum((0, 1))
        return d / max(batch.x.shape[0], 1)

    @_serialised
    def kfac_ggn_factors(self, batch: Batch) -> OrderedDict[str, tuple[Tensor, Tensor]]:
        """Gauss-Newton factors of each layer in :meth:`kfac_layers`: layer ->
        ``(a, s)`` with ``a`` the layer inputs ``(N, in)`` and ``s`` ``(N, M, out)``
        the columns of ``L_i`` (``H_i = L_i L_i^T``, the loss Hessian on the model
        output) back-propagated to the layer's output: ``s[i, c] = J_{out <- z}^T
        L_i[:, c]``. Then the layer's Gauss-Newton block is
        ``mean_i sum_c (s_ic s_ic^T) (x) (a_i a_i^T)``. Convolutions give the
        unfolded patches ``(N, T, in)`` and ``s`` ``(N, M, T, O)``."""
        layers = self._kfac_modules()
        x, y = batch.x, batch.y
        if not layers or x.shape[0] == 0:
            out: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
            for k, (m, _, _) in layers.items():
                a, s = _empty_factors(m, self._zeros)
                out[k] = (a, s[:, None, ...])
            return out
        store: dict[str, tuple[Tensor, Tensor]] = {}

        def make_hook(layer: str) -> Callable[..., Tensor]:
            return _factor_hook(store, layer, "kfac_ggn_factors")

        handles = [m.register_forward_hook(make_hook(k)) for k, (m, _, _) in layers.items()]
        try:
            with torch.enable_grad():
                out_ = self._forward(self._active, x)
                missing = [k for k in layers if k not in store]
                if missing:
                    raise ValueError(f"kfac_ggn_factors: layers {missing} were not called")
                root = self._output_hessian_root(out_, y)  # (N, M, C)
                deltas = [store[k][1] for k in layers]
                n_cols = root.shape[2]
                cols: list[tuple[Tensor | None, ...]] = []
                for c in range(n_cols):
                    cot = root[:, :, c].reshape(out_.shape)
                    cols.append(
                        torch.autograd.grad(
                            out_, deltas, cot, retain_graph=c + 1 < n_cols, allow_unused=True
                        )
                    )
        finally:
            for h in handles:
                h.remove()
        result: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        for j, layer in enumerate(layers):
            a, delta = store[layer]
            s_all: list[Tensor] = [
                torch.zeros_like(delta) if (t := col[j]) is None else t for col in cols
            ]
            # dense (N, out) -> (N, C, out); conv (N, O, H, W) -> (N, C, T, O)
            s_cols = [_conv.output_grads(t) if t.ndim == 4 else t for t in s_all]
            result[layer] = (a, torch.stack(s_cols, dim=1).detach())
        return result

    def __repr__(self) -> str:
        return (
            f"TorchGradientProvider({type(self.model).__name__}, P={self.n_parameters}, "
            f"dtype={self._dtype}, device={self._device})"
        )


def _factor_hook(
    store: dict[str, tuple[Tensor, Tensor]], layer: str, what: str
) -> Callable[..., Tensor]:
    """Forward hook of the Kronecker-factor passes: records the layer's input (conv:
    unfolded patches) and adds a zero ``delta`` to its output, whose gradient is the
    output gradient."""

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if layer in store:
            raise ValueError(f"{what}: layer {layer!r} is applied more than once per forward pass")
        if len(inputs) != 1:
            raise ValueError(
                f"{what}: layer {layer!r} must be called with its input as the "
                "only positional argument (keyword inputs do not reach forward hooks)"
            )
        a = inputs[0]
        if isinstance(module, nn.Conv2d):
            a = _conv.unfold_input(module, a)
        elif a.ndim != 2:
            raise ValueError(
                f"{what} supports 2-D layer inputs (N, features) only; layer "
                f"{layer!r} got shape {tuple(a.shape)}"
            )
        delta = torch.zeros_like(output, requires_grad=True)
        store[layer] = (a.detach(), delta)
        return output + delta

    return hook


def _empty_factors(module: nn.Module, zeros: Callable[..., Tensor]) -> tuple[Tensor, Tensor]:
    """Factors of an empty batch for one layer of :meth:`TorchGradientProvider.kfac_factors`."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return zeros(0, 0, module.in_channels * kh * kw), zeros(0, 0, module.out_channels)
    assert isinstance(module, nn.Linear)
    return zeros(0, module.in_features), zeros(0, module.out_features)


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
