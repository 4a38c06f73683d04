"""The gradient store (xinfluence.compute.GradientStore): scores against stored
training features equal the models' own influences; resumption, damage, refusal.

Oracle: ``model.influences(x_test, y_test, x, y)`` of the same fitted model (whose
own correctness the other tests check against closed forms and dense references),
and ``self_influence`` / ``top_k`` / ``total_influence`` of xinfluence.compute."""

from __future__ import annotations

import os

import numpy as np
import pytest

import xinfluence as xi
from compute_helpers import softmax_problem
from helpers import rel_err
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import SoftmaxRegressionGradients
from xinfluence.compute import (
    GradientStore,
    NoFactorizationError,
    StoreDamagedError,
    StoreMismatchError,
    self_influence,
    top_k,
    total_influence,
)

pytest.importorskip("zarr")

SIZES = [7, 13, 17]  # uneven batches of the 37 training points
N_TEST = 11
ROWS = 5  # 8 blocks, the last one of 2 rows

MODELS = {
    "identity": lambda gp: xi.IdentityInfluence(gp),
    "direct": lambda gp: xi.DirectInfluence(gp, regularization=1e-3),
    "direct_blocks": lambda gp: xi.DirectInfluence(
        gp, regularization=1e-3, block_structure="parameter"
    ),
    "projected_dense": lambda gp: xi.ProjectedInfluence(gp, k=9, regularization=1e-3),
    "projected_kronecker": lambda gp: xi.ProjectedInfluence(
        gp, k=(2, 4), projection="kronecker", regularization=1e-3
    ),
    "ekfac": lambda gp: xi.EkfacInfluence(gp, regularization=1e-3),
    "arnoldi": lambda gp: xi.ArnoldiInfluence(gp, regularization=1e-3, rank=5),
    "arnoldi_woodbury": lambda gp: xi.ArnoldiInfluence(
        gp, regularization=1e-3, rank=5, use_woodbury=True
    ),
    "nystroem": lambda gp: xi.NystroemSketchInfluence(
        gp, regularization=1e-3, rank=6, second_order="empirical_fisher"
    ),
}


def _problem(to_xp, seed=3):
    x, y, w, b = softmax_problem(np.random.default_rng(seed))
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    xs, ys = to_xp(x), to_xp(y)
    batches, start = [], 0
    for s in SIZES:
        batches.append((xs[start : start + s, ...], ys[start : start + s, ...]))
        start += s
    return gp, xs, ys, batches


@pytest.mark.parametrize("name", list(MODELS))
def test_scores_equal_the_models_influences(xp, to_xp, tmp_path, name):
    gp, xs, ys, batches = _problem(to_xp)
    model = MODELS[name](gp).fit(batches)
    store = GradientStore.build(model, batches, tmp_path / "s", block_rows=ROWS, progress=False)
    assert store.shape[0] == 37 and len(store.records) == 8
    xt, yt = xs[:N_TEST, ...], ys[:N_TEST, ...]
    expected = model.influences(xt, yt, xs, ys)
    scores = store.influences(model, xt, yt)
    assert type(scores) is type(expected) and scores.dtype == expected.dtype
    assert rel_err(scores, expected) < 1e-10

    # the reductions against their in-memory counterparts
    np.testing.assert_allclose(
        store.self_influence(), to_numpy(self_influence(model, xs, ys)), rtol=1e-10, atol=1e-12
    )
    tk, ref = store.top_k(model, xt, yt, k=4), top_k(model, xt, yt, xs, ys, k=4)
    np.testing.assert_array_equal(to_numpy(tk.helpful_indices), to_numpy(ref.helpful_indices))
    np.testing.assert_array_equal(to_numpy(tk.harmful_indices), to_numpy(ref.harmful_indices))
    assert rel_err(tk.helpful_scores, ref.helpful_scores) < 1e-10
    total = store.total_influence(model, xt, yt, reduce="mean")
    assert rel_err(total, total_influence(model, xt, yt, xs, ys, reduce="mean")) < 1e-10

    # a reopened store gives the same numbers; batches of queries as an iterable
    again = GradientStore.open(tmp_path / "s")
    q = [(xt[:4, ...], yt[:4, ...]), (xt[4:, ...], yt[4:, ...])]
    assert rel_err(again.influences(model, q), expected) < 1e-10


