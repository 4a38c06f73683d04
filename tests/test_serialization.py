"""Pickling, copying, and saving / loading fitted models.

Oracle: the model before the round trip. Every reload must reproduce its
influences bit for bit (same operations on the same numbers).
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import warnings

import numpy as np
import pytest

import xinfluence as xi
from xinfluence._xp import to_numpy
from xinfluence.backends.numpy import (
    FiniteDifferenceGradients,
    LinearRegressionGradients,
    LogisticRegressionGradients,
    SoftmaxRegressionGradients,
)


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


ROUND_TRIPS = {"pickle": _pickled, "deepcopy": copy.deepcopy}


def _same(a, b) -> bool:
    a, b = to_numpy(a), to_numpy(b)
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _softmax_problem(to_xp, n=37, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.integers(0, k, size=n)
    gp = SoftmaxRegressionGradients(to_xp(rng.normal(size=(k, d))), to_xp(rng.normal(size=k)))
    return gp, to_xp(x), to_xp(y)


def _batches(x, y, sizes=(13, 7, 17)):
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s, ...], y[start : start + s]))
        start += s
    return out


def _fd_loss(params, x, y):  # module level: picklable by name
    z = x @ params["w"][:, None] + params["b"]
    return (z[:, 0] - y) ** 2


MODELS = {
    "direct": lambda gp: xi.DirectInfluence(gp, regularization=1e-3),
    "direct-blocks": lambda gp: xi.DirectInfluence(
        gp, regularization={"weight": 1e-3, "bias": 1e-2}, block_structure="parameter"
    ),
    "cg": lambda gp: xi.CgInfluence(gp, regularization=1e-3, rtol=1e-10),
    "arnoldi": lambda gp: xi.ArnoldiInfluence(gp, regularization=1e-3, rank=5),
    "nystroem": lambda gp: xi.NystroemSketchInfluence(
        gp, regularization=1e-3, rank=5, second_order="empirical_fisher"
    ),
    "ekfac": lambda gp: xi.EkfacInfluence(gp, regularization=1e-3),
    "datainf": lambda gp: xi.InverseHarmonicMeanInfluence(gp, regularization=1e-2),
    "lissa": lambda gp: xi.LissaInfluence(gp, regularization=0.1, maxiter=50, rtol=1e-3),
    # the seeded map is drawn again on load, the projected curvature is read
    "projected": lambda gp: xi.ProjectedInfluence(
        gp, k=7, regularization=1e-3, seed=3, block_structure="parameter"
    ),
    "projected-parameter": lambda gp: xi.ProjectedInfluence(
        gp, k=9, regularization=1e-3, regularization_space="parameter"
    ),
}


# -- pickling and deep copies -------------------------------------------------


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
@pytest.mark.parametrize(
    "cls", [LinearRegressionGradients, LogisticRegressionGradients, SoftmaxRegressionGradients]
)
def test_glm_providers_round_trip(xp, to_xp, cls, trip):
    rng = np.random.default_rng(1)
    k = 1 if cls is LogisticRegressionGradients else 2
    gp = cls(to_xp(rng.normal(size=(k, 3))), to_xp(rng.normal(size=k)))
    x = to_xp(rng.normal(size=(6, 3)))
    y = to_xp(
        rng.integers(0, 2, size=6)
        if cls is not LinearRegressionGradients
        else rng.normal(size=(6, 2))
    )
    batch = gp.prepare_batch(xi.Batch(x, y))
    back = ROUND_TRIPS[trip](gp)
    assert back.xp is gp.xp  # the namespace is re-resolved, not a copy of a module
    assert back.dtype == gp.dtype
    assert _same(back.flat_grads(back.prepare_batch(xi.Batch(x, y))), gp.flat_grads(batch))


@pytest.mark.parametrize("trip", list(ROUND_TRIPS))
def test_finite_difference_provider_round_trip(xp, to_xp, trip):
    rng = np.random.default_rng(2)
    gp = FiniteDifferenceGradients(
        _fd_loss, {"w": to_xp(rng.normal(size=3)), "b": to_xp(0.5 * np.ones(1))}
    )
    batch = xi.Batch(to_xp(rng.normal(size=(5, 3))), to_xp(rng.normal(size=5)))
    back = ROUND_TRIPS[trip](gp)
    assert _same(back.flat_grads(back.prepare_batch(batch)), gp.flat_grads(gp.prepare_batch(batch)))


def test_lambda_loss_names_the_fix(xp, to_xp):
    gp = FiniteDifferenceGradients(
        lambda p, x, y: _fd_loss(p, x, y), {"w": to_xp(np.ones(3)), "b": to_xp(np.ones(1))}
    )
    copy.deepcopy(gp)  # copies keep the function itself
    with pytest.raises(pickle.PicklingError, match="loss_fn.*lambda.*module level.*cloudpickle"):
        pickle.dumps(gp)
    cloudpickle = pytest.importorskip("cloudpickle")
    back = pickle.loads(cloudpickle.dumps(gp))
    assert back.n_parameters == 4


@pytest.mark.parametrize("name", list(MODELS))
def test_fitted_models_round_trip(xp, to_xp, name):
    gp, x, y = _softmax_problem(to_xp)
    infl = MODELS[name](gp).fit(_batches(x, y))
    expected = infl.influences(x[:4, ...], y[:4], x, y)
    factors = infl.influence_factors(x[:3, ...], y[:3])
    for trip in ROUND_TRIPS.values():
        back = trip(infl)
        assert back.is_fitted and back.gradient_provider is not gp
        assert _same(back.influences(x[:4, ...], y[:4], x, y), expected)
        assert _same(back.influence_factors(x[:3, ...], y[:3]), factors)


# -- torch and jax providers ----------------------------------------------------


def _only_on(backend_name, wanted):
    if backend_name != wanted:
        pytest.skip(f"runs in the {wanted} session")


def _torch_problem():
    torch = pytest.importorskip("torch")
    from torch_helpers import mlp

    model = mlp(n_in=4, hidden=5, n_out=3, seed=0)
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=(29, 4)))
    y = torch.tensor(rng.integers(0, 3, size=29))
    return torch, model, x, y


def test_torch_fitted_model_survives_pickle_deepcopy_and_torch_save(backend_name):
    _only_on(backend_name, "torch")
    torch, model, x, y = _torch_problem()
    from xinfluence.backends.torch import TorchGradientProvider

    gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
    infl = xi.DirectInfluence(gp, regularization=1.0, block_structure="layer").fit(
        _batches(x, y, (11, 18))
    )
    expected = infl.influences(x[:4], y[:4], x, y)

    def saved(obj):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    for trip in (_pickled, copy.deepcopy, saved):
        back = trip(infl)
        back_gp = back.gradient_provider
        assert back_gp.model is not model
        assert torch.equal(back.influences(x[:4], y[:4], x, y), expected)
        # the copy's provider reads the copy's parameters (views, not snapshots)
        before = back_gp.flat_grads(back_gp.prepare_batch(xi.Batch(x[:2], y[:2])))
        with torch.no_grad():
            back_gp.model[0].bias.add_(1.0)
        after = back_gp.flat_grads(back_gp.prepare_batch(xi.Batch(x[:2], y[:2])))
        assert not torch.equal(before, after)
    assert torch.equal(infl.influences(x[:4], y[:4], x, y), expected)  # original untouched
    with torch.no_grad():
        model[2].weight.mul_(1.5)
    for trip in (_pickled, copy.deepcopy, saved):  # a copy of a stale model is stale
        with pytest.raises(xi.StaleFitError):
            trip(infl).influences(x[:4], y[:4], x, y)


def _jax_apply(params, x):
    import jax.numpy as jnp

    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def _jax_loss(out, target):
    import jax
    import jax.numpy as jnp

    return jnp.mean(-jax.nn.log_softmax(out)[jnp.arange(target.shape[0]), target])


def _jax_provider(apply_fn=_jax_apply):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from xinfluence.backends.jax import JaxGradientProvider

    rng = np.random.default_rng(4)
    params = {
        "w1": jnp.asarray(rng.normal(size=(4, 5))),
        "w2": jnp.asarray(rng.normal(size=(5, 3))),
    }
    x = jnp.asarray(rng.normal(size=(23, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=23))
    return JaxGradientProvider(apply_fn, params, _jax_loss), x, y


def test_jax_fitted_model_round_trips(backend_name):
    _only_on(backend_name, "jax")
    gp, x, y = _jax_provider()
    infl = xi.DirectInfluence(gp, regularization=2.0, block_structure="parameter").fit(
        _batches(x, y, (9, 14))
    )
    expected = infl.influences(x[:4], y[:4], x, y)
    for trip in ROUND_TRIPS.values():
        assert _same(trip(infl).influences(x[:4], y[:4], x, y), expected)


def test_jax_lambda_apply_fn_names_the_fix(backend_name):
    _only_on(backend_name, "jax")
    gp, x, y = _jax_provider(lambda p, x: _jax_apply(p, x))
    copy.deepcopy(gp)
    with pytest.raises(pickle.PicklingError, match="apply_fn.*lambda.*cloudpickle"):
        pickle.dumps(gp)
    cloudpickle = pytest.importorskip("cloudpickle")
    back = pickle.loads(cloudpickle.dumps(gp))
    batch = gp.prepare_batch(xi.Batch(x, y))
    assert _same(back.flat_grads(batch), gp.flat_grads(batch))


# -- save / load without pickle, in a fresh process ------------------------------

SAVED = [
    "direct",
    "direct-blocks",
    "arnoldi",
    "nystroem",
    "ekfac",
    "datainf",
    "cg",
    "lissa",
    "projected",
    "projected-parameter",
]

_CHILD = """
import sys
import numpy as np
import xinfluence as xi
from xinfluence._xp import from_numpy, to_numpy
from xinfluence.backends.numpy import SoftmaxRegressionGradients

