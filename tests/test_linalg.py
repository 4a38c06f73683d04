"""Contract tests of xinfluence.linalg on matrices with known spectra (every backend, float64).

The truth comes from numpy: matrices are built as ``Q diag(lambda) Q^T`` with a
random orthogonal ``Q``, so eigenvalues, eigenvectors and solutions are known.
"""

from __future__ import annotations

import warnings

import array_api_compat
import numpy as np
import pytest

from xinfluence._xp import namespace_name, to_numpy
from xinfluence.errors import (
    NonFiniteError,
    NotConvergedError,
    NotConvergedWarning,
    NotPositiveDefiniteError,
)
from xinfluence.linalg import (
    EigenResult,
    JacobiPreconditioner,
    NystroemPreconditioner,
    SolverResult,
    block_cg,
    block_lanczos,
    cg,
    hutchinson_diagonal,
    lanczos,
    nystroem,
)

# ---------------------------------------------------------------------------
# helpers


@pytest.fixture(params=["cg", "block_cg"])
def solve(request):
    """Both conjugate-gradient solvers honour the same contract."""
    return {"cg": cg, "block_cg": block_cg}[request.param]


def orthogonal(size: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, size)))
    return q * np.sign(np.diag(r))


def with_spectrum(eigenvalues, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(A, Q)`` with ``A = Q diag(eigenvalues) Q^T`` exactly symmetric."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    q = orthogonal(eigenvalues.shape[0], seed)
    a = (q * eigenvalues) @ q.T
    return (a + a.T) / 2, q


class Counted:
    """``v -> v @ A`` (A symmetric, row convention), counting calls and rows."""

    def __init__(self, a):
        self.a = a
        self.calls = 0
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, v):
        self.calls += 1
        self.shapes.append(tuple(v.shape))
        return v @ self.a


def same_namespace(x, xp) -> bool:
    return namespace_name(array_api_compat.array_namespace(x)) == namespace_name(xp)


def assert_in(x, xp, shape) -> None:
    assert same_namespace(x, xp), type(x)
    assert x.dtype == xp.float64
    assert tuple(x.shape) == shape


def rel_err(x, y) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def reconstruct(result: EigenResult) -> np.ndarray:
    u = to_numpy(result.eigenvectors)
    return (u * to_numpy(result.eigenvalues)) @ u.T


def subspace_distance(u: np.ndarray, v: np.ndarray) -> float:
    """Spectral norm of ``U U^T - V V^T`` (sine of the largest principal angle)."""
    return float(np.linalg.norm(u @ u.T - v @ v.T, 2))


# ---------------------------------------------------------------------------
# cg


@pytest.mark.parametrize("n_rhs", [1, 4, 45])
def test_cg_matches_dense_solve(xp, to_xp, n_rhs, solve):
    size = 30
    a, _ = with_spectrum(np.logspace(0, 2, size), seed=1)
    b = np.random.default_rng(2).standard_normal((n_rhs, size))
    op = Counted(to_xp(a))
    result = solve(op, to_xp(b), rtol=1e-12)

    assert isinstance(result, SolverResult)
    assert_in(result.solution, xp, (n_rhs, size))
    expected = np.linalg.solve(a, b.T).T
    got = to_numpy(result.solution)
    for k in range(n_rhs):
        assert rel_err(got[k], expected[k]) < 1e-9
    assert result.all_converged
    assert (
        isinstance(result.residual_norms, np.ndarray) and result.residual_norms.dtype == np.float64
    )
    assert isinstance(result.converged, np.ndarray) and result.converged.dtype == np.bool_
    assert result.residual_norms.shape == result.converged.shape == (n_rhs,)
    true_residuals = np.linalg.norm(b - got @ a, axis=1)
    np.testing.assert_allclose(
        result.residual_norms, true_residuals, rtol=0, atol=1e-13 * np.abs(b).max()
    )
    assert np.all(result.residual_norms <= 1e-12 * np.linalg.norm(b, axis=1))
    # one batched operator call per iteration, plus the final true residual
    assert 1 <= result.iterations <= 10 * size
    assert op.calls <= result.iterations + 2
    # cg multiplies all rows, block CG its (at most K) search directions
    assert all(shape[1] == size and shape[0] <= n_rhs for shape in op.shapes)
    if solve is cg:
        assert all(shape == (n_rhs, size) for shape in op.shapes)