def test_float32_storage_error(xp, to_xp, tmp_path):
    """float32 storage of a float64 model: the scores' relative error (Frobenius)
    is set by the rounding of the stored features, about 2^-24 ~ 6e-8."""
    gp, xs, ys, batches = _problem(to_xp)
    model = xi.ProjectedInfluence(gp, k=9, regularization=1e-3).fit(batches)
    s64 = GradientStore.build(model, batches, tmp_path / "f64", block_rows=ROWS, progress=False)
    s32 = GradientStore.build(
        model, batches, tmp_path / "f32", block_rows=ROWS, dtype="float32", progress=False
    )
    assert s32.dtype == np.float32 and s64.dtype == np.float64
    xt, yt = xs[:N_TEST, ...], ys[:N_TEST, ...]
    expected = model.influences(xt, yt, xs, ys)
    got = s32.influences(model, xt, yt)
    assert got.dtype == expected.dtype  # the products are in the model's dtype
    err = rel_err(got, expected)
    assert 1e-10 < err < 1e-6, err
    # self-influence comes from the unrounded features
    np.testing.assert_allclose(s32.self_influence(), s64.self_influence(), rtol=1e-12)


def test_one_store_many_namespaces(tmp_path):
    """A store built on numpy arrays scores torch and jax queries (same weights, the
    same seeded projection): the results in the query's namespace, equal to the
    numpy ones. (A basis fitted by eigh, as EK-FAC's, may differ in sign between
    backends: such a model must carry the store's fit, the probe checks it.)"""
    x, y, w, b = softmax_problem(np.random.default_rng(5))
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    model = xi.ProjectedInfluence(SoftmaxRegressionGradients(w, b), k=9, regularization=1e-3)
    model.fit(batches)
    store = GradientStore.build(model, batches, tmp_path / "s", block_rows=6, progress=False)
    expected = model.influences(x[:9], y[:9], x, y)
    assert rel_err(store.influences(model, x[:9], y[:9]), expected) < 1e-10
    tried = 0
    for name in ("torch", "jax"):
        if name == "jax" and os.environ.get("XINFLUENCE_BACKEND", "numpy") != "jax":
            continue  # jax compiles per shape: only in the jax session
        try:
            if name == "torch":
                import array_api_compat.torch as other
            else:
                import jax

                jax.config.update("jax_enable_x64", True)
                import jax.numpy as other
        except ImportError:
            continue
        conv = lambda a: other.asarray(a)  # noqa: E731
        omodel = xi.ProjectedInfluence(
            SoftmaxRegressionGradients(conv(w), conv(b)), k=9, regularization=1e-3
        ).fit([(conv(x), conv(y))])
        got = store.influences(omodel, conv(x[:9]), conv(y[:9]))
        assert not isinstance(got, np.ndarray)
        assert rel_err(to_numpy(got), expected) < 1e-10
        tried += 1
    if not tried:
        pytest.skip("neither torch nor jax installed")


def _fitted(seed=3):
    import array_api_compat.numpy as np_xp

    gp, xs, ys, batches = _problem(lambda a: np_xp.asarray(a), seed)
    model = xi.DirectInfluence(gp, regularization=1e-3, block_structure="parameter")
    return model.fit(batches), xs, ys, batches


def test_resume_after_a_kill(tmp_path):
    model, xs, ys, batches = _fitted()
    path = tmp_path / "s"

    def die(i):
        if i == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        GradientStore.build(model, batches, path, block_rows=ROWS, progress=False, on_block=die)
    with pytest.raises(StoreDamagedError, match="unfinished"):
        GradientStore.open(path)
    done = []
    store = GradientStore.build(
        model, batches, path, block_rows=ROWS, progress=False, on_block=done.append
    )
    assert done == [3, 4, 5, 6, 7]  # blocks 0, 1, 2 were kept
    expected = model.influences(xs[:N_TEST], ys[:N_TEST], xs, ys)
    assert rel_err(store.influences(model, xs[:N_TEST], ys[:N_TEST]), expected) < 1e-10
    # finished: nothing to compute; a rerun with other data is refused
    done.clear()
    GradientStore.build(model, batches, path, block_rows=ROWS, progress=False, on_block=done.append)
    assert done == []
    other = [(xs[:7] + 1.0, ys[:7]), *batches[1:]]
    with pytest.raises(StoreMismatchError):
        GradientStore.build(model, other, path, block_rows=ROWS, progress=False)