backend, folder, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
if backend == "numpy":
    import array_api_compat.numpy as xp
elif backend == "array_api_strict":
    import array_api_strict as xp
elif backend == "torch":
    import torch
    torch.set_num_threads(1)
    import array_api_compat.torch as xp
elif backend == "jax":
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as xp
inputs = np.load(folder + "/inputs.npz")
def conv(a):
    a = inputs[a]
    return from_numpy(a, dtype=xp.int64 if a.dtype.kind == "i" else xp.float64, device=None, xp=xp)
gp = SoftmaxRegressionGradients(conv("w"), conv("b"))
x, y = conv("x"), conv("y")
for name in names:
    infl = xi.load(folder + "/" + name + ".npz", gp)
    np.save(folder + "/" + name + ".out.npy", to_numpy(infl.influences(x[:4, ...], y[:4], x, y)))
"""


def test_saved_models_reload_bit_for_bit_in_a_fresh_process(
    xp, to_xp, backend_name, device, tmp_path
):
    import subprocess
    import sys

    if device is not None:
        pytest.skip("the child process uses the default device")
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    x_np, y_np = rng.normal(size=(37, 4)), rng.integers(0, 3, size=37)
    np.savez(tmp_path / "inputs.npz", w=w, b=b, x=x_np, y=y_np)
    gp = SoftmaxRegressionGradients(to_xp(w), to_xp(b))
    x, y = to_xp(x_np), to_xp(y_np)
    # jax compiles every eager operation per shape: a subset keeps its session short
    saved = ["direct-blocks", "arnoldi", "cg"] if backend_name == "jax" else SAVED
    expected = {}
    for name in saved:
        infl = MODELS[name](gp).fit(_batches(x, y))
        expected[name] = to_numpy(infl.influences(x[:4, ...], y[:4], x, y))
        infl.save(tmp_path / f"{name}.npz")
        with np.load(tmp_path / f"{name}.npz", allow_pickle=False) as archive:
            assert "__metadata__" in archive.files  # readable without pickle
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    run = subprocess.run(
        [sys.executable, str(script), backend_name, str(tmp_path), ",".join(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name in saved:
        got = np.load(tmp_path / f"{name}.out.npy")
        assert np.array_equal(got, expected[name]), name


def test_load_checks_the_provider(xp, to_xp, tmp_path):
    gp, x, y = _softmax_problem(to_xp)
    infl = xi.DirectInfluence(gp, regularization=1e-3, block_structure="parameter").fit((x, y))
    path = tmp_path / "direct.npz"
    infl.save(path)
    rng = np.random.default_rng(5)
    other = SoftmaxRegressionGradients(to_xp(rng.normal(size=(3, 4))), to_xp(rng.normal(size=3)))
    with pytest.raises(xi.StaleFitError, match="differ from those the saved model was fitted on"):
        xi.load(path, other)
    with pytest.warns(UserWarning, match="differ"):
        xi.DirectInfluence.load(path, other, on_mismatch="warn")
    narrow = SoftmaxRegressionGradients(to_xp(rng.normal(size=(3, 5))), to_xp(rng.normal(size=3)))
    with pytest.raises(ValueError, match=r"weight: saved \(3, 4\), provider \(3, 5\)"):
        xi.load(path, narrow)
    no_bias = SoftmaxRegressionGradients(to_xp(rng.normal(size=(3, 4))))
    xi.DirectInfluence(no_bias, regularization=1e-3).fit((x, y)).save(tmp_path / "nb.npz")
    with pytest.raises(ValueError, match="bias: not in the file"):
        xi.load(tmp_path / "nb.npz", gp)
    with pytest.raises(TypeError, match="holds a DirectInfluence, not a CgInfluence"):
        xi.CgInfluence.load(path, gp)
    loaded = xi.DirectInfluence.load(path, gp)
    assert _same(
        loaded.influences(x[:4, ...], y[:4], x, y), infl.influences(x[:4, ...], y[:4], x, y)
    )
    assert loaded.regularization == infl.regularization
    # a loaded Direct model changes its damping without data
    assert _same(
        loaded.with_regularization(1e-2).influences(x[:4, ...], y[:4], x, y),
        infl.with_regularization(1e-2).influences(x[:4, ...], y[:4], x, y),
    )
    with pytest.raises(xi.NotFittedError):
        xi.DirectInfluence(gp).save(tmp_path / "nothing.npz")


_TORCH_CHILD = """
import sys
import numpy as np
import torch
import xinfluence as xi
from xinfluence.backends.torch import TorchGradientProvider

