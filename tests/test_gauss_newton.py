"""The generalized Gauss-Newton curvature ``G = mean_i J_i^T H_i J_i`` (second_order
"gauss_newton") against oracles built here.

* Generalized linear models (every backend): ``G`` equals the Hessian (canonical
  links). The providers build ``G`` from explicit Jacobians and dense output
  Hessians, the Hessian from products with the loss curvature: two
  constructions that must agree to rounding.
* Networks (torch and jax backends): ``G`` equals a dense ``J^T H J`` formed here
  from the Jacobian of the whole output (``torch.autograd.functional.jacobian``,
  ``jax.jacrev``) and per-sample loss Hessians on the output (autodiff), with
  uneven batches; it is positive semi-definite where the Hessian is not.
* The solvers (Direct, CG, Arnoldi, Nyström, LiSSA) against dense solves on that
  oracle; EK-FAC's Gauss-Newton factors and corrected eigenvalues against their
  definitions.
"""

from __future__ import annotations

import numpy as np
import pytest

import xinfluence as xi
from helpers import kronecker_basis, rel_err, split
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import (
    FiniteDifferenceGradients,
    LinearRegressionGradients,
    LogisticRegressionGradients,
    SoftmaxRegressionGradients,
)
from xinfluence.curvature import Dataset, make_curvature
from xinfluence.types import iter_batches

N, N_TEST, D_IN, HIDDEN, N_OUT = 37, 6, 4, 5, 3
SIZES = [13, 17, 7]  # uneven batches


def _curv(second_order, gp, batches):
    return make_curvature(second_order, gp, Dataset(iter_batches(batches), gp))


# -- generalized linear models: G equals the Hessian ---------------------------
def _glm(kind, to_xp):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(N, D_IN))
    if kind == "linear":
        w, b = rng.normal(size=(2, D_IN)), rng.normal(size=2)
        y = rng.normal(size=(N, 2))
        gp = LinearRegressionGradients(to_xp(w), to_xp(b))
    elif kind == "logistic":
        w, b = rng.normal(size=(1, D_IN)), rng.normal(size=1)
        y = (rng.random(N) > 0.5).astype(np.float64)
        gp = LogisticRegressionGradients(to_xp(w), to_xp(b))
    else:
        w, b = rng.normal(size=(N_OUT, D_IN)), rng.normal(size=N_OUT)
        y = rng.integers(0, N_OUT, size=N)
        gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    batches = [(to_xp(x[s]), to_xp(y[s])) for s in split(N, SIZES)]
    return gp, batches, x, y, w, b


@pytest.mark.parametrize("kind", ["linear", "logistic", "softmax"])
def test_glm_gauss_newton_equals_hessian(kind, xp, to_xp):
    gp, batches, *_ = _glm(kind, to_xp)
    gn, hess = _curv("gauss_newton", gp, batches), _curv("hessian", gp, batches)
    dense_h = hess.dense()
    assert rel_err(gn.dense(), dense_h) <= 1e-12
    v = to_xp(np.random.default_rng(0).normal(size=(5, gp.n_parameters)))
    assert rel_err(gn.matmat(v), hess.matmat(v)) <= 1e-12
    assert rel_err(gn.diagonal(), hess.diagonal()) <= 1e-12
    # not vacuous: the empirical Fisher is another matrix
    assert rel_err(_curv("empirical_fisher", gp, batches).dense(), dense_h) >= 1e-2


def test_glm_influences_gauss_newton_equal_hessian(xp, to_xp):
    gp, batches, x, y, *_ = _glm("softmax", to_xp)
    xt, yt = to_xp(x[:N_TEST]), to_xp(y[:N_TEST])
    kw = dict(regularization=1e-3, block_structure="parameter")
    got = xi.DirectInfluence(gp, second_order="gauss_newton", **kw).fit(batches)
    ref = xi.DirectInfluence(gp, second_order="hessian", **kw).fit(batches)
    assert (
        rel_err(
            got.influences(xt, yt, to_xp(x), to_xp(y)), ref.influences(xt, yt, to_xp(x), to_xp(y))
        )
        <= 1e-10
    )


def _softmax_ggn_oracle(x, y, w, b):
    """``mean_i kron(H_i, x̃_i x̃_i^T)`` in the flat order ``[W (O, I) row-major, b]``,
    with ``H_i = diag(p_i) - p_i p_i^T`` written out here."""
    xt = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    z = x @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    h = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
    o, i1 = w.shape[0], xt.shape[1]
    g = np.einsum("nab,npq->apbq", h, xt[:, :, None] * xt[:, None, :]) / len(x)
    g = g.reshape(o * i1, o * i1)  # index o * (I + 1) + i'
    perm = [oo * i1 + ii for oo in range(o) for ii in range(i1 - 1)] + [
        oo * i1 + i1 - 1 for oo in range(o)
    ]
    return g[np.ix_(perm, perm)], h, xt


