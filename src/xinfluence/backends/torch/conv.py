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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .linear import param_layers


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
    """The input patches of ``x`` ``(N, C, H, W)``: ``(N, T, C*kh*kw)``, in the
    order of :func:`torch.nn.functional.unfold` (detached: a strided copy,
    several times faster than ``unfold`` for float64 on the CPU)."""
    if x.ndim != 4:
        raise ValueError(
            f"expected a Conv2d input of shape (N, C, H, W), got {tuple(x.shape)} "
            "(unbatched inputs are not supported)"
        )
    pad = _padding(module)
    assert pad is not None  # conv_supported was checked
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    n, c, h, w = x.shape
    ho = (h + 2 * pad[0] - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pad[1] - dw * (kw - 1) - 1) // sw + 1
    window = _Window((kh, kw), (dh, dw), (sh, sw), (ho, wo))
    xp = torch.nn.functional.pad(x.detach(), (pad[1], pad[1], pad[0], pad[0]))
    out = x.new_empty(n, ho, wo, c, kh, kw)
    return window.patches(xp, out, positions_first=True).view(n, ho * wo, c * kh * kw)


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
    return param_layers(model, active, conv_supported)


@dataclass(frozen=True)
class _Window:
    """A stride-``stride``, dilation-``dilation`` window of ``kernel`` over a
    zero-bordered ``(B, C, Hp, Wp[, K])`` tensor, with ``out_hw`` positions."""

    kernel: tuple[int, int]
    dilation: tuple[int, int]
    stride: tuple[int, int]
    out_hw: tuple[int, int]

    def patches(self, xp: Tensor, out: Tensor, *, positions_first: bool) -> Tensor:
        """Copies the patches of ``xp`` into ``out``, shaped ``(B, C, kh, kw, H',
        W'[, K])``, or with ``positions_first`` ``(B, H', W', C, kh, kw[, K])``."""
        st = xp.stride()
        (kh, kw), (dh, dw), (sh, sw), (ho, wo) = (
            self.kernel,
            self.dilation,
            self.stride,
            self.out_hw,
        )
        dims = {
            "b": (xp.shape[0], st[0]),
            "c": (xp.shape[1], st[1]),
            "ky": (kh, dh * st[2]),
            "kx": (kw, dw * st[3]),
            "h": (ho, sh * st[2]),
            "w": (wo, sw * st[3]),
        }
        order = ("b", "h", "w", "c", "ky", "kx")
        if not positions_first:
            order = ("b", "c", "ky", "kx", "h", "w")
        shape = [dims[d][0] for d in order] + list(xp.shape[4:])
        stride = [dims[d][1] for d in order] + list(st[4:])
        out.copy_(xp.as_strided(shape, stride))
        return out
