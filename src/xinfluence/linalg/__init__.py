"""Backend-agnostic linear algebra on the Array API.

Every routine takes the operator as a callable ``matmat`` mapping a ``(K, P)``
array to ``(K, P)`` by applying the symmetric ``P x P`` matrix ``A`` to each
row (row convention), and returns arrays in the namespace, device and dtype of
its inputs (or of the ``xp``, ``dtype``, ``device`` it is given).

- :func:`block_cg`: block conjugate gradients (one shared Krylov space) for SPD
  systems with many right-hand sides.
- :func:`cg`: batched independent conjugate gradients for SPD systems.
- :func:`lanczos`: the eigenpairs of largest magnitude of a symmetric operator.
- :func:`block_lanczos`: the same by block Lanczos (one ``matmat`` per block of
  vectors), extended until the Ritz residuals converge.
- :func:`nystroem`: randomized Nyström low-rank approximation of a PSD operator.
- :class:`JacobiPreconditioner`, :class:`NystroemPreconditioner`,
  :func:`hutchinson_diagonal`: preconditioners for :func:`cg`.
"""

from ._results import EigenResult, SolverResult
from .block_cg import block_cg
from .cg import cg
from .lanczos import block_lanczos, lanczos
from .nystroem import nystroem
from .preconditioners import JacobiPreconditioner, NystroemPreconditioner, hutchinson_diagonal

__all__ = [
    "EigenResult",
    "JacobiPreconditioner",
    "NystroemPreconditioner",
    "SolverResult",
    "block_cg",
    "block_lanczos",
    "cg",
    "hutchinson_diagonal",
    "lanczos",
    "nystroem",
]
