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


def _oracle(regularization):
    import xinfluence as xi

    ns: dict = {}
    exec(RECIPE, ns)
    gp, _, _ = ns["build"]()
    x, y = ns["x"], ns["y"]
    model = xi.DirectInfluence(gp, regularization=regularization).fit((x, y))
    return model.influences(x[:6], y[:6], x, y)


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
