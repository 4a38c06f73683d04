"""On jax the generic solvers compile a fixed, small set of programs per problem.

Jax-specific: runs whatever ``XINFLUENCE_BACKEND`` is (skipped without jax).
Every XLA compilation (of a jitted provider function or of one eager operation)
is counted through :mod:`jax.monitoring`; jax's caches are cleared before each
cold run, so that two problems of different sizes start equally cold. A count
that grows with the number of training points or of queries means that some
loop compiles per iteration or per shape.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from jax._src import dispatch  # noqa: E402

import xinfluence as xi  # noqa: E402
from xinfluence.backends.jax import JaxGradientProvider  # noqa: E402

_COUNT = [0]


def _on_duration(event: str, duration: float, **kwargs: object) -> None:
    if event == dispatch.BACKEND_COMPILE_EVENT:
        _COUNT[0] += 1


@pytest.fixture(scope="module", autouse=True)
def _listener():
    # array_api_compat compiles two scalar operations once per process, on its
    # first jax array: not part of any problem
    xi._xp.namespace(jnp.zeros(5))
    xi._compile.compiler_options()  # its check compiles once per process
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    yield
    jax.monitoring.unregister_event_duration_listener(_on_duration)


def _problem(n_train: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 5)) / 2), "bias": jnp.zeros(5)},
        "out": {"kernel": jnp.asarray(rng.normal(size=(5, 3)) / 2), "bias": jnp.zeros(3)},
    }

    def hidden(p, x):
        return jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])

    def apply(p, x):
        return hidden(p, x) @ p["out"]["kernel"] + p["out"]["bias"]

    apply.dense_layers = {"dense": lambda p, x: x, "out": hidden}  # for EK-FAC

    def loss(logits, labels):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    x = jnp.asarray(rng.normal(size=(n_train + 15, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=n_train + 15))
    return apply, loss, params, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _cold_compiles(
    make, n_train: int, n_chunks: int, *, own: bool = True
) -> tuple[int, int, np.ndarray]:
    """Compilations of a cold fit plus ``n_chunks`` queries of 5 test points each,
    and how many of them were the provider's own: its construction (flattening
    the parameters) and its jitted functions, counted by fitting and querying
    again with a new provider (the library's programs are then cached, the new
    provider's jitted functions are not; 0 unless ``own``)."""
    apply, loss, params, train, test = _problem(n_train)
    chunks = [(test[0][5 * i : 5 * i + 5], test[1][5 * i : 5 * i + 5]) for i in range(n_chunks)]
    jax.clear_caches()

    def run():
        start = _COUNT[0]
        gp = JaxGradientProvider(apply, params, loss, dense_layers=apply.dense_layers)
        built = _COUNT[0] - start
        model = make(gp).fit([train])
        scores = [np.asarray(model.influences(*chunk)) for chunk in chunks]
        return _COUNT[0] - start, built, scores[0]

    cold, built, scores = run()
    warm = run()[0] if own else 0
    return cold, built + warm, scores


_DIRECT: dict[float, np.ndarray] = {}


def _direct_scores(reg: float) -> np.ndarray:
    """The oracle: dense (G + reg I)^-1 on the small problem, first 5 test points."""
    if reg not in _DIRECT:
        apply, loss, params, train, test = _problem(20)
        gp = JaxGradientProvider(apply, params, loss)
        model = xi.DirectInfluence(gp, regularization=reg, second_order="gauss_newton")
        _DIRECT[reg] = np.asarray(model.fit([train]).influences(test[0][:5], test[1][:5]))
    return _DIRECT[reg]


def _gn(cls, reg, **options):
    return lambda gp: cls(gp, regularization=reg, second_order="gauss_newton", **options)


# Each bound is the count measured on this code plus a little, below the count
# of the code before this test (in brackets: fe400c3, whose solvers ran eager
# operations around their compiled steps, plus input checks, norms and scaling
# as separate programs). "extra" bounds the compilations beyond the provider's
# own (the goal: at most 10). Every total fell by one when the test side's loss
# check took the losses of its gradient pass (or products, or layer factors);
# most rose by one again when small batches took a larger batch's gradient
# program (the test points' own program, 0.3 s, became two tiny ones: padding
# and dropping the padded rows, the provider's).
@pytest.mark.parametrize(
    ("name", "make", "reg", "bound", "extra", "rtol"),
    [
        ("cg", _gn(xi.CgInfluence, 1e-3), 1e-3, 15, 7, 1e-6),  # [42, 33 extra]
        # batched CG and LiSSA: 15/6 and 20/10 while each iteration ran the product and
        # a step program from the host (34b9c72); now the loop, the product and the true
        # residual are one program (_xp.compiled)
        ("cg_batched", _gn(xi.CgInfluence, 1e-3, solver="batched"), 1e-3, 13, 5, 1e-6),  # [56, 47]
        ("lissa", _gn(xi.LissaInfluence, 0.1, rtol=1e-9), 0.1, 18, 9, 1e-6),  # [66, 56]
        ("direct", _gn(xi.DirectInfluence, 1e-3), 1e-3, 16, 8, None),  # [40, 31] (the oracle)
        # approximations: their values are checked elsewhere (test_operators, test_jax_conv)
        # Arnoldi: 24 and 15 before its first step shared the later steps' programs,
        # 21 and 12 before each step stored its block and the solver checked its
        # products (34b9c72); 2 of its 10 extra are the last block cut to the 3
        # rows left in R^43 (10 extra -> 8 on a model with P > the Krylov space)
        ("arnoldi", _gn(xi.ArnoldiInfluence, 1e-3, rank=10), 1e-3, 20, 10, None),  # [69, 60]
        (
            "nystroem",
            _gn(xi.NystroemSketchInfluence, 1e-3, rank=10),
            1e-3,
            14,
            6,
            None,
        ),  # [54, 45]; 20 and 11 at 34b9c72, which padded the sketch in the provider
        (
            "ekfac",
            _gn(xi.EkfacInfluence, 1e-3, block_structure="layer"),
            1e-3,
            15,
            8,
            None,
        ),  # [41, 32]; 27 and 18 before its layers' passes ran as one program each,
        # 20 and 12 at 34b9c72 (eigenbases, means, the convexity check, and each
        # layer's per-sample gradients apart from its contraction were separate
        # programs); of the 7 extra, 2 are the layers' queries (per-sample gradients
        # from the pass the blocks share and the contraction: one program per layer
        # shape), 2 the restricted providers' flattened parameters
        (
            "projected",
            lambda gp: xi.ProjectedInfluence(gp, k=8, regularization=1e-3),
            0,
            17,
            9,
            None,
        ),  # [40, 31]
    ],
)
def test_cold_compilations_do_not_grow_with_data_or_queries(name, make, reg, bound, extra, rtol):
    small, own, scores = _cold_compiles(make, n_train=20, n_chunks=1)
    large, _, _ = _cold_compiles(make, n_train=47, n_chunks=3, own=False)
    assert small == large, f"{name}: {small} compilations for 20 points, {large} for 47"
    assert small <= bound, f"{name}: {small} compilations in a cold fit and query"
    if extra is not None:
        assert small - own <= extra, f"{name}: {small - own} compilations beyond the provider's"
    if rtol is None:
        return
    direct = _direct_scores(reg)
    err = np.max(np.abs(scores - direct)) / np.max(np.abs(direct))
    assert err < rtol, f"{name}: relative error {err:.2e} against DirectInfluence"


def test_compiled_solves_tell_apart_models_that_differ_only_in_captured_arrays():
    """Batched CG runs as one program cached by the text of its computation; two
    models whose apply functions close over different arrays of the same shape
    trace to the same text, and must not share a program (the second would use
    the first one's array: a 7% error here)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(30, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=30))
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)))}

    def loss(logits, labels):
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    for scale in (1.0, 3.0):
        mixing = jnp.asarray(np.eye(4) * scale)

        def apply(p, xb, mixing=mixing):
            return (xb @ mixing) @ p["w"]

        gp = JaxGradientProvider(apply, params, loss)
        cg = xi.CgInfluence(gp, regularization=0.1, solver="batched").fit([(x, y)])
        direct = xi.DirectInfluence(gp, regularization=0.1).fit([(x, y)])
        expected = np.asarray(direct.influences(x[:3], y[:3]))
        err = np.max(np.abs(np.asarray(cg.influences(x[:3], y[:3])) - expected))
        assert err <= 1e-8 * np.max(np.abs(expected)), f"scale {scale}: error {err:.2e}"


def test_compiled_solves_report_nan_products_as_before():
    """Inside the compiled loop nothing reads the products on the host: NaN must
    still end batched CG and LiSSA with NonFiniteError (not a divergence, and not
    silently), as where each product was checked (34b9c72)."""
    from xinfluence.curvature import Dataset, make_curvature
    from xinfluence.operators import LissaOperator, LissaOptions
    from xinfluence.types import iter_batches

    b = jnp.asarray(np.random.default_rng(0).normal(size=(3, 43)))
    with pytest.raises(xi.NonFiniteError, match="at iteration 1"):
        xi.linalg.cg(lambda v: v * jnp.nan, b)
    apply, loss, params, train, _ = _problem(20)
    gp = JaxGradientProvider(apply, params, loss)
    curvature = make_curvature("gauss_newton", gp, Dataset(iter_batches([train]), gp))
    op = LissaOperator(curvature, 0.1, LissaOptions(scale=10.0))
    curvature.matmat = lambda v, shift=0.0: v * jnp.nan  # type: ignore[method-assign]
    with pytest.raises(xi.NonFiniteError, match="curvature product"):
        op.apply(b)


def _tanh_sum(x):
    return jnp.sum(jnp.tanh(x) * x, axis=1)


def test_library_programs_compile_with_its_options_at_the_top_and_nest_plainly():
    """``_xp.jit``: on a CPU the library's programs compile with its XLA options
    (jax takes options only on the outermost jit, and raises on a nested one),
    and give the values of a plain ``jax.jit``, alone and inside another trace."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)))
    options = xi._compile.compiler_options()
    if jax.default_backend() == "cpu":
        assert options == xi._compile._CPU_COMPILER_OPTIONS
    else:
        assert options is None
    f = xi._xp.jit(_tanh_sum)
    # what a jitted function exposes (tests count its programs by _cache_size)
    assert hasattr(f, "_cache_size") == hasattr(jax.jit(_tanh_sum), "_cache_size")
    expected = np.asarray(jax.jit(_tanh_sum)(x))
    np.testing.assert_allclose(np.asarray(f(x)), expected, rtol=1e-14)
    nested = jax.jit(lambda v: f(v) * 2)(x)
    np.testing.assert_allclose(np.asarray(nested), 2 * expected, rtol=1e-14)
    if hasattr(f, "_cache_size"):
        assert f._cache_size() == 1  # the nested call compiled with its caller
    # a solver's compiled loop calls jitted products inside its own trace
    b = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5)))
    scale = jnp.asarray(np.arange(1.0, 6.0))
    product = xi._xp.jit(lambda v: v * scale)
    result = xi.linalg.cg(product, b, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(result.solution), np.asarray(b) / np.arange(1.0, 6.0))


def test_options_this_jaxlib_does_not_know_fall_back_to_the_defaults(monkeypatch):
    monkeypatch.setattr(xi._compile, "_CPU_COMPILER_OPTIONS", {"xla_no_such_option": True})
    xi._compile.compiler_options.cache_clear()
    try:
        assert xi._compile.compiler_options() is None
        x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)))
        got = xi._xp.jit(_tanh_sum)(x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(_tanh_sum)(x)))
    finally:
        monkeypatch.undo()
        xi._compile.compiler_options.cache_clear()
        xi._compile.compiler_options()  # checked again here, not in another test's count
