"""Property-based tests (hypothesis) of the array-API contract of every influence model.

Random problems: the three analytic GLM providers with random weights, random
feature and output counts, with or without bias, float32 and float64, block
structures ``"full"``, ``"layer"``, ``"parameter"`` and dicts (reordered blocks,
an ``"ignore"`` block), uneven training batches, 1 to ``N + 3`` test points
(``N_test > N`` included), up and perturbation mode. For every model:

1. results in the provider's namespace, device and dtype, of the documented shape;
2. ``influences`` is the sum of ``influences_by_block``, ``influence_factors``
   the concatenation of ``influence_factors_by_block``;
3. ``influences_from_factors(influence_factors(...))`` equals ``influences(...)``;
4. the training side as uneven batches, and queries under a 1-byte memory
   budget (one sample per chunk), equal the one-shot query;
5. a model saved and loaded answers bit for bit as the fitted one (all but
   ``ProjectedInfluence``, which cannot be saved yet).

The oracle is always the same model's unchunked, unblocked query: these are
consistency properties of the machinery (chunking, blocks, factors, files);
the values themselves are checked against closed forms elsewhere. Tolerances:
exact up to rounding (1000 eps) for models applying a fixed operator; for CG
and LiSSA, whose solves depend on which right-hand sides are solved together,
100 times the solver's residual tolerance (the error bound is ``rtol * cond``;
regularization >= 0.3 keeps ``cond`` to at most a few hundred, and the errors
seen in 2,700 random examples stayed below this).

Examples are few and derandomized (the ``xinfluence`` hypothesis profile in
``conftest.py``); ``HYPOTHESIS_PROFILE=explore`` draws many random ones.
Generic: numpy, array-api-strict and torch sessions, not jax (compiles per shape).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import array_api_compat
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import xinfluence as xi  # noqa: E402
from xinfluence._xp import from_numpy, to_numpy  # noqa: E402
from xinfluence.backends.numpy import (  # noqa: E402
    LinearRegressionGradients,
    LogisticRegressionGradients,
    SoftmaxRegressionGradients,
)

GLMS = {
    "linear": LinearRegressionGradients,
    "logistic": LogisticRegressionGradients,
    "softmax": SoftmaxRegressionGradients,
}

# Iterative solvers, tight enough that the comparisons below mean something:
# float64 near its floor, float32 a little above eps * cond.
# LiSSA converges linearly (about cond * log(1 / rtol) iterations): less tight.
SOLVER_RTOL = {
    "cg": {"float64": 1e-12, "float32": 1e-5},
    "lissa": {"float64": 1e-8, "float32": 1e-5},
}


def _cg(gp, dtype, **kw):
    rtol = SOLVER_RTOL["cg"][dtype]
    return xi.CgInfluence(gp, rtol=rtol, maxiter=500, on_failure="raise", **kw)


def _lissa(gp, dtype, **kw):
    rtol = SOLVER_RTOL["lissa"][dtype]
    return xi.LissaInfluence(gp, rtol=rtol, maxiter=5000, on_failure="raise", **kw)


# model name -> (factory(gp, dtype, **common), solves at query time)
MODELS = {
    "direct": (lambda gp, dtype, **kw: xi.DirectInfluence(gp, **kw), False),
    "cg": (_cg, True),
    "lissa": (_lissa, True),
    "arnoldi": (
        lambda gp, dtype, **kw: xi.ArnoldiInfluence(gp, rank=3, on_failure="ignore", **kw),
        False,
    ),
    "nystroem": (lambda gp, dtype, **kw: xi.NystroemSketchInfluence(gp, rank=3, **kw), False),
    "datainf": (lambda gp, dtype, **kw: xi.InverseHarmonicMeanInfluence(gp, **kw), False),
    "identity": (lambda gp, dtype, **kw: xi.IdentityInfluence(gp, **kw), False),
    # dense-layer blocks only: the GLMs are one layer
    "ekfac": (
        lambda gp, dtype, **kw: xi.EkfacInfluence(gp, **{**kw, "block_structure": "layer"}),
        False,
    ),
    "projected": (lambda gp, dtype, **kw: xi.ProjectedInfluence(gp, k=3, **kw), False),
}


@st.composite
def problems(draw):
    """A random GLM problem as host numpy arrays plus its options."""
    kind = draw(st.sampled_from(sorted(GLMS)))
    dtype = draw(st.sampled_from(["float64", "float32"]))
    d = draw(st.integers(1, 4))
    k = {"logistic": 1, "softmax": draw(st.integers(2, 3)), "linear": draw(st.integers(1, 3))}[kind]
    bias = draw(st.booleans())
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    n = sum(sizes)
    n_test = draw(st.integers(1, n + 3))
    names = ["weight", "bias"] if bias else ["weight"]
    structures = ["full", "layer", "parameter", {"all": names}]
    if bias:
        structures += [{"b": ["bias"], "w": ["weight"]}, {"w": ["weight"], "ignore": ["bias"]}]
    structure = draw(st.sampled_from(structures))
    mode = draw(st.sampled_from(["up", "perturbation"]))
    reg = draw(st.sampled_from([0.3, 1.0]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + n_test, d))
    if kind == "linear":
        y = rng.normal(size=(n + n_test, k))
    elif kind == "logistic":
        y = rng.integers(0, 2, size=n + n_test).astype(np.float64)
    else:
        y = rng.integers(0, k, size=n + n_test)
    w = rng.normal(size=(k, d)) / np.sqrt(d)
    b = rng.normal(size=k) if bias else None
    return dict(
        kind=kind,
        dtype=dtype,
        sizes=sizes,
        x=x[:n],
        y=y[:n],
        x_test=x[n:],
        y_test=y[n:],
        w=w,
        b=b,
        structure=structure,
        mode=mode,
        reg=reg,
    )


def _on_backend(p, xp, device):
    dtype = getattr(xp, p["dtype"])

    def arr(a):
        if a.dtype.kind in "iu":
            return from_numpy(a, dtype=xp.int64, device=device, xp=xp)
        return from_numpy(a, dtype=dtype, device=device, xp=xp)

    gp = GLMS[p["kind"]](arr(p["w"]), None if p["b"] is None else arr(p["b"]))
    x, y, xt, yt = (arr(p[key]) for key in ("x", "y", "x_test", "y_test"))
    batches, start = [], 0
    for s in p["sizes"]:
        batches.append(xi.Batch(x[start : start + s, ...], y[start : start + s, ...]))
        start += s
    return gp, dtype, x, y, xt, yt, batches


def _np(a):
    return np.asarray(to_numpy(a), dtype=np.float64)


def _assert_close(actual, expected, rtol, what, scale=None):
    a, e = _np(actual), _np(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    scale = float(np.max(np.abs(e))) if scale is None else scale
    err = float(np.max(np.abs(a - e), initial=0.0))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:.1g} * {scale:.3g}"


def _assert_contract(value, xp, device, dtype, shape, what):
    assert array_api_compat.array_namespace(value) is array_api_compat.array_namespace(
        xp.asarray(0)
    ), f"{what}: namespace {array_api_compat.array_namespace(value)}"
    if device is not None:
        assert array_api_compat.device(value) == device, f"{what}: device"
    assert value.dtype == dtype, f"{what}: dtype {value.dtype} != {dtype}"
    assert tuple(value.shape) == shape, f"{what}: shape {tuple(value.shape)} != {shape}"


@pytest.mark.parametrize("name", list(MODELS))
@given(p=problems())
def test_contract(name, p, xp, device):
    factory, iterative = MODELS[name]
    gp, dtype, x, y, xt, yt, batches = _on_backend(p, xp, device)
    structure = p["structure"]
    if name == "ekfac":
        structure = "layer"
    reg = p["reg"]
    if name == "lissa":  # its iterations grow as (top eigenvalue + reg) / reg
        reg = 4 * reg
    common = dict(regularization=reg, block_structure=structure)
    if name == "nystroem":  # a PSD curvature by construction (the GLM Hessians are, too)
        common["second_order"] = "empirical_fisher"
    model = factory(gp, p["dtype"], **common).fit(batches)
    mode = p["mode"]
    n, n_test = x.shape[0], xt.shape[0]
    trailing = () if mode == "up" else tuple(x.shape[1:])
    eps = float(np.finfo(p["dtype"]).eps)
    # exact up to rounding; iterative solves: see the module docstring
    exact = 1e3 * eps
    solve = 100 * SOLVER_RTOL[name][p["dtype"]] + exact if iterative else exact

    scores = model.influences(xt, yt, x, y, mode=mode)
    _assert_contract(scores, xp, device, dtype, (n_test, n, *trailing), "influences")
    scale = float(np.max(np.abs(_np(scores))))
    if scale == 0.0:  # e.g. all gradients zero: nothing below could fail
        return

    # 2. blocks: the whole is the sum (influences) or concatenation (factors)
    by_block = model.influences_by_block(xt, yt, x, y, mode=mode)
    blocks = [b for b in model.blocks if b != "ignore"]
    assert list(by_block) == blocks
    total = None
    for block, value in by_block.items():
        _assert_contract(value, xp, device, dtype, (n_test, n, *trailing), f"block {block}")
        total = value if total is None else total + value
    _assert_close(scores, total, exact, "sum of influences_by_block", scale=scale)

    factors = model.influence_factors(xt, yt)
    p_blocks = {
        b: sum(int(np.prod(gp.parameter_shapes[m])) for m in names)
        for b, names in model.blocks.items()
        if b != "ignore"
    }
    _assert_contract(factors, xp, device, dtype, (n_test, sum(p_blocks.values())), "factors")
    f_by_block = model.influence_factors_by_block(xt, yt)
    assert list(f_by_block) == blocks
    for block, value in f_by_block.items():
        _assert_contract(value, xp, device, dtype, (n_test, p_blocks[block]), f"factors {block}")
    concat = xp.concat(list(f_by_block.values()), axis=-1)
    _assert_close(factors, concat, 0.0, "concatenated factors_by_block", scale=1.0)

    # 3. from factors
    from_factors = model.influences_from_factors(factors, x, y, mode=mode)
    _assert_contract(
        from_factors, xp, device, dtype, (n_test, n, *trailing), "influences_from_factors"
    )
    _assert_close(from_factors, scores, solve, "influences_from_factors", scale=scale)
    ff_by_block = model.influences_from_factors_by_block(f_by_block, batches, mode=mode)
    for block, value in ff_by_block.items():
        _assert_close(value, by_block[block], solve, f"from factors, block {block}", scale=scale)

    # 4. uneven batches and a tiny memory budget: one sample per chunk
    _assert_close(
        model.influences(xt, yt, batches, mode=mode), scores, solve, "batches", scale=scale
    )
    with xi.memory_budget_scope(1):
        chunked = model.influences(xt, yt, x, y, mode=mode)
        chunked_factors = model.influence_factors(xt, yt)
        chunked_from = model.influences_from_factors(factors, batches, mode=mode)
    _assert_contract(chunked, xp, device, dtype, (n_test, n, *trailing), "chunked influences")
    _assert_close(chunked, scores, solve, "influences under a 1-byte budget", scale=scale)
    _assert_close(
        chunked_factors,
        factors,
        solve,
        "factors under a 1-byte budget",
        scale=float(np.max(np.abs(_np(factors)))),
    )
    _assert_close(
        chunked_from, from_factors, exact, "from factors under a 1-byte budget", scale=scale
    )
    if mode == "up":  # self-influence: x=None means the test points against themselves
        own = model.influences(xt, yt)
        _assert_contract(own, xp, device, dtype, (n_test, n_test), "influences(x_test, y_test)")

    # 5. save and load: bit for bit
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.npz"
        model.save(path)
        loaded = xi.load(path, gp)
    assert type(loaded) is type(model)
    again = loaded.influences(xt, yt, x, y, mode=mode)
    _assert_contract(again, xp, device, dtype, (n_test, n, *trailing), "loaded influences")
    assert np.array_equal(to_numpy(again), to_numpy(scores)), "loaded model: not bit-identical"
    assert np.array_equal(to_numpy(loaded.influence_factors(xt, yt)), to_numpy(factors))
