"""Per-sample layer quantities of ``nn.Conv2d`` layers (Grosse & Martens 2016, "KFC").

A ``Conv2d`` with ``groups=1`` and zero padding is a dense layer applied at every
output position ``t`` (``T = H_out * W_out`` of them) to the unfolded input
patch: with ``a_nt`` the patch of sample ``n`` at position ``t`` (``C * kh * kw``
entries, in the order of :func:`torch.nn.functional.unfold`, which is the
row-major order of the weight ``(O, C, kh, kw)`` flattened to ``(O, C*kh*kw)``)
and ``s_nt = d l_n / d out_n[:, t]`` ``(O,)``,

    ``grad_W l_n = sum_t s_nt a_nt^T``  ``(O, C*kh*kw)``,   ``grad_b l_n = sum_t s_nt``.

K-FAC for such a layer (KFC) approximates the layer's block of ``mean_n g_n g_n^T``
by ``Gamma (x) Omega`` with ``Omega = mean_n sum_t ã_nt ã_nt^T`` (``ã`` the patch
with a trailing 1 when the layer has a bias) and
``Gamma = mean_n (1/T) sum_t s_nt s_nt^T``; EK-FAC keeps the eigenbases of the two
factors and corrects the eigenvalues on the data
(:class:`~xinfluence.influence.EkfacInfluence`).

This module holds what is specific to convolutions: which layers qualify, and
the unfolded inputs and output gradients in the ``(N, T, features)`` layout
that EK-FAC takes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp
from torch.nn.grad import conv2d_input, conv2d_weight

__all__ = [
    "conv_supported",
    "unfold_input",
    "output_grads",
    "conv_param_layers",
    "SequentialLayout",
    "sequential_hvp",
]


def _padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """The explicit zero padding of ``module``, or ``None`` where unfold cannot
    express it (``padding="same"`` with an odd total padding)."""
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        out: list[int] = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                return None
            out.append(total // 2)
        return (out[0], out[1])
    return (int(pad[0]), int(pad[1]))


def conv_supported(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Conv2d`` that unfold describes exactly:
    ``groups=1``, ``padding_mode="zeros"`` and a padding unfold can express."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and _padding(module) is not None
    )


def unfold_input(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The input patches of ``x`` ``(N, C, H, W)``: ``(N, T, C*kh*kw)``."""
    if x.ndim != 4:
        raise ValueError(
            f"expected a Conv2d input of shape (N, C, H, W), got {tuple(x.shape)} "
            "(unbatched inputs are not supported)"
        )
    pad = _padding(module)
    assert pad is not None  # conv_supported was checked
    cols = torch.nn.functional.unfold(
        x,
        module.kernel_size,
        dilation=module.dilation,
        padding=pad,
        stride=module.stride,
    )
    return cols.transpose(1, 2)


def output_grads(grad_out: Tensor) -> Tensor:
    """``(N, O, H_out, W_out)`` output gradients as ``(N, T, O)``."""
    return grad_out.flatten(2).transpose(1, 2)


def conv_param_layers(
    model: nn.Module, active: dict[str, Tensor]
) -> OrderedDict[str, tuple[nn.Conv2d, str | None, str | None]]:
    """Supported ``nn.Conv2d`` modules (:func:`conv_supported`) holding parameters
    in ``active``: module name (``"root"`` for the model itself) -> ``(module,
    weight name or None, bias name or None)``. Layers with a tied active
    parameter are left out."""
    uses: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    out: OrderedDict[str, tuple[nn.Conv2d, str | None, str | None]] = OrderedDict()
    for mod_name, module in model.named_modules():
        if not conv_supported(module):
            continue
        assert isinstance(module, nn.Conv2d)
        prefix = f"{mod_name}." if mod_name else ""
        found: list[str | None] = []
        tied = False
        for attr in ("weight", "bias"):
            p = getattr(module, attr)
            name = prefix + attr
            is_active = p is not None and name in active
            tied = tied or (is_active and uses[id(p)] > 1)
            found.append(name if is_active else None)
        if not tied and (found[0] is not None or found[1] is not None):
            out[mod_name or "root"] = (module, found[0], found[1])
    return out


