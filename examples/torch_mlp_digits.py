"""The most helpful and harmful training images of one prediction (PyTorch MLP).

Trains a 64-32-10 MLP on scikit-learn's digits (float64, full-batch L-BFGS with
weight decay), then asks: which training images most supported, and which most
opposed, the model's prediction for a test image? Scores are up-weighting
influences I[t, j] = g_t^T (H + lambda I)^-1 g_j: positive means training image
j lowered the loss of test image t (it helped), negative means it raised it.

lambda is the weight decay of training: the trained parameters minimise the mean
loss plus (lambda / 2)|theta|^2, so H + lambda I is the Hessian of the training
objective, positive definite at a minimum.

Run: python examples/torch_mlp_digits.py   (needs torch and scikit-learn)
     --threads N: torch threads (default 1; 0 keeps torch's default, one per core)
"""

import argparse

import numpy as np
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
x = torch.tensor(x / 16.0, dtype=torch.float64)
y = torch.tensor(y, dtype=torch.int64)
x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]

model = torch.nn.Sequential(
    torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
).double()
weight_decay = 1e-3
opt = torch.optim.LBFGS(
    model.parameters(), max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
)


def closure():
    opt.zero_grad()
    theta = torch.cat([p.reshape(-1) for p in model.parameters()])
    loss = torch.nn.functional.cross_entropy(model(x_train), y_train)
    loss = loss + 0.5 * weight_decay * theta @ theta
    loss.backward()
    return loss


for _ in range(3):
    opt.step(closure)
model.eval()
with torch.no_grad():
    accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
print(f"test accuracy {accuracy:.3f}")

gp = TorchGradientProvider(model, torch.nn.functional.cross_entropy)
# CG: no dense Hessian; loaders work too (fit(DataLoader(...)))
infl = xi.CgInfluence(gp, regularization=weight_decay, rtol=1e-8).fit((x_train, y_train))

t = 3  # one test image
scores = infl.influences(x_test[t : t + 1], y_test[t : t + 1], x_train, y_train)[0]
with torch.no_grad():
    predicted = model(x_test[t : t + 1]).argmax(1).item()
print(f"test image {t}: label {y_test[t].item()}, predicted {predicted}")
order = torch.argsort(scores, descending=True)
print("most helpful training images (index, label, score):")
for j in order[:5].tolist():
    print(f"  {j:5d}  {y_train[j].item()}  {scores[j].item():+.4g}")
print("most harmful training images:")
for j in order.flip(0)[:5].tolist():
    print(f"  {j:5d}  {y_train[j].item()}  {scores[j].item():+.4g}")

# the same numbers as the exact solve (dense Hessian, 2410 parameters)
exact = xi.DirectInfluence(gp, regularization=weight_decay).fit((x_train, y_train))
ref = exact.influences(x_test[t : t + 1], y_test[t : t + 1], x_train, y_train)[0]
err = (torch.linalg.norm(scores - ref) / torch.linalg.norm(ref)).item()
print(f"CG against the exact solve: relative error {err:.2e}")
assert err < 1e-5
assert np.isfinite(scores.numpy()).all()
