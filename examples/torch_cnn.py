"""Influence functions for a small convolutional network (PyTorch).

A CNN (Conv2d 1->4, 3x3, tanh, Conv2d 4->4, 3x3, tanh, Linear 64->10) on
scikit-learn's 8x8 digits. Models with convolutions take the general
``torch.func`` path of the provider (per-sample gradients by ``vmap(grad)``,
Hessian-vector products by double backward), so every method works on them;
this script compares conjugate gradients and the Arnoldi (Lanczos) low-rank
approximation with the exact solve.

The network is trained by Adam with weight decay lambda, then polished by
L-BFGS on the same objective: influence functions assume a minimum, and
H + lambda I is then positive definite.

Run: python examples/torch_cnn.py   (needs torch and scikit-learn)
     --threads N: torch threads (default 1; 0 keeps torch's default, one per core)
"""

import argparse

import torch
from sklearn.datasets import load_digits

import xinfluence as xi
from xinfluence.backends.torch import TorchGradientProvider

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument(
    "--threads",
    type=int,
    default=1,
    help="torch threads (default 1: a model this small only loses time to thread "
    "contention, on a shared machine badly; 0 keeps torch's default, one per core)",
)
args = parser.parse_args()
if args.threads > 0:
    torch.set_num_threads(args.threads)
print(f"torch threads: {torch.get_num_threads()}")

torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x = torch.tensor(x / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
y = torch.tensor(y)
x_train, y_train, x_test, y_test = x[:300], y[:300], x[1500:1510], y[1500:1510]

model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 4, 3),
    torch.nn.Tanh(),
    torch.nn.Conv2d(4, 4, 3),
    torch.nn.Tanh(),
    torch.nn.Flatten(),
    torch.nn.Linear(4 * 4 * 4, 10),
).double()
lam = 1e-2


def objective():
    theta = torch.cat([p.reshape(-1) for p in model.parameters()])
    return torch.nn.functional.cross_entropy(model(x_train), y_train) + 0.5 * lam * theta @ theta


adam = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(300):
    adam.zero_grad()
    objective().backward()
    adam.step()
lbfgs = torch.optim.LBFGS(
    model.parameters(), max_iter=1000, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
)


def closure():
    lbfgs.zero_grad()
    loss = objective()
    loss.backward()
    return loss


lbfgs.step(closure)
model.eval()
with torch.no_grad():
    acc = (model(x[1200:]).argmax(1) == y[1200:]).double().mean().item()
print(f"{sum(p.numel() for p in model.parameters())} parameters, held-out accuracy {acc:.3f}")

gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
data = (x_train, y_train)
exact = xi.DirectInfluence(gp, regularization=lam).fit(data)
ref = exact.influences(x_test, y_test, x_train, y_train)  # (10, 300)
for name, infl in [
    ("CG", xi.CgInfluence(gp, regularization=lam, rtol=1e-9)),
    ("Arnoldi rank 50", xi.ArnoldiInfluence(gp, regularization=lam, rank=50)),
]:
    got = infl.fit(data).influences(x_test, y_test, x_train, y_train)
    err = (torch.linalg.norm(got - ref) / torch.linalg.norm(ref)).item()
    print(f"{name}: relative error against the exact solve {err:.2e}")
    if name == "CG":
        assert err < 1e-6

# which training images support the first test prediction most
top = torch.argsort(ref[0], descending=True)[:5]
print(f"test label {y_test[0].item()}; most helpful training labels {y_train[top].tolist()}")