# -- exact Hessian-vector products of sequential convolutional networks -----------
#
# Forward-over-reverse differentiation written out per layer, for an
# ``nn.Sequential`` of supported ``Conv2d``, ``Linear`` and parameter-free
# layers (activations, pooling, flatten): the ``K`` vectors are folded into the
# batch dimension, so that each layer costs a few large convolutions and matrix
# products instead of ``vmap``-transformed autodiff. With ``z_l`` the layer
# outputs, ``g_l = d phi / d z_l`` (``phi`` the batch's mean loss) and dots the
# derivatives along a vector ``v``:
#
# * forward: ``z'_l = W z'_{l-1} + V z_{l-1} (+ v_b)`` for a layer with weight
#   ``W`` and tangent ``V``; ``z'_l = f'(z_{l-1}) z'_{l-1}`` for a parameter-free
#   ``f`` (by ``torch.func.jvp``);
# * backward: ``g'_L = (d^2 phi / d z_L^2) z'_L``; ``g'_{l-1} = W^T g'_l + V^T g_l``,
#   or the tangent of ``f``'s vector-Jacobian product (``jvp`` of ``vjp``);
# * ``(H v)_W = sum_n g'_l z_{l-1}^T + g_l z'_{l-1}^T`` (patches for a
#   convolution), ``(H v)_b = sum_n g'_l``.


class NotSequentialStructured(Exception):
    """The model is not a sequence of layers this path handles."""


@dataclass(frozen=True)
class SequentialLayout:
    """The layers of an ``nn.Sequential`` and, for each, its weight and bias
    slices in the provider's flat vector (``None``: absent or not trainable)."""

    modules: list[nn.Module]
    weight: list[slice | None]
    bias: list[slice | None]

    @classmethod
    def build(
        cls, model: nn.Module, active: dict[str, Tensor], slices: OrderedDict[str, slice]
    ) -> SequentialLayout:
        """Raises :class:`NotSequentialStructured` unless ``model`` is an
        ``nn.Sequential`` of supported convolutions (at least one), ``nn.Linear``
        layers and parameter-free modules, with every active parameter a
        layer's weight or bias and no parameter shared."""
        if not isinstance(model, nn.Sequential):
            raise NotSequentialStructured("not an nn.Sequential")
        modules, weight, bias, covered, seen = [], [], [], set(), set()
        for name, module in model.named_children():
            own = dict(module.named_parameters())
            if isinstance(module, nn.Linear) or conv_supported(module):
                pieces = []
                for attr in ("weight", "bias"):
                    full = f"{name}.{attr}"
                    p = getattr(module, attr)
                    if p is not None and id(p) in seen:
                        raise NotSequentialStructured("shared parameter")
                    if p is not None:
                        seen.add(id(p))
                    pieces.append(slices[full] if full in active else None)
                    if full in active:
                        covered.add(full)
                weight.append(pieces[0])
                bias.append(pieces[1])
            elif own or any(True for _ in module.buffers()):
                raise NotSequentialStructured(f"layer {name} has parameters or buffers")
            else:
                weight.append(None)
                bias.append(None)
            modules.append(module)
        if covered != set(active) or not any(isinstance(m, nn.Conv2d) for m in modules):
            raise NotSequentialStructured("parameters outside the layers, or no convolution")
        return cls(modules, weight, bias)


def _fold(t: Tensor) -> Tensor:
    """``(K, N, ...)`` -> ``(K*N, ...)``."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _expand(t: Tensor, k: int) -> Tensor:
    """``(N, ...)`` -> ``(K*N, ...)`` (a copy, K times)."""
    return t.unsqueeze(0).expand(k, *t.shape).reshape(k * t.shape[0], *t.shape[1:])


def _geometry(module: Any) -> dict[str, Any]:
    """Kernel size, dilation, padding and stride of a supported convolution."""
    return {
        "kernel_size": module.kernel_size,
        "dilation": module.dilation,
        "padding": _padding(module),
        "stride": module.stride,
    }


def _conv(module: Any, x: Tensor, weight: Tensor) -> Tensor:
    """``module``'s convolution of ``x`` with another ``weight``, without bias."""
    geo = _geometry(module)
    return torch.nn.functional.conv2d(
        x, weight, None, stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"]
    )


