"""Preconditioners for :func:`~xinfluence.linalg.cg`: callables ``(K, P) -> (K, P)``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _xp
from .._xp import Array, Namespace
from ..errors import NotPositiveDefiniteError
from ._util import MatMat, apply_operator, check_positive_int, resolve_namespace

__all__ = ["JacobiPreconditioner", "NystroemPreconditioner", "hutchinson_diagonal"]


def _shifted(
    values: Array, regularization: float, name: str, *, xp: Namespace
) -> tuple[Array, float]:
    """``values + regularization`` and its minimum; an error unless it is positive."""
    if regularization < 0:
        raise ValueError(f"regularization must be >= 0, got {regularization}")
    shifted = values + regularization
    smallest = float(xp.min(shifted))
    if not smallest > 0:
        raise NotPositiveDefiniteError(
            f"the {name} preconditioner needs its curvature values + regularization > 0, "
            f"got {smallest:.3e}; increase the regularization"
        )
    return shifted, smallest


class JacobiPreconditioner:
    r"""Diagonal preconditioner ``M^{-1} v = v / (d + μ)`` applied to each row.

    Args:
        diagonal: ``(P,)`` (an estimate of) the diagonal ``d`` of ``A``, e.g.
            from :func:`hutchinson_diagonal`.
        regularization: ``μ >= 0`` added to the diagonal (the damping of the
            system ``(A + μ I) x = b`` being solved).

    Raises:
        NotPositiveDefiniteError: some ``d_i + μ <= 0``.
    """

    __slots__ = ("_inverse", "regularization")

    def __init__(self, diagonal: Array, regularization: float = 0.0) -> None:
        xp = _xp.namespace(diagonal)
        if diagonal.ndim != 1:
            raise ValueError(f"expected the diagonal of shape (P,), got {tuple(diagonal.shape)}")
        shifted, _ = _shifted(diagonal, regularization, "Jacobi", xp=xp)
        self._inverse = 1.0 / shifted
        self.regularization = float(regularization)

    @property
    def size(self) -> int:
        return int(self._inverse.shape[0])

    def __call__(self, v: Array) -> Array:
        """``(K, P) -> (K, P)``: each row divided elementwise by ``d + μ``."""
        return v * self._inverse

    def __repr__(self) -> str:
        return f"JacobiPreconditioner(size={self.size}, regularization={self.regularization:g})"


class NystroemPreconditioner:
    r"""Nyström PCG preconditioner (Frangella, Tropp and Udell 2021) for ``A + μ I``.

    From a rank-``r`` approximation ``A ≈ U diag(λ) U^T`` (e.g. by
    :func:`~xinfluence.linalg.nystroem`, ``U`` (P, r) orthonormal) and the
    regularization ``μ``, the inverse preconditioner is

    .. math::
        M^{-1} = (λ_r + μ) U (Λ + μ I)^{-1} U^T + (I - U U^T),

    with ``λ_r`` the smallest kept eigenvalue. It maps the top eigenvalues of
    ``A + μ I`` to about ``λ_r + μ`` and leaves the rest (``<= λ_r + μ``)
    unchanged, so the preconditioned system has condition number about
    ``(λ_r + μ) / μ``.

    Args:
        eigenvalues: ``(r,)`` non-negative eigenvalues ``λ``.
        eigenvectors: ``(P, r)`` orthonormal eigenvectors ``U``.
        regularization: ``μ``; ``min(λ) + μ`` must be positive.
    """

    __slots__ = ("_eigenvectors", "_row_scale", "regularization")

    def __init__(self, eigenvalues: Array, eigenvectors: Array, regularization: float) -> None:
        xp = _xp.namespace(eigenvalues, eigenvectors)
        if (
            eigenvalues.ndim != 1
            or eigenvectors.ndim != 2
            or eigenvectors.shape[1] != eigenvalues.shape[0]
        ):
            raise ValueError(
                "expected eigenvalues (r,) and eigenvectors (P, r), got shapes "
                f"{tuple(eigenvalues.shape)} and {tuple(eigenvectors.shape)}"
            )
        shifted, smallest = _shifted(eigenvalues, regularization, "Nyström", xp=xp)
        # M^{-1} v = v + ((λ_r + μ) / (λ + μ) - 1) (v U) U^T  for rows v.
        self._row_scale = smallest / shifted - 1.0
        self._eigenvectors = eigenvectors
        self.regularization = float(regularization)

    @property
    def size(self) -> int:
        return int(self._eigenvectors.shape[0])

    @property
    def rank(self) -> int:
        return int(self._eigenvectors.shape[1])

    def __call__(self, v: Array) -> Array:
        """``(K, P) -> (K, P)``: ``M^{-1}`` applied to each row."""
        xp = _xp.namespace(v, self._eigenvectors)
        coefficients = (v @ self._eigenvectors) * self._row_scale  # (K, r)
        return v + coefficients @ xp.matrix_transpose(self._eigenvectors)

    def __repr__(self) -> str:
        return (
            f"NystroemPreconditioner(size={self.size}, rank={self.rank}, "
            f"regularization={self.regularization:g})"
        )


def hutchinson_diagonal(
    matmat: MatMat,
    size: int,
    /,
    *,
    num_samples: int,
    seed: int | np.random.Generator | None = 0,
    xp: Namespace,
    dtype: Any,
    device: Any = None,
    distribution: str = "rademacher",
    batch_size: int | None = None,
) -> Array:
    r"""Hutchinson (Bekas et al. 2007) estimate of the diagonal of ``A``: ``(P,)``.

    .. math::
        \operatorname{diag}(A) \approx \frac{1}{S} \sum_{s=1}^{S} z_s \odot A z_s,

    with ``S = num_samples`` probes ``z_s`` of i.i.d. Rademacher (``±1``,
    default) or standard normal entries, seeded. The estimate is unbiased;
    with Rademacher probes its variance for entry ``i`` is
    ``(sum_{j != i} A_ij^2) / S``, so it is exact for a diagonal ``A``.

    Args:
        matmat: ``(K, P) -> (K, P)``, the rows of its input multiplied by ``A``.
        size: ``P``.
        num_samples: ``S``, the number of probes.
        seed: seed (or numpy ``Generator``) for the probes.
        xp, dtype, device: namespace, real floating dtype and device.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        batch_size: probes per ``matmat`` call; default all at once.
    """
    size = check_positive_int(size, "size")
    num_samples = check_positive_int(num_samples, "num_samples")
    xp = resolve_namespace(xp, dtype, device)
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    batch_size = num_samples if batch_size is None else check_positive_int(batch_size, "batch_size")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    total = xp.zeros((size,), dtype=dtype, device=device)
    for start in range(0, num_samples, batch_size):
        k = min(batch_size, num_samples - start)
        z = _xp.random_normal((k, size), seed=rng, dtype=dtype, device=device, xp=xp)
        if distribution == "rademacher":
            z = xp.where(z >= 0, xp.ones_like(z), -xp.ones_like(z))
        total = total + xp.sum(z * apply_operator(matmat, z, xp=xp), axis=0)
    return total / num_samples
