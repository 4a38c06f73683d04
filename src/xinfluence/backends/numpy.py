"""Gradient providers written against the array API (no autograd needed).

They run unchanged on numpy, array-api-strict, cupy, torch and jax arrays:
the namespace is that of the parameters.

* :class:`LinearRegressionGradients`, :class:`LogisticRegressionGradients`,
  :class:`SoftmaxRegressionGradients`: generalised linear models
  ``z = f(x) = x @ weight.T + bias`` with analytic per-sample gradients, mixed
  gradients, Jacobian products and Hessian products.
* :class:`FiniteDifferenceGradients`: central finite differences of any
  per-sample loss written with array-API calls.

Per-sample losses match torch's defaults on one sample: MSE is the mean over
outputs of the squared error, logistic is ``binary_cross_entropy_with_logits``,
softmax is ``cross_entropy``. The flat parameter vector is
``[weight.ravel(), bias]`` (row-major), block names ``"weight"`` and ``"bias"``.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, final

import array_api_extra as xpx

from .. import _xp
from .._state import check_picklable_function, fingerprint
from .._xp import Array, Namespace
from ..types import Batch, GradientProvider

__all__ = [
    "LinearRegressionGradients",
    "LogisticRegressionGradients",
    "SoftmaxRegressionGradients",
    "FiniteDifferenceGradients",
]


class _ArrayParams(GradientProvider):
    """Shared state of the array-API providers: parameters of one namespace."""

    def _init_params(self, params: Mapping[str, Array]) -> None:
        arrays = list(params.values())
        if not arrays:
            raise ValueError("expected at least one parameter array")
        for name, a in params.items():
            if not hasattr(a, "shape"):
                raise TypeError(f"parameter {name!r} must be an array, got {type(a).__name__}")
        self._xp_ns = _xp.namespace(*arrays)
        xp = self._xp_ns
        dtype = arrays[0].dtype
        for name, a in params.items():
            if not xp.isdtype(a.dtype, "real floating"):
                raise TypeError(f"parameter {name!r} must be real floating, got {a.dtype}")
            if a.dtype != dtype:
                raise TypeError(
                    f"all parameters must share one dtype, got {dtype} and {a.dtype} ({name!r})"
                )
        self._params: OrderedDict[str, Array] = OrderedDict(params)
        self._dtype = dtype
        self._device = _xp.device_of(arrays[0])

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        del state["_device"]  # re-read from the arrays on load (cupy, jax devices)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._device = _xp.device_of(next(iter(self._params.values())))

    def _used_params(self) -> Mapping[str, Array]:
        """The arrays the derivatives read (mutable for most namespaces)."""
        return self._params

    def parameter_fingerprint(self) -> str:
        return fingerprint(self._used_params().items())

    @property
    def xp(self) -> Namespace:
        return self._xp_ns

    @property
    def dtype(self) -> Any:
        return self._dtype

    @property
    def device(self) -> Any:
        return self._device

    @property
    def parameter_shapes(self) -> OrderedDict[str, tuple[int, ...]]:
        return OrderedDict((k, tuple(int(d) for d in v.shape)) for k, v in self._params.items())


class _GeneralizedLinearModel(_ArrayParams):
    """``z = x @ weight.T + bias`` with a per-sample loss ``l(z, y)``.

    With ``delta = dl/dz`` (N, O) and ``C_n = d^2 l / dz^2`` (O, O), the per-sample
    gradient is ``[outer(delta_n, x_n).ravel(), delta_n]`` and the Hessian of the
    mean loss is ``mean_n J_n^T C_n J_n`` (z is linear in the parameters).
    """

    def __init__(self, weight: Array, bias: Array | None = None):
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        self._init_params(params)
        if weight.ndim != 2:
            raise ValueError(f"weight must have shape (n_out, n_in), got {tuple(weight.shape)}")
        self.n_out, self.n_in = int(weight.shape[0]), int(weight.shape[1])
        if bias is not None and tuple(bias.shape) != (self.n_out,):
            raise ValueError(f"bias must have shape ({self.n_out},), got {tuple(bias.shape)}")
        self.weight, self.bias = weight, bias

    def layer_groups(self) -> OrderedDict[str, list[str]]:
        return OrderedDict(linear=list(self.parameter_names))

    # -- the loss (per model) ---------------------------------------------
    @abstractmethod
    def _delta(self, z: Array, y: Array) -> Array:
        """``dl/dz`` per sample: ``(N, O)``."""

    @abstractmethod
    def _curvature_apply(self, z: Array, u: Array) -> Array:
        """``C_n u_n`` for ``u`` of shape ``(R, N, O)``: ``(R, N, O)``."""

    @abstractmethod
    def _loss(self, z: Array, y: Array) -> Array:
        """Per-sample losses ``(N,)``."""

    @abstractmethod
    def _prepare_targets(self, y: Array) -> Array:
        """Validate targets and bring them to the shape the loss expects."""

    # -- batch handling ------------------------------------------------------
    def check_input_shape(self, batch: Batch) -> None:
        if batch.x.ndim != 2 or batch.x.shape[1] != self.n_in:
            raise ValueError(f"expected x of shape (N, {self.n_in}), got {tuple(batch.x.shape)}")

    def prepare_batch(self, batch: Batch) -> Batch:
        batch = super().prepare_batch(batch)
        x = _xp.as_float(batch.x, dtype=self.dtype, xp=self.xp, what="x")
        return Batch(x, self._prepare_targets(batch.y))

    def _z(self, x: Array) -> Array:
        z = x @ self.xp.matrix_transpose(self.weight)
        return z if self.bias is None else z + self.bias

    def loss(self, batch: Batch) -> Array:
        """Per-sample losses ``(N,)`` (handy for checks and leave-one-out tests)."""
        batch = self.prepare_batch(batch)
        return self._loss(self._z(batch.x), batch.y)

    def per_sample_losses(self, batch: Batch) -> Array:
        return self._loss(self._z(batch.x), batch.y)

    def _split(self, v: Array) -> tuple[Array, Array | None]:
        """Rows of flat vectors ``(K, P)`` -> ``(K, O, I)`` and ``(K, O)`` (or None)."""
        xp = self.xp
        k, nw = v.shape[0], self.n_out * self.n_in
        vw = xp.reshape(v[:, :nw], (k, self.n_out, self.n_in))
        return vw, (v[:, nw:] if self.bias is not None else None)

    def _join(self, gw: Array, gb: Array) -> Array:
        """``(K, O, I)`` and ``(K, O)`` -> flat ``(K, P)``."""
        xp = self.xp
        flat = xp.reshape(gw, (gw.shape[0], self.n_out * self.n_in))
        return flat if self.bias is None else xp.concat([flat, gb], axis=1)

    # -- derivatives ---------------------------------------------------------
    def flat_grads(self, batch: Batch) -> Array:
        x, y = batch.x, batch.y
        delta = self._delta(self._z(x), y)  # (N, O)
        gw = delta[:, :, None] * x[:, None, :]
        return self._join(gw, delta)

    def flat_mixed_grads(self, batch: Batch) -> Array:
        xp = self.xp
        x, y = batch.x, batch.y
        n = x.shape[0]
        z = self._z(x)
        delta = self._delta(z, y)
        # d delta / dx = C_n W: u[m, n, :] = W[:, m]
        u = xp.broadcast_to(
            xp.matrix_transpose(self.weight)[:, None, :], (self.n_in, n, self.n_out)
        )
        cw = xp.permute_dims(self._curvature_apply(z, u), (1, 0, 2))  # (N, I_m, O)
        eye = _xp.eye(self.n_in, dtype=self.dtype, device=self.device, xp=xp)
        # d/dx_m [delta_k x_j] = (C W)_{k m} x_j + delta_k [j == m]
        gw = (
            cw[:, :, :, None] * x[:, None, None, :]
            + delta[:, None, :, None] * eye[None, :, None, :]
        )
        flat = xp.reshape(gw, (n, self.n_in, self.n_out * self.n_in))
        return flat if self.bias is None else xp.concat([flat, cw], axis=2)

    def _jv(self, x: Array, v: Array) -> Array:
        """Jacobian of ``z`` times each row of ``v``: ``(K, N, O)``."""
        xp = self.xp
        vw, vb = self._split(v)
        jv = x[None, :, :] @ xp.permute_dims(vw, (0, 2, 1))
        return jv if vb is None else jv + vb[:, None, :]

    def jacobian_prod(self, batch: Batch, g: Array) -> Array:
        xp = self.xp
        delta = self._delta(self._z(batch.x), batch.y)  # (N, O)
        # g_k . grad_n = delta_n . (J_n g_k)
        return xp.matrix_transpose(xp.sum(delta[None, :, :] * self._jv(batch.x, g), axis=2))

    def hvp(self, batch: Batch, v: Array) -> Array:
        xp = self.xp
        x = batch.x
        n = x.shape[0]
        u = self._curvature_apply(self._z(x), self._jv(x, v))  # (K, N, O)
        gw = xp.permute_dims(u, (0, 2, 1)) @ x[None, :, :] / n  # (K, O, I)
        return self._join(gw, xp.sum(u, axis=1) / n)

    def kfac_layers(self) -> OrderedDict[str, tuple[str, str | None]]:
        """The one dense layer, for EK-FAC: ``{"linear": ("weight", "bias" or None)}``."""
        return OrderedDict(linear=("weight", "bias" if self.bias is not None else None))

    def kfac_factors(self, batch: Batch) -> OrderedDict[str, tuple[Array, Array]]:
        """Inputs ``a = x`` ``(N, I)`` and output gradients ``s = dl/dz`` ``(N, O)``."""
        return OrderedDict(linear=(batch.x, self._delta(self._z(batch.x), batch.y)))

    def hessian_diagonal(self, batch: Batch) -> Array:
        """Exact diagonal of the batch-mean Hessian, ``(P,)`` (for Jacobi preconditioning)."""
        xp = self.xp
        x, n = batch.x, batch.x.shape[0]
        eye = _xp.eye(self.n_out, dtype=self.dtype, device=self.device, xp=xp)
        # diag C_n per output: apply C_n to unit vectors e_o
        units = xp.broadcast_to(eye[:, None, :], (self.n_out, n, self.n_out))
        c_diag = xp.sum(self._curvature_apply(self._z(x), units) * units, axis=2)  # (O, N)
        dw = c_diag @ (x * x) / n  # (O, I)
        db = xp.sum(c_diag, axis=1) / n
        return self._join(dw[None, ...], db[None, :])[0, :]

    # -- generalized Gauss-Newton -------------------------------------------
    # Built from the explicit output Jacobian J_n (O, P) and the dense output
    # Hessian H_n (O, O) of each loss, not from the Hessian code above (which
    # applies the loss curvature to J v without forming either): for these
    # canonical-link losses G equals the Hessian, and the tests check that
    # the two independent constructions agree.
    @property
    def supports_gauss_newton(self) -> bool:
        return True

    @abstractmethod
    def _output_hessian(self, z: Array) -> Array:
        """``H_n = d^2 l / dz^2`` per sample, dense: ``(N, O, O)``."""

    @abstractmethod
    def _output_hessian_root(self, z: Array) -> Array:
        """``L_n`` with ``H_n = L_n L_n^T``: ``(N, O, C)``."""

    def _output_jacobian(self, x: Array) -> Array:
        """``J_n = dz_n / dtheta`` in the flat order: ``(N, O, P)``;
        ``J_n[o, (o', i)] = [o = o'] x_n[i]`` and ``J_n[o, b_o'] = [o = o']``."""
        xp = self.xp
        n, o = x.shape[0], self.n_out
        eye = _xp.eye(o, dtype=self.dtype, device=self.device, xp=xp)
        jw = xp.reshape(eye[None, :, :, None] * x[:, None, None, :], (n, o, o * self.n_in))
        if self.bias is None:
            return jw
        return xp.concat([jw, xp.broadcast_to(eye[None, :, :], (n, o, o))], axis=2)

    def _ggn_chunks(self, n: int) -> list[slice]:
        """Sample chunks whose Jacobians (3 arrays of ``O x P`` per sample) fit the
        memory budget."""
        from .._config import memory_budget

        itemsize = int(getattr(self.dtype, "itemsize", 8))
        per_sample = 3 * self.n_out * self.n_parameters * itemsize
        step = max(1, memory_budget() // max(1, per_sample))
        return [slice(lo, min(n, lo + step)) for lo in range(0, n, step)]

    def _ggn_parts(self, x: Array) -> list[tuple[Array, Array]]:
        """``(J, H J)`` flattened to ``(n O, P)`` for each chunk of samples."""
        xp = self.xp
        out = []
        for sl in self._ggn_chunks(x.shape[0]):
            xs = x[sl, ...]
            jac = self._output_jacobian(xs)  # (n, O, P)
            hj = self._output_hessian(self._z(xs)) @ jac
            rows = jac.shape[0] * self.n_out
            out.append((xp.reshape(jac, (rows, self.n_parameters)), xp.reshape(hj, (rows, -1))))
        return out

    def ggn_matmat(self, batch: Batch, v: Array) -> Array:
        xp = self.xp
        if v.ndim != 2 or v.shape[1] != self.n_parameters:
            raise ValueError(f"expected v of shape (K, {self.n_parameters}), got {tuple(v.shape)}")
        total = None
        for jac, hj in self._ggn_parts(batch.x):
            # v J^T H J, with H J formed once per chunk
            term = (v @ xp.matrix_transpose(jac)) @ hj
            total = term if total is None else total + term
        assert total is not None
        return total / batch.x.shape[0]

    def ggn(self, batch: Batch) -> Array:
        xp = self.xp
        total = None
        for jac, hj in self._ggn_parts(batch.x):
            term = xp.matrix_transpose(jac) @ hj
            total = term if total is None else total + term
        assert total is not None
        return _xp.symmetrize(total / batch.x.shape[0], xp=xp)

    def ggn_diagonal(self, batch: Batch) -> Array:
        xp = self.xp
        total = None
        for jac, hj in self._ggn_parts(batch.x):
            term = xp.sum(jac * hj, axis=0)
            total = term if total is None else total + term
        assert total is not None
        return total / batch.x.shape[0]

    def kfac_ggn_factors(self, batch: Batch) -> OrderedDict[str, tuple[Array, Array]]:
        """Inputs ``a = x`` ``(N, I)`` and the Gauss-Newton pseudo-gradients at the
        output ``s[n, c] = L_n[:, c]`` ``(N, C, O)`` with ``H_n = L_n L_n^T``
        (the output is the layer's own output)."""
        root = self._output_hessian_root(self._z(batch.x))  # (N, O, C)
        return OrderedDict(linear=(batch.x, self.xp.permute_dims(root, (0, 2, 1))))


@final
class LinearRegressionGradients(_GeneralizedLinearModel):
    """Least squares: ``l = mean_o (z_o - y_o)^2`` (torch's ``mse_loss``).

    ``y`` has shape ``(N, n_out)``, or ``(N,)`` when ``n_out == 1``.
    """

    def _prepare_targets(self, y: Array) -> Array:
        xp = self.xp
        if y.ndim == 1 and self.n_out == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != self.n_out:
            raise ValueError(f"expected y of shape (N, {self.n_out}), got {tuple(y.shape)}")
        return _xp.as_float(y, dtype=self.dtype, xp=xp, what="y")

    def _delta(self, z: Array, y: Array) -> Array:
        return 2 * (z - y) / self.n_out

    def _curvature_apply(self, z: Array, u: Array) -> Array:
        return 2 * u / self.n_out

    def _loss(self, z: Array, y: Array) -> Array:
        return self.xp.mean((z - y) ** 2, axis=1)

    def _output_hessian(self, z: Array) -> Array:
        # d^2/dz^2 mean_o (z_o - y_o)^2 = (2 / O) I
        eye = _xp.eye(self.n_out, dtype=self.dtype, device=self.device, xp=self.xp)
        return self.xp.broadcast_to((2 / self.n_out) * eye[None, :, :], (z.shape[0], *eye.shape))

    def _output_hessian_root(self, z: Array) -> Array:
        eye = _xp.eye(self.n_out, dtype=self.dtype, device=self.device, xp=self.xp)
        root = math.sqrt(2 / self.n_out) * eye
        return self.xp.broadcast_to(root[None, :, :], (z.shape[0], *eye.shape))


@final
class LogisticRegressionGradients(_GeneralizedLinearModel):
    """Binary cross-entropy with logits: ``l = softplus(z) - y z``, ``y`` in [0, 1].

    ``weight`` has shape ``(1, n_in)``; ``y`` has shape ``(N,)`` or ``(N, 1)``.
    """

    def __init__(self, weight: Array, bias: Array | None = None):
        super().__init__(weight, bias)
        if self.n_out != 1:
            raise ValueError(
                f"logistic regression needs weight of shape (1, n_in), got {tuple(weight.shape)}"
            )

    def _prepare_targets(self, y: Array) -> Array:
        xp = self.xp
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != 1:
            raise ValueError(f"expected y of shape (N,) or (N, 1), got {tuple(y.shape)}")
        y = _xp.as_float(y, dtype=self.dtype, xp=xp, what="y")
        if bool(xp.any(y < 0)) or bool(xp.any(y > 1)):
            raise ValueError("expected binary targets y in [0, 1]")
        return y

    def _sigmoid(self, z: Array) -> Array:
        xp = self.xp
        # stable for both signs
        e = xp.exp(-xp.abs(z))
        return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))

    def _delta(self, z: Array, y: Array) -> Array:
        return self._sigmoid(z) - y

    def _curvature_apply(self, z: Array, u: Array) -> Array:
        s = self._sigmoid(z)
        return s * (1 - s) * u

    def _loss(self, z: Array, y: Array) -> Array:
        xp = self.xp
        out = xp.maximum(z, 0) - z * y + xp.log1p(xp.exp(-xp.abs(z)))
        return out[:, 0]

    def _output_hessian(self, z: Array) -> Array:
        # d^2/dz^2 (softplus(z) - y z) = p (1 - p), p = sigmoid(z)
        p = self._sigmoid(z)
        return (p * (1 - p))[:, :, None]

    def _output_hessian_root(self, z: Array) -> Array:
        return self.xp.sqrt(self._output_hessian(z))