def _conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C*kh*kw, T)``."""
    return torch.nn.functional.unfold(x, **_geometry(module))


class _Rule:
    """The forward tangent and backward second-order cotangent of a
    parameter-free layer, from quantities computed once per batch: tangents and
    cotangents are ``(K, N, ...)``, the batch's own values ``(N, ...)``."""

    def forward(self, t_in: Tensor) -> Tensor:
        raise NotImplementedError

    def backward(self, dg: Tensor, t_in: Tensor | None, g_out: Tensor) -> Tensor:
        """``g'_in`` from ``g'_out`` (``dg``), the input tangent and the first-order
        cotangent at the output."""
        raise NotImplementedError


@dataclass
class _Pointwise(_Rule):
    """``y = f(z)`` elementwise: ``y' = f'(z) z'``, ``g'_z = f'(z) g'_y + f''(z) z' g_y``."""

    d1: Tensor
    d2: Tensor | None  # None where f'' = 0 (piecewise linear)

    def forward(self, t_in: Tensor) -> Tensor:
        return t_in * self.d1

    def backward(self, dg: Tensor, t_in: Tensor | None, g_out: Tensor) -> Tensor:
        out = dg * self.d1
        if self.d2 is not None and t_in is not None:
            out = out + t_in * (self.d2 * g_out)
        return out


@dataclass
class _Reshape(_Rule):
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def forward(self, t_in: Tensor) -> Tensor:
        return t_in.reshape(t_in.shape[0], *self.out_shape)

    def backward(self, dg: Tensor, t_in: Tensor | None, g_out: Tensor) -> Tensor:
        return dg.reshape(dg.shape[0], *self.in_shape)


@dataclass
class _MaxPool(_Rule):
    """Max pooling is linear in the tangent: a gather at the batch's argmax
    indices (``(N, C, H'*W')`` into the input's ``H*W``), and its transpose a
    scatter-add (overlapping windows accumulate, as in autograd)."""

    index: Tensor
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def forward(self, t_in: Tensor) -> Tensor:
        k = t_in.shape[0]
        idx = self.index.unsqueeze(0).expand(k, *self.index.shape)
        return t_in.flatten(3).gather(3, idx).reshape(k, *self.out_shape)

    def backward(self, dg: Tensor, t_in: Tensor | None, g_out: Tensor) -> Tensor:
        k = dg.shape[0]
        idx = self.index.unsqueeze(0).expand(k, *self.index.shape)
        n, c, h, w = self.in_shape
        out = dg.new_zeros(k, n, c, h * w)
        out.scatter_add_(3, idx, dg.flatten(3))
        return out.reshape(k, *self.in_shape)


def _rule(module: nn.Module, z_in: Tensor, z_out: Tensor) -> _Rule | None:
    """The specialised rule of a common parameter-free layer; ``None``: the
    general ``torch.func`` path (a jvp of the layer's vjp on ``K`` copies)."""
    if type(module) is nn.ReLU:
        return _Pointwise((z_in > 0).to(z_in.dtype), None)
    if type(module) is nn.LeakyReLU:
        slope = torch.full_like(z_in, module.negative_slope)
        return _Pointwise(torch.where(z_in > 0, torch.ones_like(z_in), slope), None)
    if type(module) is nn.Tanh:
        d1 = 1 - z_out * z_out
        return _Pointwise(d1, -2 * z_out * d1)
    if type(module) is nn.Sigmoid:
        d1 = z_out * (1 - z_out)
        return _Pointwise(d1, d1 * (1 - 2 * z_out))
    if type(module) is nn.Flatten or type(module) is nn.Identity:
        return _Reshape(tuple(z_in.shape), tuple(z_out.shape))
    if type(module) is nn.Dropout and not module.training:
        return _Reshape(tuple(z_in.shape), tuple(z_out.shape))
    if type(module) is nn.MaxPool2d and z_in.ndim == 4:
        out, index = torch.nn.functional.max_pool2d(
            z_in,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            ceil_mode=module.ceil_mode,
            return_indices=True,
        )
        if out.shape != z_out.shape:
            return None
        return _MaxPool(index.flatten(2), tuple(z_in.shape), tuple(z_out.shape))
    return None


def sequential_vector_bytes(layout: SequentialLayout, x: Tensor) -> int:
    """Bytes one vector of :func:`sequential_hvp` holds per sample: every layer's
    output about six times (values, tangents, cotangents, temporaries) and each
    convolution's input patches twice (torch's float64 CPU convolutions unfold
    their inputs)."""
    total = x[:1].numel()
    h = x[:1]
    with torch.no_grad():
        for module in layout.modules:
            if isinstance(module, nn.Conv2d):
                total += 2 * _conv_patches(module, h).numel()
            h = module(h)
            total += 6 * h.numel()
    return total * x.element_size()


