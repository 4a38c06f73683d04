"""The generalized Gauss-Newton of :class:`~.provider.JaxGradientProvider`: dense
products, the matrix and its diagonal, and the layers' Gauss-Newton factors for
EK-FAC (a base class of the provider; it uses the provider's model, its
parameters and its jitted parametrisation)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ... import _xp
from ..._xp import Array
from ...types import Batch
from .model import _along_rows, _pad_rows

if TYPE_CHECKING:
    from ..._xp import Namespace
    from .model import _Model


class _GaussNewton:
    """``G = (1/N) sum_i J_i^T H_i J_i`` of the provider's model (see below)."""

    if TYPE_CHECKING:  # the provider's, which this class serves
        _model: _Model
        _theta: Array
        _fixed: tuple[Any, ...]
        _params_of: Callable[..., Any]

        @property
        def xp(self) -> Namespace: ...
        @property
        def dtype(self) -> Any: ...
        @property
        def n_parameters(self) -> int: ...
        def _check_vectors(self, v: Array, what: str) -> Array: ...
        def kfac_layers(self) -> OrderedDict[str, tuple[str, str | None]]: ...

    # -- generalized Gauss-Newton ---------------------------------------------
    # G = (1/N) sum_i J_i^T H_i J_i, J_i = d out_i / d theta with out_i =
    # apply_fn(params, x_i[None])[0] (each sample fed alone, as the loss is), and
    # H_i = jax.hessian of the loss as a function of that output.
    @property
    def supports_gauss_newton(self) -> bool:
        return True

    def _ggn_fns(self) -> dict[str, Callable[..., Any]]:
        """The jitted Gauss-Newton functions, built on first use."""
        fns = getattr(self, "_ggn_jit", None)
        if fns is not None:
            return fns
        model = self._model
        apply_fn, loss, params_of = model.apply_fn, model.loss, self._params_of

        def sample_out(theta, fixed, xi):
            return apply_fn(params_of(theta, fixed), xi[None])[0]

        def outputs(theta, fixed, x):
            return jax.vmap(sample_out, in_axes=(None, None, 0))(theta, fixed, x)

        def out_hessians(out, y):  # (N, M, M)
            def out_loss(oi, yi):
                return jnp.reshape(loss(oi[None], yi[None]), ())

            n, m = out.shape[0], math.prod(out.shape[1:])
            return jnp.reshape(jax.vmap(jax.hessian(out_loss))(out, y), (n, m, m))

        def matmat(theta, fixed, x, y, v):
            def f(t):
                return outputs(t, fixed, x)

            out, push = jax.linearize(f, theta)
            pull = jax.vjp(f, theta)[1]
            h = out_hessians(out, y)
            n = out.shape[0]

            def one(vk):
                u = jnp.reshape(push(vk), (n, -1))
                hu = jnp.einsum("nij,nj->ni", h, u)
                return pull(jnp.reshape(hu, out.shape))[0] / n

            return _along_rows(one, v, samples=n, device=model.device)

        def jacobians(theta, fixed, x, y):  # J and H J as (n M, P)
            jac = jax.vmap(jax.jacrev(sample_out, argnums=0), in_axes=(None, None, 0))(
                theta, fixed, x
            )
            n, p = x.shape[0], theta.shape[0]
            jac = jnp.reshape(jac, (n, -1, p))
            hj = out_hessians(outputs(theta, fixed, x), y) @ jac
            return jnp.reshape(jac, (-1, p)), jnp.reshape(hj, (-1, p))

        def dense_sum(theta, fixed, x, y):
            jac, hj = jacobians(theta, fixed, x, y)
            return jac.T @ hj

        def diagonal_sum(theta, fixed, x, y):
            jac, hj = jacobians(theta, fixed, x, y)
            return jnp.sum(jac * hj, axis=0)

        fns = {
            "outputs": _xp.jit(outputs),
            "out_hessians": _xp.jit(out_hessians),
            "matmat": _xp.jit(matmat),
            "dense_sum": _xp.jit(dense_sum),
            "diagonal_sum": _xp.jit(diagonal_sum),
        }
        self._ggn_jit = fns
        return fns

    def ggn_matmat(self, batch: Batch, v: Array) -> Array:
        """``V G`` for the batch's mean loss: ``J v`` by :func:`jax.linearize`, ``H_i``
        dense from :func:`jax.hessian` of the loss on the output, ``J^T`` by
        :func:`jax.vjp`; vectorised over the rows."""
        v = self._check_vectors(v, "v")
        k = v.shape[0]
        fn = self._ggn_fns()["matmat"]
        return fn(self._theta, self._fixed, batch.x, batch.y, _pad_rows(v))[:k]

    def _ggn_chunks(self, batch: Batch) -> list[tuple[Array, Array]]:
        """Sample chunks whose per-sample Jacobians (``M x P`` each, a few copies)
        fit :func:`xinfluence.memory_budget`."""
        from ..._config import memory_budget

        x, y = batch.x, batch.y
        out = jax.eval_shape(self._ggn_fns()["outputs"], self._theta, self._fixed, x[:1])
        m = math.prod(out.shape[1:])
        per_sample = 4 * m * self.n_parameters * x.dtype.itemsize
        step = max(1, memory_budget() // max(1, per_sample))
        return [(x[lo : lo + step], y[lo : lo + step]) for lo in range(0, x.shape[0], step)]

    def ggn(self, batch: Batch) -> Array:
        """Dense ``(1/N) sum_i J_i^T H_i J_i`` from per-sample Jacobians (reverse
        mode), in chunks of samples."""
        fn = self._ggn_fns()["dense_sum"]
        total = None
        for xs, ys in self._ggn_chunks(batch):
            term = fn(self._theta, self._fixed, xs, ys)
            total = term if total is None else total + term
        assert total is not None
        return _xp.symmetrize(total / batch.x.shape[0], xp=self.xp)

    def ggn_diagonal(self, batch: Batch) -> Array:
        fn = self._ggn_fns()["diagonal_sum"]
        total = None
        for xs, ys in self._ggn_chunks(batch):
            term = fn(self._theta, self._fixed, xs, ys)
            total = term if total is None else total + term
        assert total is not None
        return total / batch.x.shape[0]

    def _kfac_ggn_fn(self) -> Callable[..., Any]:
        """Jitted ``(leaves, x, y) -> ({layer: (a, s)}, lam, (max |lam|, min lam))``
        with ``s`` ``(N, M, O)`` the Gauss-Newton pseudo-gradients at the layer's
        output and ``lam`` ``(N, M)`` the eigenvalues of the ``H_i``: the convexity
        check's extremes in the same program (zeros without samples)."""
        cached = getattr(self, "_kfac_ggn_jit", None)
        if cached is not None:
            return cached
        m = self._model
        index = {n: i for i, n in enumerate(m.names)}
        dense, treedef, apply_fn, loss = m.dense, m.treedef, m.apply_fn, m.loss
        probe = OrderedDict(
            (layer, index[b if b is not None else w]) for layer, (w, b, _, _) in dense.items()
        )

        def sample_out(sel, leaves, xi):
            full = list(leaves)
            for layer, i in probe.items():
                full[i] = sel[layer]
            return apply_fn(jax.tree_util.tree_unflatten(treedef, full), xi[None])[0]

        def out_loss(oi, yi):
            return jnp.reshape(loss(oi[None], yi[None]), ())

        def fn(leaves, x, y):
            params = jax.tree_util.tree_unflatten(treedef, list(leaves))
            sel = {layer: leaves[i] for layer, i in probe.items()}
            out = jax.vmap(sample_out, in_axes=(None, None, 0))(sel, leaves, x)
            n, mm = out.shape[0], math.prod(out.shape[1:])
            h = jnp.reshape(jax.vmap(jax.hessian(out_loss))(out, y), (n, mm, mm))
            lam, vec = jnp.linalg.eigh((h + jnp.swapaxes(h, 1, 2)) / 2)
            root = vec * jnp.sqrt(jnp.maximum(lam, 0))[:, None, :]  # (N, M, C)
            jac = jax.vmap(jax.jacrev(sample_out), in_axes=(None, None, 0))(sel, leaves, x)
            result = {}
            for layer, (_, b, layout, features) in dense.items():
                a = features(params, x)
                g = jnp.reshape(jac[layer], (n, mm, *jac[layer].shape[1 + out.ndim - 1 :]))
                g = jnp.einsum("nm...,nmc->nc...", g, root)  # per column c: J^T L[:, c]
                if b is not None:
                    s = g
                else:
                    ga = (
                        jnp.einsum("ncoi,ni->nco", g, a)
                        if layout == "oi"
                        else jnp.einsum("ncio,ni->nco", g, a)
                    )
                    aa = jnp.sum(a * a, axis=1)[:, None, None]
                    s = jnp.where(aa > 0, ga / jnp.where(aa > 0, aa, 1), 0)
                result[layer] = (a, s)
            return result, lam, _extremes(lam) if lam.size else jnp.zeros(2, dtype=lam.dtype)

        jitted = _xp.jit(fn)
        self._kfac_ggn_jit = jitted
        return jitted

    def kfac_ggn_factors(self, batch: Batch) -> OrderedDict[str, tuple[Array, Array]]:
        """Per layer of :meth:`kfac_layers`: inputs ``a`` ``(N, I)`` and Gauss-Newton
        pseudo-gradients ``s`` ``(N, M, O)`` (for a convolution or a dense layer on
        a token axis ``a`` ``(N, T, I)`` and ``s`` ``(N, M, T, O)``, as in
        :meth:`kfac_factors`): the columns of ``L_i``
        (``H_i = L_i L_i^T``, the loss Hessian on the output) back-propagated to
        the layer's output, so that the layer's Gauss-Newton block is
        ``mean_i sum_c (s_ic s_ic^T) (x) (a_i a_i^T)``.

        Raises:
            ValueError: the loss is not convex in the output: an eigenvalue of some
                ``H_i`` below ``-10 M eps max(1, |H|)``
                (:func:`xinfluence._xp.psd_rounding_tolerance`).
        """
        layers = self.kfac_layers()
        if not layers:
            return OrderedDict()
        m = self._model
        out: dict[str, tuple[Array, Array]] = {}
        extremes = None  # (max |lam|, min lam) of lam, the eigenvalues of the H_i
        if m.dense:  # the same H_i as the traced layers': one check
            out, lam, extremes = self._kfac_ggn_fn()(m.leaves, batch.x, batch.y)
        if m.traced:
            fn = m.conv_fn(batch.x, ggn=True, layers=tuple(m.traced))
            conv, lam = fn(m.leaves, batch.x, batch.y)
            out.update(conv)
            if extremes is None and lam.size:
                extremes = _extremes(lam)
        # the pseudo-gradients used the eigenvalues clipped to zero; rounding puts
        # the exact zero eigenvalue of a softmax Hessian at about +-eps (entries of
        # H_i err by eps times the O(1) probabilities however small H_i is): scale >= 1
        top, low = (float(v) for v in np.asarray(extremes)) if lam.size else (0.0, 0.0)
        tol = _xp.psd_rounding_tolerance(lam.dtype, lam.shape[-1], max(top, 1.0), xp=self.xp)
        if lam.size and low < -tol:
            raise ValueError(
                "the loss Hessian on the model output has negative eigenvalues "
                f"(smallest {low:.3e}, largest magnitude {top:.3e}, rounding "
                f"tolerance {tol:.1e}): the loss is not convex in the output; "
                "use second_order='empirical_fisher' for EK-FAC"
            )
        result: OrderedDict[str, tuple[Array, Array]] = OrderedDict()
        for layer in layers:
            a, s = out[layer]
            result[layer] = (_xp.as_float(a, dtype=self.dtype, xp=self.xp, what="features"), s)
        return result


@jax.jit
def _extremes(lam: Array) -> Array:
    """``(max |lam|, min lam)`` as one program (one host transfer)."""
    return jnp.stack([jnp.max(jnp.abs(lam)), jnp.min(lam)])
