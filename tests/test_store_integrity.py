"""Calculator stores: overwrite refuses what xinfluence did not write, damaged
blocks are recomputed on resume and named on reading, one writer at a time,
resume feedback, mismatches named by field (numpy backend: the store logic does
not depend on the namespace)."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xinfluence as xi
from compute_helpers import resume_problem
from xinfluence.compute import (
    SequentialInfluenceCalculator,
    StoreDamagedError,
    StoreLockedError,
    StoreMismatchError,
    open_influences,
)

BACKEND = os.environ.get("XINFLUENCE_BACKEND", "numpy")
numpy_only = pytest.mark.skipif(BACKEND != "numpy", reason="numpy backend only")
pytest.importorskip("zarr")

N_BLOCKS = 24  # 3 test chunks of 4 x 8 training chunks of 5


def _calc(model=None, progress=False):
    if model is None:
        model = resume_problem()[0]
    return SequentialInfluenceCalculator(
        model, progress=progress, test_chunk_size=4, train_chunk_size=5
    )


@pytest.fixture(scope="module")
def problem():
    return resume_problem()


@pytest.fixture
def written(problem, tmp_path):
    """A finished store and its values."""
    model, test, batches = problem
    path = tmp_path / "store"
    z = _calc(model).influences(test, batches).to_zarr(str(path))
    return path, np.asarray(z[...])


def _user_files(directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "notes.txt").write_text("mine")
    (directory / "data").mkdir()
    (directory / "data" / "table.csv").write_text("1,2\n")
    return {"notes.txt": "mine", "data/table.csv": "1,2\n"}


def _survive(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (directory / name).read_text() == text


# -- overwrite ---------------------------------------------------------------------
@numpy_only
def test_overwrite_refuses_a_directory_of_user_files(problem, tmp_path):
    model, test, batches = problem
    target = tmp_path / "mine"
    files = _user_files(target)
    with pytest.raises(StoreMismatchError, match="refusing to overwrite") as exc:
        _calc(model).influences(test, batches).to_zarr(str(target), overwrite=True)
    assert str(target) in str(exc.value) and "notes.txt" in str(exc.value)
    _survive(target, files)
    assert sorted(os.listdir(target)) == ["data", "notes.txt"]  # no lock left behind

    # a zarr group that xinfluence did not write is refused too
    import zarr

    other = zarr.open_group(str(tmp_path / "zarr"), mode="w")
    other.create_array("theirs", data=np.arange(3.0))
    with pytest.raises(StoreMismatchError, match="without xinfluence's fingerprint"):
        _calc(model).influences(test, batches).to_zarr(str(tmp_path / "zarr"), overwrite=True)
    np.testing.assert_array_equal(
        zarr.open_group(str(tmp_path / "zarr"), mode="r")["theirs"][...], np.arange(3.0)
    )

    # an empty directory and an xinfluence store may be overwritten
    (tmp_path / "empty").mkdir()
    z = _calc(model).influences(test, batches).to_zarr(str(tmp_path / "empty"), overwrite=True)
    z2 = _calc(model).influences(test, batches).to_zarr(str(tmp_path / "empty"), overwrite=True)
    np.testing.assert_array_equal(np.asarray(z[...]), np.asarray(z2[...]))


# -- damage ------------------------------------------------------------------------
def _chunk_file(path: Path, i: int, j: int) -> Path:
    found = path / "values" / "c" / str(i) / str(j)
    assert found.is_file(), sorted(str(p) for p in (path / "values").rglob("*"))
    return found


def _damage(chunk: Path, kind: str) -> None:
    raw = bytearray(chunk.read_bytes())
    if kind == "deleted":
        chunk.unlink()
    elif kind == "flipped":
        raw[len(raw) // 2] ^= 0x01
        chunk.write_bytes(bytes(raw))
    else:
        chunk.write_bytes(np.random.default_rng(0).bytes(len(raw)))


@numpy_only
@pytest.mark.parametrize("kind", ["deleted", "flipped", "random"])
def test_a_damaged_block_is_named_on_reading_and_recomputed_on_resume(problem, written, kind):
    model, test, batches = problem
    path, values = written
    _damage(_chunk_file(path, 1, 2), kind)

    stored = open_influences(str(path))
    np.testing.assert_array_equal(stored[:4], values[:4])  # other blocks read fine
    with pytest.raises(StoreDamagedError, match=r"block \(1, 2\)"):
        stored[...]
    with pytest.raises(StoreDamagedError, match=r"block \(1, 2\)"):
        stored[5, 11]
    with pytest.raises(StoreDamagedError, match=r"1 damaged"):
        stored.verify()

    computed = []
    lazy = _calc(model).influences(test, batches)
    with pytest.warns(UserWarning, match=r"damaged and are recomputed \(block \(1, 2\)"):
        z = lazy.to_zarr(str(path), on_block=lambda i, j: computed.append((i, j)))
    assert computed == [(1, 2)] and lazy.blocks_resumed == N_BLOCKS - 1
    np.testing.assert_array_equal(np.asarray(z[...]), values)
    open_influences(str(path)).verify()


@numpy_only
def test_an_unfinished_block_is_not_read_as_nan(problem, tmp_path):
    model, test, batches = problem
    path = tmp_path / "partial"

    class Stop(Exception):
        pass

    def stop(i, j):
        if (i, j) == (0, 3):
            raise Stop

    with pytest.raises(Stop):
        _calc(model).influences(test, batches).to_zarr(str(path), on_block=stop)
    with pytest.raises(StoreDamagedError, match=r"unfinished \(4 blocks done"):
        open_influences(str(path))
    # a block whose record is gone is never read
    _calc(model).influences(test, batches).to_zarr(str(path))
    import zarr

    del zarr.open_group(str(path), mode="a")["done"]["2.5"]
    with pytest.raises(StoreDamagedError, match=r"block \(2, 5\): not finished"):
        open_influences(str(path))[8:, 20:]


# -- one writer --------------------------------------------------------------------
@numpy_only
def test_a_second_writer_is_refused_by_the_lock(problem, tmp_path):
    model, test, batches = problem
    path = tmp_path / "locked"
    errors = []

    def second_writer(i, j):
        if (i, j) == (0, 1):
            try:
                _calc(model).influences(test, batches).to_zarr(str(path))
            except StoreLockedError as exc:
                errors.append(str(exc))

    _calc(model).influences(test, batches).to_zarr(str(path), on_block=second_writer)
    assert len(errors) == 1
    assert f"pid {os.getpid()}" in errors[0] and "another run is writing" in errors[0]
    assert not (path / ".xinfluence-lock").exists()  # released at the end

    # a lock from a live process elsewhere is respected
    lock = path / ".xinfluence-lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "another-host"}))
    with pytest.raises(StoreLockedError, match="another-host"):
        _calc(model).influences(test, batches).to_zarr(str(path))
    # a lock left by a dead process on this host is taken over
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    lazy = _calc(model).influences(test, batches)
    lazy.to_zarr(str(path))
    assert lazy.blocks_computed == 0 and not lock.exists()


# -- resume feedback, mismatch messages ----------------------------------------------
@numpy_only
def test_resume_says_how_much_is_done_and_starts_the_bar_there(problem, tmp_path, capsys):
    pytest.importorskip("tqdm")
    model, test, batches = problem
    path = tmp_path / "resume"

    class Stop(Exception):
        pass

    def stop(i, j):
        if (i, j) == (0, 6):
            raise Stop

    with pytest.raises(Stop):
        _calc(model).influences(test, batches).to_zarr(str(path), on_block=stop)
    capsys.readouterr()
    lazy = _calc(model, progress=True).influences(test, batches)
    lazy.to_zarr(str(path))
    err = capsys.readouterr().err
    assert "resuming: 7 of 24 blocks done" in err
    assert " 7/24 [" in err and " 0/24 [" not in err
    assert lazy.blocks_resumed == 7 and lazy.blocks_computed == 17

    again = _calc(model, progress=True).influences(test, batches)
    again.to_zarr(str(path))
    err = capsys.readouterr().err
    assert "nothing to compute: all 24 blocks" in err and again.blocks_computed == 0


@numpy_only
def test_mismatch_names_only_the_differing_fields(problem, written):
    _, test, batches = problem
    path, _ = written
    gp = resume_problem()[0].gradient_provider
    other = xi.DirectInfluence(gp, regularization=1e-2, block_structure="parameter").fit(batches)
    with pytest.raises(StoreMismatchError) as exc:
        _calc(other).influences(test, batches).to_zarr(str(path))
    message = str(exc.value)
    assert "regularization: store 0.001, now 0.01" in message
    assert "block_structure" not in message and "DirectInfluence" not in message
    assert len(message) < 200, message


# -- dask and jax ------------------------------------------------------------------
@pytest.mark.skipif(BACKEND != "jax", reason="jax backend only")
def test_a_float64_jax_model_turns_on_x64_where_it_is_unpickled():
    import jax
    import jax.numpy as jnp

    from xinfluence.backends.jax import JaxGradientProvider
    from xinfluence.compute.dask import _shipped, _unwrap

    prior = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)  # as the user did in the client
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(9, 3)))
    y = jnp.asarray(rng.normal(size=(9, 1)))
    params = {"w": jnp.asarray(rng.normal(size=(3, 1)))}
    gp = JaxGradientProvider(_apply, params, _mse)
    model = xi.DirectInfluence(gp, regularization=1e-3).fit((x, y))
    blob = pickle.dumps(_shipped(model))
    # a dask worker process starts without x64
    jax.config.update("jax_enable_x64", False)
    try:
        loaded = _unwrap(pickle.loads(blob))
        assert jax.config.jax_enable_x64
    finally:
        jax.config.update("jax_enable_x64", True)
    loaded_dtype = loaded.gradient_provider.dtype
    try:
        np.testing.assert_allclose(
            np.asarray(loaded.influences(x, y)), np.asarray(model.influences(x, y)), rtol=1e-12
        )
    finally:
        jax.config.update("jax_enable_x64", prior)
    assert loaded_dtype == jnp.float64


def _apply(params, x):
    return x @ params["w"]


def _mse(out, target):
    import jax.numpy as jnp

    return jnp.mean((out - target) ** 2)
