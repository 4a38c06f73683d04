"""Kronecker-factored model: EKFAC."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, final

from .. import _xp
from .._config import memory_budget
from .._xp import Array, Namespace
from ..curvature import Dataset
from ..operators import (
    EkfacOperator,
)
from ..types import (
    Batch,
    BlockMapper,
    GradientProvider,
    KroneckerFactorProvider,
    Operator,
    OperatorGradientComposition,
    iter_batches,
)
from ._shared import LayerGradients, SharedFactorMapper, SharedFactors, shared_query_sizes
from .base import ComposableInfluence

if TYPE_CHECKING:
    from .base import BlockStructure, Regularization


def _augmented(a: Array, /, *, xp: Namespace, bias: bool) -> Array:
    """The layer inputs ``a`` (..., I), with a trailing 1 where the layer has a bias."""
    if not bias:
        return a
    ones = xp.ones((*a.shape[:-1], 1), dtype=a.dtype, device=_xp.device_of(a))
    return xp.concat([a, ones], axis=-1)


def _kfac_accumulate(
    a: Array, s: Array, previous: tuple[Array, Array] | None, /, *, xp: Namespace, bias: bool
) -> tuple[Array, Array]:
    """The K-FAC sums ``(sum a a^T, sum s s^T / T)`` of one batch added to ``previous``.

    Dense layers on 2-D inputs give a (N, I), s (N, C, O); dense layers on a
    token axis and convolutions (KFC) the inputs (patches) and output gradients
    at T positions, a (N, T, I), s (N, C, T, O), with the per-sample weight
    gradients sum_t s_nct a_nt^T. The factors are Grosse & Martens' "expand"
    approximation (as kronfluence's): positions are treated as independent
    samples, A = mean_n sum_t a_nt a_nt^T, S = mean_n (1/T) sum_{c,t} s_nct s_nct^T,
    so that A (x) S = (1/(N^2 T)) (sum_{n,t} a a^T) (x) (sum_{n,c,t} s s^T), the
    product kronfluence's A = sum a a^T / (N T), S = sum s s^T / N gives; exact
    (the layer's K-FAC block) for T = 1. C = 1 for the empirical Fisher.
    """
    a = _augmented(a, xp=xp, bias=bias)
    positions = 1 if a.ndim == 2 else int(a.shape[1])
    a2 = xp.reshape(a, (-1, a.shape[-1]))
    s2 = xp.reshape(s, (-1, s.shape[-1]))  # all C columns (and T positions)
    a_cov = xp.matrix_transpose(a2) @ a2
    s_cov = xp.matrix_transpose(s2) @ s2 / positions
    if previous is None:
        return a_cov, s_cov
    return previous[0] + a_cov, previous[1] + s_cov


def _kfac_eigenbases(
    a_cov: Array, s_cov: Array, n: float, /, *, xp: Namespace
) -> tuple[Array, Array, Array]:
    """``(Q_S, Q_A, lambda_S lambda_A^T)`` from the K-FAC sums over ``n`` samples."""
    lam_a, q_a = xp.linalg.eigh(_xp.symmetrize(a_cov / n, xp=xp))
    lam_s, q_s = xp.linalg.eigh(_xp.symmetrize(s_cov / n, xp=xp))
    # covariances are PSD: rounding's slightly negative eigenvalues are zeros
    lam_s, lam_a = xp.clip(lam_s, min=0.0), xp.clip(lam_a, min=0.0)
    return q_s, q_a, lam_s[:, None] * lam_a[None, :]


def _ekfac_accumulate_diagonal(
    a: Array,
    s: Array,
    q_s: Array,
    q_a: Array,
    previous: Array | None,
    /,
    *,
    xp: Namespace,
    bias: bool,
) -> Array:
    """The corrected eigenvalue sums of one batch, ``sum_n (Q_S^T G_n Q_A)**2``
    (O, I'), added to ``previous``."""
    a_rot, s_rot = _augmented(a, xp=xp, bias=bias) @ q_a, s @ q_s
    if a.ndim == 2:
        # Lambda[o, i] = mean_n sum_c (Q_S^T s_nc)[o]^2 (Q_A^T a_n)[i]^2
        s_sq = xp.sum(s_rot * s_rot, axis=1)
        term = xp.matrix_transpose(s_sq) @ (a_rot * a_rot)
    else:
        term = _rotated_gradient_squares(s_rot[:, 0, ...], a_rot, xp=xp)
        for c in range(1, s_rot.shape[1]):
            term = term + _rotated_gradient_squares(s_rot[:, c, ...], a_rot, xp=xp)
    return term if previous is None else previous + term


def _kfac_accumulate_layers(
    factors: dict[str, tuple[Array, Array]],
    previous: dict[str, tuple[Array, Array]] | None,
    n: float | None,
    /,
    *,
    xp: Namespace,
    biases: tuple[tuple[str, bool], ...],
) -> dict[str, Any]:
    """:func:`_kfac_accumulate` for every layer of ``biases`` (layer, has bias):
    one compiled program per model (and batch shape) on jax. On the last batch,
    ``n`` the number of samples: the eigenbases of the sums
    (:func:`_kfac_eigenbases_layers`) in the same program."""
    cov = {
        layer: _kfac_accumulate(
            *factors[layer], None if previous is None else previous[layer], xp=xp, bias=bias
        )
        for layer, bias in biases
    }
    return cov if n is None else _kfac_eigenbases_layers(cov, n, xp=xp)


def _kfac_eigenbases_layers(
    cov: dict[str, tuple[Array, Array]], n: float, /, *, xp: Namespace
) -> dict[str, tuple[Array, Array, Array]]:
    """:func:`_kfac_eigenbases` for every layer: one compiled program on jax."""
    return {layer: _kfac_eigenbases(a, s, n, xp=xp) for layer, (a, s) in cov.items()}


def _ekfac_accumulate_diagonal_layers(
    factors: dict[str, tuple[Array, Array]],
    bases: dict[str, tuple[Array, Array, Array]],
    previous: dict[str, Array] | None,
    n: float | None,
    /,
    *,
    xp: Namespace,
    biases: tuple[tuple[str, bool], ...],
) -> dict[str, Array]:
    """:func:`_ekfac_accumulate_diagonal` for every layer: one compiled program on
    jax. On the last batch, ``n`` the number of samples: the sums divided by it
    (the means) in the same program."""
    sums = {
        layer: _ekfac_accumulate_diagonal(
            *factors[layer],
            bases[layer][0],
            bases[layer][1],
            None if previous is None else previous[layer],
            xp=xp,
            bias=bias,
        )
        for layer, bias in biases
    }
    return sums if n is None else {layer: total / n for layer, total in sums.items()}


def _with_last(batches: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
    """``(batch, whether it is the last)``, one batch read ahead: the last batch's
    program also finishes the pass (jax: one program fewer per pass)."""
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def _rotated_gradient_squares(s_rot: Array, a_rot: Array, *, xp: Namespace) -> Array:
    """``sum_n (s_n^T a_n)**2`` ``(O, I)`` for ``s_rot`` ``(N, T, O)`` and ``a_rot``
    ``(N, T, I)`` (the rotated per-sample gradients of a convolution), over
    chunks of samples so that the ``(chunk, O, I)`` gradients fit the memory
    budget."""
    n, o, i = s_rot.shape[0], s_rot.shape[2], a_rot.shape[2]
    per_sample = 2 * o * i * (xp.finfo(s_rot.dtype).bits // 8)
    step = max(1, min(n, memory_budget() // max(per_sample, 1)))
    total = xp.zeros((o, i), dtype=s_rot.dtype, device=_xp.device_of(s_rot))
    for lo in range(0, n, step):
        g = xp.matrix_transpose(s_rot[lo : lo + step]) @ a_rot[lo : lo + step]
        total = total + xp.sum(g * g, axis=0)
    return total


@final
class EkfacInfluence(ComposableInfluence):
    """EK-FAC (George et al. 2018): per dense layer, the layer's block of the
    curvature in the Kronecker eigenbasis of its input and output-gradient
    covariances, with eigenvalues corrected on the data (``update_diagonal=True``)
    or taken as products of the factors' eigenvalues (plain K-FAC).

    ``second_order`` names the curvature whose layer blocks are approximated:

    * ``"gauss_newton"`` (default): the generalized Gauss-Newton matrix
      ``mean_i J_i^T H_i J_i``. Its layer block is exactly
      ``mean_i sum_c (s_ic s_ic^T) (x) (a_i a_i^T)``, with ``a_i`` the layer's
      input and ``s_ic`` the ``c``-th column of a square root ``H_i = L_i L_i^T``
      of the loss Hessian on the model output, back-propagated to the layer's
      output (``M`` pseudo-gradients per sample, ``M`` the output size); needs a
      loss convex in the output and the provider's ``kfac_ggn_factors``;
    * ``"empirical_fisher"``: ``mean_i g_i g_i^T``, one true gradient
      ``s_i = d l_i / d z`` per sample (the behaviour before 0.2).

    With ``update_diagonal`` the eigenvalues are the exact diagonal of the
    layer's curvature block in the Kronecker eigenbasis.

    The provider must offer the Kronecker factors: ``kfac_layers()`` (layer ->
    ``(weight name, bias name or None)``) and ``kfac_factors(batch)`` (layer ->
    inputs ``a`` ``(N, I)`` and output gradients ``s`` ``(N, O)``), plus
    ``kfac_ggn_factors(batch)`` (``s`` ``(N, C, O)``) for the Gauss-Newton
    curvature, as the torch provider does for ``nn.Linear`` and Hugging Face
    ``Conv1D`` layers, the jax provider for declared dense layers and the
    array-API GLMs for their one layer. Blocks are the layers; every parameter
    must belong to one: on other models, track the layers
    (``TorchGradientProvider(model, loss, layers=[...])``,
    ``JaxGradientProvider(apply_fn, params, loss, layers=[...])``) or restrict
    the provider to them; the other parameters are then out of the curvature
    and the scores.

    Dense layers on a token axis (inputs ``(N, *S, I)``, flattened to
    ``T = prod(S)`` positions: torch's dense layers, the jax provider's tracked
    ones) and convolutions (the torch provider's ``nn.Conv2d`` layers, the jax
    provider's ``conv_layers`` and tracked convolutions) give
    their factors per position, ``a`` ``(N, T, I)`` and ``s`` ``(N, T, O)``.
    The factors are Grosse & Martens' "expand" approximation (KFC, 2016; as
    kronfluence's): ``A = mean_n sum_t a_nt a_nt^T``,
    ``S = mean_n (1/T) sum_t s_nt s_nt^T`` (the product ``A (x) S`` equals
    kronfluence's; exact for ``T = 1``), and the corrected eigenvalues are
    ``mean_n (Q_S^T G_n Q_A)**2`` with the exact per-sample gradients
    ``G_n = sum_t s_nt a_nt^T``, summed over positions before squaring (and
    over the ``C`` pseudo-gradients ``s_nct`` for the Gauss-Newton curvature).
    """

    def __init__(
        self,
        gradient_provider: GradientProvider,
        /,
        *,
        regularization: Regularization = 0.0,
        block_structure: BlockStructure = "layer",
        second_order: str = "gauss_newton",
        update_diagonal: bool = True,
    ):
        gp = gradient_provider
        if not isinstance(gp, KroneckerFactorProvider):
            raise TypeError(
                f"EkfacInfluence needs a provider with kfac_layers() and kfac_factors(); "
                f"{type(gp).__name__} has none"
            )
        if block_structure != "layer":
            raise ValueError(
                "EkfacInfluence works on dense-layer blocks only: block_structure must be "
                f"'layer', got {block_structure!r}"
            )
        if second_order not in ("gauss_newton", "empirical_fisher"):
            raise ValueError(
                "EK-FAC approximates a positive semi-definite curvature: second_order must be "
                f"'gauss_newton' or 'empirical_fisher', got {second_order!r}"
            )
        if second_order == "gauss_newton" and not callable(getattr(gp, "kfac_ggn_factors", None)):
            raise TypeError(
                f"EkfacInfluence with second_order='gauss_newton' needs a provider with "
                f"kfac_ggn_factors(); {type(gp).__name__} has none (pass "
                "second_order='empirical_fisher' to use its kfac_factors)"
            )
        layers = gp.kfac_layers()
        covered = {n for w, b in layers.values() for n in (w, b) if n is not None}
        uncovered = [n for n in gp.parameter_names if n not in covered]
        if not layers or uncovered:
            raise ValueError(
                f"EkfacInfluence needs every parameter in a dense layer; not covered: "
                f"{uncovered}. Track the dense layers (TorchGradientProvider(model, loss, "
                "layers=[...])), or restrict the provider to them"
            )
        custom = OrderedDict((k, tuple(n for n in v if n is not None)) for k, v in layers.items())
        super().__init__(
            gp,
            regularization=regularization,
            block_structure=custom,
            second_order=second_order,
        )
        self.update_diagonal = bool(update_diagonal)
        self._factors: KroneckerFactorProvider = gp

    def _create_operator(
        self, block: str, gp: GradientProvider, data: Dataset, regularization: float
    ) -> Operator:  # pragma: no cover - fit builds all layers in one pass
        raise NotImplementedError

    def fit(self, data: Any) -> EkfacInfluence:
        gp = self.gradient_provider
        xp = gp.xp
        dataset = Dataset(iter_batches(data), gp)
        factors = self._factors
        layers = factors.kfac_layers()
        layouts = gp.kfac_layouts() if hasattr(gp, "kfac_layouts") else {}

        # Dense layers give a (N, I), s (N, C, O); dense layers on a token axis and
        # convolutions (KFC) the inputs and output gradients at T positions,
        # a (N, T, I), s (N, C, T, O), with the per-sample weight gradients
        # sum_t s_nct a_nt^T: A = mean_n sum_t a a^T, S = mean_n (1/T) sum_{c,t} s s^T
        # ("expand", _kfac_accumulate). C = 1 for the empirical Fisher.
        def layer_factors(batch: Batch) -> OrderedDict[str, tuple[Array, Array]]:
            if self.second_order == "gauss_newton":
                out = gp.kfac_ggn_factors(batch)  # type: ignore[attr-defined]
            else:
                out = OrderedDict(
                    (k, (a, s[:, None, ...])) for k, (a, s) in factors.kfac_factors(batch).items()
                )
            missing = [k for k in layers if k not in out]
            if missing:
                raise ValueError(
                    f"EkfacInfluence: the provider gave no factors for layers {missing} "
                    f"(second_order={self.second_order!r}); use second_order="
                    "'empirical_fisher' for them"
                )
            return out

        # jax: each pass is one compiled program for all layers (per batch shape),
        # whose run on the last batch also finishes the pass (eigenbases, means)
        statics = ("xp", "biases")
        accumulate = _xp.maybe_jit(_kfac_accumulate_layers, xp=xp, static_argnames=statics)
        diagonal = _xp.maybe_jit(_ekfac_accumulate_diagonal_layers, xp=xp, static_argnames=statics)
        biases = tuple((layer, bias is not None) for layer, (_, bias) in layers.items())
        sums: dict[str, Any] | None = None
        n = 0
        for batch, last in _with_last(dataset):
            n += len(batch)
            total = float(n) if last else None
            sums = accumulate(dict(layer_factors(batch)), sums, total, xp=xp, biases=biases)
        if n == 0 or sums is None:
            raise ValueError("cannot fit on an empty dataset")
        bases: dict[str, tuple[Array, Array, Array]] = sums
        if self.update_diagonal:
            corrected: dict[str, Array] | None = None
            seen = 0
            for batch, last in _with_last(dataset):
                seen += len(batch)
                factors_now = dict(layer_factors(batch))
                total = float(seen) if last else None
                corrected = diagonal(factors_now, bases, corrected, total, xp=xp, biases=biases)
            if corrected is None or seen != n:
                raise ValueError(
                    f"EkfacInfluence: the data gave {n} samples in the first pass and "
                    f"{seen} in the second; fit needs data that can be iterated twice "
                    "with the same batches (a list, or a re-iterable loader)"
                )
            bases = {k: (q_s, q_a, corrected[k]) for k, (q_s, q_a, _) in bases.items()}
        comps: OrderedDict[str, OperatorGradientComposition] = OrderedDict()
        for layer, names in self.blocks.items():
            block_gp = self._block_provider(names)
            slices = block_gp.parameter_slices
            weight, bias = layers[layer]
            q_s, q_a, eigenvalues = bases[layer]
            op = EkfacOperator(
                q_s,
                q_a,
                _xp.check_finite(eigenvalues, xp=xp, what=f"EK-FAC eigenvalues of {layer!r}"),
                self.regularization[layer],
                weight_slice=slices[weight],
                bias_slice=None if bias is None else slices[bias],
                layout=layouts.get(layer, "oi"),
                block=layer,
            )
            comps[layer] = OperatorGradientComposition(op, block_gp)
        self._mapper = self._compose(comps)
        self._data = dataset
        return self

    def _query_sizes(self, sample: Batch) -> dict[str, int]:
        mapper = self._mapper
        blocks = {} if mapper is None else mapper.composable_block_dict
        return shared_query_sizes(self.gradient_provider, blocks, sample)

    def _compose(self, comps: OrderedDict[str, OperatorGradientComposition]) -> BlockMapper:
        """Every layer block's gradients from one shared pass of the model per batch
        (:class:`~xinfluence.influence._shared.LayerGradients`)."""
        shared = SharedFactors(self.gradient_provider)
        out: OrderedDict[str, OperatorGradientComposition] = OrderedDict()
        for layer, comp in comps.items():
            op = comp.op
            gp = comp.gp.gp if isinstance(comp.gp, LayerGradients) else comp.gp
            if isinstance(op, EkfacOperator):
                gp = LayerGradients(
                    gp,
                    shared,
                    layer,
                    weight_slice=op.weight_slice,
                    bias_slice=op.bias_slice,
                    layout=op.layout,
                )
            out[layer] = OperatorGradientComposition(op, gp)
        return SharedFactorMapper(out, shared)