def _check_ekfac_layer(op, g_block, a_cov=None, s_cov=None):
    """Corrected eigenvalues = diag(B^T G B) and the factors' eigenbases."""
    basis = kronecker_basis(op)
    expected = np.diag(basis.T @ g_block @ basis)
    got = to_numpy(op.eigenvalues).ravel()
    assert np.max(np.abs(got - expected)) <= 1e-12 * np.max(np.abs(expected))
    for q, cov in ((op.q_a, a_cov), (op.q_s, s_cov)):
        if cov is None:
            continue
        q = to_numpy(q)
        rot = q.T @ cov @ q
        off = rot - np.diag(np.diag(rot))
        assert np.max(np.abs(off)) <= 1e-12 * np.max(np.abs(cov))


def test_ekfac_gauss_newton_on_softmax_regression(xp, to_xp):
    """Single-layer softmax regression: the layer's GGN is mean_i (x̃ x̃^T) ⊗ H_i;
    EK-FAC's factors are mean x̃ x̃^T and mean H_i, its corrected eigenvalues the
    diagonal of that GGN in their Kronecker eigenbasis."""
    gp, batches, x, y, w, b = _glm("softmax", to_xp)
    model = xi.EkfacInfluence(gp, regularization=1e-3).fit(batches)
    assert model.second_order == "gauss_newton"  # the default
    g, h, xt = _softmax_ggn_oracle(x, y, w, b)
    # the oracle is the Hessian here (cross-check of the oracle itself)
    assert rel_err(g, _curv("hessian", gp, batches).dense()) <= 1e-12
    (op,) = [c.op for c in model._mapper.composable_block_dict.values()]
    _check_ekfac_layer(op, g, a_cov=xt.T @ xt / N, s_cov=h.mean(0))


def test_ekfac_gauss_newton_differs_from_empirical_fisher(xp, to_xp):
    gp, batches, x, y, *_ = _glm("softmax", to_xp)
    xt, yt = to_xp(x[:N_TEST]), to_xp(y[:N_TEST])
    scores = [
        to_numpy(
            xi.EkfacInfluence(gp, regularization=1e-3, second_order=so)
            .fit(batches)
            .influences(xt, yt, to_xp(x), to_xp(y))
        )
        for so in ("gauss_newton", "empirical_fisher")
    ]
    assert rel_err(scores[0], scores[1]) >= 1e-2


def test_providers_without_model_output_refuse_gauss_newton(xp, to_xp):
    def loss_fn(params, x, y):
        return (x @ params["w"] - y) ** 2

    gp = FiniteDifferenceGradients(loss_fn, {"w": to_xp(np.ones(3))})
    with pytest.raises(NotImplementedError, match="no model output"):
        xi.CgInfluence(gp, second_order="gauss_newton")
    with pytest.raises(NotImplementedError, match="no model output"):
        gp.ggn_matmat(None, to_xp(np.ones((1, 3))))
    with pytest.raises(ValueError, match="empirical_fisher"):
        xi.InverseHarmonicMeanInfluence(gp, regularization=0.1, second_order="gauss_newton")
    # the gradient-similarity baseline has no curvature: second_order is ignored
    xi.IdentityInfluence(gp, second_order="gauss_newton")


class _KfacOnly(SoftmaxRegressionGradients):
    """A Kronecker-factor provider that has kfac_factors but no kfac_ggn_factors."""

    kfac_ggn_factors = None


def test_ekfac_gauss_newton_needs_ggn_factors(xp, to_xp):
    rng = np.random.default_rng(0)
    gp = _KfacOnly(to_xp(rng.normal(size=(3, 2))), to_xp(np.zeros(3)))
    with pytest.raises(TypeError, match="kfac_ggn_factors"):
        xi.EkfacInfluence(gp)
    xi.EkfacInfluence(gp, second_order="empirical_fisher")


# -- networks: torch and jax ------------------------------------------------------
def _data():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(N + N_TEST, D_IN))
    y = rng.integers(0, N_OUT, size=N + N_TEST)
    return x, y


