"""The benchmark problems, shared by the orchestrator and the pyDVL worker.

This module must import in both environments: the development one (numpy 2,
xinfluence) and pyDVL's (numpy < 2, no xinfluence). It therefore uses only
numpy, torch and scikit-learn.

A problem is a small tanh network on scikit-learn's ``digits`` (pixels / 16),
trained in float64 with a fixed seed, and saved to an ``.npz`` holding the
data splits and the trained weights. Both environments rebuild the model from
that file, so they work on bit-identical numbers.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

# name -> hidden layer widths. ``small`` is the 64-24-10 network
# (1,810 parameters); ``large`` has about 100,000 parameters (99,126).
CASES: dict[str, tuple[int, ...]] = {
    "small": (24,),
    "large": (300, 256),
}

N_TRAIN = 1000
N_TEST = 200
BATCH_SIZE = 250
REGULARIZATION = 1e-2
WEIGHT_DECAY = 1e-3  # L2 penalty during training only (keeps the Hessian near PSD)


def build_model(hidden: tuple[int, ...], n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """``Linear, Tanh, Linear, Tanh, ..., Linear`` in float64."""
    widths = (n_in, *hidden, n_out)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, dtype=torch.float64))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_problem(case: str, path: str, *, seed: int = 0, train_iters: int = 300) -> dict:
    """Train the network of ``case`` on digits and save data and weights to ``path``.

    Training: full-batch L-BFGS (strong Wolfe line search) on the mean
    cross-entropy plus ``WEIGHT_DECAY / 2 * |theta|^2``. Returns a summary.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float64)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    train, test = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_TEST]
    x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]

    torch.manual_seed(seed)
    model = build_model(CASES[case])
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=train_iters,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), yt)
        loss = loss + 0.5 * WEIGHT_DECAY * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    start = time.perf_counter()
    opt.step(closure)
    train_s = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        train_acc = float((model(xt).argmax(1) == yt).double().mean())
        test_acc = float(
            (model(torch.from_numpy(x_test)).argmax(1) == torch.from_numpy(y_test)).double().mean()
        )
        train_loss = float(nn.functional.cross_entropy(model(xt), yt))
    arrays = {f"param:{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez(
        path,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        hidden=np.asarray(CASES[case], dtype=np.int64),
        **arrays,
    )
    return dict(
        case=case,
        hidden=CASES[case],
        n_parameters=n_parameters(model),
        train_accuracy=train_acc,
        test_accuracy=test_acc,
        train_loss=train_loss,
        train_seconds=train_s,
    )


@dataclass
class Problem:
    model: nn.Sequential
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    loader: DataLoader

    @property
    def n_parameters(self) -> int:
        return n_parameters(self.model)


def load_problem(path: str, device: str = "cpu") -> Problem:
    """Rebuild the trained model (eval mode, float64) and the data from ``path``,
    on ``device`` (model, data and the DataLoader's tensors)."""
    with np.load(path) as f:
        hidden = tuple(int(h) for h in f["hidden"])
        state = OrderedDict(
            (k.split(":", 1)[1], torch.from_numpy(np.array(f[k])))
            for k in f.files
            if k.startswith("param:")
        )
        x_train = torch.from_numpy(np.array(f["x_train"]))
        y_train = torch.from_numpy(np.array(f["y_train"]))
        x_test = torch.from_numpy(np.array(f["x_test"]))
        y_test = torch.from_numpy(np.array(f["y_test"]))
    model = build_model(hidden)
    model.load_state_dict(state)
    model.eval().to(device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=BATCH_SIZE, shuffle=False)
    return Problem(model, x_train, y_train, x_test, y_test, loader)


def synchronize(device: str) -> None:
    """Wait for the device's queued work, so that a clock read after it is honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    """``max |a - ref| / max |ref|``."""
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def warmup_loader(prob: Problem) -> DataLoader:
    """The reduced warm-up workload's training data: the first batch only."""
    return DataLoader(
        Subset(prob.loader.dataset, range(BATCH_SIZE)), batch_size=BATCH_SIZE, shuffle=False
    )


def best_total(times: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(fit, influences, total) of the run with the smallest total."""
    fit_s, infl_s = min(times, key=lambda t: t[0] + t[1])
    return fit_s, infl_s, fit_s + infl_s


def fmt_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    return f"{s:.3g}" if s < 100 else f"{s:.0f}"