def test_damaged_block_is_named_then_recomputed(tmp_path):
    import zarr

    model, xs, ys, batches = _fitted()
    path = tmp_path / "s"
    GradientStore.build(model, batches, path, block_rows=ROWS, progress=False)
    arr = zarr.open_group(str(path), mode="a")["values"]
    arr[10:15, 0] = arr[10:15, 0] + 1e-3  # block 2
    store = GradientStore.open(path)
    with pytest.raises(StoreDamagedError, match="block 2"):
        store.influences(model, xs[:3], ys[:3])
    done = []
    with pytest.warns(UserWarning, match="damaged"):
        store = GradientStore.build(
            model, batches, path, block_rows=ROWS, progress=False, on_block=done.append
        )
    assert done == [2]
    expected = model.influences(xs[:3], ys[:3], xs, ys)
    assert rel_err(store.influences(model, xs[:3], ys[:3]), expected) < 1e-10


def test_models_without_a_factorization_are_refused(tmp_path):
    import array_api_compat.numpy as np_xp

    gp, xs, ys, batches = _problem(lambda a: np_xp.asarray(a))
    for model in (
        xi.CgInfluence(gp, regularization=1e-3),
        xi.LissaInfluence(gp, regularization=1e-1, maxiter=5, on_failure="ignore"),
        xi.InverseHarmonicMeanInfluence(gp, regularization=1e-2),
    ):
        model.fit(batches)
        with pytest.raises(NoFactorizationError, match="ProjectedInfluence, EkfacInfluence"):
            GradientStore.build(model, batches, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()  # refused before any I/O
    with pytest.raises(xi.NotFittedError):
        GradientStore.build(xi.IdentityInfluence(gp), batches, tmp_path / "s", progress=False)


def test_another_model_is_refused(tmp_path):
    model, xs, ys, batches = _fitted()
    path = tmp_path / "s"
    store = GradientStore.build(model, batches, path, block_rows=ROWS, progress=False)
    with pytest.raises(StoreMismatchError, match="regularization"):
        store.influences(
            model.__class__(
                model.gradient_provider, regularization=1e-2, block_structure="parameter"
            ).fit(batches),
            xs[:2],
            ys[:2],
        )
    refit, *_ = _fitted(seed=4)  # other parameters and data, same options
    with pytest.raises(StoreMismatchError, match="first training point"):
        store.influences(refit, xs[:2], ys[:2])
    # options differ: refused before any pass
    with pytest.raises(StoreMismatchError, match="block_rows"):
        GradientStore.build(model, batches, path, block_rows=4, progress=False)
    # not a store that xinfluence wrote
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StoreMismatchError, match="refusing to overwrite"):
        GradientStore.build(model, batches, foreign, overwrite=True, progress=False)
    assert (foreign / "notes.txt").exists()