def _torch_case(loss_name):
    torch = pytest.importorskip("torch")
    from xinfluence.backends.torch import TorchGradientProvider

    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, N_OUT)
    ).double()
    x, y = _data()
    xt = torch.from_numpy(x)
    if loss_name == "ce":
        loss, yt = torch.nn.functional.cross_entropy, torch.from_numpy(y)
    else:
        loss = torch.nn.functional.mse_loss
        yt = torch.from_numpy(np.random.default_rng(4).normal(size=(len(x), N_OUT)))
    params = dict(model.named_parameters())

    def output_of(theta):
        d, i = {}, 0
        for name, p in params.items():
            d[name] = theta[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return torch.func.functional_call(model, d, (xt[:N],))

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    jac = torch.autograd.functional.jacobian(output_of, flat).numpy()  # (N, O, P)
    out = output_of(flat).detach()
    h = np.stack(
        [
            torch.autograd.functional.hessian(
                lambda o, t=yt[i : i + 1]: loss(o[None], t), out[i]
            ).numpy()
            for i in range(N)
        ]
    )

    def make(**kw):
        return TorchGradientProvider(model, loss, **kw)

    batches = [(xt[s], yt[s]) for s in split(N, SIZES)]
    return make, batches, (xt, yt), jac, h, ("0", "2"), model


def _jax_case(loss_name):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from xinfluence.backends.jax import JaxGradientProvider

    rng = np.random.default_rng(3)
    # flax-style kernel (I, O) with a bias, torch-style weight (O, I) without
    params = {
        "dense1": {
            "kernel": jnp.asarray(rng.normal(size=(D_IN, HIDDEN))),
            "bias": jnp.asarray(0.3 * rng.normal(size=HIDDEN)),
        },
        "out": {"weight": jnp.asarray(rng.normal(size=(N_OUT, HIDDEN)))},
    }

    def hidden(p, xb):
        return jnp.tanh(xb @ p["dense1"]["kernel"] + p["dense1"]["bias"])

    def apply(p, xb):
        return hidden(p, xb) @ p["out"]["weight"].T

    if loss_name == "ce":

        def loss(o, t):
            picked = jnp.take_along_axis(o, t[:, None], axis=1)[:, 0]
            return jnp.mean(jax.nn.logsumexp(o, axis=1) - picked)

        x, y = _data()
        yj = jnp.asarray(y)
    else:

        def loss(o, t):
            return jnp.mean((o - t) ** 2)

        x, _ = _data()
        yj = jnp.asarray(np.random.default_rng(4).normal(size=(len(x), N_OUT)))
    xj = jnp.asarray(x)
    flat, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jacrev(lambda t: apply(unravel(t), xj[:N]))(flat))
    out = apply(params, xj[:N])
    h = np.stack(
        [
            np.asarray(jax.hessian(lambda o, t=yj[i : i + 1]: loss(o[None], t))(out[i]))
            for i in range(N)
        ]
    )

    def make(**kw):
        gp = JaxGradientProvider(
            apply, params, loss, dense_layers={"dense1": lambda p, xb: xb, "out": hidden}, **kw
        )
        assert np.array_equal(np.asarray(gp.flat_params), np.asarray(flat))  # same flat order
        return gp

    batches = [(xj[s], yj[s]) for s in split(N, SIZES)]
    return make, batches, (xj, yj), jac, h, ("dense1", "out"), params


def _net(loss_name, backend_name):
    if backend_name == "torch":
        return _torch_case(loss_name)
    if backend_name == "jax":
        return _jax_case(loss_name)
    pytest.skip("networks run on the torch and jax backends")


@pytest.fixture(params=["ce", "mse"])
def net(request, backend_name):
    return _net(request.param, backend_name)


@pytest.fixture
def net_ce(backend_name):
    """Cross-entropy only (the solvers: jax compiles each product shape anew)."""
    return _net("ce", backend_name)


def _oracle(jac, h):
    return np.einsum("nap,nab,nbq->pq", jac, h, jac) / jac.shape[0]


@pytest.mark.parametrize("forward_ad", [True, False])
def test_network_gauss_newton_equals_autodiff_oracle(net, backend_name, forward_ad, monkeypatch):
    make, batches, _, jac, h, *_ = net
    if backend_name == "jax" and not forward_ad:
        pytest.skip("forward_ad is a torch provider option")
    if backend_name == "jax":  # large products' chunks of tangents, on this small problem
        from xinfluence.backends.jax import model as jax_model

        monkeypatch.setattr(jax_model, "_CPU_CHUNK_MIN_WORK", 0)
    gp = make(forward_ad=False) if not forward_ad else make()
    g = _oracle(jac, h)
    curv = _curv("gauss_newton", gp, batches)
    assert rel_err(curv.dense(), g) <= 1e-12
    v = np.random.default_rng(1).normal(size=(6, gp.n_parameters))
    vx = curv.xp.asarray(v)
    assert rel_err(curv.matmat(vx), v @ g) <= 1e-12
    assert rel_err(curv.matmat(vx[:1, :]), v[:1] @ g) <= 1e-12
    # more rows than jax pushes at once on a CPU (chunks of 8, padded 21 -> 24)
    v = np.random.default_rng(2).normal(size=(21, gp.n_parameters))
    assert rel_err(curv.matmat(curv.xp.asarray(v)), v @ g) <= 1e-12
    assert rel_err(curv.diagonal(), np.diag(g)) <= 1e-12