def test_cg_leaves_its_inputs_alone(xp, to_xp, solve):
    """The solvers update their iterates in place where the array type allows
    (torch): the right-hand sides and the initial guess must not change."""
    size = 20
    a, _ = with_spectrum(np.logspace(0, 1, size), seed=3)
    rng = np.random.default_rng(4)
    b, x0 = to_xp(rng.standard_normal((7, size))), to_xp(rng.standard_normal((7, size)))
    b_before, x0_before = to_numpy(b).copy(), to_numpy(x0).copy()
    solve(lambda v: v @ to_xp(a), b, rtol=1e-10)
    solve(lambda v: v @ to_xp(a), b, rtol=1e-10, x0=x0)
    np.testing.assert_array_equal(to_numpy(b), b_before)
    np.testing.assert_array_equal(to_numpy(x0), x0_before)


def test_block_cg_shares_the_krylov_space(xp, to_xp):
    """With many right-hand sides block CG needs far fewer iterations, and a
    rank-deficient block (parallel and repeated columns, K > P) loses none."""
    size = 60
    a, _ = with_spectrum(np.logspace(-2, 2, size), seed=4)
    rng = np.random.default_rng(5)
    b = rng.standard_normal((80, size))  # K > P
    b[1] = 1e-7 * b[0]  # parallel, much shorter
    b[2] = b[3]  # repeated
    b[4] = 0.0
    exact = np.linalg.solve(a, b.T).T
    blocked = block_cg(lambda v: v @ to_xp(a), to_xp(b), rtol=1e-11)
    single = cg(lambda v: v @ to_xp(a), to_xp(b), rtol=1e-11)
    assert blocked.all_converged and single.all_converged
    got = to_numpy(blocked.solution)
    for k in range(len(b)):
        if k != 4:
            assert rel_err(got[k], exact[k]) < 1e-8, k
    assert np.all(got[4] == 0)
    assert blocked.iterations * 5 <= single.iterations


def test_cg_zero_right_hand_sides(xp, to_xp, solve):
    size = 12
    a, _ = with_spectrum(np.linspace(1, 5, size), seed=3)
    b = np.random.default_rng(4).standard_normal((3, size))
    b[1] = 0.0
    result = solve(lambda v: v @ to_xp(a), to_xp(b), rtol=1e-12)
    got = to_numpy(result.solution)
    assert np.all(np.isfinite(got))
    assert np.all(got[1] == 0.0)
    assert result.all_converged
    assert result.residual_norms[1] == 0.0
    np.testing.assert_allclose(got, np.linalg.solve(a, b.T).T, rtol=1e-9, atol=1e-12)

    zero = solve(lambda v: v @ to_xp(a), to_xp(np.zeros((2, size))))
    assert zero.iterations == 0 and zero.all_converged
    assert_in(zero.solution, xp, (2, size))
    assert np.all(to_numpy(zero.solution) == 0.0)


def test_cg_more_right_hand_sides_than_unknowns_with_atol(xp, to_xp, solve):
    size = 5
    a, _ = with_spectrum([1.0, 2.0, 3.0, 4.0, 5.0], seed=5)
    b = np.random.default_rng(6).standard_normal((17, size)) * np.logspace(-6, 0, 17)[:, None]
    result = solve(lambda v: v @ to_xp(a), to_xp(b), rtol=0.0, atol=1e-10)
    assert result.all_converged
    assert np.all(result.residual_norms <= 1e-10)
    np.testing.assert_allclose(to_numpy(result.solution), np.linalg.solve(a, b.T).T, atol=1e-9)