@pytest.mark.parametrize(
    "name", ["projected_kronecker", "projected_dense", "ekfac", "arnoldi_woodbury"]
)
def test_torch_mlp(tmp_path, name):
    torch = pytest.importorskip("torch")
    from torch_helpers import mlp
    from xinfluence.backends.torch import TorchGradientProvider

    net = mlp(n_in=4, hidden=5, n_out=3, seed=1)
    gp = TorchGradientProvider(net, torch.nn.functional.cross_entropy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(29, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (29,), generator=g)
    batches = [(x[:11], y[:11]), (x[11:], y[11:])]
    model = {
        "projected_kronecker": lambda: xi.ProjectedInfluence(
            gp, k=(3, 4), projection="kronecker", regularization=1e-3, block_structure="layer"
        ),
        "projected_dense": lambda: xi.ProjectedInfluence(gp, k=20, regularization=1e-3),
        "ekfac": lambda: xi.EkfacInfluence(gp, regularization=1e-3),
        "arnoldi_woodbury": lambda: xi.ArnoldiInfluence(
            gp, regularization=1e-2, rank=6, use_woodbury=True, second_order="empirical_fisher"
        ),
    }[name]().fit(batches)
    store = GradientStore.build(model, batches, tmp_path / "s", block_rows=8, progress=False)
    expected = model.influences(x[:7], y[:7], x, y)
    got = store.influences(model, x[:7], y[:7])
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    assert rel_err(got, expected) < 1e-10
    # one triangular solve per row (torch's right-hand solve) for the dense inverses
    np.testing.assert_allclose(
        store.self_influence(), to_numpy(self_influence(model, x, y)), rtol=1e-10, atol=1e-14
    )


class _TokenNet:
    """A dense layer over a token axis, mean-pooled, then a dense head."""

    @staticmethod
    def make(torch, dtype):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Linear(4, 6)
                self.head = torch.nn.Linear(6, 3)

            def forward(self, x):  # (N, T, 4)
                return self.head(torch.tanh(self.embed(x)).mean(dim=1))

        torch.manual_seed(2)
        return Net().to(dtype)


@pytest.mark.parametrize("net_kind", ["mlp", "tokens", "conv"])
def test_ekfac_features_from_layer_factors(net_kind):
    """EK-FAC's stored features ``Q_S^T G Q_A`` from the layers' ``a`` and ``s`` equal
    the rotation of the flat per-sample gradients (the dense reference), also over a
    token axis and a convolution's positions; in float64 and float32."""
    torch = pytest.importorskip("torch")
    from torch_helpers import mlp
    from xinfluence.backends.torch import TorchGradientProvider
    from xinfluence.compute._factor import _ekfac_from_grads, factorize

    g = torch.Generator().manual_seed(0)
    if net_kind == "mlp":
        net = mlp(n_in=4, hidden=5, n_out=3, seed=1)
        x = torch.randn(23, 4, generator=g, dtype=torch.float64)
    elif net_kind == "tokens":
        net = _TokenNet.make(torch, torch.float64)
        x = torch.randn(23, 5, 4, generator=g, dtype=torch.float64)
    else:  # a convolution: a and s at the output positions
        torch.manual_seed(3)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(2, 3, 3, padding=1),
            torch.nn.Tanh(),
            torch.nn.Flatten(),
            torch.nn.Linear(3 * 4 * 4, 3),
        ).double()
        x = torch.randn(23, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    batches = [(x[:9], y[:9]), (x[9:], y[9:])]
    feats = {}
    for dtype in (torch.float64, torch.float32):
        net_d = net.to(dtype)
        gp = TorchGradientProvider(net_d, torch.nn.functional.cross_entropy)
        model = xi.EkfacInfluence(gp, regularization=1e-3).fit(
            [(a.to(dtype), b) for a, b in batches]
        )
        factors = factorize(model)
        assert all(not f.grads for f in factors)  # no per-sample gradients formed
        batch = xi.Batch(x.to(dtype), y)
        ops = model._fitted_mapper().composable_block_dict
        got = torch.cat([f.features(batch) for f in factors], dim=1)
        ref = torch.cat(
            [
                _ekfac_from_grads(f.name, ops[f.name].op, ops[f.name].gp).features(batch)
                for f in factors
            ],
            dim=1,
        )
        assert got.dtype == dtype and got.shape == ref.shape
        feats[dtype] = (got, ref)
    got, ref = feats[torch.float64]
    assert rel_err(got, ref) < 1e-10
    # float32 against its own fit's reference (eigenvectors may flip sign between dtypes)
    got32, ref32 = feats[torch.float32]
    assert rel_err(got32.double(), ref32.double()) < 1e-5


def test_kronecker_blocks_sized_from_activations_and_stored_uncompressed(tmp_path):
    """Default blocks: a Kronecker projection never forms ``(N, P)`` gradients, so its
    blocks are sized from the activations, several times larger than a dense
    projection's (which does) under the same budget; the values are stored without
    compression (random features do not compress). float32 scores and
    self-influences against the model's own."""
    torch = pytest.importorskip("torch")
    from torch_helpers import mlp
    from xinfluence.backends.torch import TorchGradientProvider

    net = mlp(n_in=50, hidden=200, n_out=3, seed=1).float()
    gp = TorchGradientProvider(net, torch.nn.functional.cross_entropy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(61, 50, generator=g)
    y = torch.randint(0, 3, (61,), generator=g)
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]
    kron = xi.ProjectedInfluence(
        gp, k=(3, 4), projection="kronecker", regularization=1e-3, block_structure="layer"
    ).fit(batches)
    dense = xi.ProjectedInfluence(gp, k=24, regularization=1e-3).fit(batches)
    with xi.memory_budget_scope(2**20):
        s_kron = GradientStore.build(kron, batches, tmp_path / "k", progress=False)
        s_dense = GradientStore.build(dense, batches, tmp_path / "d", progress=False)
    assert s_kron.block_rows >= 5 * s_dense.block_rows, (s_kron.block_rows, s_dense.block_rows)
    assert not s_kron.array.compressors and not s_dense.array.compressors
    for model, store in ((kron, s_kron), (dense, s_dense)):
        got = store.influences(model, x[:7], y[:7])
        assert got.dtype == torch.float32
        assert rel_err(got, model.influences(x[:7], y[:7], x, y)) < 1e-5
        ref = to_numpy(self_influence(model, x, y))
        assert rel_err(store.self_influence(), ref) < 1e-5


def test_options_that_change_the_store_are_fingerprinted(tmp_path):
    """lambda (given anew or by with_regularization) and the options that change
    B g_j or M, also when given as numpy scalars, refuse the store by name: at a
    rebuild (before any pass) and at scoring. (A numpy integer option such as
    krylov_dimension=np.int64(12) used to be left out of the fingerprint, and its
    change went unnoticed or was blamed on the first training point.)"""
    import array_api_compat.numpy as np_xp

    gp, xs, ys, batches = _problem(lambda a: np_xp.asarray(a))
    base = dict(
        regularization=1e-3,
        rank=np.int64(3),
        krylov_dimension=np.int64(12),
        tol=np.float32(1e-6),
        on_failure="ignore",
    )
    model = xi.ArnoldiInfluence(gp, **base).fit(batches)
    path = tmp_path / "s"
    store = GradientStore.build(model, batches, path, block_rows=ROWS, progress=False)
    for name, value in (
        ("regularization", 2e-3),
        ("krylov_dimension", np.int64(14)),
        ("tol", np.float32(1e-4)),
        ("seed", np.int64(7)),
    ):
        other = xi.ArnoldiInfluence(gp, **{**base, name: value}).fit(batches)
        with pytest.raises(StoreMismatchError, match=rf"\b{name}: store "):
            GradientStore.build(other, batches, path, block_rows=ROWS, progress=False)
        with pytest.raises(StoreMismatchError, match=rf"\b{name}: store "):
            store.influences(other, xs[:2], ys[:2])
    # the same numpy options again: the finished store is reused as it is
    same = xi.ArnoldiInfluence(gp, **base).fit(batches)
    done = []
    GradientStore.build(same, batches, path, block_rows=ROWS, progress=False, on_block=done.append)
    assert done == []
    # a changed damping on the fitted model itself
    model.with_regularization(1e-2)
    with pytest.raises(StoreMismatchError, match="regularization"):
        GradientStore.build(model, batches, path, block_rows=ROWS, progress=False)
    with pytest.raises(StoreMismatchError, match="regularization"):
        store.influences(model, xs[:2], ys[:2])


def test_projection_and_ekfac_options_are_fingerprinted(tmp_path):
    """Seed, k, distribution of a projection and EK-FAC's diagonal update change B g_j
    or M: a store built with other values is refused by name before any pass."""
    import array_api_compat.numpy as np_xp

    gp, xs, ys, batches = _problem(lambda a: np_xp.asarray(a))
    cases = [
        (
            dict(k=9, seed=1, regularization=1e-3),
            {"seed": dict(seed=np.int64(2)), "k": dict(k=np.int64(8))},
            xi.ProjectedInfluence,
        ),
        (
            dict(regularization=1e-3, second_order="empirical_fisher"),
            {"update_diagonal": dict(update_diagonal=False)},
            xi.EkfacInfluence,
        ),
    ]
    for i, (base, variants, cls) in enumerate(cases):
        path = tmp_path / f"s{i}"
        model = cls(gp, **base).fit(batches)
        GradientStore.build(model, batches, path, block_rows=ROWS, progress=False)
        for name, change in variants.items():
            other = cls(gp, **{**base, **change}).fit(batches)
            with pytest.raises(StoreMismatchError, match=name):
                GradientStore.build(other, batches, path, block_rows=ROWS, progress=False)


@pytest.mark.parametrize(
    "name", ["direct_blocks", "projected_dense", "projected_kronecker", "ekfac"]
)
def test_a_saved_model_scores_without_the_training_data(xp, to_xp, tmp_path, name):
    """save_model=True: the store keeps the fitted model; loaded for the same
    provider it scores bit for bit as the model that built the store."""
    gp, xs, ys, batches = _problem(to_xp)
    model = MODELS[name](gp).fit(batches)
    path = tmp_path / "s"
    GradientStore.build(model, batches, path, block_rows=ROWS, progress=False, save_model=True)
    store = GradientStore.open(path)
    assert store.has_model
    loaded = store.model(gp)
    assert type(loaded) is type(model) and loaded is not model
    xt, yt = xs[:N_TEST, ...], ys[:N_TEST, ...]
    expected = store.influences(model, xt, yt)
    assert np.array_equal(to_numpy(store.influences(loaded, xt, yt)), to_numpy(expected))
    assert rel_err(expected, model.influences(xt, yt, xs, ys)) < 1e-10


def test_a_saved_model_is_verified(tmp_path):
    import hashlib

    import zarr

    from xinfluence.compute import NoSavedModelError

    model, xs, ys, batches = _fitted()
    gp = model.gradient_provider
    path = tmp_path / "s"
    GradientStore.build(model, batches, path, block_rows=ROWS, progress=False)
    with pytest.raises(NoSavedModelError, match="keeps no fitted model"):
        GradientStore.open(path).model(gp)
    # a rerun with save_model adds it to the finished store
    GradientStore.build(model, batches, path, block_rows=ROWS, progress=False, save_model=True)
    GradientStore.open(path).model(gp)
    group = zarr.open_group(str(path), mode="a")
    raw = np.asarray(group["model"][...])
    record = dict(group.attrs["xinfluence_model"])
    flipped = raw.copy()
    flipped[len(raw) // 2] ^= 1
    group["model"][...] = flipped
    with pytest.raises(xi.CorruptFileError, match="differs from the SHA-256 recorded"):
        GradientStore.open(path).model(gp)
    # the record edited to match: the digests inside the file name the damage
    group.attrs["xinfluence_model"] = {**record, "sha256": hashlib.sha256(flipped).hexdigest()}
    with pytest.raises(xi.CorruptFileError, match=r"s/model"):
        GradientStore.open(path).model(gp)
    group.attrs["xinfluence_model"] = record
    group["model"][...] = raw
    GradientStore.open(path).model(gp)
    del group["model"]
    with pytest.raises(xi.CorruptFileError, match="saved model is missing"):
        GradientStore.open(path).model(gp)
    # a provider of other parameter values
    GradientStore.build(model, batches, path, block_rows=ROWS, progress=False, save_model=True)
    other, *_ = _fitted(seed=4)
    with pytest.raises(StoreMismatchError, match="score with the model that built it"):
        GradientStore.open(path).model(other.gradient_provider)


@pytest.mark.parametrize("name", ["projected_kronecker", "ekfac"])
def test_a_saved_float32_model(tmp_path, name):
    """float32 models keep their dtype through the store's saved model."""
    x, y, w, b = softmax_problem(np.random.default_rng(3))
    f32 = [a.astype(np.float32) for a in (x, w, b)]
    gp = SoftmaxRegressionGradients(f32[1], f32[2])
    batches = [(f32[0][:13], y[:13]), (f32[0][13:], y[13:])]
    model = MODELS[name](gp).fit(batches)
    path = tmp_path / "s"
    GradientStore.build(model, batches, path, block_rows=ROWS, progress=False, save_model=True)
    store = GradientStore.open(path)
    assert store.dtype == np.float32
    loaded = store.model(gp)
    got = store.influences(loaded, f32[0][:N_TEST], y[:N_TEST])
    assert got.dtype == np.float32
    assert np.array_equal(got, store.influences(model, f32[0][:N_TEST], y[:N_TEST]))
    assert rel_err(got, model.influences(f32[0][:N_TEST], y[:N_TEST], f32[0], y)) < 1e-5