def sequential_hvp(
    layout: SequentialLayout,
    losses: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    v: Tensor,
    chunk: int,
) -> Tensor:
    """``V H`` ``(K, P)`` for ``v`` ``(K, P)``: the Hessian of the mean over the
    batch of ``losses(output, y)`` (per-sample losses ``(N,)``), ``chunk``
    vectors at a time."""
    n = x.shape[0]
    modules = layout.modules
    # values z_l and cotangents g_l of the mean loss, by one autograd pass
    with torch.enable_grad():
        zs = [x.detach().requires_grad_(True)]
        for module in modules:
            zs.append(module(zs[-1]))
        phi = losses(zs[-1], y).sum() / n
        gs = list(torch.autograd.grad(phi, zs[1:], allow_unused=True))
    zs = [z.detach() for z in zs]
    gs = [torch.zeros_like(z) if g is None else g.detach() for z, g in zip(zs[1:], gs)]
    out = torch.zeros_like(v)
    with torch.no_grad():  # the torch.func transforms inside still differentiate
        rules = [
            None if isinstance(m, (nn.Linear, nn.Conv2d)) else _rule(m, zs[i], zs[i + 1])
            for i, m in enumerate(modules)
        ]
        for lo in range(0, v.shape[0], chunk):
            _sequential_hvp_chunk(
                layout, losses, zs, gs, rules, y, v[lo : lo + chunk], out[lo : lo + chunk]
            )
    return out


def _weight_tangent(module: Any, v: Tensor, sl: slice | None) -> Tensor | None:
    if sl is None:
        return None
    return v[:, sl].reshape(v.shape[0], module.weight.shape[0], -1)  # (K, O, I)


