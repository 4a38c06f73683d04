"""JAX gradient provider: per-sample derivatives of any ``apply_fn(params, x)``.

:class:`JaxGradientProvider` wraps a pure function ``apply_fn(params, x)`` of a
parameter pytree and a batch of inputs, and a loss ``loss(output, target)``
with *mean* reduction over the batch (``optax`` losses followed by ``.mean()``,
or anything that averages like ``torch.nn.functional.cross_entropy``). The
per-sample loss is

    ``l_i(theta) = loss(apply_fn(params, x_i[None]), y_i[None])``

so every sample is fed to the model as a batch of one; ``apply_fn`` must
therefore treat samples independently (no batch norm in training mode).

Conventions
-----------
* **Flat parameter vector** (``P`` entries): the leaves of ``params`` in
  pytree order (:func:`jax.tree_util.tree_flatten_with_path`), each raveled
  row-major, concatenated. Plain dicts flatten in *sorted key* order, so
  ``{"weight": w, "bias": b}`` is ``[b, w.ravel()]``.
* **Parameter names**: the leaf key paths joined with ``"/"`` (a dict key is
  the key, a sequence index the index, an attribute its name), e.g.
  ``"dense1/kernel"`` or, for equinox, ``"layers/0/weight"``.
* **Layers** (``block_structure="layer"``): leaves grouped by their path
  without the last key; leaves at the root form the group ``"root"``.
* **Arrays**: results are ``jax.Array`` of the parameters' dtype and device;
  inputs must be jax arrays (others raise
  :class:`~xinfluence.errors.NamespaceMismatchError`); ``x`` is cast to the
  parameters' dtype, floating ``y`` too, integer ``y`` (class labels) is kept.
* **float64**: JAX computes in float32 unless ``jax_enable_x64`` is on. For
  influence functions (Hessian solves) enable it *before* creating arrays:
  ``jax.config.update("jax_enable_x64", True)``, and build float64 parameters.

Shapes (``N`` samples, ``D = x.shape[1:]``, ``K`` vectors): ``flat_grads``
``(N, P)``; ``flat_mixed_grads`` ``(N, *D, P)``; ``jacobian_prod(batch, g)``
``(N, K)`` for ``g`` ``(K, P)``; ``hvp(batch, v)`` ``(K, P)``; ``hessian``
``(P, P)``. Every derivative is one :func:`jax.jit`-compiled function per
provider, compiled once per input shape.

Example
-------
::

    jax.config.update("jax_enable_x64", True)
    gp = JaxGradientProvider(apply_fn, params, lambda z, y: optax_loss(z, y).mean())
    infl = xi.DirectInfluence(gp, regularization=1e-3).fit([(x1, y1), (x2, y2)])
    scores = infl.influences(x_test, y_test, x_train, y_train)  # (N_test, N)

Using other JAX libraries
-------------------------
* flax (linen): ``variables = model.init(key, x)``;
  ``JaxGradientProvider(lambda p, x: model.apply({"params": p}, x),
  variables["params"], loss)``. Names look like ``"Dense_0/kernel"``.
* equinox: split the model into its array leaves and the rest with
  ``params, static = eqx.partition(model, eqx.is_inexact_array)`` and pass
  ``apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)`` (equinox
  modules act on one sample). Names follow the attributes,
  ``"layers/0/weight"``.

Kronecker factors (EK-FAC)
--------------------------
Since a JAX model has no modules to hook, dense layers are declared with
``dense_layers={layer_name: features}``: ``layer_name`` is a dict node of the
pytree holding a 2-D ``"kernel"`` (flax layout ``(I, O)``, ``z = a @ kernel +
bias``) or ``"weight"`` (torch layout ``(O, I)``, ``z = a @ weight.T + bias``)
and optionally a 1-D ``"bias"`` ``(O,)``; ``features(params, x) -> (N, I)``
returns the layer's inputs ``a`` for a batch. The layer must be applied once per
sample (no weight sharing). :meth:`JaxGradientProvider.kfac_factors` then
returns ``a`` and ``s = dl_n/dz_n``: from the per-sample bias gradient when the
layer has a bias, otherwise by least squares from the (rank-one) per-sample
weight gradient and the known ``a``. With them the per-sample gradient of the
weight is ``outer(s_n, a_n)`` (``"weight"``) or ``outer(a_n, s_n)``
(``"kernel"``), and that of the bias is ``s_n``.

Convolutions are declared by name, ``conv_layers=[layer_name, ...]``: a node
holding a ``"kernel"`` (flax layout ``(kh, kw, C, O)``) or ``"weight"`` (torch /
equinox layout ``(O, C, kh, kw)``) that feeds exactly one
``lax.conv_general_dilated`` and nothing else, and optionally a ``"bias"``
(``(O,)`` or ``(O, 1, 1)``) added to that convolution's output. No features
function is needed: the model is traced once per input shape, and the traced
model is evaluated with the convolution's input kept (the patches ``a_nt``) and
a zero perturbation added to its output (its gradient is ``s_nt``); see
:mod:`xinfluence.backends.jax.taps`. Stride, padding, dilation and layouts come
from the traced call; grouped convolutions and convolutions inside loops or
branches are refused.

Tracked layers, ``layers=[layer_name, ...]``, are found by tracing the same
way, and the provider covers only them (the other leaves are out of the
curvature and the scores, listed in ``untracked_parameters``): a node with a
2-D ``"kernel"`` / ``"weight"`` is a dense layer fed to one ``dot_general``
(flax ``Dense``, equinox ``Linear`` under ``vmap``) on inputs ``(N, I)`` or
``(N, *S, I)``; its factors keep the ``T = prod(S)`` positions of a token axis,
``a`` ``(N, T, I)`` and ``s`` ``(N, T, O)``, and EK-FAC and the Kronecker
projections use them as the torch provider does (Grosse & Martens' "expand":
``A = mean_n sum_t a_nt a_nt^T``, ``S = mean_n (1/T) sum_t s_nt s_nt^T``; each
token projected before the sum). A node with a kernel of more axes is a
convolution; other nodes (embeddings, LayerNorm) are refused by name::

    gp = JaxGradientProvider(apply_fn, params, loss, layers=["Dense_0", "Dense_1"])

When the declared layers hold every differentiated leaf and include a
convolution, :meth:`flat_grads` and
:meth:`jacobian_prod` use the factors too (checked once per input shape against
``vmap(grad)``).

Modules: ``provider`` the public :class:`JaxGradientProvider`; ``model``
the traced model behind it (flat parameters, pytree paths, layer groups,
convolution taps); ``taps`` the jaxpr walk that finds and evaluates the
convolutions (the hooks JAX does not have).
"""

from __future__ import annotations

from .provider import JaxGradientProvider as JaxGradientProvider

__all__ = ["JaxGradientProvider"]
