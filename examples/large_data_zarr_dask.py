"""Large data: influences computed chunk by chunk into a zarr store, and on a dask cluster.

Neither side of the computation needs to fit in memory. Here the data is small
(scikit-learn's digits, softmax regression) so that the script runs in seconds,
but the code is what you would run on 10^6 training points:

1. ``SequentialInfluenceCalculator(model)``: both sides are iterables of
   batches (a list of ``(x, y)`` chunks here; a torch ``DataLoader`` works
   too); ``.to_zarr(path)`` writes the ``(N_test, N)`` influences block by
   block and records each finished block, so rerunning the same call after a
   crash computes only the missing blocks. ``top_k`` streams the most helpful
   and harmful training points without the whole matrix.
2. ``DaskInfluenceCalculator(model, client=client)``: inputs are dask arrays
   chunked along samples; the fitted model is scattered to the workers once and
   every (test chunk, training chunk) block is one task.

Run: python examples/large_data_zarr_dask.py   (needs scikit-learn, zarr, dask[distributed])
"""

import tempfile
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from dask.distributed import Client, LocalCluster
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import xinfluence as xi
from xinfluence.backends.numpy import SoftmaxRegressionGradients
from xinfluence.compute import DaskInfluenceCalculator, SequentialInfluenceCalculator


def main():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_train, y_train, x_test, y_test = x[:1300], y[:1300], x[1300:], y[1300:]
    n, C = len(y_train), 1.0
    clf = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(x_train, y_train)
    gp = SoftmaxRegressionGradients(clf.coef_, clf.intercept_)
    model = xi.CgInfluence(gp, regularization=1.0 / (C * n), rtol=1e-10)

    # chunks as they would come from disk: lists of (x, y) pairs (uneven on purpose)
    def chunks(a, b, size):
        return [(a[i : i + size], b[i : i + size]) for i in range(0, len(b), size)]

    train_chunks, test_chunks = chunks(x_train, y_train, 300), chunks(x_test, y_test, 200)
    model.fit(train_chunks)  # fit accepts the same iterables

    # 1. sequential, into a resumable zarr store
    calc = SequentialInfluenceCalculator(
        model, progress=True, test_chunk_size=200, train_chunk_size=300
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "influences.zarr"
        values = calc.influences(test_chunks, train_chunks).to_zarr(str(store))
        print(f"zarr store {store.name}: shape {values.shape}, chunks {values.chunks}")
        lazy = calc.influences(test_chunks, train_chunks)
        again = lazy.to_zarr(str(store))  # a rerun: every block is already finished
        print(f"rerun on the same store computed {lazy.blocks_computed} blocks")
        on_disk = np.asarray(zarr.open_array(str(store / "values"), mode="r")[...])
        assert np.array_equal(on_disk, np.asarray(again[...]))

    top = calc.influences(test_chunks, train_chunks).top_k(5)
    print("test point 0: most helpful training points", np.asarray(top.helpful_indices[0]))

    # 2. the same on a dask cluster (two local worker processes)
    xd = da.from_array(x_train, chunks=(300, 64))
    yd = da.from_array(y_train, chunks=300)
    xtd = da.from_array(x_test, chunks=(200, 64))
    ytd = da.from_array(y_test, chunks=200)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            lazy_dask = DaskInfluenceCalculator(model, client=client).influences(xtd, ytd, xd, yd)
            result = lazy_dask.compute()
    print(f"dask: {result.shape}, {lazy_dask.numblocks} blocks")
    rel = np.linalg.norm(result - on_disk) / np.linalg.norm(on_disk)
    print(f"dask against the zarr store: relative difference {rel:.1e}")
    assert rel < 1e-10


if __name__ == "__main__":  # dask's worker processes import this file: guard the work
    main()
