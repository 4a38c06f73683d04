"""The gradient store on dask: a build from dask arrays or partitions, a task per
block, on a 2-process LocalCluster (and dask's local scheduler) gives the store of
a sequential build, resumes either's runs; scoring with ``client=`` gives the
sequential numbers.

Oracle: the sequential :class:`GradientStore` (itself checked against the models'
own influences in test_gradient_store.py), and ``model.influences``."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import xinfluence as xi
from compute_helpers import softmax_problem
from helpers import rel_err
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import SoftmaxRegressionGradients
from xinfluence.compute import GradientStore, StoreDamagedError, StoreMismatchError
from xinfluence.types import Batch

da = pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")

ROWS = 5  # 37 training points: 8 blocks, the last of 2
N_TEST = 11
NUMPY_ONLY = pytest.mark.skipif(
    os.environ.get("XINFLUENCE_BACKEND", "numpy") != "numpy", reason="numpy backend only"
)

MODELS = {
    "direct_blocks": lambda gp: xi.DirectInfluence(
        gp, regularization=1e-3, block_structure="parameter"
    ),
    "projected_kronecker": lambda gp: xi.ProjectedInfluence(
        gp, k=(2, 4), projection="kronecker", regularization=1e-3
    ),
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    distributed = pytest.importorskip("distributed")
    if os.environ.get("XINFLUENCE_BACKEND", "numpy") != "numpy":
        pytest.skip("the cluster tests run in the numpy session")
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            local_directory=str(tmp_path_factory.mktemp("dask")),
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def _problem(name="direct_blocks"):
    x, y, w, b = softmax_problem(np.random.default_rng(3))
    model = MODELS[name](SoftmaxRegressionGradients(w, b))
    batches = [(x[:7], y[:7]), (x[7:20], y[7:20]), (x[20:], y[20:])]  # uneven
    return model.fit(batches), x, y, batches


def _dask(x, y, chunks=ROWS):
    return da.from_array(x, chunks=(chunks, x.shape[1])), da.from_array(y, chunks=(chunks,))


def _same_store(a: GradientStore, b: GradientStore, blocks: int = 8) -> None:
    """The same fingerprint, layout, records (rows, data digests; the checksums
    follow the values, which may differ in the last bit where a kernel depends on
    memory layout) and values to 1e-12."""
    assert a.fingerprint == b.fingerprint and a.array.chunks == b.array.chunks
    assert sorted(a.records) == sorted(b.records) == list(range(blocks))
    for i, rec in a.records.items():
        assert {k: v for k, v in rec.items() if "checksum" not in k} == {
            k: v for k, v in b.records[i].items() if "checksum" not in k
        }
    assert rel_err(a.features(), b.features()) <= 1e-12
    assert rel_err(a.self_influence(), b.self_influence()) <= 1e-12


@NUMPY_ONLY
@pytest.mark.parametrize("name", list(MODELS))
def test_cluster_build_and_scores_equal_sequential(tmp_path, client, name):
    model, x, y, batches = _problem(name)
    seq = GradientStore.build(model, batches, tmp_path / "seq", block_rows=ROWS, progress=False)
    done = []
    store = GradientStore.build(
        model, _dask(x, y), tmp_path / "dask", client=client, progress=False, on_block=done.append
    )
    assert sorted(done) == list(range(8))
    _same_store(store, seq)

    xt, yt = x[:N_TEST], y[:N_TEST]
    expected = seq.influences(model, xt, yt)
    got = store.influences(model, xt, yt, client=client)
    assert type(got) is type(expected) and got.shape == (N_TEST, 37)
    assert rel_err(got, expected) <= 1e-12
    assert rel_err(got, model.influences(xt, yt, x, y)) < 1e-10
    for reduce in ("sum", "mean"):
        ref = seq.total_influence(model, xt, yt, reduce=reduce)
        assert (
            rel_err(store.total_influence(model, xt, yt, reduce=reduce, client=client), ref)
            <= 1e-12
        )
    assert rel_err(store.self_influence(client=client), seq.self_influence()) <= 1e-12
    # k = 4 and k past N: indices equal, scores to 1e-12
    for k in (4, 40):
        tk, ref = store.top_k(model, xt, yt, k=k, client=client), seq.top_k(model, xt, yt, k=k)
        for part in ("helpful", "harmful"):
            np.testing.assert_array_equal(
                to_numpy(getattr(tk, f"{part}_indices")), to_numpy(getattr(ref, f"{part}_indices"))
            )
            assert rel_err(getattr(tk, f"{part}_scores"), getattr(ref, f"{part}_scores")) <= 1e-12


@NUMPY_ONLY
def test_cluster_build_from_partitions(tmp_path, client):
    model, x, y, batches = _problem()
    seq = GradientStore.build(model, batches, tmp_path / "seq", block_rows=ROWS, progress=False)
    parts = [(x[i : i + ROWS], y[i : i + ROWS]) for i in range(0, 35, ROWS)]
    parts.append(Batch(x[35:], y[35:]))  # the last one shorter
    store = GradientStore.build(model, parts, tmp_path / "p", client=client, progress=False)
    _same_store(store, seq)
    # a partition of another size than the others is refused before any I/O
    bad = [parts[0], (x[5:12], y[5:12]), *parts[2:]]
    with pytest.raises(ValueError, match="block_rows = 5"):
        GradientStore.build(model, bad, tmp_path / "bad", client=client, progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="in-memory zarr store"):
        GradientStore.build(model, parts, zarr.storage.MemoryStore(), client=client, progress=False)


@NUMPY_ONLY
def test_cluster_build_resumes(tmp_path, client):
    """A rerun computes only the blocks without a record: a dask run's, and a
    sequential run's on dask; a finished block of other data is refused."""
    model, x, y, batches = _problem()
    path = tmp_path / "s"
    GradientStore.build(model, _dask(x, y), path, client=client, progress=False)
    shutil.rmtree(path / "done" / "3.0")
    with pytest.raises(StoreDamagedError, match="no finished block 3"):
        GradientStore.open(path).influences(model, x[:2], y[:2])
    done = []
    store = GradientStore.build(
        model, _dask(x, y), path, client=client, progress=False, on_block=done.append
    )
    assert done == [3]
    expected = model.influences(x[:N_TEST], y[:N_TEST], x, y)
    assert rel_err(store.influences(model, x[:N_TEST], y[:N_TEST], client=client), expected) < 1e-10

    # a sequential run interrupted after 3 blocks, finished on the cluster
    def die(i):
        if i == 2:
            raise KeyboardInterrupt("killed")

    seq_path = tmp_path / "seq"
    with pytest.raises(KeyboardInterrupt):
        GradientStore.build(model, batches, seq_path, block_rows=ROWS, progress=False, on_block=die)
    done.clear()
    resumed = GradientStore.build(
        model, _dask(x, y), seq_path, client=client, progress=False, on_block=done.append
    )
    assert sorted(done) == [3, 4, 5, 6, 7]
    _same_store(resumed, store)

    # other data in a finished block (not the first point): refused
    x2 = x.copy()
    x2[12] += 1.0
    with pytest.raises(StoreMismatchError, match=r"block \(2, 0\) was computed from other"):
        GradientStore.build(model, _dask(x2, y), path, client=client, progress=False)