torch.set_num_threads(1)
folder, names = sys.argv[1], sys.argv[2].split(",")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
data = np.load(folder + "/data.npz")
x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
for name in names:
    infl = xi.load(folder + "/" + name + ".npz", gp)
    np.save(folder + "/" + name + ".out.npy", infl.influences(x[:4], y[:4], x, y).numpy())
"""

TORCH_SAVED = {
    "direct": lambda gp: xi.DirectInfluence(gp, regularization=1.0, block_structure="layer"),
    "arnoldi": lambda gp: xi.ArnoldiInfluence(gp, regularization=1.0, rank=6),
    "nystroem": lambda gp: xi.NystroemSketchInfluence(
        gp, regularization=1e-2, rank=6, second_order="empirical_fisher"
    ),
    "ekfac": lambda gp: xi.EkfacInfluence(gp, regularization=1e-2),
    "datainf": lambda gp: xi.InverseHarmonicMeanInfluence(gp, regularization=1e-2),
    "kronecker": lambda gp: xi.ProjectedInfluence(
        gp, k=(2, 3), projection="kronecker", regularization=1e-3, block_structure="layer"
    ),
    "kronecker-parameter": lambda gp: xi.ProjectedInfluence(
        gp, k=6, projection="kronecker", regularization=1e-2, regularization_space="parameter"
    ),
}


def test_torch_models_reload_bit_for_bit_in_a_fresh_process(backend_name, tmp_path):
    _only_on(backend_name, "torch")
    import subprocess
    import sys

    torch, model, x, y = _torch_problem()
    from xinfluence.backends.torch import TorchGradientProvider

    np.savez(tmp_path / "data.npz", x=x.numpy(), y=y.numpy())
    gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
    expected = {}
    for name, make in TORCH_SAVED.items():
        infl = make(gp).fit(_batches(x, y, (11, 18)))
        expected[name] = infl.influences(x[:4], y[:4], x, y).numpy()
        infl.save(tmp_path / f"{name}.npz")
    script = tmp_path / "child.py"
    script.write_text(_TORCH_CHILD)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path), ",".join(TORCH_SAVED)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name in TORCH_SAVED:
        assert np.array_equal(np.load(tmp_path / f"{name}.out.npy"), expected[name]), name


class _Halving(xi.Operator):
    def __init__(self, size):
        self.size = size

    @property
    def input_size(self):
        return self.size

    def _apply(self, t):
        return t / 2


class _CustomInfluence(xi.ComposableInfluence):
    def _create_operator(self, block, gp, data, regularization):
        return _Halving(gp.n_parameters)


def test_save_refuses_what_it_cannot_save(xp, to_xp, tmp_path):
    gp, x, y = _softmax_problem(to_xp)
    custom = _CustomInfluence(gp).fit((x, y))
    with pytest.raises(NotImplementedError, match="_Halving.*saving supports Direct, Arnoldi"):
        custom.save(tmp_path / "custom.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved xinfluence model"):
        xi.load(tmp_path / "other.npz", gp)


# -- saved files are verified: digests of every array and of the metadata ----------


def _saved_file(to_xp, tmp_path, name="model.npz"):
    gp, x, y = _softmax_problem(to_xp)
    infl = xi.DirectInfluence(gp, regularization=1e-3, block_structure="parameter").fit((x, y))
    path = tmp_path / name
    infl.save(path)
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    return gp, x, y, infl, path, arrays


def _rewrite(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_saved_model_round_trip_is_bit_identical(xp, to_xp, tmp_path):
    gp, x, y, infl, path, arrays = _saved_file(to_xp, tmp_path)
    assert "__metadata_sha256__" in arrays
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified file loads without a warning
        loaded = xi.load(path, gp)
    assert _same(
        loaded.influences(x[:5, ...], y[:5], x, y), infl.influences(x[:5, ...], y[:5], x, y)
    )
    assert loaded.regularization == infl.regularization


def test_load_refuses_tampered_arrays(xp, to_xp, tmp_path):
    gp, _, _, _, path, arrays = _saved_file(to_xp, tmp_path)
    for key in ("block0/_factor", "block1/curvature"):  # scaled by 2: shape and dtype kept
        _rewrite(path, {**arrays, key: arrays[key] * 2})
        with pytest.raises(xi.CorruptFileError, match=rf"model\.npz.*array '{key}' .*differs"):
            xi.load(path, gp)
    removed = {k: v for k, v in arrays.items() if k != "block0/_factor"}
    _rewrite(path, removed)
    with pytest.raises(xi.CorruptFileError, match="array 'block0/_factor' is missing"):
        xi.load(path, gp)
    _rewrite(path, {**arrays, "block9/extra": np.zeros(3)})
    with pytest.raises(xi.CorruptFileError, match="array 'block9/extra' was added"):
        xi.load(path, gp)


def test_load_refuses_tampered_metadata(xp, to_xp, tmp_path):
    gp, _, _, _, path, arrays = _saved_file(to_xp, tmp_path)
    metadata = json.loads(bytes(arrays["__metadata__"]))
    metadata["regularization"]["weight"] = 0.5
    edited = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
    _rewrite(path, {**arrays, "__metadata__": edited})
    with pytest.raises(xi.CorruptFileError, match=r"model\.npz.*metadata .*differ from the SHA"):
        xi.load(path, gp)
    # the metadata's digest itself removed: refused too (a version-2 file always has it)
    del arrays["__metadata_sha256__"]
    _rewrite(path, arrays)
    with pytest.raises(xi.CorruptFileError, match="digest .* is missing"):
        xi.load(path, gp)


def test_load_names_truncated_and_empty_files(xp, to_xp, tmp_path):
    gp, _, _, _, path, _ = _saved_file(to_xp, tmp_path)
    raw = path.read_bytes()
    for keep in (len(raw) // 2, len(raw) - 7, 0):
        cut = tmp_path / f"cut{keep}.npz"
        cut.write_bytes(raw[:keep])
        expected = "is empty" if keep == 0 else "is not a complete .npz"
        with pytest.raises(xi.CorruptFileError, match=rf"cut{keep}\.npz.*{expected}"):
            xi.load(cut, gp)
    with pytest.raises(FileNotFoundError):  # a missing file stays a missing file
        xi.load(tmp_path / "absent.npz", gp)


def test_version_1_files_load_with_a_warning(xp, to_xp, tmp_path):
    gp, x, y, infl, path, arrays = _saved_file(to_xp, tmp_path)
    metadata = json.loads(bytes(arrays.pop("__metadata__")))
    del arrays["__metadata_sha256__"], metadata["digests"]
    metadata["format_version"] = 1  # as the previous xinfluence wrote it
    arrays["__metadata__"] = np.frombuffer(json.dumps(metadata).encode("utf-8"), dtype=np.uint8)
    _rewrite(path, arrays)
    with pytest.warns(UserWarning, match=r"model\.npz.*format version 1.*cannot be verified"):
        loaded = xi.load(path, gp)
    assert _same(
        loaded.influences(x[:5, ...], y[:5], x, y), infl.influences(x[:5, ...], y[:5], x, y)
    )