@final
class SoftmaxRegressionGradients(_GeneralizedLinearModel):
    """Cross-entropy of ``softmax(z)`` against integer labels ``y`` in ``[0, n_out)``."""

    def _prepare_targets(self, y: Array) -> Array:
        xp = self.xp
        if y.ndim != 1:
            raise ValueError(f"expected integer labels y of shape (N,), got {tuple(y.shape)}")
        if not xp.isdtype(y.dtype, "integral"):
            raise TypeError(f"expected integer class labels y, got dtype {y.dtype}")
        if y.shape[0] and (bool(xp.any(y < 0)) or bool(xp.any(y >= self.n_out))):
            raise ValueError(f"expected labels in [0, {self.n_out}), got values outside")
        return y

    def _probs(self, z: Array) -> Array:
        xp = self.xp
        e = xp.exp(z - xp.max(z, axis=1, keepdims=True))
        return e / xp.sum(e, axis=1, keepdims=True)

    def _onehot(self, y: Array) -> Array:
        return xpx.one_hot(y, self.n_out, dtype=self.dtype, xp=self.xp)

    def _delta(self, z: Array, y: Array) -> Array:
        return self._probs(z) - self._onehot(y)

    def _curvature_apply(self, z: Array, u: Array) -> Array:
        p = self._probs(z)
        return p * u - p * self.xp.sum(p * u, axis=-1, keepdims=True)

    def _loss(self, z: Array, y: Array) -> Array:
        xp = self.xp
        m = xp.max(z, axis=1, keepdims=True)
        lse = xp.log(xp.sum(xp.exp(z - m), axis=1)) + m[:, 0]
        return lse - xp.sum(z * self._onehot(y), axis=1)

    def _output_hessian(self, z: Array) -> Array:
        # d^2/dz^2 (logsumexp(z) - z_y) = diag(p) - p p^T, p = softmax(z)
        p = self._probs(z)
        eye = _xp.eye(self.n_out, dtype=self.dtype, device=self.device, xp=self.xp)
        return eye[None, :, :] * p[:, None, :] - p[:, :, None] * p[:, None, :]

    def _output_hessian_root(self, z: Array) -> Array:
        # L = diag(sqrt p) - p sqrt(p)^T: L L^T = diag(p) - 2 p p^T + p p^T (sum p = 1)
        p = self._probs(z)
        r = self.xp.sqrt(p)
        eye = _xp.eye(self.n_out, dtype=self.dtype, device=self.device, xp=self.xp)
        return eye[None, :, :] * r[:, None, :] - p[:, :, None] * r[:, None, :]