@NUMPY_ONLY
def test_cluster_scoring_names_a_damaged_block(tmp_path, client):
    model, x, y, batches = _problem()
    path = tmp_path / "s"
    GradientStore.build(model, batches, path, block_rows=ROWS, progress=False)
    arr = zarr.open_group(str(path), mode="a")["values"]
    arr[10:15, 0] = arr[10:15, 0] + 1e-3  # block 2
    store = GradientStore.open(path)
    with pytest.raises(StoreDamagedError, match="damaged block 2"):
        store.influences(model, x[:3], y[:3], client=client)
    with pytest.raises(StoreDamagedError, match="damaged block 2"):
        store.top_k(model, x[:3], y[:3], k=2, client=client)


def test_local_scheduler_build_equals_sequential(tmp_path, xp, to_xp):
    """Dask arrays without a client: dask's default scheduler (threads), on every
    backend (the numpy chunks are converted to the model's namespace in the tasks)."""
    x, y, w, b = softmax_problem(np.random.default_rng(3))
    model = MODELS["direct_blocks"](SoftmaxRegressionGradients(to_xp(w), to_xp(b)))
    xs, ys = to_xp(x), to_xp(y)
    model.fit([(xs[:20, ...], ys[:20, ...]), (xs[20:, ...], ys[20:, ...])])
    seq = GradientStore.build(model, [(xs, ys)], tmp_path / "seq", block_rows=ROWS, progress=False)
    store = GradientStore.build(
        model, _dask(x, y, (5, 9, 3, 20)), tmp_path / "d", block_rows=ROWS, progress=False
    )
    _same_store(store, seq)
    # the sequential default for in-memory arrays (what featurize --scheduler uses)
    from xinfluence.compute._gradient_store_dask import default_block_rows

    auto = GradientStore.build(model, [(xs, ys)], tmp_path / "auto", progress=False)
    assert default_block_rows(model, xs, ys, None) == auto.block_rows
    # default block_rows: the arrays' first chunk
    assert (
        GradientStore.build(model, _dask(x, y, 8), tmp_path / "e", progress=False).block_rows == 8
    )


@pytest.mark.skipif(
    os.environ.get("XINFLUENCE_BACKEND", "numpy") != "torch", reason="torch backend only"
)
def test_torch_dataloader_partitions(tmp_path):
    """A torch model, partitions as DataLoaders over subsets, on an in-process
    cluster: the sequential store and scores (torch tensors back)."""
    torch = pytest.importorskip("torch")
    distributed = pytest.importorskip("distributed")
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from torch_helpers import mlp
    from xinfluence.backends.torch import TorchGradientProvider

    gp = TorchGradientProvider(
        mlp(n_in=4, hidden=5, n_out=3, seed=1), torch.nn.functional.cross_entropy
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(29, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (29,), generator=g)
    data = TensorDataset(x, y)
    model = xi.ProjectedInfluence(
        gp, k=(3, 4), projection="kronecker", regularization=1e-3, block_structure="layer"
    ).fit([(x, y)])
    seq = GradientStore.build(model, [(x, y)], tmp_path / "seq", block_rows=8, progress=False)
    parts = [
        DataLoader(Subset(data, range(i, min(i + 8, 29))), batch_size=3) for i in range(0, 29, 8)
    ]
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        store = GradientStore.build(model, parts, tmp_path / "d", client=client, progress=False)
        got = store.influences(model, x[:7], y[:7], client=client)
    _same_store(store, seq, blocks=4)
    expected = seq.influences(model, x[:7], y[:7])
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    assert rel_err(got, expected) <= 1e-12
