"""Per-sample gradients, Jacobian products, their memory-budget chunk sizes,
Hessian-vector products and Hessians (general and structured paths).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, jvp, vjp, vmap

from ..._config import memory_budget
from ...types import Batch
from . import linear as _linear
from . import sequential as _sequential
from .base import _FORWARD_AD_LOCK, _module_lock, _ProviderBase, _serialised

if TYPE_CHECKING:
    from .base import Params


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


class _Derivatives(_ProviderBase):
    """Part of :class:`TorchGradientProvider` (layout: :mod:`xinfluence.backends.torch`)."""

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
        # under the module's lock: another provider's hooks on the same module (a
        # factor pass in another thread) must not see this pass, nor it theirs
        with _module_lock(self.model):
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
                return _linear.linear_hvp(self._layout, factors, v, self._workspace)
            # one vector: the general path's single reverse-over-reverse product
            # was faster (benchmarks/run_large_models.py)
            structured = self._sequential_hvp(batch, v) if v.shape[0] > 1 else None
            if structured is not None:
                return structured
        return self._hvp(batch, v)

    def _sequential_hvp(self, batch: Batch, v: Tensor) -> Tensor | None:
        """``V H`` by the per-layer forward-over-reverse products of
        :mod:`xinfluence.backends.torch.sequential` for an ``nn.Sequential`` with
        convolutions, or ``None`` for the general path. The first use is checked
        against one autodiff product."""
        if self._conv_structure is False or not self.forward_ad:
            return None
        if self._conv_layout is None:
            try:
                self._conv_layout = _sequential.SequentialLayout.build(
                    self.model, self._active, self.parameter_slices
                )
            except _sequential.NotSequentialStructured:
                self._conv_structure = False
                return None
        layout, x, y = self._conv_layout, batch.x, batch.y
        n = int(x.shape[0])
        per_vector, fixed = _sequential.sequential_bytes(layout, x)
        per_vector = max(per_vector, 1)
        budget = memory_budget()
        # Samples per pass: the whole batch unless one vector over it exceeds the
        # budget; then sub-batches, whose mean-loss Hessians are averaged.
        rows = n if self.chunk_size is not None else max(1, min(n, budget // (fixed + per_vector)))
        chunk = self.chunk_size or max(1, (budget - rows * fixed) // (rows * per_vector))

        def matmat(w: Tensor) -> Tensor:
            with _FORWARD_AD_LOCK:  # forward-mode levels are global to the process
                if rows >= n:
                    return _sequential.sequential_hvp(
                        layout, self._output_losses, x, y, w, chunk, budget
                    )
                total: Tensor | None = None
                for lo in range(0, n, rows):
                    xs, ys = x[lo : lo + rows], y[lo : lo + rows]
                    part = _sequential.sequential_hvp(
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
            fits = self._kept_bytes(x) + size <= _linear.FACTOR_CACHE_BYTES
            entry = (y, versions, pullback, size) if fits else (y, versions, None, 0)
            self._remember(x, entry, self._pullback_cache)
        return pullback  # type: ignore[no-any-return]

    @_serialised
    def hessian(self, batch: Batch) -> Tensor:
        """Dense Hessian of the batch's mean loss, ``(P, P)``.

        When every parameter of the provider is the weight or bias of an
        ``nn.Linear`` layer (MLPs), the Hessian is assembled from per-sample
        layer quantities (:mod:`xinfluence.backends.torch.linear`) with a few
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

    def _linear_layout(self) -> _linear.LinearLayout | None:
        """The layer layout when every parameter sits in an ``nn.Linear`` layer and
        the structure has not failed a check, else ``None``."""
        if self._linear_structure is False or not self.forward_ad:
            return None
        if self._layout is None:
            layers = _linear.linear_param_layers(self.model, self._active)
            covered = {n for _, w, b in layers.values() for n in (w, b) if n is not None}
            if covered != set(self._names):
                self._linear_structure = False
                return None
            self._layout = _linear.LinearLayout.build(layers, self.parameter_slices)
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
                h = _linear.linear_hessian(self, layout, batch, self._workspace)
        except _linear.NotLinearStructured:
            self._linear_structure = False
            return None
        return h if self._structure_holds(batch, lambda v: v @ h) else None

    def _structured_factors(
        self, batch: Batch, n_vectors: int, *, reuse: bool = False
    ) -> _linear.LinearFactors | None:
        """The batch's layer factors for products (kept while the batch lives and
        the parameters are unchanged), or ``None`` for the general path.
        ``reuse``: the caller said the batch comes back (:meth:`prepare_products`)."""
        layout = self._linear_layout()
        x, y = batch.x, batch.y
        if layout is None or layout.factor_elements(x.shape[0]) > _linear.FACTOR_ELEMENTS:
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
        fits = self._kept_bytes(x) + size <= _linear.FACTOR_CACHE_BYTES
        if not (worth_once or fits):
            return None
        try:
            with _FORWARD_AD_LOCK:
                f = _linear.linear_factors(self, layout, x, y, x.shape[0])
        except _linear.NotLinearStructured:
            self._linear_structure = False
            return None
        if not self._structure_holds(
            batch, lambda v: _linear.linear_hvp(layout, f, v, self._workspace)
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