def test_cg_initial_guess(xp, to_xp, solve):
    size = 20
    a, _ = with_spectrum(np.logspace(0, 1, size), seed=7)
    b = np.random.default_rng(8).standard_normal((2, size))
    exact = np.linalg.solve(a, b.T).T
    result = solve(lambda v: v @ to_xp(a), to_xp(b), rtol=1e-10, x0=to_xp(exact))
    assert result.iterations == 0 and result.all_converged
    near = solve(lambda v: v @ to_xp(a), to_xp(b), rtol=1e-12, x0=to_xp(exact + 1e-3))
    assert near.all_converged
    np.testing.assert_allclose(to_numpy(near.solution), exact, rtol=1e-9, atol=1e-12)


def diagonally_dominant(size: int, seed: int) -> np.ndarray:
    """``S (I + W) S`` with ``S`` = diag(sqrt(d)), ``d`` spread over 4 decades, ``|W|_2 = 0.5``."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((size, size))
    w = g + g.T
    w *= 0.5 / np.linalg.norm(w, 2)
    s = np.sqrt(np.logspace(0, 4, size))
    a = s[:, None] * (np.eye(size) + w) * s[None, :]
    return (a + a.T) / 2


def test_cg_jacobi_preconditioner_reduces_iterations(xp, to_xp, solve):
    size = 60
    a = diagonally_dominant(size, seed=9)
    b = np.random.default_rng(10).standard_normal((3, size))
    op = lambda v: v @ to_xp(a)  # noqa: E731
    plain = solve(op, to_xp(b), rtol=1e-10)
    jacobi = JacobiPreconditioner(to_xp(np.diag(a).copy()))
    preconditioned = solve(op, to_xp(b), rtol=1e-10, preconditioner=jacobi)
    assert plain.all_converged and preconditioned.all_converged
    assert preconditioned.iterations < plain.iterations / 2
    expected = np.linalg.solve(a, b.T).T
    assert rel_err(to_numpy(preconditioned.solution), expected) < 1e-8

    # the regularization is added to the diagonal
    reg = JacobiPreconditioner(to_xp(np.diag(a).copy()), regularization=2.0)
    v = np.ones((2, size))
    np.testing.assert_allclose(to_numpy(reg(to_xp(v))), v / (np.diag(a) + 2.0), rtol=1e-14)
    with pytest.raises(NotPositiveDefiniteError):
        JacobiPreconditioner(to_xp(np.array([1.0, -1.0, 2.0])))


def test_cg_nystroem_preconditioner_reduces_iterations(xp, to_xp, device, solve):
    size, mu = 80, 1e-2
    h, _ = with_spectrum(1e4 * 0.5 ** np.arange(size), seed=11)
    a = h + mu * np.eye(size)
    b = np.random.default_rng(12).standard_normal((4, size))
    op = lambda v: v @ to_xp(a)  # noqa: E731
    plain = solve(op, to_xp(b), rtol=1e-10, on_failure="ignore")
    approx = nystroem(
        lambda v: v @ to_xp(h), size, rank=25, seed=0, xp=xp, dtype=xp.float64, device=device
    )
    preconditioner = NystroemPreconditioner(approx.eigenvalues, approx.eigenvectors, mu)
    preconditioned = solve(op, to_xp(b), rtol=1e-10, preconditioner=preconditioner)
    assert preconditioned.all_converged
    assert preconditioned.iterations < plain.iterations / 2
    assert rel_err(to_numpy(preconditioned.solution), np.linalg.solve(a, b.T).T) < 1e-8


def test_nystroem_preconditioner_formula(xp, to_xp):
    size, rank, mu = 10, 3, 0.5
    u = orthogonal(size, 13)[:, :rank]
    lam = np.array([9.0, 4.0, 2.0])
    pre = NystroemPreconditioner(to_xp(lam), to_xp(u), mu)
    expected = (lam[-1] + mu) * (u / (lam + mu)) @ u.T + np.eye(size) - u @ u.T
    v = np.random.default_rng(14).standard_normal((4, size))
    got = pre(to_xp(v))
    assert_in(got, xp, (4, size))
    np.testing.assert_allclose(to_numpy(got), v @ expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(NotPositiveDefiniteError):
        NystroemPreconditioner(to_xp(np.array([1.0, 0.0])), to_xp(u[:, :2]), 0.0)


def test_hutchinson_diagonal(xp, to_xp, device):
    size = 15
    d = np.linspace(1.0, 3.0, size)
    est = hutchinson_diagonal(
        lambda v: v * to_xp(d), size, num_samples=3, seed=0, xp=xp, dtype=xp.float64, device=device
    )
    assert_in(est, xp, (size,))
    np.testing.assert_allclose(to_numpy(est), d, rtol=1e-14)  # Rademacher: exact on diagonals

    a = diagonally_dominant(size, seed=15)
    op = lambda v: v @ to_xp(a)  # noqa: E731
    kwargs = dict(xp=xp, dtype=xp.float64, device=device)
    for distribution in ("rademacher", "gaussian"):
        est = to_numpy(
            hutchinson_diagonal(op, size, num_samples=4000, distribution=distribution, **kwargs)
        )
        assert rel_err(est, np.diag(a)) < 0.1
    batched = hutchinson_diagonal(op, size, num_samples=10, seed=3, batch_size=3, **kwargs)
    whole = hutchinson_diagonal(op, size, num_samples=10, seed=3, **kwargs)
    np.testing.assert_allclose(to_numpy(batched), to_numpy(whole), rtol=1e-12)


def test_cg_not_converged_warns(xp, to_xp, solve):
    size = 40
    a, _ = with_spectrum(np.logspace(0, 4, size), seed=16)
    b = np.random.default_rng(17).standard_normal((3, size))
    b[2] = 0.0
    with pytest.warns(NotConvergedWarning, match="2 of 3"):
        result = solve(lambda v: v @ to_xp(a), to_xp(b), maxiter=3)
    assert result.iterations == 3
    assert not result.all_converged
    assert list(result.converged) == [False, False, True]
    assert np.all(result.residual_norms[:2] > 0)
    np.testing.assert_allclose(
        result.residual_norms, np.linalg.norm(b - to_numpy(result.solution) @ a, axis=1), rtol=1e-8
    )


def test_cg_not_converged_raise_and_ignore(xp, to_xp, solve):
    size = 40
    a, _ = with_spectrum(np.logspace(0, 4, size), seed=16)
    b = to_xp(np.random.default_rng(17).standard_normal((2, size)))
    with pytest.raises(NotConvergedError):
        solve(lambda v: v @ to_xp(a), b, maxiter=2, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = solve(lambda v: v @ to_xp(a), b, maxiter=2, on_failure="ignore")
    assert not result.all_converged
    with pytest.raises(ValueError, match="on_failure"):
        solve(lambda v: v @ to_xp(a), b, on_failure="loud")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cg_indefinite_raises(xp, to_xp, seed, solve):
    size = 20
    half = size // 2
    a, _ = with_spectrum(
        np.concatenate([-np.logspace(0, 1, half), np.logspace(0, 1, half)]), seed=seed
    )
    b = to_xp(np.random.default_rng(seed + 100).standard_normal((3, size)))
    with pytest.raises(NotPositiveDefiniteError, match="regulari"):
        solve(lambda v: v @ to_xp(a), b)
    with pytest.raises(NotPositiveDefiniteError):
        solve(lambda v: -v, b)


def test_cg_rejects_bad_shapes(xp, to_xp, solve):
    a = to_xp(np.eye(4))
    with pytest.raises(ValueError, match=r"\(K, P\)"):
        solve(lambda v: v @ a, to_xp(np.ones(4)))
    with pytest.raises(ValueError, match=r"\(K, P\)"):
        solve(lambda v: (v @ a)[:, :3], to_xp(np.ones((2, 4))))
    with pytest.raises(ValueError, match="x0"):
        solve(lambda v: v @ a, to_xp(np.ones((2, 4))), x0=to_xp(np.ones((1, 4))))


# ---------------------------------------------------------------------------
# lanczos


@pytest.fixture
def eig_kwargs(xp, device):
    return dict(xp=xp, dtype=xp.float64, device=device)


def test_lanczos_top_eigenpairs(xp, to_xp, eig_kwargs):
    size, rank = 80, 5
    spectrum = 10.0 * 0.7 ** np.arange(size)
    a, q = with_spectrum(spectrum, seed=20)
    op = Counted(to_xp(a))
    result = lanczos(op, size, rank=rank, **eig_kwargs)
    assert isinstance(result, EigenResult) and result.rank == rank
    assert_in(result.eigenvalues, xp, (rank,))
    assert_in(result.eigenvectors, xp, (size, rank))
    assert all(shape == (1, size) for shape in op.shapes)
    assert op.calls == 20  # default krylov_dimension = max(2 * rank + 1, 20)
    np.testing.assert_allclose(
        to_numpy(result.eigenvalues), spectrum[:rank], rtol=0, atol=1e-10 * spectrum[0]
    )
    u = to_numpy(result.eigenvectors)
    np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-12)
    cosines = np.linalg.svd(u.T @ q[:, :rank], compute_uv=False)
    np.testing.assert_allclose(cosines, 1.0, atol=1e-10)
    assert subspace_distance(u, q[:, :rank]) < 1e-6
    residual = np.linalg.norm(a @ u - u * to_numpy(result.eigenvalues), axis=0)
    assert residual.max() < 1e-6
    assert result.residual_norms is not None and result.residual_norms.shape == (rank,)
    np.testing.assert_allclose(result.residual_norms, residual, rtol=1e-3, atol=1e-12)


def test_lanczos_residuals_flag_an_unconverged_krylov_space(xp, to_xp, eig_kwargs):
    size = 60
    a, _ = with_spectrum(np.linspace(1.0, 2.0, size), seed=27)  # no gap: slow convergence
    result = lanczos(lambda v: v @ to_xp(a), size, rank=4, krylov_dimension=9, **eig_kwargs)
    u = to_numpy(result.eigenvectors)
    residual = np.linalg.norm(a @ u - u * to_numpy(result.eigenvalues), axis=0)
    assert residual.max() > 1e-3
    np.testing.assert_allclose(result.residual_norms, residual, rtol=1e-6)


def test_lanczos_full_rank_is_exact(xp, to_xp, eig_kwargs):
    size = 30
    spectrum = np.linspace(1.0, 10.0, size)
    a, _ = with_spectrum(spectrum, seed=21)
    result = lanczos(lambda v: v @ to_xp(a), size, rank=size, **eig_kwargs)
    np.testing.assert_allclose(to_numpy(result.eigenvalues), spectrum[::-1], rtol=1e-10)
    assert rel_err(reconstruct(result), a) < 1e-10
    u = to_numpy(result.eigenvectors)
    np.testing.assert_allclose(u.T @ u, np.eye(size), atol=1e-10)


def test_lanczos_largest_magnitude_with_negative_eigenvalues(xp, to_xp, eig_kwargs):
    size = 40
    rest = np.random.default_rng(22).uniform(-1.0, 1.0, size - 3)
    spectrum = np.concatenate([[8.0, -10.0, -6.0], rest])
    a, q = with_spectrum(spectrum, seed=23)
    result = lanczos(lambda v: v @ to_xp(a), size, rank=3, krylov_dimension=30, **eig_kwargs)
    np.testing.assert_allclose(to_numpy(result.eigenvalues), [-10.0, 8.0, -6.0], atol=1e-9)
    assert subspace_distance(to_numpy(result.eigenvectors), q[:, :3]) < 1e-6


def test_lanczos_repeated_eigenvalues_and_identity(xp, to_xp, eig_kwargs):
    # Few distinct eigenvalues: the Krylov space becomes invariant and Lanczos restarts
    # in its complement, so repeated eigenvalues come with their multiplicity.
    size = 25
    spectrum = np.concatenate([[5.0, 5.0, 5.0, 2.0, 2.0], np.full(size - 5, 0.5)])
    a, q = with_spectrum(spectrum, seed=24)
    result = lanczos(lambda v: v @ to_xp(a), size, rank=3, **eig_kwargs)
    np.testing.assert_allclose(to_numpy(result.eigenvalues), [5.0, 5.0, 5.0], rtol=1e-10)
    assert subspace_distance(to_numpy(result.eigenvectors), q[:, :3]) < 1e-6

    identity = lanczos(lambda v: 2.0 * v, size, rank=4, **eig_kwargs)
    np.testing.assert_allclose(to_numpy(identity.eigenvalues), 2.0, rtol=1e-12)
    u = to_numpy(identity.eigenvectors)
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-12)

    zero = lanczos(lambda v: 0.0 * v, size, rank=2, **eig_kwargs)
    np.testing.assert_array_equal(to_numpy(zero.eigenvalues), 0.0)


def test_lanczos_low_rank_operator(xp, to_xp, eig_kwargs):
    # A Gauss-Newton-like matrix of rank 4 < rank asked: the rest are zeros.
    size = 30
    g = np.random.default_rng(25).standard_normal((4, size))
    a = g.T @ g
    result = lanczos(lambda v: v @ to_xp(a), size, rank=6, **eig_kwargs)
    top = np.sort(np.linalg.eigvalsh(a))[::-1][:6]
    np.testing.assert_allclose(to_numpy(result.eigenvalues), top, atol=1e-10 * top[0])
    assert rel_err(reconstruct(result), a) < 1e-10


def test_lanczos_seeded(xp, to_xp, eig_kwargs):
    size = 40
    a, _ = with_spectrum(np.logspace(-2, 2, size), seed=26)
    op = lambda v: v @ to_xp(a)  # noqa: E731
    first = lanczos(op, size, rank=3, krylov_dimension=8, seed=5, **eig_kwargs)
    again = lanczos(op, size, rank=3, krylov_dimension=8, seed=5, **eig_kwargs)
    other = lanczos(op, size, rank=3, krylov_dimension=8, seed=6, **eig_kwargs)
    np.testing.assert_array_equal(to_numpy(first.eigenvalues), to_numpy(again.eigenvalues))
    np.testing.assert_array_equal(to_numpy(first.eigenvectors), to_numpy(again.eigenvectors))
    assert not np.array_equal(to_numpy(first.eigenvalues), to_numpy(other.eigenvalues))


def test_lanczos_rejects_bad_arguments(xp, eig_kwargs):
    op = lambda v: v  # noqa: E731
    with pytest.raises(ValueError, match="rank"):
        lanczos(op, 5, rank=6, **eig_kwargs)
    with pytest.raises(ValueError, match="krylov_dimension"):
        lanczos(op, 10, rank=4, krylov_dimension=3, **eig_kwargs)
    with pytest.raises(ValueError, match="rank"):
        lanczos(op, 10, rank=0, **eig_kwargs)


# ---------------------------------------------------------------------------
# nystroem


@pytest.mark.parametrize("singular", [False, True])
def test_nystroem_full_rank_reproduces(xp, to_xp, singular, eig_kwargs):
    size = 30
    spectrum = np.logspace(-3, 3, size)
    if singular:
        spectrum[:10] = 0.0
    a, _ = with_spectrum(spectrum, seed=30)
    op = Counted(to_xp(a))
    result = nystroem(op, size, rank=size, seed=1, **eig_kwargs)
    assert op.calls == 1 and op.shapes == [(size, size)]
    assert_in(result.eigenvalues, xp, (size,))
    assert_in(result.eigenvectors, xp, (size, size))
    assert rel_err(reconstruct(result), a) < 1e-8
    eigenvalues = to_numpy(result.eigenvalues)
    assert np.all(eigenvalues >= 0) and np.all(np.diff(eigenvalues) <= 0)
    np.testing.assert_allclose(
        eigenvalues, np.sort(spectrum)[::-1], rtol=1e-6, atol=1e-8 * spectrum.max()
    )


def test_nystroem_error_within_theory(xp, to_xp, eig_kwargs):
    # E |A - A_nys|_* <= (1 + k / (r - k - 1)) |A - [A]_k|_* for k <= r - 2
    # (Tropp, Yurtsever, Udell, Cevher 2017); factor 2 slack for a single draw.
    size, rank = 100, 12
    spectrum = 0.6 ** np.arange(size)
    a, _ = with_spectrum(spectrum, seed=31)
    for seed in range(3):
        result = nystroem(lambda v: v @ to_xp(a), size, rank=rank, seed=seed, **eig_kwargs)
        error = np.abs(np.linalg.eigvalsh(a - reconstruct(result))).sum()
        bound = min((1 + k / (rank - k - 1)) * spectrum[k:].sum() for k in range(1, rank - 1))
        assert error <= 2 * bound
        assert error >= spectrum[rank:].sum() * (1 - 1e-8)  # no better than the best rank-r
        u = to_numpy(result.eigenvectors)
        np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-12)
        eigenvalues = to_numpy(result.eigenvalues)
        assert np.all(eigenvalues >= 0) and np.all(np.diff(eigenvalues) <= 0)
        assert np.all(eigenvalues <= spectrum[:rank] * (1 + 1e-12))  # Nyström never overshoots


def test_nystroem_seeded(xp, to_xp, eig_kwargs):
    size = 20
    a, _ = with_spectrum(np.logspace(-2, 2, size), seed=32)
    op = lambda v: v @ to_xp(a)  # noqa: E731
    first = nystroem(op, size, rank=4, seed=7, **eig_kwargs)
    again = nystroem(op, size, rank=4, seed=7, **eig_kwargs)
    other = nystroem(op, size, rank=4, seed=8, **eig_kwargs)
    np.testing.assert_array_equal(to_numpy(first.eigenvalues), to_numpy(again.eigenvalues))
    np.testing.assert_array_equal(to_numpy(first.eigenvectors), to_numpy(again.eigenvectors))
    assert not np.array_equal(to_numpy(first.eigenvalues), to_numpy(other.eigenvalues))


def test_nystroem_rejects_indefinite_and_bad_rank(xp, to_xp, eig_kwargs):
    with pytest.raises(NotPositiveDefiniteError):
        nystroem(lambda v: -v, 6, rank=3, **eig_kwargs)
    with pytest.raises(ValueError, match="rank"):
        nystroem(lambda v: v, 6, rank=7, **eig_kwargs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: invalid value in matmul
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("solver", ["nystroem", "lanczos"])
def test_eigensolvers_reject_non_finite_products(xp, to_xp, eig_kwargs, solver, bad):
    """The low-rank models pass their curvature products unchecked (the solvers
    check what they compute from them): a NaN or inf entry must be an error."""
    size = 12
    a, _ = with_spectrum(np.logspace(-1, 1, size), seed=5)
    a[3, 4] = a[4, 3] = bad
    op = lambda v: v @ to_xp(a)  # noqa: E731
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        if solver == "nystroem":
            nystroem(op, size, rank=4, **eig_kwargs)
        else:
            block_lanczos(op, size, rank=4, **eig_kwargs)
