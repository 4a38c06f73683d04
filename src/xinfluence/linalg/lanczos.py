"""Lanczos with full re-orthogonalisation for a few extreme eigenpairs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import array_api_extra as xpx
import numpy as np

from .. import _xp
from .._xp import Array, Namespace
from ._results import EigenResult
from ._util import (
    MatMat,
    apply_operator,
    check_positive_int,
    resolve_namespace,
    round_up_2,
    row_norms,
)

__all__ = ["block_lanczos", "lanczos", "positive_definite_shift"]


def lanczos(
    matmat: MatMat,
    size: int,
    /,
    *,
    rank: int,
    krylov_dimension: int | None = None,
    tol: float = 1e-10,
    seed: int | np.random.Generator | None = 0,
    xp: Namespace,
    dtype: Any,
    device: Any = None,
) -> EigenResult:
    r"""The ``rank`` eigenpairs of largest magnitude of a symmetric operator.

    Builds an orthonormal basis ``Q`` (m, P) of the Krylov space
    ``span{q_0, A q_0, ..., A^{m-1} q_0}`` (``q_0`` Gaussian, seeded) with the
    three-term Lanczos recurrence

    .. math::
        \beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1},
        \qquad \alpha_j = q_j^T A q_j,

    re-orthogonalising every new vector against all previous ones twice
    ("twice is enough"), so that ``Q A Q^T = T`` is tridiagonal to working
    precision. The eigenpairs ``T s_i = \theta_i s_i`` of the small ``T``
    (computed on the host in float64) give the Ritz pairs ``(\theta_i, Q^T s_i)``.

    If the Krylov space becomes invariant (``beta_j <= tol * |A|_est``), the
    recurrence is restarted with a fresh random vector orthogonal to ``Q``
    (``T`` gets a zero off-diagonal entry), so that repeated eigenvalues are
    found with their multiplicity (zero eigenvalues of a low-rank ``A``
    included); the iteration stops at ``krylov_dimension`` vectors. With
    ``krylov_dimension == size`` the result is the full eigendecomposition of
    ``A``. Like every single-vector Krylov method, it sees only one copy of a
    repeated eigenvalue as long as the Krylov space is not invariant.

    Args:
        matmat: ``(K, P) -> (K, P)``, the rows of its input multiplied by the
            symmetric ``A`` (called here with ``K = 1``).
        size: ``P``, the dimension of ``A``.
        rank: number of eigenpairs to return, ``1 <= rank <= size``.
        krylov_dimension: ``m``, number of Lanczos vectors, ``rank <= m``;
            default ``min(size, max(2 * rank + 1, 20))``; values above ``size``
            are clipped to ``size``.
        tol: relative threshold on ``beta_j`` for an invariant subspace.
        seed: seed (or numpy ``Generator``) for the starting vector.
        xp, dtype, device: namespace, real floating dtype and device of the
            result and of the vectors passed to ``matmat``.

    Returns:
        :class:`EigenResult`: ``eigenvalues`` (rank,) sorted by descending
        magnitude, ``eigenvectors`` (P, rank) with orthonormal columns, and
        ``residual_norms`` (rank,), the Ritz residuals ``|A u_i - theta_i u_i|``
        (free by-products of the recurrence) to judge whether
        ``krylov_dimension`` was large enough.
    """
    size = check_positive_int(size, "size")
    rank = check_positive_int(rank, "rank")
    xp = resolve_namespace(xp, dtype, device)
    if rank > size:
        raise ValueError(f"rank must be <= size, got rank={rank} > size={size}")
    if krylov_dimension is None:
        krylov_dimension = max(2 * rank + 1, 20)
    krylov_dimension = min(check_positive_int(krylov_dimension, "krylov_dimension"), size)
    if krylov_dimension < rank:
        raise ValueError(
            f"krylov_dimension must be >= rank, got krylov_dimension={krylov_dimension} "
            f"< rank={rank}"
        )
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    # An (m, P) basis filled row by row (in place where the namespace allows).
    # Jit-compiling namespaces (jax) project against all m rows, the unfilled ones
    # zero, so that shapes stay constant and each iteration runs the same two
    # compiled programs around the product; the others only against the j + 1
    # filled rows.
    m = krylov_dimension
    fixed_shapes = _xp.compiles_per_shape(xp)
    start = _xp.maybe_jit(_lanczos_start, xp=xp, static_argnames=("xp", "m"))
    store = _xp.maybe_jit(_lanczos_store, xp=xp)
    step = _xp.maybe_jit(_lanczos_step, xp=xp)
    unit = _xp.maybe_jit(_unit, xp=xp)

    def draw() -> Array:
        return _xp.random_normal((size,), seed=rng, dtype=dtype, device=device, xp=xp)

    basis, q, q_prev = start(draw(), xp=xp, m=m)
    beta_prev = 0.0
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for j in range(m):
        basis, q_row = store(basis, q, j, xp=xp)
        rows = basis if fixed_shapes else basis[: j + 1, :]
        w = apply_operator(matmat, q_row, xp=xp)
        q_next, stats = step(w, q, q_prev, beta_prev, rows, j, xp=xp)
        alpha_f, beta_f, a_q_norm_f = (float(h) for h in _xp.to_numpy(stats))
        alphas.append(alpha_f)
        scale = max(scale, a_q_norm_f)
        if j == m - 1:
            break
        q_prev = q
        if beta_f <= tol * scale:
            # Invariant subspace: continue in its orthogonal complement.
            beta_prev = 0.0
            q = unit(draw(), basis, xp=xp)
        else:
            beta_prev = beta_f
            q = q_next
        betas.append(beta_prev)

    t = np.diag(np.asarray(alphas, dtype=np.float64))
    if betas:
        off = np.asarray(betas, dtype=np.float64)
        t = t + np.diag(off, 1) + np.diag(off, -1)
    theta, s = np.linalg.eigh(t)
    order = np.argsort(-np.abs(theta), kind="stable")[:rank]
    s_top = _xp.from_numpy(np.ascontiguousarray(s[:, order]), dtype=dtype, device=device, xp=xp)
    eigenvectors = _xp.maybe_jit(_combine_rows, xp=xp)(basis, s_top, xp=xp)
    eigenvalues = _xp.from_numpy(theta[order], dtype=dtype, device=device, xp=xp)
    # Ritz residuals |A Q^T s_i - theta_i Q^T s_i| = beta_m |s_{m-1, i}| (beta_m: last |w|).
    residual_norms = beta_f * np.abs(s[-1, order])
    return EigenResult(
        eigenvalues=eigenvalues, eigenvectors=eigenvectors, residual_norms=residual_norms
    )


def _shared_value(theta: np.ndarray, order: np.ndarray, b: int, width: float) -> float | None:
    """A value ``theta[i]``, ``i`` in ``order``, that at least ``b >= 2`` entries of
    ``theta`` share to within ``width``, else None."""
    if b < 2:
        return None
    for i in order:
        if np.count_nonzero(np.abs(theta - theta[i]) <= width) >= b:
            return float(theta[i])
    return None


def _unit(v: Array, basis: Array, /, *, xp: Namespace) -> Array:
    """``v`` (P,) orthogonalised against the rows of ``basis`` (orthonormal or zero)
    and normalised."""
    v, _ = _orthogonalize(v, basis, xp=xp)
    return v / xp.linalg.vector_norm(v)


def _lanczos_start(v: Array, /, *, xp: Namespace, m: int) -> tuple[Array, Array, Array]:
    """``(basis, q, q_prev)``: a zero ``(m, P)`` basis, ``v`` normalised, zeros."""
    basis = xp.zeros((m, int(v.shape[0])), dtype=v.dtype, device=_xp.device_of(v))
    return basis, _unit(v, basis, xp=xp), xp.zeros_like(v)


def _lanczos_store(basis: Array, q: Array, j: int, /, *, xp: Namespace) -> tuple[Array, Array]:
    """``basis`` with row ``j`` set to ``q`` (P,), and ``q`` as a row ``(1, P)``."""
    return xpx.at(basis)[j, :].set(q), q[None, :]


def _lanczos_step(
    w: Array, q: Array, q_prev: Array, beta_prev: float, rows: Array, j: int, /, *, xp: Namespace
) -> tuple[Array, Array]:
    """One Lanczos step from ``w = A q`` (1, P): ``(w / |w|, [alpha, |w|, |A q|])``,
    ``w`` made orthogonal to ``q``, ``q_prev`` and (twice, in full) the ``rows``."""
    w = w[0, :]
    a_q_norm = xp.linalg.vector_norm(w)
    alpha = xp.linalg.vecdot(q, w)
    w = w - alpha * q - beta_prev * q_prev
    w, removed = _orthogonalize(w, rows, xp=xp)
    alpha = alpha + removed[j]
    beta = xp.linalg.vector_norm(w)
    q_next = w / xp.where(beta > 0, beta, xp.ones_like(beta))
    return q_next, xp.stack([alpha, beta, a_q_norm])


def _project_once(
    w: Array, basis: Array, previous: Array | None, /, *, xp: Namespace
) -> tuple[Array, Array, Array]:
    """One pass of :func:`block_lanczos`'s projection: ``(w - c basis, c (+ previous),
    [max |c|, min_k |w_k - c_k basis| / |w_k|])``, ``c = w basis^T``."""
    before = row_norms(w, xp=xp)
    c = w @ xp.matrix_transpose(basis)
    w_new = w - c @ basis
    ratio = xp.min(row_norms(w_new, xp=xp) / xp.where(before > 0, before, xp.ones_like(before)))
    stats = xp.stack([xp.max(xp.abs(c)), ratio])
    return w_new, c if previous is None else c + previous, stats


def _block_recurrence(
    w: Array,
    block: Array,
    coupling: Array | None,
    previous: Array,
    store: Array,
    offset: int,
    /,
    *,
    xp: Namespace,
) -> tuple[Array, Array, Array]:
    """``(w - A_j Q_j - B_j Q_{j-1}, A_j, store)`` with ``A_j = w Q_j^T`` (rows),
    ``store`` the basis with ``Q_j`` (``block``) in its rows from ``offset``."""
    c_loc = w @ xp.matrix_transpose(block)
    w = w - c_loc @ block
    if coupling is not None:
        w = w - coupling @ previous
    return w, c_loc, _xp.set_rows(store, offset, block, xp=xp)


def _first_store(block: Array, /, *, xp: Namespace, rows: int) -> Array:
    """The basis store ``(rows, P)``: ``block`` (k, P) then zero rows."""
    k, size = int(block.shape[0]), int(block.shape[1])
    zeros = xp.zeros((rows - k, size), dtype=block.dtype)
    return xp.concat([block, zeros], axis=0)


def _qr_rows(w: Array, /, *, xp: Namespace) -> tuple[Array, Array]:
    """``(Q, R)`` with ``w = R^T Q``, the rows of ``Q`` orthonormal (QR of ``w^T``)."""
    q, r = xp.linalg.qr(xp.matrix_transpose(w))
    return xp.matrix_transpose(q), r


def _combine_rows(basis: Array, s: Array, /, *, xp: Namespace) -> Array:
    """``basis^T s``: (m, P), (m, r) -> (P, r)."""
    return xp.matrix_transpose(basis) @ s


def _orthogonalize(w: Array, basis: Array, /, *, xp: Namespace) -> tuple[Array, Array]:
    """Remove from ``w`` (P,) its components along the rows of ``basis`` (m, P), twice.

    The rows are orthonormal or zero. Returns the projected vector and the total
    coefficients ``basis @ w`` removed (m,).
    """
    h1 = basis @ w
    w = w - h1 @ basis
    h2 = basis @ w
    w = w - h2 @ basis
    return w, h1 + h2


def positive_definite_shift(
    matmat: MatMat,
    size: int,
    /,
    *,
    xp: Namespace,
    dtype: Any,
    device: Any = None,
    seed: int = 0,
    krylov_dimension: int = 64,
) -> tuple[float, float]:
    r"""A shift ``mu >= 0`` that makes the symmetric ``A + mu I`` positive definite.

    For advice after a solver met a non-positive curvature: the Rayleigh quotient
    it met is only an upper bound on the smallest eigenvalue, so suggesting it
    undershoots. Here a Lanczos run (``krylov_dimension`` single-vector products)
    gives the leftmost Ritz value ``theta`` and its residual ``rho``: an eigenvalue
    lies in ``[theta - rho, theta + rho]``, and the leftmost Ritz value converges
    to ``lambda_min`` first, so ``ell = theta - rho`` estimates a lower bound. The
    shift is ``mu = 1.5 max(-ell, 0) + 1e-6 |A|``, rounded up to two significant
    digits, then checked by a second Lanczos run from another random start on
    ``A + mu I`` (a Krylov space is shift-invariant, so only a new start vector
    is a new test); ``mu`` is doubled until that check finds no non-positive
    Ritz value (three times at most).

    Returns:
        ``(ell, mu)``: the estimate of the smallest eigenvalue and the shift.
    """
    m = min(int(size), int(krylov_dimension))

    def leftmost(op: MatMat, start: int) -> tuple[float, float, float]:
        eig = lanczos(
            op, size, rank=m, krylov_dimension=m, seed=start, xp=xp, dtype=dtype, device=device
        )
        theta = np.asarray(_xp.to_numpy(eig.eigenvalues), dtype=np.float64)
        rho = np.zeros_like(theta) if eig.residual_norms is None else eig.residual_norms
        i = int(np.argmin(theta))
        return float(theta[i]), float(rho[i]), float(np.max(np.abs(theta)))

    theta, rho, top = leftmost(matmat, seed)
    ell = theta - rho
    mu = round_up_2(1.5 * max(-ell, 0.0) + 1e-6 * top)
    for attempt in range(3):

        def shifted(v: Array, mu: float = mu) -> Array:
            return matmat(v) + mu * v

        check, _, _ = leftmost(shifted, seed + 1 + attempt)
        if check > 0:
            break
        mu = round_up_2(2 * mu + max(-check, 0.0))
    return ell, mu


def block_lanczos(
    matmat: MatMat,
    size: int,
    /,
    *,
    rank: int,
    block_size: int | None = None,
    krylov_dimension: int | None = None,
    tol: float = 1e-6,
    seed: int | np.random.Generator | None = 0,
    xp: Namespace,
    dtype: Any,
    device: Any = None,
    on_failure: str = "warn",
) -> EigenResult:
    r"""The ``rank`` eigenpairs of largest magnitude of a symmetric operator, by block
    Lanczos with full re-orthogonalisation and a convergence check.

    Each step applies ``matmat`` once to a block of ``b = block_size`` orthonormal
    vectors (a curvature product is far cheaper per vector with many vectors at
    once) and extends the orthonormal basis ``Q`` of the block Krylov space
    ``span{Q_0, A Q_0, A^2 Q_0, ...}`` (``Q_0``: ``b`` Gaussian vectors, seeded):

    .. math::
        A Q_j^T = Q_{j-1}^T B_j^T + Q_j^T A_j + Q_{j+1}^T B_{j+1},

    with ``A_j = Q_j A Q_j^T`` and ``B_{j+1}`` from a QR factorisation of the new
    block after subtracting ``A_j`` and ``B_j`` terms and projecting out all previous
    blocks (a second pass where the first removed most of a row). ``B_{j+1}`` is made rank
    revealing by an SVD of the small ``R`` factor: directions with singular value
    below ``10 sqrt(P) eps |A|`` are deflated (an invariant subspace) and replaced
    by random vectors orthogonal to ``Q``, so repeated eigenvalues are found with
    their multiplicity up to ``b`` (a single-vector Krylov method sees one copy).

    After every step the Ritz pairs ``(theta_i, Q^T s_i)`` of the block
    tridiagonal ``T = Q A Q^T`` (host, float64) are checked: the residual of a
    Ritz pair is ``|A u_i - theta_i u_i| = |B_{j+1} s_i^{last}|`` (``s_i^{last}``:
    the last block of ``s_i``). The iteration stops once the ``rank`` pairs of
    largest ``|theta|`` all have ``residual <= tol max|theta|``, or when the
    basis reaches ``krylov_dimension`` vectors; then, unconverged, it warns
    (:class:`~xinfluence.errors.NotConvergedWarning`) with the residuals.

    Args:
        matmat: ``(K, P) -> (K, P)``, the rows of its input multiplied by the
            symmetric ``A`` (called with ``K = block_size``).
        size: ``P``.
        rank: number of eigenpairs, ``1 <= rank <= P``.
        block_size: ``b``, default ``min(rank, 8)``; at least the multiplicity of
            the eigenvalues sought. Larger blocks make each product cheaper per
            vector but need a larger Krylov space for the same pairs (rank 50 on
            a 99k-parameter MLP Hessian: 400 vectors with ``b = 50``, 160 with
            ``b = 8``; ``benchmarks/arnoldi_floor.py``).
        krylov_dimension: the budget, the largest basis size; default
            ``min(P, max(10 rank, 100), the memory budget)`` (the basis takes
            ``krylov_dimension P`` floats; see :func:`xinfluence.memory_budget`).
        tol: relative residual tolerance of the Ritz pairs (at least ``50 eps``).
            Eigenvalues are then accurate to about ``tol^2 |A|^2 / gap`` and
            eigenvectors to ``tol |A| / gap``.
        seed: seed (or numpy ``Generator``) for the start block and the refills.
        xp, dtype, device: namespace, real floating dtype and device.
        on_failure: ``"warn"``, ``"raise"`` (:class:`~xinfluence.errors.NotConvergedError`)
            or ``"ignore"`` when the budget ends before convergence.

    Returns:
        :class:`EigenResult` with ``eigenvalues`` (rank,) by descending magnitude,
        ``eigenvectors`` (P, rank), ``residual_norms`` (rank,), ``converged``,
        ``krylov_dimension`` and ``matmat_calls``.
    """
    from .._config import memory_budget
    from ..errors import NonFiniteError, NotConvergedError, NotConvergedWarning, warn

    size = check_positive_int(size, "size")
    rank = check_positive_int(rank, "rank")
    xp = resolve_namespace(xp, dtype, device)
    if rank > size:
        raise ValueError(f"rank must be <= size, got rank={rank} > size={size}")
    b = min(rank, 8) if block_size is None else check_positive_int(block_size, "block_size")
    b = min(b, size)
    eps = _xp.finfo_eps(dtype, xp=xp)
    if krylov_dimension is None:
        itemsize = 8 if eps < 1e-10 else 4
        affordable = max(memory_budget() // (2 * size * itemsize), 2 * b)
        krylov_dimension = min(size, max(10 * rank, 100), affordable)
    m_max = min(check_positive_int(krylov_dimension, "krylov_dimension"), size)
    if m_max < rank:
        raise ValueError(
            f"krylov_dimension must be >= rank, got krylov_dimension={m_max} < rank={rank}"
        )
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    if on_failure not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
    tol_eff = max(float(tol), 50 * eps)
    # unit rows whose overlaps with the basis are all below this are orthonormal to
    # it to working precision: subtracting the overlaps would not improve them
    clean_below = 10 * eps * math.sqrt(size)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    # jax: each of these is one compiled program (per shape), not a dozen eager ones
    project_once = _xp.maybe_jit(_project_once, xp=xp)
    recurrence = _xp.maybe_jit(_block_recurrence, xp=xp)
    qr_rows = _xp.maybe_jit(_qr_rows, xp=xp)
    combine = _xp.maybe_jit(_combine_rows, xp=xp)

    def project(
        w: Array, basis: Array | None, *, skip_below: float = 0.0
    ) -> tuple[Array, Array | None]:
        """``w`` less its components along the rows of ``basis``; the removed
        coefficients ``w basis^T``. A second pass runs when the first removed most
        of a row (Kahan-Parlett "twice is enough": a row that kept more than half
        its norm is orthogonal to working precision after one pass). Components
        all at most ``skip_below`` are left in place (``None`` coefficients)."""
        if basis is None:
            return w, None
        w1, c1, stats = project_once(w, basis, None, xp=xp)
        largest, ratio = (float(v) for v in _xp.to_numpy(stats))
        if skip_below > 0 and largest <= skip_below:
            return w, None
        if ratio > 0.5:
            return w1, c1
        w2, c12, _ = project_once(w1, basis, c1, xp=xp)
        return w2, c12

    def orthonormal(w: Array) -> tuple[Array, np.ndarray]:
        """Rows ``Q`` (k, P) orthonormal and host ``R`` (k, k) with ``w = R^T Q``."""
        q, r = qr_rows(w, xp=xp)
        return q, np.asarray(_xp.to_numpy(r), dtype=np.float64)

    def random_rows(k: int, basis: Array | None) -> Array:
        v = _xp.random_normal((k, size), seed=rng, dtype=dtype, device=device, xp=xp)
        v, _ = project(v, basis)
        return orthonormal(v)[0]

    block = random_rows(b, None)
    basis: Array | None = None
    # The basis lives in one (m_max, P) array: growing it by concatenation copied
    # it at every step. Jit-compiling namespaces (jax) use all of it, the unfilled
    # rows zero, so that shapes stay constant and nothing recompiles; the others
    # use a view of the filled rows (the unfilled ones are never touched).
    fixed = _xp.compiles_per_shape(xp)
    store: Array | None = (
        None if fixed else xp.empty((m_max, size), dtype=dtype, device=device)
    )  # jax: the first block and zero rows, one program (see _first_store)
    blocks_t: list[tuple[int, int, np.ndarray]] = []  # (row offset, col offset, block) of T
    offsets: list[int] = []
    dim = 0
    calls = 0
    scale = 0.0
    coupling: np.ndarray | None = None  # B_{j+1}, (r_{j+1}, r_j)
    previous = block  # Q_{j-1}, used once coupling is set
    while True:
        r_j = int(block.shape[0])
        offsets.append(dim)
        if store is None:
            first_store = _xp.maybe_jit(_first_store, xp=xp, static_argnames=("xp", "rows"))
            store = first_store(block, xp=xp, rows=m_max)
        w = apply_operator(matmat, block, xp=xp)  # (r_j, P) = Q_j A
        calls += 1
        # The three-term recurrence first (w -= A_j Q_j + B_j Q_{j-1}), then one
        # full pass against the basis (a second only where it removed most of a
        # row): the full passes read the whole basis and dominate the step.
        # the first step's coupling is zero (exactly: w - 0 Q_j = w), so that one
        # program serves every step; it also stores Q_j in the basis
        b_host = np.zeros((r_j, r_j)) if coupling is None else coupling
        b_j = _xp.from_numpy(b_host, dtype=dtype, device=device, xp=xp)
        w, c_loc, store = recurrence(w, block, b_j, previous, store, dim, xp=xp)
        c_host = _xp.to_numpy(c_loc)
        if not np.all(np.isfinite(c_host)):  # NaN or inf in w reaches A_j = w Q_j^T
            raise NonFiniteError(
                "block Lanczos: the product of matmat contains NaN or inf values "
                "(or overflows the dtype)"
            )
        basis = store if fixed else store[: dim + r_j, :]
        dim += r_j
        w, coef = project(w, basis)
        assert coef is not None
        # the diagonal block of T, c_loc + coef[:, columns], summed on the host in
        # the working dtype (coef is only (r_j, m_max))
        a_j = np.asarray(c_host + _xp.to_numpy(coef)[:, dim - r_j : dim], dtype=np.float64)
        a_j = 0.5 * (a_j + a_j.T)
        blocks_t.append((dim - r_j, dim - r_j, a_j))
        scale = max(scale, float(np.max(np.abs(np.linalg.eigvalsh(a_j)))) if r_j else 0.0)
        room = size - dim
        coupling = None
        new_block = None
        if room > 0:
            q, r = orthonormal(w)  # w = r^T q, (r_j, P)
            u, sv, vt = np.linalg.svd(r)
            scale = max(scale, float(sv[0]) if sv.size else 0.0)
            keep = sv > 10 * math.sqrt(size) * eps * max(scale, 1e-300)
            keep[room:] = False
            u_keep = _xp.from_numpy(
                np.ascontiguousarray(u[:, keep]), dtype=dtype, device=device, xp=xp
            )
            kept = combine(u_keep, q, xp=xp)  # (k, P), rows orthonormal
            b_kept = sv[keep, None] * vt[keep, :]  # (k, r_j): w = b_kept^T kept + small
            if kept.shape[0] > 0:  # clean: the kept rows may carry basis components
                # (w's residual components, divided by small singular values)
                kept, cleaned = project(kept, basis, skip_below=clean_below)
                if cleaned is not None:
                    kept, r2 = orthonormal(kept)
                    b_kept = r2 @ b_kept
            n_fill = min(r_j, room) - int(kept.shape[0])
            if n_fill > 0:
                both = basis if kept.shape[0] == 0 else xp.concat([basis, kept], axis=0)
                fill = random_rows(n_fill, both)
                kept = xp.concat([kept, fill], axis=0)
                b_kept = np.concatenate([b_kept, np.zeros((n_fill, r_j))], axis=0)
            new_block, coupling = kept, b_kept
        # Ritz pairs of T and their residuals |B_{j+1} s_last|
        t = np.zeros((dim, dim))
        for row, col, value in blocks_t:
            t[row : row + value.shape[0], col : col + value.shape[1]] = value
            if row != col:
                t[col : col + value.shape[1], row : row + value.shape[0]] = value.T
        theta, s = np.linalg.eigh(t)
        order = np.argsort(-np.abs(theta), kind="stable")[: min(rank, dim)]
        if coupling is None:
            residuals = np.zeros(order.size)
        else:
            residuals = np.linalg.norm(coupling @ s[dim - r_j :, order], axis=0)
        top = float(np.max(np.abs(theta))) if theta.size else 0.0
        converged = order.size == rank and bool(np.all(residuals <= tol_eff * max(top, 1e-300)))
        if converged or new_block is None or dim + int(new_block.shape[0]) > m_max:
            break
        assert coupling is not None
        blocks_t.append((dim, dim - r_j, coupling))
        previous, block = block, new_block

    if order.size < rank:  # pragma: no cover - dim >= rank by construction
        raise AssertionError("block Lanczos ended below rank")
    # A block Krylov space holds at most b copies of a repeated eigenvalue (the b
    # start vectors' projections onto its eigenspace). A top value found b times
    # may therefore have more copies that the converged pairs do not show.
    shared = (
        _shared_value(theta, order, b, 10 * tol_eff * max(top, 1e-300))
        if converged and b < rank
        else None
    )
    if shared is not None:
        if block_size is None:  # the default block: once more with one block of rank vectors
            del store, basis, block, previous  # free the first basis
            again = block_lanczos(
                matmat,
                size,
                rank=rank,
                block_size=rank,
                krylov_dimension=krylov_dimension,
                tol=tol,
                seed=rng,
                xp=xp,
                dtype=dtype,
                device=device,
                on_failure=on_failure,
            )
            return dataclasses.replace(again, matmat_calls=calls + (again.matmat_calls or 0))
        if on_failure != "ignore":
            message = (
                f"block Lanczos: the eigenvalue {shared:.6g} was found {b} times, as often as "
                f"block_size={b} allows: it may have more copies among the top {rank}, which "
                "a block Krylov method cannot see; raise block_size (at most rank)"
            )
            if on_failure == "raise":
                raise NotConvergedError(message)
            warn(message, NotConvergedWarning)
    s_top = np.ascontiguousarray(s[:, order])
    if fixed:  # the basis has m_max rows, those past dim zero
        s_top = np.concatenate([s_top, np.zeros((m_max - dim, s_top.shape[1]))], axis=0)
    eigenvectors = combine(basis, _xp.from_numpy(s_top, dtype=dtype, device=device, xp=xp), xp=xp)
    eigenvalues = _xp.from_numpy(theta[order], dtype=dtype, device=device, xp=xp)
    if not converged and on_failure != "ignore":
        relative = residuals / max(top, 1e-300)
        message = (
            f"block Lanczos: the top {rank} Ritz pairs did not converge within a Krylov "
            f"space of dimension {dim} (krylov_dimension={m_max}, block_size={b}): largest "
            f"relative residual |A u - theta u| / |A| = {float(np.max(relative)):.2e} > "
            f"tol={tol_eff:.1e} (worst pairs: "
            f"{', '.join(f'{v:.1e}' for v in np.sort(relative)[::-1][:5])}); the eigenpairs "
            "and what is computed from them are approximate: raise krylov_dimension or "
            "block_size, or lower rank"
        )
        if on_failure == "raise":
            raise NotConvergedError(message)
        warn(message, NotConvergedWarning)
    return EigenResult(
        eigenvalues=eigenvalues,
        eigenvectors=eigenvectors,
        residual_norms=residuals,
        converged=converged,
        krylov_dimension=dim,
        matmat_calls=calls,
    )
