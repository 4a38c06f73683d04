"""``xinfluence featurize`` and ``xinfluence score``: a gradient store from the command line."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest

from xinfluence.cli import main

BACKEND = os.environ.get("XINFLUENCE_BACKEND", "numpy")
pytestmark = pytest.mark.skipif(BACKEND != "numpy", reason="runs in the numpy session")

RECIPE = textwrap.dedent(
    """
    import numpy as np
    from xinfluence.backends.numpy import LogisticRegressionGradients

    rng = np.random.default_rng(1)
    x = rng.normal(size=(43, 4))
    y = (x @ np.array([1.0, -1.5, 0.5, 0.0]) + 0.5 * rng.normal(size=43) > 0).astype(float)
    y = y[:, None]
    w = np.array([[0.9, -1.2, 0.4, 0.1]])
    b = np.array([0.05])

    def build():
        gp = LogisticRegressionGradients(w, b)
        train = [(x[i : i + 13], y[i : i + 13]) for i in range(0, 43, 13)]  # uneven chunks
        return gp, train, (x[:6], y[:6])
    """
)


@pytest.fixture
def recipe(tmp_path):
    pytest.importorskip("zarr")
    path = tmp_path / "recipe.py"
    path.write_text(RECIPE)
    return path


def _oracle(regularization, cls="DirectInfluence", **options):
    import xinfluence as xi

    ns: dict = {}
    exec(RECIPE, ns)
    gp, _, _ = ns["build"]()
    x, y = ns["x"], ns["y"]
    model = getattr(xi, cls)(gp, regularization=regularization, **options).fit((x, y))
    return model.influences(x[:6], y[:6], x, y)


def _top(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _check_top(path, ref, k, rtol=1e-10):
    """The top-k written to ``path`` against the full influence matrix ``ref``."""
    got = _top(path)
    helpful = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    harmful = np.argsort(ref, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got["helpful_indices"], helpful)
    np.testing.assert_array_equal(got["harmful_indices"], harmful)
    for name, idx in (("helpful_scores", helpful), ("harmful_scores", harmful)):
        want = np.take_along_axis(ref, idx, 1)
        np.testing.assert_allclose(got[name], want, rtol=rtol, atol=rtol * np.abs(ref).max())


# training data that raises when read: score must not touch it
UNTOUCHABLE = """

class Untouchable:
    def __iter__(self):
        raise AssertionError("score read the training data")

    def __len__(self):
        raise AssertionError("score read the training data")

    def __getitem__(self, i):
        raise AssertionError("score read the training data")


def queries():
    gp, _, test = build()
    return gp, Untouchable(), test


def queries_only():
    gp, _, test = build()
    return gp, test
