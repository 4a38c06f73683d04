"""Exact Hessian-vector products of sequential convolutional networks: an
``nn.Sequential`` of ``Conv2d``, ``Linear`` and parameter-free layers, the
``K`` vectors carried together so that each layer costs a few large matrix
products (the method: the comments below).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp

from .conv import _padding, _Window, conv_supported

# -- exact Hessian-vector products of sequential convolutional networks -----------
#
# Forward-over-reverse differentiation written out per layer, for an
# ``nn.Sequential`` of supported ``Conv2d``, ``Linear`` and parameter-free
# layers (activations, pooling, flatten): the ``K`` vectors are carried
# together, so that each layer costs a few large matrix products instead of
# ``vmap``-transformed autodiff. With ``z_l`` the layer
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


class _Rule:
    """The forward tangent and backward second-order cotangent of a
    parameter-free layer, from quantities computed once per batch (the batch's
    own values ``(N, ...)``). Tangents and cotangents are ``(K, N, ...)``, or
    ``(N, ..., K)`` where ``inner`` (:class:`_ConvBatch`'s layout)."""

    inner_ok = False  # whether the rule takes the K-innermost layout

    def forward(self, t_in: Tensor, inner: bool) -> Tensor:
        raise NotImplementedError

    def backward(self, dg: Tensor, t_in: Tensor | None, g_out: Tensor, inner: bool) -> Tensor:
        """``g'_in`` from ``g'_out`` (``dg``), the input tangent and the first-order
        cotangent at the output."""
        raise NotImplementedError


def _bcast(x: Tensor, inner: bool) -> Tensor:
    """A batch quantity ``(N, ...)`` broadcast against ``K`` vectors' tangents."""
    return x.unsqueeze(-1) if inner else x


@dataclass
class _Pointwise(_Rule):
    """``y = f(z)`` elementwise: ``y' = f'(z) z'``, ``g'_z = f'(z) g'_y + f''(z) z' g_y``."""

    d1: Tensor
    d2: Tensor | None  # None where f'' = 0 (piecewise linear)
    inner_ok = True

    def forward(self, t_in: Tensor, inner: bool) -> Tensor:
        if self.d2 is None:  # the backward pass does not need t_in: scale it in place
            return t_in.mul_(_bcast(self.d1, inner))
        return t_in * _bcast(self.d1, inner)

    def backward(self, dg: Tensor, t_in: Tensor | None, g_out: Tensor, inner: bool) -> Tensor:
        dg.mul_(_bcast(self.d1, inner))  # dg is this pass's own
        if self.d2 is not None and t_in is not None:
            dg.addcmul_(t_in, _bcast(self.d2 * g_out, inner))
        return dg


@dataclass
class _Reshape(_Rule):
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def forward(self, t_in: Tensor, inner: bool) -> Tensor:
        return t_in.reshape(t_in.shape[0], *self.out_shape)

    def backward(self, dg: Tensor, t_in: Tensor | None, g_out: Tensor, inner: bool) -> Tensor:
        return dg.reshape(dg.shape[0], *self.in_shape)


@dataclass
class _MaxPool(_Rule):
    """Max pooling is linear in the tangent: a gather at the batch's argmax
    indices (``(N, C, H'*W')`` into the input's ``H*W``), and its transpose a
    scatter-add (overlapping windows accumulate, as in autograd)."""

    index: Tensor
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    inner_ok = True

    def _index(self, k: int, inner: bool) -> Tensor:
        if inner:
            return self.index.unsqueeze(-1).expand(*self.index.shape, k)
        return self.index.unsqueeze(0).expand(k, *self.index.shape)

    def forward(self, t_in: Tensor, inner: bool) -> Tensor:
        if inner:
            k = t_in.shape[-1]
            flat = t_in.flatten(2, 3)  # (N, C, H*W, K)
            return flat.gather(2, self._index(k, True)).reshape(*self.out_shape, k)
        k = t_in.shape[0]
        return t_in.flatten(3).gather(3, self._index(k, False)).reshape(k, *self.out_shape)

    def backward(self, dg: Tensor, t_in: Tensor | None, g_out: Tensor, inner: bool) -> Tensor:
        n, c, h, w = self.in_shape
        if inner:
            k = dg.shape[-1]
            out = dg.new_zeros(n, c, h * w, k)
            out.scatter_add_(2, self._index(k, True), dg.flatten(2, 3))
            return out.reshape(n, c, h, w, k)
        k = dg.shape[0]
        out = dg.new_zeros(k, n, c, h * w)
        out.scatter_add_(3, self._index(k, False), dg.flatten(3))
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


# -- the convolutions of the products as matrix products ---------------------------
#
# torch's float64 CPU convolutions loop over images with an im2col and an
# ``(O, I) @ (I, T)`` product each; both are slow for small images. Here a
# convolution's tangents and cotangents are "K-innermost", ``(N, C, H, W, K)``:
# the patches of one image's K tangents then form one ``(I, T*K)`` matrix, and
# each of the product's convolutions is a large matrix product. Patches are
# strided views of a zero-bordered copy, copied into buffers (torch's
# ``unfold`` is several times slower), over blocks of samples that keep each
# buffer near ``block_bytes`` whatever the number of vectors.

_BLOCK_BYTES = 8 * 2**20  # the most per buffer; 4-32 MiB ran equally fast


def _to_inner(t: Tensor) -> Tensor:
    """``(K, N, ...)`` -> ``(N, ..., K)``."""
    return t.movedim(0, -1).contiguous()


def _to_outer(t: Tensor) -> Tensor:
    """``(N, ..., K)`` -> ``(K, N, ...)``."""
    return t.movedim(-1, 0).contiguous()


def _blocks(n: int, per_sample: int, block_bytes: int) -> list[slice]:
    size = max(1, block_bytes // max(per_sample, 1))
    return [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]


class _Buffers:
    """Reused scratch tensors by slot: a fresh allocation of tens of MB costs
    its page faults each time. Slots ``a``-``d`` are shared by steps that never
    hold them at once (:class:`_ConvBatch`)."""

    def __init__(self, like: Tensor) -> None:
        self._like = like
        self._store: dict[str, Tensor] = {}

    def get(self, name: str, *shape: int, zero_once: bool = False) -> Tensor:
        numel = 1
        for d in shape:
            numel *= d
        buf = self._store.get(name)
        if buf is None or buf.numel() < numel:
            buf = (self._like.new_zeros if zero_once else self._like.new_empty)(numel)
            self._store[name] = buf
        return buf[:numel].view(*shape)


@dataclass
class _ConvBatch:
    """One convolution over one batch, for the products: the batch's input
    ``z`` ``(N, C, H, W)`` and first-order output cotangents ``g`` ``(N, O, H',
    W')``, the weight as ``(O, I)`` with ``I = C*kh*kw``, ``T = H'*W'`` output
    and ``S = H*W`` input positions.

    Two patch matrices of the batch, built per block of samples: ``pz``
    ``(b*T, I)``, the input patches, and ``pg`` ``(b*S, J)`` with ``J = O*kh*kw``,
    the patches of ``g`` seen from the input: ``pg[(n, s), (o, ky, kx)]`` is the
    output cotangent that input position ``s`` meets through kernel tap
    ``(kh-1-ky, kw-1-kx)`` (zero where none), so that the transposed
    convolution and the weight gradient against an input tangent are each one
    matrix product with ``pg``."""

    z: Tensor
    g: Tensor
    w2d: Tensor
    padding: tuple[int, int]
    window: _Window  # the convolution's own
    back: _Window  # the transposed convolution's, over the input positions
    buffers: _Buffers
    block_bytes: int

    @classmethod
    def build(cls, module: nn.Conv2d, z_in: Tensor, g_out: Tensor, block_bytes: int) -> _ConvBatch:
        pad = _padding(module)
        assert pad is not None  # conv_supported was checked
        kernel = (int(module.kernel_size[0]), int(module.kernel_size[1]))
        dilation = (int(module.dilation[0]), int(module.dilation[1]))
        window = _Window(
            kernel,
            dilation,
            (int(module.stride[0]), int(module.stride[1])),
            (int(g_out.shape[2]), int(g_out.shape[3])),
        )
        back = _Window(kernel, dilation, (1, 1), (int(z_in.shape[2]), int(z_in.shape[3])))
        return cls(
            z_in,
            g_out,
            module.weight.detach().reshape(module.weight.shape[0], -1),
            pad,
            window,
            back,
            _Buffers(z_in),
            block_bytes,
        )

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (int(self.z.shape[1]), int(self.z.shape[2]), int(self.z.shape[3]))

    def _blocks(self, per_sample: int) -> list[slice]:
        return _blocks(int(self.z.shape[0]), per_sample, self.block_bytes)

    def _pz(self, blk: slice) -> Tensor:
        """``(b*T, I)``: the input patches of the samples ``blk``."""
        (ph, pw), (kh, kw), (ho, wo) = self.padding, self.window.kernel, self.window.out_hw
        z = self.z[blk]
        zp = torch.nn.functional.pad(z, (pw, pw, ph, ph))
        buf = self.buffers.get("c", z.shape[0], ho, wo, z.shape[1], kh, kw)
        return self.window.patches(zp, buf, positions_first=True).view(z.shape[0] * ho * wo, -1)

    def _pg(self, blk: slice) -> Tensor:
        """``(b*S, J)``: the output cotangents of the samples ``blk`` as seen from
        each input position, by kernel tap (flipped)."""
        g = self.g[blk]
        b, o, ho, wo = g.shape
        (_, h, w), (ph, pw) = self.in_shape, self.padding
        (kh, kw), (dh, dw), (sh, sw) = self.window.kernel, self.window.dilation, self.window.stride
        # g spread over the stride's grid, then bordered (negative: cropped) so
        # that input position s meets tap k at s + k*dilation
        d = g.new_zeros(b, o, (ho - 1) * sh + 1, (wo - 1) * sw + 1)
        d[:, :, ::sh, ::sw] = g
        lo_h, lo_w = (kh - 1) * dh - ph, (kw - 1) * dw - pw
        hi_h, hi_w = h - 1 + ph - (ho - 1) * sh, w - 1 + pw - (wo - 1) * sw
        dp = torch.nn.functional.pad(d, (lo_w, hi_w, lo_h, hi_h))
        buf = self.buffers.get("c", b, h, w, o, kh, kw)
        return self.back.patches(dp, buf, positions_first=True).view(b * h * w, -1)

    def _padded(self, t: Tensor) -> Tensor:
        """``t`` ``(b, C, H, W, K)`` copied into a reused zero-bordered buffer."""
        (ph, pw), (c, h, w) = self.padding, self.in_shape
        b, k = t.shape[0], t.shape[-1]
        buf = self.buffers.get(f"pad{k}", b, c, h + 2 * ph, w + 2 * pw, k, zero_once=True)
        buf[:, :, ph : ph + h, pw : pw + w].copy_(t)
        return buf

    def forward(self, t_in: Tensor | None, vw: Tensor | None, vb: Tensor | None, k: int) -> Tensor:
        """The output tangent ``(N, O, H', W', K)``, ``W * t_in + V_k * z + v_b``,
        for the input tangent ``t_in`` ``(N, C, H, W, K)`` (``None``: zero) and the
        weight and bias tangents ``vw`` ``(K, O, I)`` and ``vb`` ``(K, O)``."""
        n, (o, i), tn = int(self.z.shape[0]), self.w2d.shape, math.prod(self.window.out_hw)
        c, (kh, kw) = self.in_shape[0], self.window.kernel
        out = self.z.new_empty(n, o, tn, k)
        vmat = None if vw is None else vw.permute(2, 1, 0).reshape(i, o * k)  # [i, (o, k)]
        (ph, pw), (_, h, w) = self.padding, self.in_shape
        # per sample: patches and bordered copy of t_in, pz, the V_k * z rows
        per_sample = tn * (i * k + i + o * k) + c * (h + 2 * ph) * (w + 2 * pw) * k
        for blk in self._blocks(per_sample * out.element_size()):
            b, dst = blk.stop - blk.start, out[blk]
            if t_in is not None:
                buf = self.buffers.get("a", b, c, kh, kw, *self.window.out_hw, k)
                patches = self.window.patches(self._padded(t_in[blk]), buf, positions_first=False)
                torch.matmul(self.w2d, patches.view(b, i, tn * k), out=dst.view(b, o, tn * k))
            if vmat is not None:
                r = self.buffers.get("b", b * tn, o * k)
                torch.mm(self._pz(blk), vmat, out=r)
                r4 = r.view(b, tn, o, k).transpose(1, 2)
                if t_in is None:
                    dst.copy_(r4)
                else:
                    dst += r4
            elif t_in is None:
                dst.zero_()
            if vb is not None:
                dst += vb.T.reshape(1, o, 1, k)
        return out.view(n, o, *self.window.out_hw, k)

    def weight_grad(self, dg: Tensor, t_in: Tensor | None) -> Tensor:
        """``(H v)_W`` ``(K, O, I)``: ``sum_{n,t} dg_nt pz_nt^T`` plus the gradient of
        ``g`` against the input tangent ``t_in`` ``(N, C, H, W, K)``, with ``dg``
        ``(N, O, H', W', K)`` the tangents of the output cotangents."""
        n, (o, i), k = int(self.z.shape[0]), self.w2d.shape, dg.shape[-1]
        tn = math.prod(self.window.out_hw)
        size = dg.element_size()
        acc = self.z.new_zeros(o * k, i)
        dgf = dg.view(n, o, tn, k)
        for blk in self._blocks(tn * (o * k + i) * size):
            d = self.buffers.get("a", blk.stop - blk.start, tn, o, k)
            d.copy_(dgf[blk].transpose(1, 2))  # rows (n, t)
            acc.addmm_(d.view(-1, o * k).T, self._pz(blk))
        hw = acc.view(o, k, i).permute(1, 0, 2)
        if t_in is None:
            return hw
        # sum_{n,s} pg[(n,s), (o,tap)] t[n, c, s, k]: t positions-first
        (c, h, w), (kh, kw) = self.in_shape, self.window.kernel
        cross = self.z.new_zeros(o * kh * kw, c * k)
        for blk in self._blocks(h * w * (c * k + o * kh * kw) * size):
            tpf = self.buffers.get("b", blk.stop - blk.start, h, w, c, k)
            tpf.copy_(t_in[blk].permute(0, 2, 3, 1, 4))
            cross.addmm_(self._pg(blk).T, tpf.view(-1, c * k))
        cross5 = cross.view(o, kh, kw, c, k).flip(1, 2)  # taps back in the weight's order
        return hw + cross5.permute(4, 0, 3, 1, 2).reshape(k, o, i)

    def input_grad(self, dg: Tensor, vw: Tensor | None) -> Tensor:
        """``g'_in`` ``(N, C, H, W, K)``: ``W^T dg`` (patch cotangents summed back
        onto the zero-bordered image) ``+ V_k^T g`` (one product with ``pg``)."""
        n, (o, i), k = int(self.z.shape[0]), self.w2d.shape, dg.shape[-1]
        tn = math.prod(self.window.out_hw)
        (c, h, w), (ph, pw) = self.in_shape, self.padding
        (kh, kw), (dh, dw), (sh, sw), (ho, wo) = (
            self.window.kernel,
            self.window.dilation,
            self.window.stride,
            self.window.out_hw,
        )
        vflip = None
        if vw is not None:  # [(o, tap flipped), (c, k)]
            v5 = vw.reshape(k, o, c, kh, kw).flip(3, 4)
            vflip = v5.permute(1, 3, 4, 2, 0).reshape(o * kh * kw, c * k)
        dgf = dg.view(n, o, tn * k)
        out = dg.new_empty(n, c, h, w, k)
        wt = self.w2d.T
        # per sample: patch cotangents, the bordered image, pg, the V_k^T g rows
        per_sample = (
            i * tn * k + c * (h + 2 * ph) * (w + 2 * pw) * k + h * w * (o * kh * kw + c * k)
        )
        for blk in self._blocks(per_sample * dg.element_size()):
            b = blk.stop - blk.start
            cols = self.buffers.get("a", b, i, tn * k)
            torch.matmul(wt, dgf[blk], out=cols)
            cols7 = cols.view(b, c, kh, kw, ho, wo, k)
            acc = self.buffers.get("b", b, c, h + 2 * ph, w + 2 * pw, k)
            acc.zero_()
            for ky in range(kh):
                for kx in range(kw):
                    acc[
                        :,
                        :,
                        ky * dh : ky * dh + sh * (ho - 1) + 1 : sh,
                        kx * dw : kx * dw + sw * (wo - 1) + 1 : sw,
                    ] += cols7[:, :, ky, kx]
            dst = out[blk]
            dst.copy_(acc[:, :, ph : ph + h, pw : pw + w])
            if vflip is not None:
                r = self.buffers.get("d", b * h * w, c * k)
                torch.mm(self._pg(blk), vflip, out=r)
                dst += r.view(b, h, w, c, k).permute(0, 3, 1, 2, 4)
        return out


def _output_elements(layout: SequentialLayout, x: Tensor) -> int:
    """The elements of one sample's layer outputs, all layers."""
    total, h = 0, x[:1]
    with torch.no_grad():
        for module in layout.modules:
            h = module(h)
            total += h.numel()
    return total


def sequential_bytes(layout: SequentialLayout, x: Tensor) -> tuple[int, int]:
    """Bytes :func:`sequential_hvp` holds per sample: ``(per vector, fixed)``.
    Per vector, the input and every layer's output twice (the tangents kept for
    the backward pass, cotangents, layout copies; measured: about once on the
    benchmark CNN); patches live in buffers over blocks of samples, whatever the
    number of vectors. Fixed, as much again: the batch's layer values and
    first-order cotangents."""
    total = (x[:1].numel() + 2 * _output_elements(layout, x)) * x.element_size()
    return total, total


def sequential_hvp(
    layout: SequentialLayout,
    losses: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    v: Tensor,
    chunk: int,
    budget: int,
) -> Tensor:
    """``V H`` ``(K, P)`` for ``v`` ``(K, P)``: the Hessian of the mean over the
    batch of ``losses(output, y)`` (per-sample losses ``(N,)``), ``chunk``
    vectors at a time. ``budget`` (bytes) sizes the convolutions' scratch
    buffers: each at most ``budget / 64``."""
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
        steps: list[_Rule | _ConvBatch | None] = []
        for i, m in enumerate(modules):
            if isinstance(m, nn.Conv2d):
                block = max(1, min(_BLOCK_BYTES, budget // 64))
                steps.append(_ConvBatch.build(m, zs[i], gs[i], block))
            elif isinstance(m, nn.Linear):
                steps.append(None)
            else:
                steps.append(_rule(m, zs[i], zs[i + 1]))
        for lo in range(0, v.shape[0], chunk):
            _sequential_hvp_chunk(
                layout, losses, zs, gs, steps, y, v[lo : lo + chunk], out[lo : lo + chunk]
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
    steps: list[_Rule | _ConvBatch | None],
    y: Tensor,
    v: Tensor,
    out: Tensor,
) -> None:
    """One chunk of :func:`sequential_hvp`. Tangents between convolutions,
    pointwise layers and max pooling stay K-innermost (``(N, ..., K)``); other
    layers take ``(K, N, ...)``, converted where the layout changes."""
    k, n = v.shape[0], zs[0].shape[0]
    modules = layout.modules
    # forward tangents z'_l (None while zero); inner[l]: z'_l is K-innermost;
    # used[l]: the input tangent of layer l in the layout the layer takes
    dz: list[Tensor | None] = [None]
    inner = [False]
    used: list[Tensor | None] = []
    wants: list[bool] = []
    for i, module in enumerate(modules):
        step = steps[i]
        want = isinstance(step, _ConvBatch) or (
            isinstance(step, _Rule) and step.inner_ok and inner[i]
        )
        t_in = dz[i]
        if t_in is not None and want != inner[i]:
            t_in = _to_inner(t_in) if want else _to_outer(t_in)
        used.append(t_in)
        wants.append(want)
        vb_sl = layout.bias[i]
        vb = None if vb_sl is None else v[:, vb_sl]
        t_out: Tensor | None = None
        if isinstance(step, _ConvBatch):
            vw = _weight_tangent(module, v, layout.weight[i])
            if t_in is not None or vw is not None or vb is not None:
                t_out = step.forward(t_in, vw, vb, k)
        elif isinstance(module, nn.Linear):
            vw = _weight_tangent(module, v, layout.weight[i])
            z_in = zs[i]
            if t_in is not None:
                t_out = torch.nn.functional.linear(t_in, module.weight)
            if vw is not None:
                term = torch.einsum("koi,n...i->kn...o", vw, z_in)
                t_out = term if t_out is None else t_out + term
            if vb is not None:
                term = vb.reshape(k, *([1] * (zs[i + 1].ndim - 1)), -1).expand(k, *zs[i + 1].shape)
                # a copy where the term is alone: later layers may scale it in place
                t_out = term.contiguous() if t_out is None else t_out + term
        elif t_in is None:
            pass
        elif step is not None:
            t_out = step.forward(t_in, want)
        else:
            z_in = zs[i]
            t_out = jvp(module, (_expand(z_in, k),), (_fold(t_in),))[1]
            t_out = t_out.reshape(k, n, *t_out.shape[1:])
        dz.append(t_out)
        inner.append(want if t_out is not None else False)
    # backward tangents g'_l, from the loss's second derivative at the output
    t_last = dz[-1]
    if t_last is None:  # no trainable parameter
        return
    if inner[-1]:
        t_last = _to_outer(t_last)
    y_rep = _expand(y, k)

    def out_grad(z: Tensor) -> Tensor:
        return grad(lambda zz: losses(zz, y_rep).sum() / n)(z)

    dg_fold = jvp(out_grad, (_expand(zs[-1], k),), (_fold(t_last),))[1]
    dg = dg_fold.reshape(k, n, *dg_fold.shape[1:])
    dg_inner = False  # the layout of dg
    for i in range(len(modules) - 1, -1, -1):
        module, step, t_in, g_out, want = modules[i], steps[i], used[i], gs[i], wants[i]
        # every layer takes its output's cotangent in the layout of its input
        if dg_inner != want:
            dg = _to_inner(dg) if want else _to_outer(dg)
            dg_inner = want
        if isinstance(step, _ConvBatch):
            vw = _weight_tangent(module, v, layout.weight[i])
            if layout.weight[i] is not None:
                out[:, layout.weight[i]] = step.weight_grad(dg, t_in).reshape(k, -1)
            if layout.bias[i] is not None:
                out[:, layout.bias[i]] = dg.sum(dim=(0, 2, 3)).T
            if i == 0:
                break
            dg = step.input_grad(dg, vw)
        elif isinstance(module, nn.Linear):
            vw = _weight_tangent(module, v, layout.weight[i])
            z_in = zs[i]
            if layout.weight[i] is not None:
                hw = torch.einsum("kn...o,n...i->koi", dg, z_in)
                if t_in is not None:
                    hw = hw + torch.einsum("n...o,kn...i->koi", g_out, t_in)
                out[:, layout.weight[i]] = hw.reshape(k, -1)
            if layout.bias[i] is not None:
                dims = tuple(d for d in range(1, dg.ndim) if d != dg.ndim - 1)
                out[:, layout.bias[i]] = dg.sum(dim=dims)
            if i == 0:
                break
            new = dg @ module.weight
            if vw is not None:
                new = new + torch.einsum("koi,n...o->kn...i", vw, g_out)
            dg = new
        else:
            if i == 0:
                break
            if step is not None:
                dg = step.backward(dg, t_in, g_out, want)
            else:
                z_in = zs[i]
                g_rep = _expand(g_out, k)
                z_rep = _expand(z_in, k)
                t_fold = torch.zeros_like(z_rep) if t_in is None else _fold(t_in)

                def pull(z: Tensor, g: Tensor, f: nn.Module = module) -> Tensor:
                    return vjp(f, z)[1](g)[0]

                new = jvp(pull, (z_rep, g_rep), (t_fold, _fold(dg)))[1]
                dg = new.reshape(k, n, *z_in.shape[1:])
        # dg is now the input cotangent in the layout the layer took
        dg_inner = want
