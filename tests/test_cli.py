"""The ``xinfluence`` command: demo, compute, report, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from xinfluence.cli import main

BACKEND = os.environ.get("XINFLUENCE_BACKEND", "numpy")
numpy_session = pytest.mark.skipif(BACKEND != "numpy", reason="runs in the numpy session")


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xinfluence", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


@numpy_session
def test_help_on_every_subcommand(capsys):
    for args in ([], ["demo"], ["compute"], ["report"]):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--help"])
        assert exc.value.code == 0
        assert "usage: xinfluence" in capsys.readouterr().out
    assert main([]) == 2  # no subcommand: the help, and a usage status


@numpy_session
def test_python_m_and_import_keeps_cli_out():
    assert "demo" in _run("--help").stdout
    code = (
        "import sys, xinfluence; "
        "mods = ('xinfluence.cli', 'matplotlib', 'sklearn', 'zarr'); "
        "print([m for m in mods if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@numpy_session
def test_average_precision_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    from xinfluence.cli._demo import average_precision, detection_curve, recall_at

    rng = np.random.default_rng(0)
    flipped = rng.random(300) < 0.1
    scores = rng.normal(size=300) + 2.0 * flipped  # no ties
    assert average_precision(scores, flipped) == pytest.approx(
        metrics.average_precision_score(flipped, scores), rel=1e-12
    )
    precision, recall = detection_curve(scores, flipped)
    order = np.argsort(-scores)
    assert precision[29] == pytest.approx(flipped[order[:30]].mean())
    assert recall_at(scores, flipped, 0.1) == pytest.approx(
        flipped[order[:30]].sum() / flipped.sum()
    )


@numpy_session
def test_demo_numpy_writes_report(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "accuracy.png",
        "index.html",
        "mislabel.png",
        "self_influence.png",
        *[f"test_{k}.png" for k in range(6)],
    ]
    page = (out / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # no network assets
    assert "<script" not in page
    for name in files:
        if name.endswith(".png"):
            assert f"src='{name}'" in page
    # CG against the exact solve, as printed: tight, since CG runs to rtol 1e-8
    line = next(s for s in printed.splitlines() if "vs exact influences" in s)
    assert float(line.rsplit(" ", 1)[1]) < 1e-6
    # self-influence finds the flipped labels far better than chance (0.1)
    line = next(s for s in printed.splitlines() if "average precision" in s)
    ap = float(line.split("self-influence ")[1].split(",")[0])
    assert ap > 0.5
    assert "report: " in printed


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_demo_framework_backends(backend, tmp_path, capsys):
    if BACKEND != backend:
        pytest.skip(f"runs in the {backend} session")
    pytest.importorskip(backend)
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert main(["demo", "--backend", backend, "--method", "ekfac", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2410 parameters" in printed
    assert (out / "index.html").exists()


def test_demo_bad_input(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--method", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["demo", "--flip-fraction", "1.5", "--out", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flip-fraction" in err


RECIPE = textwrap.dedent(
    """
    import numpy as np
    from xinfluence.backends.numpy import LinearRegressionGradients

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    y = x @ np.array([[1.0], [-2.0], [0.5]]) + 0.1 * rng.normal(size=(50, 1))
    w = np.linalg.lstsq(x, y, rcond=None)[0].T

    def build():
        gp = LinearRegressionGradients(w)
        train = [(x[i : i + 15], y[i : i + 15]) for i in range(0, 50, 15)]  # uneven chunks
        return gp, train, (x[:7], y[:7])

    def wrong():
        return LinearRegressionGradients(w), (x, y)

    def not_a_provider():
        return "gp", (x, y), (x, y)
    """
)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.py"
    path.write_text(RECIPE)
    return path


@numpy_session
def test_compute_and_report(recipe, tmp_path, capsys):
    pytest.importorskip("zarr")
    import zarr

    import xinfluence as xi

    store = tmp_path / "scores.zarr"
    args = ["compute", f"{recipe}:build", "--method", "direct", "--regularization", "1e-3"]
    args += ["--top-k", "4", "--out", str(store), "--no-progress", "--train-chunk-size", "20"]
    assert main(args) == 0
    group = zarr.open_group(str(store), mode="r")
    values = np.asarray(group["values"][...])
    # oracle: the in-memory model on the same data
    ns: dict = {}
    exec(RECIPE, ns)
    gp, _, _ = ns["build"]()
    x, y = ns["x"], ns["y"]
    ref = xi.DirectInfluence(gp, regularization=1e-3).fit((x, y)).influences(x[:7], y[:7], x, y)
    np.testing.assert_allclose(values, ref, rtol=1e-12, atol=0)
    helpful = np.asarray(group["top_k/helpful_indices"][...])
    harmful = np.asarray(group["top_k/harmful_indices"][...])
    np.testing.assert_array_equal(helpful, np.argsort(-ref, axis=1, kind="stable")[:, :4])
    np.testing.assert_array_equal(harmful, np.argsort(ref, axis=1, kind="stable")[:, :4])
    assert group.attrs["xinfluence_cli"]["options"] == {"regularization": 1e-3}

    # the same command again: every block is done, the result is unchanged
    assert main(args) == 0
    np.testing.assert_array_equal(np.asarray(group["values"][...]), values)
    # another method on the same store is refused in one line, then --overwrite works
    other = [a if a != "direct" else "cg" for a in args]
    capsys.readouterr()
    assert main(other) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "Traceback" not in err
    assert main([*other, "--overwrite", "-o", "rtol=1e-10"]) == 0

    plots = tmp_path / "plots"
    pytest.importorskip("matplotlib")
    assert main(["report", str(store), "--top-k", "2", "--rows", "3", "--plots", str(plots)]) == 0
    printed = capsys.readouterr().out
    assert "shape (7, 50)" in printed and "CgInfluence" in printed
    assert "test 2: helpful" in printed
    assert sorted(p.name for p in plots.iterdir()) == ["distribution.png", "matrix.png"]


@numpy_session
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compute", "missing.py:build", "--out", "s.zarr"], "recipe file not found"),
        (["compute", "{recipe}:nothing", "--out", "s.zarr"], "has no function 'nothing'"),
        (["compute", "{recipe}:wrong", "--out", "s.zarr"], "must return (gradient_provider"),
        (["compute", "{recipe}:not_a_provider", "--out", "s.zarr"], "not a gradient provider"),
        (["compute", "{recipe}", "--out", "s.zarr"], "expected RECIPE.py:function"),
        (["compute", "{recipe}:build", "-o", "rank=3", "--out", "s.zarr"], "unknown option"),
        (["compute", "{recipe}:build", "-o", "rtol", "--out", "s.zarr"], "KEY=VALUE"),
        (["report", "missing.zarr"], "store not found"),
    ],
)
def test_errors_are_one_line(recipe, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{recipe}", str(recipe)) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@numpy_session
def test_debug_shows_the_traceback(recipe, tmp_path):
    proc = _run("compute", f"{recipe}:wrong", "--out", str(tmp_path / "s.zarr"), "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CliError" in proc.stderr
    proc = _run("compute", f"{recipe}:wrong", "--out", str(tmp_path / "s.zarr"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


@numpy_session
def test_unknown_method_is_a_usage_error(recipe, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compute", f"{recipe}:build", "--method", "magic", "--out", "s.zarr"])
    assert exc.value.code == 2


@numpy_session
@pytest.mark.slow
def test_compute_on_a_dask_scheduler(tmp_path, capsys):
    pytest.importorskip("zarr")
    distributed = pytest.importorskip("distributed")
    import zarr

    import xinfluence as xi

    path = tmp_path / "arrays.py"
    path.write_text(
        RECIPE.replace("return gp, train, (x[:7], y[:7])", "return gp, (x, y), (x[:7], y[:7])")
    )
    store = tmp_path / "dask.zarr"
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        args = ["compute", f"{path}:build", "--method", "direct", "--regularization", "1e-3"]
        args += ["--scheduler", cluster.scheduler_address, "--train-chunk-size", "20"]
        assert main([*args, "--out", str(store), "--top-k", "2"]) == 0
        # iterables of batches cannot be distributed: one clear line
        (tmp_path / "chunks.py").write_text(RECIPE)
        bad = [a.replace(str(path), str(tmp_path / "chunks.py")) for a in args]
        capsys.readouterr()
        assert main([*bad, "--out", str(tmp_path / "x.zarr")]) == 1
        assert "(x, y) pair of arrays" in capsys.readouterr().err
    values = np.asarray(zarr.open_group(str(store), mode="r")["values"][...])
    ns: dict = {}
    exec(RECIPE, ns)
    x, y = ns["x"], ns["y"]
    gp = ns["build"]()[0]
    ref = xi.DirectInfluence(gp, regularization=1e-3).fit((x, y)).influences(x[:7], y[:7], x, y)
    np.testing.assert_allclose(values, ref, rtol=1e-12, atol=0)


@numpy_session
@pytest.mark.parametrize("dask", [False, True])
def test_overwrite_refuses_a_directory_of_user_files(recipe, tmp_path, capsys, dask):
    target = tmp_path / "results"
    target.mkdir()
    (target / "paper.tex").write_text("mine")
    (target / "figures").mkdir()
    (target / "figures" / "a.png").write_bytes(b"png")
    args = ["compute", f"{recipe}:build", "--method", "direct", "--regularization", "1e-3"]
    args += ["--out", str(target), "--overwrite", "--no-progress"]
    if dask:  # refused before anything connects to the scheduler
        args += ["--scheduler", "tcp://127.0.0.1:1"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "refusing to overwrite" in captured.err and str(target) in captured.err
    assert "paper.tex" in captured.err and captured.err.count("\n") == 1
    assert "fitting" not in captured.out  # before the fit
    assert (target / "paper.tex").read_text() == "mine"
    assert (target / "figures" / "a.png").read_bytes() == b"png"
    assert sorted(os.listdir(target)) == ["figures", "paper.tex"]


@numpy_session
def test_compute_resume_keeps_every_run_and_checks_options_before_the_fit(recipe, tmp_path, capsys):
    pytest.importorskip("zarr")
    import zarr

    store = tmp_path / "scores.zarr"
    args = ["compute", f"{recipe}:build", "--method", "direct", "--regularization", "1e-3"]
    args += ["--out", str(store), "--no-progress", "--train-chunk-size", "20"]
    args += ["--test-chunk-size", "4"]
    assert main(args) == 0  # 2 x 3 blocks
    first = dict(zarr.open_group(str(store), mode="r").attrs["xinfluence_cli"])
    assert len(first["runs"]) == 1 and first["runs"][0]["blocks_computed"] == 6
    values = np.asarray(zarr.open_group(str(store), mode="r")["values"][...])

    # a finished store: nothing to compute, the timings stay
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to compute: all 6 blocks" in capsys.readouterr().out
    assert dict(zarr.open_group(str(store), mode="r").attrs["xinfluence_cli"]) == first

    # a damaged block: recomputed, this run's timings added to the first's
    (store / "values" / "c" / "1" / "2").unlink()
    with pytest.warns(UserWarning, match=r"block \(1, 2\)"):
        assert main(args) == 0
    assert "resumed: 5 blocks were done, 1 computed" in capsys.readouterr().out
    group = zarr.open_group(str(store), mode="r")
    runs = group.attrs["xinfluence_cli"]["runs"]
    assert runs[0] == first["runs"][0] and len(runs) == 2 and runs[1]["blocks_computed"] == 1
    np.testing.assert_array_equal(np.asarray(group["values"][...]), values)

    # other options: refused before the fit, naming only what differs
    other = [a if a != "1e-3" else "1e-2" for a in args]
    assert main(other) == 1
    captured = capsys.readouterr()
    assert "fitting" not in captured.out
    assert "regularization: store 0.001, now 0.01" in captured.err
    assert len(captured.err) < 200 and "--overwrite" in captured.err

    # report names a damaged block instead of printing its numbers
    chunk = store / "values" / "c" / "0" / "1"
    chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))
    assert main(["report", str(store)]) == 1
    err = capsys.readouterr().err
    assert "block (0, 1)" in err and err.count("\n") == 1


@numpy_session
def test_compute_on_a_dask_scheduler_resumes(tmp_path, capsys):
    pytest.importorskip("zarr")
    distributed = pytest.importorskip("distributed")
    import zarr

    import xinfluence as xi

    path = tmp_path / "arrays.py"
    path.write_text(
        RECIPE.replace("return gp, train, (x[:7], y[:7])", "return gp, (x, y), (x[:7], y[:7])")
    )
    store = tmp_path / "dask.zarr"
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        args = ["compute", f"{path}:build", "--method", "direct", "--regularization", "1e-3"]
        args += ["--scheduler", cluster.scheduler_address, "--train-chunk-size", "20"]
        args += ["--test-chunk-size", "4", "--out", str(store)]
        assert main(args) == 0  # 2 x 3 blocks
        group = zarr.open_group(str(store), mode="r")
        assert sorted(group["done"].group_keys()) == [f"{i}.{j}" for i in (0, 1) for j in (0, 1, 2)]
        values = np.asarray(group["values"][...])
        (store / "values" / "c" / "0" / "1").unlink()
        capsys.readouterr()
        with pytest.warns(UserWarning, match=r"block \(0, 1\)"):
            assert main(args) == 0
        captured = capsys.readouterr()
        assert "resuming: 5 of 6 blocks done" in captured.err
        assert (
            " 5/6 [" in captured.err and "resumed: 5 blocks were done, 1 computed" in captured.out
        )
        assert main(args) == 0
        assert "nothing to compute: all 6 blocks" in capsys.readouterr().out
        runs = zarr.open_group(str(store), mode="r").attrs["xinfluence_cli"]["runs"]
        assert [r["blocks_computed"] for r in runs] == [6, 1]
        # the same store without the scheduler is another computation (other digests)
        assert main(args[:6] + args[8:]) == 1
        assert "runner: store 'dask', now None" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(store))["values"][...]), values)
    ns: dict = {}
    exec(RECIPE, ns)
    x, y = ns["x"], ns["y"]
    gp = ns["build"]()[0]
    ref = xi.DirectInfluence(gp, regularization=1e-3).fit((x, y)).influences(x[:7], y[:7], x, y)
    np.testing.assert_allclose(values, ref, rtol=1e-12, atol=0)
