"""Influence computation at scale: chunked, resumable, distributed.

* :class:`SequentialInfluenceCalculator`: influences over iterables of batches,
  one block at a time, collected in memory (``.compute()``) or written to a
  zarr store block by block (``.to_zarr(path)``, resumable after a kill,
  checksummed per block; :func:`open_influences` reads such a store with
  every block verified).
* :class:`DaskInfluenceCalculator`: the same over dask arrays, on dask's local
  schedulers or a ``dask.distributed`` cluster.
* :class:`GradientStore`: featurize the training set once (``B g_j`` of a model
  whose influence factors as ``<A g_t, B g_j>``, in a resumable, checksummed zarr
  store), then score queries as matrix products against it.
* Streaming reductions that never hold the ``(N_test, N)`` matrix:
  :func:`top_k`, :func:`self_influence`, :func:`total_influence` for in-memory
  arrays, and the ``top_k``, ``sum``, ``mean`` methods of the calculators'
  lazy results.

Importing this package imports neither dask, zarr nor tqdm; they are extras
(``pip install "xinfluence[dask,progress]"``) loaded when used.
"""

from __future__ import annotations

from ._reductions import TopK
from ._store import (
    StoreDamagedError,
    StoredInfluences,
    StoreLockedError,
    StoreMismatchError,
    open_influences,
)
from .dask import DaskInfluenceCalculator
from .gradient_store import (
    FACTORIZED_MODELS,
    GradientStore,
    NoFactorizationError,
    NoSavedModelError,
)
from .reductions import self_influence, top_k, total_influence
from .sequential import LazyInfluences, SequentialInfluenceCalculator

__all__ = [
    "DaskInfluenceCalculator",
    "FACTORIZED_MODELS",
    "GradientStore",
    "LazyInfluences",
    "NoFactorizationError",
    "NoSavedModelError",
    "SequentialInfluenceCalculator",
    "StoreDamagedError",
    "StoreLockedError",
    "StoreMismatchError",
    "StoredInfluences",
    "TopK",
    "open_influences",
    "self_influence",
    "top_k",
    "total_influence",
]