@final
class FiniteDifferenceGradients(_ArrayParams):
    """Derivatives of any per-sample loss by central finite differences.

    ``loss_fn(params, x, y) -> (N,)`` takes a dict of parameter arrays (the
    ``params`` given here, same names and shapes), a batch of inputs ``x`` of
    shape ``(N, *D)`` and targets ``y``, and returns the per-sample losses,
    using array-API calls only (``array_api_compat.array_namespace(x)`` gives the
    namespace). Each sample's loss must depend on its own ``x_i`` only.

    Steps and accuracy (``eps`` the dtype's machine epsilon, ``s_k = max(1, |theta_k|)``):

    * gradients: ``h_k = eps^(1/3) s_k``; truncation and rounding error both
      ``~ eps^(2/3)`` relative (about 1e-11 in float64);
    * Hessian products and mixed gradients: second differences with
      ``h = eps^(1/4) s``; error ``~ eps^(1/2)`` relative (about 1e-8 in float64).

    Costs: ``2 P`` loss evaluations for ``flat_grads``, ``4 P`` per row of
    ``hvp``, ``4 P D`` for ``flat_mixed_grads``: meant for small models and for
    checking other providers. ``step`` (a float) replaces ``eps^(1/3)`` and
    ``eps^(1/4)`` by one relative step.
    """

    def __init__(
        self,
        loss_fn: Callable[[Mapping[str, Array], Array, Array], Array],
        params: Mapping[str, Array],
        *,
        step: float | None = None,
        input_shape: tuple[int, ...] | None = None,
    ):
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(params, x, y) -> (N,)")
        self._init_params(params)
        self.loss_fn = loss_fn
        self.input_shape = None if input_shape is None else tuple(input_shape)
        xp = self.xp
        self._theta = xp.concat([xp.reshape(p, (-1,)) for p in self._params.values()])
        eps = _xp.finfo_eps(self.dtype, xp=xp)
        self._h1 = step if step is not None else eps ** (1 / 3)
        self._h2 = step if step is not None else eps ** (1 / 4)

    def __getstate__(self) -> dict[str, Any]:
        check_picklable_function(self.loss_fn, "loss_fn")
        return super().__getstate__()

    def _used_params(self) -> Mapping[str, Array]:
        return self._unflatten(self._theta)  # a copy made at construction

    def per_sample_losses(self, batch: Batch) -> Array:
        return self._losses(self._theta, batch.x, batch.y)

    def check_input_shape(self, batch: Batch) -> None:
        if self.input_shape is not None and tuple(batch.x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected x of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(batch.x.shape)}"
            )

    def prepare_batch(self, batch: Batch) -> Batch:
        batch = super().prepare_batch(batch)
        return Batch(_xp.as_float(batch.x, dtype=self.dtype, xp=self.xp, what="x"), batch.y)

    def _unflatten(self, theta: Array) -> OrderedDict[str, Array]:
        xp = self.xp
        out: OrderedDict[str, Array] = OrderedDict()
        for (name, shape), sl in zip(self.parameter_shapes.items(), self.parameter_slices.values()):
            out[name] = xp.reshape(theta[sl], shape)
        return out

    def _losses(self, theta: Array, x: Array, y: Array) -> Array:
        out = self.loss_fn(self._unflatten(theta), x, y)
        if tuple(out.shape) != (x.shape[0],):
            raise ValueError(
                f"loss_fn must return per-sample losses of shape ({x.shape[0]},), "
                f"got {tuple(out.shape)}"
            )
        return out

    def _unit(self, k: int, scale: float) -> Array:
        xp = self.xp
        idx = xp.arange(self._theta.shape[0], device=self.device)
        return xp.astype(idx == k, self.dtype) * scale

    def _scale(self, k: int) -> float:
        return max(1.0, abs(float(self._theta[k])))

    def flat_grads(self, batch: Batch) -> Array:
        xp = self.xp
        cols = []
        for k in range(self.n_parameters):
            h = self._h1 * self._scale(k)
            e = self._unit(k, h)
            up = self._losses(self._theta + e, batch.x, batch.y)
            down = self._losses(self._theta - e, batch.x, batch.y)
            cols.append((up - down) / (2 * h))
        return xp.stack(cols, axis=1)

    def flat_mixed_grads(self, batch: Batch) -> Array:
        xp = self.xp
        x, y = batch.x, batch.y
        n = x.shape[0]
        d = math.prod(x.shape[1:])
        xf = xp.reshape(x, (n, d))
        rows = []
        for m in range(d):
            hx = self._h2 * max(1.0, float(xp.max(xp.abs(xf[:, m]))) if n else 1.0)
            ex = xp.astype(xp.arange(d, device=self.device) == m, self.dtype) * hx
            x_up = xp.reshape(xf + ex, x.shape)
            x_down = xp.reshape(xf - ex, x.shape)
            cols = []
            for k in range(self.n_parameters):
                h = self._h2 * self._scale(k)
                e = self._unit(k, h)
                val = (
                    self._losses(self._theta + e, x_up, y)
                    - self._losses(self._theta + e, x_down, y)
                    - self._losses(self._theta - e, x_up, y)
                    + self._losses(self._theta - e, x_down, y)
                )
                cols.append(val / (4 * h * hx))
            rows.append(xp.stack(cols, axis=1))  # (N, P)
        return xp.reshape(xp.stack(rows, axis=1), (n, *x.shape[1:], self.n_parameters))

    def _mean_loss(self, theta: Array, batch: Batch) -> Array:
        return self.xp.mean(self._losses(theta, batch.x, batch.y))

    def hvp(self, batch: Batch, v: Array) -> Array:
        xp = self.xp
        rows = []
        for r in range(v.shape[0]):
            vr = v[r, :]
            norm = float(xp.linalg.vector_norm(vr))
            if norm == 0.0:
                rows.append(xp.zeros_like(vr))
                continue
            hv = self._h2 * max(1.0, float(xp.max(xp.abs(self._theta))))
            dv = vr * (hv / norm)
            cols = []
            for k in range(self.n_parameters):
                h = self._h2 * self._scale(k)
                e = self._unit(k, h)
                val = (
                    self._mean_loss(self._theta + e + dv, batch)
                    - self._mean_loss(self._theta + e - dv, batch)
                    - self._mean_loss(self._theta - e + dv, batch)
                    + self._mean_loss(self._theta - e - dv, batch)
                )
                cols.append(val * (norm / (4 * h * hv)))
            rows.append(xp.stack(cols))
        return xp.stack(rows, axis=0)
