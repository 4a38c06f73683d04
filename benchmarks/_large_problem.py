"""The large-model benchmark problems: a 97k-parameter CNN, the 99k MLP and a
1M-parameter MLP, all on scikit-learn's ``digits`` (pixels / 16, float64).

Only numpy, torch and scikit-learn are imported here, so that the kronfluence
worker (its own environment) can rebuild the same models from the same file.
The networks are trained briefly (full-batch L-BFGS with weight decay, fixed
seed); influence methods only need a reasonable point, not a converged one.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

N_TRAIN = 1000
N_TEST = 200
BATCH_SIZE = 250
WEIGHT_DECAY = 1e-3


def build_model(case: str) -> nn.Sequential:
    """``cnn``: ``Conv(1, 32, 3, pad 1), ReLU, Conv(32, 64, 3, pad 1), ReLU, MaxPool 2,
    Flatten, Linear(1024, 76), ReLU, Linear(76, 10)`` on ``(1, 8, 8)`` images:
    97,486 parameters. ``mlp99k``: ``64-300-256-10`` tanh (99,126). ``mlp1m``:
    ``64-1024-896-10`` tanh (993,930). All float64."""
    f64 = torch.float64
    if case == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, dtype=f64),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, dtype=f64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(1024, 76, dtype=f64),
            nn.ReLU(),
            nn.Linear(76, 10, dtype=f64),
        )
    widths = {"mlp99k": (64, 300, 256, 10), "mlp1m": (64, 1024, 896, 10)}[case]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, dtype=f64))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def make_problem(case: str, path: str, *, seed: int = 0, train_iters: int = 15) -> dict:
    """Train ``case`` on digits and save data (images for the CNN) and weights."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float64)
    if case == "cnn":
        x = x.reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    train, test = perm[:N_TRAIN], perm[N_TRAIN : N_TRAIN + N_TEST]
    torch.manual_seed(seed)
    model = build_model(case)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    opt = torch.optim.LBFGS(
        model.parameters(), lr=1.0, max_iter=train_iters, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), yt)
        loss = loss + 0.5 * WEIGHT_DECAY * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    model.eval()
    with torch.no_grad():
        acc = float(
            (model(torch.from_numpy(x[test])).argmax(1) == torch.from_numpy(y[test]))
            .double()
            .mean()
        )
    arrays = {f"param:{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez(
        path,
        case=np.asarray(case),
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        **arrays,
    )
    return {"case": case, "test_accuracy": acc, "n_parameters": n_parameters(model)}


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_problem(path: str) -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    """The trained model (eval mode) and the data tensors of ``path``."""
    with np.load(path) as f:
        case = str(f["case"])
        state = OrderedDict(
            (k.split(":", 1)[1], torch.from_numpy(np.array(f[k])))
            for k in f.files
            if k.startswith("param:")
        )
        data = {
            k: torch.from_numpy(np.array(f[k])) for k in ("x_train", "y_train", "x_test", "y_test")
        }
    model = build_model(case)
    model.load_state_dict(state)
    return model.eval(), data
