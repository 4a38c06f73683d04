"""Exact second derivatives of models whose parameters all sit in ``nn.Linear`` layers.

Used by :class:`~xinfluence.backends.torch.TorchGradientProvider` for its dense
Hessian and its Hessian-vector products when every parameter of the provider is
the weight or bias of an ``nn.Linear`` layer applied once per forward pass to
2-D inputs (MLPs). Autodiff then spends most of its time on vectorised
elementwise work and small batched matrix products; here the same numbers come
from a few per-sample quantities and large matrix products.

The formula. Add a perturbation ``s_L`` to the output of each layer ``L`` and let
``phi(s)`` be the batch's mean loss. Moving layer ``L``'s trainable parameters
``U_L`` (``(out_L, c_L)``: the weight's ``in_L`` columns, then the bias column)
by ``dU_L`` perturbs its output by ``s_L = dU_L @ ã_L``, where ``ã_L`` is its
input (then a 1) at the *moved* upstream parameters. To second order, with, per
sample ``i``,

* ``delta_iL = d phi / d s_iL`` ``(out_L,)`` and ``Phi_i = d^2 phi / d s_i^2``
  ``(S, S)``, ``S = sum_L out_L``;
* ``J_i(L, L') = d a_iL / d s_iL'`` ``(in_L, out_L')``, zero unless ``L'`` is
  upstream of ``L``;

the Hessian block of ``(U_L, U_L')``, indexed ``[a, p, b, q]``, is

    ``sum_i Phi_i[La, L'b] ã_iL[p] ã_iL'[q] + C_LL'[a,p,b,q] + C_L'L[b,q,a,p]``,
    ``C_LL'[a,p,b,q] = sum_i delta_iL[a] J_i(L, L')[p, b] ã_iL'[q]`` (weight columns ``p``).

``delta``, ``Phi`` and ``J`` come from one gradient and ``S`` forward-mode
products over the batch (all samples at once: eval-mode samples are
independent). A use of a weight that the layer hooks cannot see (a weight read
outside its module) would make the formula wrong; the provider therefore checks
the result against one autodiff product and otherwise takes the general path.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ...types import Batch

Params = dict[str, Tensor]

# Elements of the largest per-chunk intermediate of the dense Hessian; of the
# factors of one batch (above it products take the general path); bytes of the
# factors a provider keeps for batches that come back.
CHUNK_ELEMENTS = 2**22
FACTOR_ELEMENTS = 2**23
FACTOR_CACHE_BYTES = 2**28


class NotLinearStructured(Exception):
    """The forward pass does not have the structure the formula needs."""


@dataclass(frozen=True)
class LinearLayout:
    """Where each layer's ``U_L`` lives in the provider's flat vector.

    ``layers``: layer -> ``(module, weight name or None, bias name or None)``;
    ``weight``/``bias``: layer -> slice of the flat vector or None; ``n_w``:
    weight columns (``in_L`` or 0), ``cols = n_w + (1 if bias)``; ``offsets``:
    the layer's first output unit among the ``S`` perturbation directions.
    """

    layers: OrderedDict[str, tuple[nn.Linear, str | None, str | None]]
    n_out: dict[str, int]
    n_in: dict[str, int]
    n_w: dict[str, int]
    cols: dict[str, int]
    offsets: dict[str, int]
    width: int
    weight: dict[str, slice | None]
    bias: dict[str, slice | None]

    @classmethod
    def build(
        cls,
        layers: OrderedDict[str, tuple[nn.Linear, str | None, str | None]],
        slices: OrderedDict[str, slice],
    ) -> LinearLayout:
        n_out = {k: m.out_features for k, (m, _, _) in layers.items()}
        n_in = {k: m.in_features for k, (m, _, _) in layers.items()}
        n_w = {k: n_in[k] if w is not None else 0 for k, (_, w, _) in layers.items()}
        cols = {k: n_w[k] + int(b is not None) for k, (_, _, b) in layers.items()}
        offsets, width = {}, 0
        for k in layers:
            offsets[k] = width
            width += n_out[k]
        return cls(
            layers,
            n_out,
            n_in,
            n_w,
            cols,
            offsets,
            width,
            {k: None if w is None else slices[w] for k, (_, w, _) in layers.items()},
            {k: None if b is None else slices[b] for k, (_, _, b) in layers.items()},
        )

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    def factor_elements(self, n: int) -> int:
        """Elements of the factors of ``n`` samples (``Phi`` dominates)."""
        s = self.width
        return n * (s * s + s + sum(self.cols.values()) + s * sum(self.n_w.values()))


@dataclass(frozen=True)
class LinearFactors:
    """Per-sample quantities of ``n`` samples, as contiguous tensors:

    * ``atil`` layer -> ``ã_L`` ``(n, c_L)`` and ``atil_t`` its transpose;
    * ``delta`` layer -> ``(n, out_L)``;
    * ``phi`` ``(L, L')`` -> ``Phi[L, L']`` ``(n, out_L, out_L')`` (symmetrised);
    * ``jac`` ``(L, L')`` -> ``J(L, L')`` ``(n, in_L, out_L')`` for the nonzero
      pairs with a weight in ``L``; ``jac_diag`` its diagonal ``(n, in_L)`` where
      ``J`` is diagonal (an elementwise activation between the layers), else
      ``jac_t`` its transpose.
    """

    atil: dict[str, Tensor]
    atil_t: dict[str, Tensor]
    delta: dict[str, Tensor]
    phi: dict[tuple[str, str], Tensor]
    jac: dict[tuple[str, str], Tensor]
    jac_t: dict[tuple[str, str], Tensor]
    jac_diag: dict[tuple[str, str], Tensor]


def linear_factors(
    gp: Any, layout: LinearLayout, x: Tensor, y: Tensor, n_total: int
) -> LinearFactors:
    """The factors of the samples ``x, y``, for the mean over ``n_total`` samples."""
    names = layout.names
    modules = {k: m for k, (m, _, _) in layout.layers.items()}
    dtype, device = gp.dtype, gp.device
    n = x.shape[0]
    ctx: dict[str, Any] = {}

    def make_hook(layer: str) -> Callable[..., Tensor]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            acts = ctx["a"]
            if layer in acts or len(inputs) != 1 or inputs[0].ndim != 2 or output.ndim != 2:
                raise NotLinearStructured(layer)
            acts[layer] = inputs[0]
            return output + ctx["s"][layer]

        return hook

    def phi(s: Params) -> tuple[Tensor, Params]:
        ctx["s"], ctx["a"] = s, {}
        loss = gp._output_losses(gp._forward(gp._active, x), y).sum() / n_total
        if set(ctx["a"]) != set(names):
            raise NotLinearStructured("a layer was not called")
        return loss, dict(ctx["a"])

    g_fn = grad(phi, has_aux=True)
    s0 = {k: torch.zeros(n, layout.n_out[k], dtype=dtype, device=device) for k in names}
    # one direction per output unit of every layer, for all samples at once
    dirs = {
        k: torch.zeros(layout.width, n, layout.n_out[k], dtype=dtype, device=device) for k in names
    }
    for k in names:
        unit = torch.arange(layout.n_out[k], device=device)
        dirs[k][layout.offsets[k] + unit, :, unit] = 1

    def tangent(e: Params) -> tuple[Params, Params]:
        return jvp(g_fn, (s0,), (e,))[1]

    handles = [modules[k].register_forward_hook(make_hook(k)) for k in names]
    try:
        delta, acts = g_fn(s0)
        d_delta, d_acts = vmap(tangent)(dirs)  # (S, n, out_L), (S, n, in_L)
    finally:
        for handle in handles:
            handle.remove()
    phi_mat = torch.cat([d_delta[k] for k in names], dim=2).permute(1, 2, 0)  # (n, S, S)
    phi_mat = (phi_mat + phi_mat.transpose(1, 2)) / 2
    phi_blocks = {}
    for k in names:
        o = layout.offsets[k]
        for k2 in names:
            o2 = layout.offsets[k2]
            phi_blocks[(k, k2)] = phi_mat[
                :, o : o + layout.n_out[k], o2 : o2 + layout.n_out[k2]
            ].contiguous()
    atil = {
        k: torch.cat(
            [acts[k][:, : layout.n_w[k]], acts[k].new_ones(n, layout.cols[k] - layout.n_w[k])],
            dim=1,
        )
        for k in names
    }
    jac = {}
    for k in (k for k in names if layout.n_w[k]):
        for k2 in names:
            o = layout.offsets[k2]
            block = d_acts[k][o : o + layout.n_out[k2]].permute(1, 2, 0)  # (n, in_L, out_L')
            if bool(torch.any(block != 0)):
                jac[(k, k2)] = block.contiguous()
    jac_t, jac_diag = {}, {}
    for key, j in jac.items():
        d = torch.diagonal(j, dim1=1, dim2=2) if j.shape[1] == j.shape[2] else None
        if d is not None and torch.equal(torch.diag_embed(d), j):
            jac_diag[key] = d.contiguous()
        else:
            jac_t[key] = j.transpose(1, 2).contiguous()
    return LinearFactors(
        atil,
        {k: a.T.contiguous() for k, a in atil.items()},
        {k: v.detach() for k, v in delta.items()},
        phi_blocks,
        jac,
        jac_t,
        jac_diag,
    )


def linear_hessian(gp: Any, layout: LinearLayout, batch: Batch, ws: Workspace) -> Tensor:
    """Dense Hessian ``(P, P)`` of the batch's mean loss in the provider's flat
    order. Sums over samples are matrix products over chunks of samples, so that
    no intermediate exceeds about ``CHUNK_ELEMENTS``."""
    x, y = batch.x, batch.y
    names, cols, n_out, n_w = layout.names, layout.cols, layout.n_out, layout.n_w
    n_total = x.shape[0]
    pairs = [(k, k2) for i, k in enumerate(names) for k2 in names[i:]]
    per_sample = max(
        layout.factor_elements(1) + layout.width * layout.width,
        *(cols[k] * cols[k2] + n_out[k] * cols[k2] + n_out[k2] * cols[k] for k, k2 in pairs),
    )
    chunk = max(1, min(n_total, CHUNK_ELEMENTS // per_sample))
    # scratch in the parameters' dtype: x may be integer or of another precision
    # (cast_inputs=False, a model that converts its inputs)
    like = torch.empty(0, dtype=gp.dtype, device=gp.device)
    gauss: dict[tuple[str, str], Tensor] = {}  # [(a b), (p q)]: (out out', c c')
    cross: dict[tuple[str, str], Tensor] = {}  # C_LL' as [(p b), (a q)]: (in out', out c')

    def accumulate(store: dict[Any, Tensor], name: str, key: Any, lhs: Tensor, rhs: Tensor) -> None:
        if key in store:
            store[key].addmm_(lhs.T, rhs)
        else:
            shape = (lhs.shape[1], rhs.shape[1])
            store[key] = torch.mm(lhs.T, rhs, out=ws.get(f"{name}{key}", shape, lhs))

    for lo in range(0, n_total, chunk):
        f = linear_factors(gp, layout, x[lo : lo + chunk], y[lo : lo + chunk], n_total)
        n = f.delta[names[0]].shape[0]
        for k, k2 in pairs:
            outer = ws.get("outer", (n, cols[k], cols[k2]), like)
            torch.mul(f.atil[k][:, :, None], f.atil[k2][:, None, :], out=outer)
            accumulate(gauss, "gauss", (k, k2), f.phi[(k, k2)].view(n, -1), outer.view(n, -1))
        for (k, k2), jac in f.jac.items():
            rhs = ws.get("rhs", (n, n_out[k], cols[k2]), like)
            torch.mul(f.delta[k][:, :, None], f.atil[k2][:, None, :], out=rhs)
            accumulate(cross, "cross", (k, k2), jac.view(n, -1), rhs.view(n, -1))

    # each (parameter, parameter) piece of a layer block goes to its flat position
    pieces: dict[str, list[tuple[slice, slice, bool]]] = {k: [] for k in names}
    for k in names:
        w_flat, b_flat = layout.weight[k], layout.bias[k]
        if w_flat is not None:
            pieces[k].append((slice(0, n_w[k]), w_flat, True))
        if b_flat is not None:
            pieces[k].append((slice(n_w[k], cols[k]), b_flat, False))
    p = gp.n_parameters
    h = torch.empty(p, p, dtype=gp.dtype, device=gp.device)
    for k, k2 in pairs:
        # views indexed [a, p, b, q] of the Hessian block of (U_L, U_L')
        g4 = gauss[(k, k2)].view(n_out[k], n_out[k2], cols[k], cols[k2]).permute(0, 2, 1, 3)
        c1 = c2 = None
        if (k, k2) in cross:  # C_LL'[a, p, b, q], p < n_w
            c1 = cross[(k, k2)].view(n_w[k], n_out[k2], n_out[k], cols[k2]).permute(2, 0, 1, 3)
        if (k2, k) in cross:  # C_L'L[b, q, a, p], q < n_w'
            c2 = cross[(k2, k)].view(n_w[k2], n_out[k], n_out[k2], cols[k]).permute(1, 3, 2, 0)
        for sl1, flat1, weight1 in pieces[k]:
            for sl2, flat2, weight2 in pieces[k2]:
                target = h[flat1, flat2].view(
                    n_out[k], sl1.stop - sl1.start, n_out[k2], sl2.stop - sl2.start
                )
                target.copy_(g4[:, sl1, :, sl2])
                if c1 is not None and weight1:
                    target.add_(c1[:, :, :, sl2])
                if c2 is not None and weight2:
                    target.add_(c2[:, sl1])
                if k != k2:
                    h[flat2, flat1].copy_(h[flat1, flat2].T)
    return h


class Workspace:
    """Reusable scratch tensors. A large tensor allocated anew on every call costs
    page faults (CPU torch does not cache allocations), about as much as the
    arithmetic here; buffers over ``KEEP_BYTES`` are not kept between calls."""

    KEEP_BYTES = 2**26

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous ``shape`` view of the buffer ``name`` (contents undefined)."""
        size = math.prod(shape)
        buf = self._buffers.get(name)
        if (
            buf is None
            or buf.numel() < size
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(size, dtype=like.dtype, device=like.device)
            if size * buf.element_size() <= self.KEEP_BYTES:
                self._buffers[name] = buf
        return buf[:size].view(shape)


def linear_hvp(layout: LinearLayout, f: LinearFactors, v: Tensor, ws: Workspace) -> Tensor:
    """``V H`` for ``v`` ``(K, P)`` (rows in the provider's flat order) from the
    factors of the whole batch: ``(K, P)``. Vectors are processed in chunks that
    keep the scratch tensors (``n x width x chunk``) near ``2**22`` elements and
    the chunk's own memory within :func:`xinfluence.memory_budget`: per vector,
    about four parameter-sized buffers (``u``, ``extra`` per layer; ``g``,
    ``uw`` for the widest) and three ``n x out`` ones per layer."""
    from ..._config import memory_budget

    names = layout.names
    n = f.delta[names[0]].shape[0]
    widest = max(layout.width, *layout.n_in.values())
    params = sum(layout.cols[k] * layout.n_out[k] for k in names)
    per_vector = v.element_size() * (
        4 * params + 3 * n * sum(layout.n_out.values()) + n * max(layout.n_w.values())
    )
    step = max(1, min(2**22 // max(1, n * widest), memory_budget() // max(1, per_vector)))
    out = torch.empty_like(v)
    for lo in range(0, v.shape[0], step):
        _linear_hvp_chunk(layout, f, v[lo : lo + step], out[lo : lo + step], ws)
    return out


def _linear_hvp_chunk(
    layout: LinearLayout, f: LinearFactors, v: Tensor, out: Tensor, ws: Workspace
) -> None:
    names, n_out, n_w, cols = layout.names, layout.n_out, layout.n_w, layout.cols
    k_vec = v.shape[0]
    n = f.delta[names[0]].shape[0]
    s1, r = {}, {}
    for k in names:
        # U_L as (c, out, K), then s_iL = U_L ã_iL: (n, out, K)
        u = ws.get(f"u{k}", (cols[k], n_out[k], k_vec), v)
        if layout.weight[k] is not None:
            u[: n_w[k]].copy_(v[:, layout.weight[k]].view(k_vec, n_out[k], n_w[k]).permute(2, 1, 0))
        if layout.bias[k] is not None:
            u[n_w[k]].copy_(v[:, layout.bias[k]].T)
        s1[k] = ws.get(f"s{k}", (n, n_out[k], k_vec), v)
        torch.mm(f.atil[k], u.view(cols[k], -1), out=s1[k].view(n, -1))
    for k in names:  # output cotangents r_iL = sum_L' Phi_i[L, L'] s_iL'
        r[k] = ws.get(f"r{k}", (n, n_out[k], k_vec), v)
        for j, k2 in enumerate(names):
            if j == 0:
                torch.bmm(f.phi[(k, k2)], s1[k2], out=r[k])
            else:
                r[k].baddbmm_(f.phi[(k, k2)], s1[k2])
    extra: dict[str, Tensor] = {}  # (out, n_w K): the delta (x) (J s1) terms
    for (k, k2), jac in f.jac.items():
        # C_LL' applied to dU_L': sum_i delta_iL (x) (J_i s1_iL')
        t = ws.get("t", (n, n_w[k], k_vec), v)
        diag = f.jac_diag.get((k, k2))
        if diag is not None:
            torch.mul(diag[:, :, None], s1[k2], out=t)
        else:
            torch.bmm(jac, s1[k2], out=t)
        if k in extra:
            extra[k].addmm_(f.delta[k].T, t.view(n, -1))
        else:
            extra[k] = torch.mm(
                f.delta[k].T, t.view(n, -1), out=ws.get(f"e{k}", (n_out[k], n_w[k] * k_vec), v)
            )
        # C_LL'^T applied to dU_L: cotangent J_i^T (weight part of U_L)^T delta_iL
        uw = ws.get("uw", (n_out[k], n_w[k], k_vec), v)
        uw.copy_(v[:, layout.weight[k]].view(k_vec, n_out[k], n_w[k]).permute(1, 2, 0))
        m = ws.get("m", (n, n_w[k], k_vec), v)
        torch.mm(f.delta[k], uw.view(n_out[k], -1), out=m.view(n, -1))
        if diag is not None:
            r[k2].addcmul_(diag[:, :, None], m)
        else:
            r[k2].baddbmm_(f.jac_t[(k, k2)], m)
    for k in names:  # back to parameters: sum_i r_iL ã_iL^T, as (c, out, K)
        g = ws.get("g", (cols[k], n_out[k], k_vec), v)
        torch.mm(f.atil_t[k], r[k].view(n, -1), out=g.view(cols[k], -1))
        if layout.weight[k] is not None:
            target = out[:, layout.weight[k]].view(k_vec, n_out[k], n_w[k])
            target.copy_(g[: n_w[k]].permute(2, 1, 0))
            if k in extra:
                target.add_(extra[k].view(n_out[k], n_w[k], k_vec).permute(2, 0, 1))
        if layout.bias[k] is not None:
            out[:, layout.bias[k]].copy_(g[n_w[k]].T)


def linear_param_layers(
    model: nn.Module, active: Params
) -> OrderedDict[str, tuple[nn.Linear, str | None, str | None]]:
    """``nn.Linear`` modules holding parameters in ``active``: module name
    (``"root"`` for the model itself) -> ``(module, weight name or None, bias name
    or None)`` (``None``: not in ``active``). A layer with an active parameter
    that another module shares (tied weights) is left out, and so is a layer
    whose parameters do not have the shapes its ``in_features`` and
    ``out_features`` declare (a replaced ``weight``): its derivatives then take
    the general path."""
    return param_layers(model, active, lambda m: isinstance(m, nn.Linear) and _declared_shapes(m))


def param_layers(
    model: nn.Module, active: Params, accepts: Callable[[nn.Module], bool]
) -> OrderedDict[str, Any]:
    """The modules ``accepts`` takes that hold parameters in ``active``: module
    name (``"root"`` for the model itself) -> ``(module, weight name or None, bias
    name or None)`` (``None``: not in ``active``). A layer with an active
    parameter that another module shares (tied weights) is left out."""
    uses: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    out: OrderedDict[str, Any] = OrderedDict()
    for mod_name, module in model.named_modules():
        if not accepts(module):
            continue
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


def _declared_shapes(module: nn.Linear) -> bool:
    """Whether the layer's weight and bias have the shapes its attributes declare."""
    shape = (module.out_features, module.in_features)
    weight, bias = module.weight, module.bias
    return (
        isinstance(weight, Tensor)
        and tuple(weight.shape) == shape
        and (bias is None or (isinstance(bias, Tensor) and tuple(bias.shape) == shape[:1]))
    )
