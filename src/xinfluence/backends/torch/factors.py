"""KFAC / EKFAC layer factors and the generalized Gauss-Newton products."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, jvp, vjp, vmap

from ... import _xp
from ...types import Batch
from . import conv as _conv
from . import linear as _linear
from .base import _FORWARD_AD_LOCK, _serialised
from .derivatives import _Derivatives
from .layers import hf_conv1d_param_layers, is_hf_conv1d

if TYPE_CHECKING:
    from .base import Params


class _LayerFactors(_Derivatives):
    """Part of :class:`TorchGradientProvider` (layout: :mod:`xinfluence.backends.torch`)."""

    # -- EK-FAC support -------------------------------------------------------
    def _kfac_modules(self) -> OrderedDict[str, tuple[nn.Module, str, str | None]]:
        """The ``nn.Linear`` and supported ``nn.Conv2d`` layers whose weight is a
        parameter of this provider, in module order."""
        layers: dict[str, tuple[nn.Module, str | None, str | None]] = {
            **_linear.linear_param_layers(self.model, self._active),
            **hf_conv1d_param_layers(self.model, self._active),
            **_conv.conv_param_layers(self.model, self._active),
        }
        order = {name or "root": i for i, (name, _) in enumerate(self.model.named_modules())}
        return OrderedDict(
            (k, (m, w, b))
            for k, (m, w, b) in sorted(layers.items(), key=lambda kv: order[kv[0]])
            if w is not None
        )

    def kfac_layouts(self) -> OrderedDict[str, str]:
        """layer -> ``"oi"`` (weight ``(out, in)``: ``nn.Linear``, ``nn.Conv2d``) or
        ``"io"`` (weight ``(in, out)``: Hugging Face ``Conv1D``, ``y = x @ W + b``)."""
        return OrderedDict(
            (k, "io" if is_hf_conv1d(m) else "oi") for k, (m, _, _) in self._kfac_modules().items()
        )

    def kfac_layers(self) -> OrderedDict[str, tuple[str, str | None]]:
        """The dense (``nn.Linear``, Hugging Face ``Conv1D``) and ``nn.Conv2d``
        layers whose weight is a parameter of
        this provider: layer name (module name, ``"root"`` for the model itself) ->
        ``(weight name, bias name or None)``. A frozen bias is ``None``; layers
        whose weight or bias is tied to another module are left out (their
        gradients are not one Kronecker product), and so are convolutions with
        ``groups > 1`` or a padding mode other than zeros."""
        return OrderedDict((k, (w, b)) for k, (_, w, b) in self._kfac_modules().items())

    @_serialised
    def kfac_factors(self, batch: Batch) -> OrderedDict[str, tuple[Tensor, Tensor]]:
        """Per-sample Kronecker factors of each layer in :meth:`kfac_layers`.

        Returns layer name -> ``(a, s)``. For a dense layer (``nn.Linear``, Hugging
        Face ``Conv1D``) on 2-D inputs: ``a`` the layer inputs ``(N, in)`` and
        ``s = d l_n / d out_n`` the gradient of the per-sample loss with respect
        to the layer's output ``(N, out)``, so that the per-sample weight gradient
        is ``outer(s_n, a_n)`` (``Conv1D``: its transpose) and the bias gradient
        ``s_n``. A dense layer on inputs ``(N, *S, in)`` (a token axis, or any
        number of sequence or spatial axes) keeps them as one axis of ``T =
        prod(S)`` positions: ``a`` ``(N, T, in)``, ``s`` ``(N, T, out)``, the
        weight gradient ``sum_t outer(s_nt, a_nt)`` and the bias gradient
        ``sum_t s_nt``. For ``nn.Conv2d``: ``a`` the unfolded input patches
        ``(N, T, C*kh*kw)`` and ``s`` the output gradients ``(N, T, O)`` at the
        ``T`` output positions, so that the weight gradient (flattened to
        ``(O, C*kh*kw)``) is ``s_n^T a_n`` and the bias gradient ``sum_t s_nt``.
        Each layer must be applied once per forward pass, to inputs whose first
        axis is the batch's. The model runs once on the whole batch (eval mode:
        samples independent).
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
                _check_called(store, layers, x.shape[0], "kfac_factors")
                deltas = [store[k][1] for k in layers]
                grads = torch.autograd.grad(losses.sum(), deltas, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        self._remember_losses(batch, losses)
        result: OrderedDict[str, tuple[Tensor, Tensor]] = OrderedDict()
        for layer, s in zip(layers, grads, strict=True):
            a, delta = store[layer]
            s = torch.zeros_like(delta) if s is None else s.detach()
            result[layer] = (a, _output_grads(layers[layer][0], s))
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
        from ..._config import memory_budget

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
        ``mean_i sum_c (s_ic s_ic^T) (x) (a_i a_i^T)``. Convolutions, and dense
        layers on inputs ``(N, *S, in)`` (``T = prod(S)`` positions, as in
        :meth:`kfac_factors`), give ``a`` ``(N, T, in)`` and ``s`` ``(N, M, T, O)``."""
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
                _check_called(store, layers, x.shape[0], "kfac_ggn_factors")
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
            # dense (N, out) -> (N, C, out), (N, *S, out) -> (N, C, T, out);
            # conv (N, O, H, W) -> (N, C, T, O)
            s_cols = [_output_grads(layers[layer][0], t) for t in s_all]
            result[layer] = (a, torch.stack(s_cols, dim=1).detach())
        return result


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
        elif a.ndim < 2:
            raise ValueError(
                f"{what}: dense layer {layer!r} needs inputs (N, *S, features), got shape "
                f"{tuple(a.shape)}"
            )
        elif a.ndim > 2:
            # the token (sequence, spatial) axes S as one axis of T positions
            a = a.reshape(a.shape[0], -1, a.shape[-1])
        delta = torch.zeros_like(output, requires_grad=True)
        store[layer] = (a.detach(), delta)
        return output + delta

    return hook


def _output_grads(module: nn.Module, s: Tensor) -> Tensor:
    """A layer's output gradients in the factor layout: dense ``(N, out)`` as they
    are, dense ``(N, *S, out)`` as ``(N, T, out)``, conv ``(N, O, H, W)`` as
    ``(N, T, O)``."""
    if isinstance(module, nn.Conv2d):
        return _conv.output_grads(s)
    return s if s.ndim == 2 else s.reshape(s.shape[0], -1, s.shape[-1])


def _check_called(
    store: dict[str, tuple[Tensor, Tensor]], layers: dict[str, Any], n: int, what: str
) -> None:
    """Every layer ran, on inputs whose first axis is the batch's."""
    missing = [k for k in layers if k not in store]
    if missing:
        raise ValueError(f"{what}: layers {missing} were not called by the model")
    for k in layers:
        a, delta = store[k]
        if a.shape[0] != n or delta.shape[0] != n:
            raise ValueError(
                f"{what}: layer {k!r} got inputs {tuple(a.shape)} and outputs "
                f"{tuple(delta.shape)} for a batch of {n}: the first axis of a layer's "
                "input and output must be the batch axis (a model that folds the tokens "
                "into the batch axis before the layer gives no per-sample factors)"
            )


def _empty_factors(module: nn.Module, zeros: Callable[..., Tensor]) -> tuple[Tensor, Tensor]:
    """Factors of an empty batch for one layer of :meth:`TorchGradientProvider.kfac_factors`."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return zeros(0, 0, module.in_channels * kh * kw), zeros(0, 0, module.out_channels)
    if is_hf_conv1d(module):
        weight: Tensor = module.weight  # type: ignore[assignment]
        return zeros(0, weight.shape[0]), zeros(0, weight.shape[1])
    assert isinstance(module, nn.Linear)
    return zeros(0, module.in_features), zeros(0, module.out_features)
