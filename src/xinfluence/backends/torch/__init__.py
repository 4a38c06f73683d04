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

Modules: ``provider`` the public class (its docstring, copies and
restrictions, ``__repr__``);
``base`` construction, pickling, input checks, the forward pass and
losses, flattening, the per-module locks; ``derivatives`` per-sample
gradients, Jacobian products, memory-budget chunk sizes, Hessian-vector
products and Hessians; ``factors`` the KFAC / EKFAC layer factors and the
Gauss-Newton products; ``linear`` the exact second derivatives of
``nn.Linear`` stacks; ``conv`` the unfolded patches of ``nn.Conv2d``
layers; ``sequential`` the Hessian-vector products of sequential CNNs;
``layers`` which modules are layers (dense, Hugging Face ``Conv1D``,
``Conv2d``) and the tracked layers of ``layers=[...]``.
``TorchGradientProvider`` is one class assembled as a chain
``_ProviderBase -> _Derivatives -> _LayerFactors -> TorchGradientProvider``.
"""

from __future__ import annotations

from .provider import TorchGradientProvider as TorchGradientProvider

__all__ = ["TorchGradientProvider"]