"""


def test_featurize_then_score_matches_the_model(recipe, tmp_path, capsys):
    store, out = tmp_path / "store.zarr", tmp_path / "top.npz"
    featurize = ["featurize", f"{recipe}:build", "--regularization", "1e-3"]
    featurize += ["--block-rows", "10", "--out", str(store), "--no-progress"]
    assert main(featurize) == 0
    assert "5 blocks" in capsys.readouterr().out
    args = ["score", str(store), f"{recipe}:build", "--top-k", "5", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "query 5: helpful" in printed
    ref = _oracle(1e-3)
    with np.load(out, allow_pickle=False) as f:
        got = {k: f[k] for k in f.files}
    helpful = np.argsort(-ref, axis=1, kind="stable")[:, :5]
    harmful = np.argsort(ref, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(got["helpful_indices"], helpful)
    np.testing.assert_array_equal(got["harmful_indices"], harmful)
    for name, idx in (("helpful_scores", helpful), ("harmful_scores", harmful)):
        want = np.take_along_axis(ref, idx, 1)
        np.testing.assert_allclose(got[name], want, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    first = f"  query 0: helpful {helpful[0, 0]}: {ref[0, helpful[0, 0]]:+.6g}"
    assert first in printed

    # a rerun resumes: every block is done, nothing is computed
    assert main(featurize) == 0
    assert "nothing to compute: all 5 blocks were done" in capsys.readouterr().out


def test_score_refuses_another_model(recipe, tmp_path, capsys):
    store = tmp_path / "store.zarr"
    featurize = ["featurize", f"{recipe}:build", "--regularization", "1e-3"]
    assert main([*featurize, "--out", str(store), "--no-progress"]) == 0
    capsys.readouterr()
    # the store keeps the method and options; another regularization is refused
    args = ["score", str(store), f"{recipe}:build", "--regularization", "1e-1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "built by another model" in err and "regularization" in err
    # a recipe whose model has other parameters: its features of the first point differ
    other = tmp_path / "other.py"
    other.write_text(RECIPE.replace("[[0.9, -1.2, 0.4, 0.1]]", "[[0.8, -1.2, 0.4, 0.1]]"))
    assert main(["score", str(store), f"{other}:build"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "score with the model that built it" in err
    # another method on the same store: refused before any I/O of the features
    assert main(["featurize", f"{recipe}:build", "--method", "identity", "--out", str(store)]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_help(capsys):
    for args in (["featurize"], ["score"]):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--help"])
        assert exc.value.code == 0
        assert "usage: xinfluence" in capsys.readouterr().out


def test_featurize_and_score_on_a_dask_scheduler(recipe, tmp_path, capsys):
    """--scheduler: the store of a sequential featurize (a run without it resumes on
    the scheduler, one block computed), and the same top-k."""
    distributed = pytest.importorskip("distributed")
    arrays = tmp_path / "arrays.py"
    arrays.write_text(RECIPE.replace("return gp, train,", "return gp, (x, y),"))
    store, seq_top, dask_top = tmp_path / "s.zarr", tmp_path / "a.npz", tmp_path / "b.npz"
    featurize = ["featurize", f"{arrays}:build", "--regularization", "1e-3", "--no-progress"]
    featurize += ["--out", str(store), "--block-rows", "10"]
    assert main(featurize) == 0
    score = ["score", str(store), f"{arrays}:build", "--top-k", "4"]
    assert main([*score, "--out", str(seq_top)]) == 0
    (store / "done" / "2.0" / "zarr.json").unlink()
    (store / "done" / "2.0").rmdir()
    capsys.readouterr()
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        where = ["--scheduler", cluster.scheduler_address]
        assert main([*featurize, *where]) == 0
        assert "resumed: 4 blocks were done, 1 computed" in capsys.readouterr().out
        assert main([*score, *where, "--out", str(dask_top)]) == 0
        # partitions (the recipe's list of 13-sample chunks) must be of --block-rows
        other = ["featurize", f"{recipe}:build", "--out", str(tmp_path / "p.zarr"), *where]
        assert main([*other, "--block-rows", "10", "--no-progress"]) == 1
        assert "block_rows = 10" in capsys.readouterr().err
    with np.load(seq_top) as a, np.load(dask_top) as b:
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


def test_score_loads_the_kept_model_and_reads_no_training_data(recipe, tmp_path, capsys):
    """featurize keeps the fitted model in the store; score loads it for the recipe's
    provider: the same numbers as refitting (1e-12), with training data that raises
    when read, or none at all."""
    recipe.write_text(RECIPE + UNTOUCHABLE)
    store = tmp_path / "store.zarr"
    featurize = ["featurize", f"{recipe}:build", "--method", "ekfac", "--regularization", "1e-3"]
    assert main([*featurize, "--block-rows", "10", "--out", str(store), "--no-progress"]) == 0
    assert "and the fitted model" in capsys.readouterr().out
    tops = {}
    for name in ("queries", "queries_only"):
        tops[name] = tmp_path / f"{name}.npz"
        args = ["score", str(store), f"{recipe}:{name}", "--top-k", "4", "--out", str(tops[name])]
        assert main(args) == 0, capsys.readouterr().err
        printed = capsys.readouterr().out
        assert "EkfacInfluence loaded from the store" in printed and "fitting" not in printed
    # the recipe's options, given again, are checked without a fit
    args = ["score", str(store), f"{recipe}:queries", "--method", "ekfac"]
    assert main([*args, "--regularization", "1e-3"]) == 0
    assert main([*args, "--regularization", "1e-2"]) == 1
    assert "built by another model" in capsys.readouterr().err
    refit = tmp_path / "refit.npz"
    args = ["score", str(store), f"{recipe}:build", "--top-k", "4", "--refit", "--out", str(refit)]
    assert main(args) == 0
    assert "fitting EkfacInfluence" in capsys.readouterr().out
    # --refit reads the training data (here: the untouchable kind, which raises)
    assert main(["score", str(store), f"{recipe}:queries", "--refit"]) == 1
    assert "score read the training data" in capsys.readouterr().err
    want = _top(refit)
    for path in tops.values():
        got = _top(path)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=0)
    _check_top(refit, _oracle(1e-3, "EkfacInfluence"), 4)


def test_a_damaged_or_missing_kept_model(recipe, tmp_path, capsys):
    import zarr

    store = tmp_path / "store.zarr"
    args = ["featurize", f"{recipe}:build", "--regularization", "1e-3", "--no-progress"]
    assert main([*args, "--out", str(store)]) == 0
    score = ["score", str(store), f"{recipe}:build", "--top-k", "3"]
    group = zarr.open_group(str(store), mode="a")
    raw = np.asarray(group["model"][...])
    damaged = raw.copy()
    damaged[-100] ^= 0xFF
    group["model"][...] = damaged
    capsys.readouterr()
    assert main(score) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{store}/model" in err and "differs from the SHA-256" in err
    assert "Rerun xinfluence featurize" in err
    # rerunning featurize (nothing to compute) keeps the model again
    assert main([*args, "--out", str(store)]) == 0
    capsys.readouterr()
    first = tmp_path / "a.npz"
    assert main([*score, "--out", str(first)]) == 0
    # a store written before featurize kept the model: refitted, with a warning
    del group.attrs["xinfluence_model"]
    del group["model"]
    again = tmp_path / "b.npz"
    with pytest.warns(UserWarning, match="keeps no fitted model .* refitting"):
        assert main([*score, "--out", str(again)]) == 0
    assert "fitting DirectInfluence" in capsys.readouterr().out
    a, b = _top(first), _top(again)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-12, atol=0)
    # featurize with the same arguments keeps the model of such a store
    assert main([*args, "--out", str(store)]) == 0
    assert "nothing to compute" in capsys.readouterr().out
    assert main(score) == 0
    assert "DirectInfluence loaded from the store" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options",
    [{"k": 3}, {"k": (1, 3), "projection": "kronecker", "regularization_space": "parameter"}],
)
def test_projected_featurize_and_score(recipe, tmp_path, capsys, options):
    store, out = tmp_path / "store.zarr", tmp_path / "top.npz"
    given = [f"-o{k}={v}".replace(" ", "") for k, v in options.items()]
    featurize = ["featurize", f"{recipe}:build", "--method", "projected", *given]
    featurize += ["--regularization", "1e-3", "--block-rows", "9", "--out", str(store)]
    assert main([*featurize, "--no-progress"]) == 0
    assert "wrote features (43, 3)" in capsys.readouterr().out
    assert main(["score", str(store), f"{recipe}:build", "--top-k", "5", "--out", str(out)]) == 0
    assert "ProjectedInfluence loaded from the store" in capsys.readouterr().out
    _check_top(out, _oracle(1e-3, "ProjectedInfluence", **options), 5)