def _sequential_hvp_chunk(
    layout: SequentialLayout,
    losses: Callable[[Tensor, Tensor], Tensor],
    zs: list[Tensor],
    gs: list[Tensor],
    rules: list[_Rule | None],
    y: Tensor,
    v: Tensor,
    out: Tensor,
) -> None:
    k, n = v.shape[0], zs[0].shape[0]
    modules = layout.modules
    # forward tangents z'_l, (K, N, ...); None while zero
    dz: list[Tensor | None] = [None]
    for i, module in enumerate(modules):
        z_in, t_in = zs[i], dz[-1]
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            vw = _weight_tangent(module, v, layout.weight[i])
            vb = None if layout.bias[i] is None else v[:, layout.bias[i]]
            t_out: Tensor | None = None
            if t_in is not None:
                t_out = (
                    module._conv_forward(_fold(t_in), module.weight, None)
                    if isinstance(module, nn.Conv2d)
                    else torch.nn.functional.linear(_fold(t_in), module.weight)
                )
                t_out = t_out.reshape(k, n, *t_out.shape[1:])
            if vw is not None:
                if isinstance(module, nn.Conv2d):
                    # the K weight tangents as one convolution with K*O filters
                    filters = vw.reshape(k * vw.shape[1], *module.weight.shape[1:])
                    term = _conv(module, z_in, filters)  # (N, K*O, H', W')
                    term = term.reshape(n, k, -1, *term.shape[2:]).transpose(0, 1)
                else:
                    term = torch.einsum("koi,n...i->kn...o", vw, z_in)
                t_out = term if t_out is None else t_out + term
            if vb is not None:
                shape = (
                    (k, 1, -1, 1, 1)
                    if isinstance(module, nn.Conv2d)
                    else (k, *([1] * (zs[i + 1].ndim - 1)), -1)
                )
                term = vb.reshape(shape).expand(k, *zs[i + 1].shape)
                t_out = term if t_out is None else t_out + term
            dz.append(t_out)
        elif t_in is None:
            dz.append(None)
        elif rules[i] is not None:
            dz.append(rules[i].forward(t_in))  # type: ignore[union-attr]
        else:
            t_out = jvp(module, (_expand(z_in, k),), (_fold(t_in),))[1]
            dz.append(t_out.reshape(k, n, *t_out.shape[1:]))
    # backward tangents g'_l, from the loss's second derivative at the output
    t_last = dz[-1]
    if t_last is None:  # no trainable parameter
        return
    y_rep = _expand(y, k)

    def out_grad(z: Tensor) -> Tensor:
        return grad(lambda zz: losses(zz, y_rep).sum() / n)(z)

    dg_fold = jvp(out_grad, (_expand(zs[-1], k),), (_fold(t_last),))[1]
    dg = dg_fold.reshape(k, n, *dg_fold.shape[1:])
    for i in range(len(modules) - 1, -1, -1):
        module, z_in, t_in, g_out = modules[i], zs[i], dz[i], gs[i]
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            vw = _weight_tangent(module, v, layout.weight[i])
            is_conv = isinstance(module, nn.Conv2d)
            if layout.weight[i] is not None:
                if is_conv:
                    # weight gradients by the convolution's own backward: z_in against
                    # the K cotangents as K*O output channels, and the K input
                    # tangents as K*C input channels against g_out
                    geo = _geometry(module)
                    o, rest = module.weight.shape[0], module.weight.shape[1:]
                    hw = conv2d_weight(
                        z_in,
                        (k * o, *rest),
                        dg.transpose(0, 1).reshape(n, k * o, *dg.shape[3:]),
                        stride=geo["stride"],
                        padding=geo["padding"],
                        dilation=geo["dilation"],
                    ).reshape(k, o, -1)
                    if t_in is not None:
                        cross = conv2d_weight(
                            t_in.transpose(0, 1).reshape(n, k * rest[0], *t_in.shape[3:]),
                            (o, k * rest[0], *rest[1:]),
                            g_out,
                            stride=geo["stride"],
                            padding=geo["padding"],
                            dilation=geo["dilation"],
                        )
                        hw = hw + cross.reshape(o, k, -1).transpose(0, 1)
                else:
                    hw = torch.einsum("kn...o,n...i->koi", dg, z_in)
                    if t_in is not None:
                        hw = hw + torch.einsum("n...o,kn...i->koi", g_out, t_in)
                out[:, layout.weight[i]] = hw.reshape(k, -1)
            if layout.bias[i] is not None:
                dims = (
                    (1, 3, 4)
                    if is_conv
                    else tuple(d for d in range(1, dg.ndim) if d != dg.ndim - 1)
                )
                out[:, layout.bias[i]] = dg.sum(dim=dims)
            if i == 0:
                break
            # g'_{l-1} = W^T g'_l + V^T g_l
            if is_conv:
                in_shape = (k * n, *z_in.shape[1:])
                geo = _geometry(module)
                new = conv2d_input(
                    in_shape,
                    module.weight,
                    _fold(dg),
                    stride=geo["stride"],
                    padding=geo["padding"],
                    dilation=geo["dilation"],
                )
                dg = new.reshape(k, n, *z_in.shape[1:])
                if vw is not None:
                    # V_k^T g_out for every k: the input gradient of one convolution
                    # with the K weight tangents stacked along its input channels
                    c = z_in.shape[1]
                    stacked = (
                        vw.reshape(k, vw.shape[1], c, -1)
                        .transpose(0, 1)
                        .reshape(vw.shape[1], k * c, *module.weight.shape[2:])
                    )
                    back = conv2d_input(
                        (n, k * c, *z_in.shape[2:]),
                        stacked,
                        g_out,
                        stride=geo["stride"],
                        padding=geo["padding"],
                        dilation=geo["dilation"],
                    )
                    dg = dg + back.reshape(n, k, *z_in.shape[1:]).transpose(0, 1)
            else:
                new = dg @ module.weight
                if vw is not None:
                    new = new + torch.einsum("koi,n...o->kn...i", vw, g_out)
                dg = new
        else:
            if i == 0:
                break
            rule = rules[i]
            if rule is not None:
                dg = rule.backward(dg, t_in, g_out)
                continue
            g_rep = _expand(g_out, k)
            z_rep = _expand(z_in, k)
            t_fold = torch.zeros_like(z_rep) if t_in is None else _fold(t_in)

            def pull(z: Tensor, g: Tensor, f: nn.Module = module) -> Tensor:
                return vjp(f, z)[1](g)[0]

            new = jvp(pull, (z_rep, g_rep), (t_fold, _fold(dg)))[1]
            dg = new.reshape(k, n, *z_in.shape[1:])
