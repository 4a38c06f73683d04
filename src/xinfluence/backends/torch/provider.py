"""The public :class:`TorchGradientProvider` (documentation and repr); its
methods live in its bases (see the package docstring).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from .factors import _LayerFactors


class TorchGradientProvider(_LayerFactors):
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
    vectors' tangents at once (:mod:`xinfluence.backends.torch.sequential`), checked
    once against autodiff; other models take the general path.

    For EK-FAC, :meth:`kfac_layers` and :meth:`kfac_factors` expose the inputs
    and output gradients of the model's ``nn.Linear`` layers and the unfolded
    input patches and output gradients of its ``nn.Conv2d`` layers (KFC).
    """

    # -- pickling: tensors are re-read from the model (they are views of its
    # parameters), caches start empty; copy.copy (restrict) shares everything.
    def __copy__(self) -> TorchGradientProvider:
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

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

    def __repr__(self) -> str:
        return (
            f"TorchGradientProvider({type(self.model).__name__}, P={self.n_parameters}, "
            f"dtype={self._dtype}, device={self._device})"
        )