def test_network_gauss_newton_blocks_are_diagonal_blocks(net):
    make, batches, _, jac, h, *_ = net
    gp = make()
    g = _oracle(jac, h)
    slices = gp.parameter_slices
    for names in gp.layer_groups().values():
        sub = gp.restrict(names)
        idx = np.concatenate([np.arange(slices[n].start, slices[n].stop) for n in names])
        assert rel_err(_curv("gauss_newton", sub, batches).dense(), g[np.ix_(idx, idx)]) <= 1e-12


def test_network_gauss_newton_is_psd_where_hessian_is_not(net):
    make, batches, *_ = net
    gp = make()
    hess = np.linalg.eigvalsh(to_numpy(_curv("hessian", gp, batches).dense()))
    assert hess[0] < -1e-3 * hess[-1], "the Hessian must be indefinite for this check"
    ggn = np.linalg.eigvalsh(to_numpy(_curv("gauss_newton", gp, batches).dense()))
    assert ggn[0] >= -1e-12 * ggn[-1]


REG = 1e-2


def _exact_scores(gp, jac, h, test, train, reg, rank=None):
    """``g_t^T (G + reg I)^-1 g_j`` by a dense solve on the oracle (or through its
    top-``rank`` eigenpairs)."""
    g = _oracle(jac, h)
    gt = to_numpy(gp.flat_grads(gp.prepare_batch(xi.Batch(*test))))
    gj = to_numpy(gp.flat_grads(gp.prepare_batch(xi.Batch(*train))))
    if rank is None:
        return gt @ np.linalg.solve(g + reg * np.eye(len(g)), gj.T)
    lam, vec = np.linalg.eigh(g)
    top = np.argsort(-np.abs(lam))[:rank]
    lam, vec = lam[top], vec[:, top]
    return (gt @ vec) / (lam + reg) @ (vec.T @ gj.T)


def test_solvers_with_gauss_newton_match_dense_solve(net_ce):
    make, batches, (x, y), jac, h, *_ = net_ce
    gp = make()
    test, train = (x[N:], y[N:]), (x[:N], y[:N])
    exact = _exact_scores(gp, jac, h, test, train, REG)

    def scores(cls, **kw):
        model = cls(gp, regularization=REG, second_order="gauss_newton", **kw).fit(batches)
        return model.influences(*test, *train)

    assert rel_err(scores(xi.DirectInfluence), exact) <= 1e-10
    assert rel_err(scores(xi.CgInfluence, rtol=1e-12, preconditioner="jacobi"), exact) <= 1e-8
    # Nyström at full rank sketches G exactly
    assert rel_err(scores(xi.NystroemSketchInfluence, rank=gp.n_parameters), exact) <= 1e-8
    # LiSSA at a damping where it contracts fast (about 0.8 per iteration)
    lissa = xi.LissaInfluence(
        gp, regularization=0.3, second_order="gauss_newton", maxiter=300, rtol=1e-10
    ).fit(batches)
    lissa_exact = _exact_scores(gp, jac, h, test, train, 0.3)
    assert rel_err(lissa.influences(*test, *train), lissa_exact) <= 1e-6
    rank = 8
    truncated = _exact_scores(gp, jac, h, test, train, REG, rank=rank)
    arnoldi = scores(xi.ArnoldiInfluence, rank=rank, krylov_dimension=gp.n_parameters)
    assert rel_err(arnoldi, truncated) <= 1e-8


def test_ekfac_gauss_newton_network_layers(net):
    """Per layer: the corrected eigenvalues are the diagonal of the layer's exact
    GGN block (the oracle) in the Kronecker eigenbasis, and the output layer's
    gradient factor is diagonalised by mean_i H_i."""
    make, batches, _, jac, h, layers, _ = net
    gp = make()
    g = _oracle(jac, h)
    model = xi.EkfacInfluence(gp, regularization=1e-3).fit(batches)
    slices = gp.parameter_slices
    comps = model._mapper.composable_block_dict
    assert list(comps) == list(layers)
    for layer, comp in comps.items():
        names = comp.gp.parameter_names
        idx = np.concatenate([np.arange(slices[n].start, slices[n].stop) for n in names])
        s_cov = h.mean(0) if layer == layers[-1] else None
        _check_ekfac_layer(comp.op, g[np.ix_(idx, idx)], s_cov=s_cov)


def test_torch_ekfac_gauss_newton_refuses_nonconvex_output_loss(backend_name):
    if backend_name != "torch":
        pytest.skip("torch provider")
    import torch

    from xinfluence.backends.torch import TorchGradientProvider

    model = torch.nn.Linear(3, 2).double()
    gp = TorchGradientProvider(model, lambda o, t: -torch.nn.functional.mse_loss(o, t))
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="not convex in the output"):
        xi.EkfacInfluence(gp, regularization=1e-3).fit((x, y))
