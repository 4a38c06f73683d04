"""The gradient store (featurize once, score many) against the floor and today's path.

    python benchmarks/run_gradient_store.py              # MLP 64-256-256-10, 5,000 points
    python benchmarks/run_gradient_store.py --n-train 20000 --widths 100,1024,896,10

Model: a random-init tanh MLP in float32 (timing only: tests/test_gradient_store.py
checks the numbers), ``ProjectedInfluence(projection="kronecker", k=(kk, kk))`` per
layer with ``block_structure="layer"``. Figures, all in the same run:

* build: ``GradientStore.build`` over the training set, per 1,000 points, as a
  multiple of two floors: every per-sample gradient once (``flat_grads``) and
  every forward and backward pass once (``kfac_factors``, which is what the
  Kronecker projection needs);
* scoring ``--n-queries`` queries: ``store.influences`` (query featurization +
  blocked products) against the bare product ``Q F^T`` plus reading the store
  (``store.features()``, verified), measured in the same run;
* today's path: ``SequentialInfluenceCalculator(model).influences(batch, train)``
  for ``--today-batches`` batches of 100 queries, against the store for the
  same batches.

Unknown arguments (those ``nox -s bench -- ...`` passes to every script) are ignored;
``--quick`` shrinks the case.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import xinfluence as xi  # noqa: E402
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402
from xinfluence.compute import GradientStore, SequentialInfluenceCalculator  # noqa: E402


def build(widths, seed=0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).eval()


def data(widths, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g)
    teacher = torch.randn(widths[0], widths[-1], generator=g)
    y = torch.argmax(x @ teacher + torch.randn(n, widths[-1], generator=g), dim=1)
    return x, y


def batches(x, y, size):
    return [(x[s : s + size], y[s : s + size]) for s in range(0, len(x), size)]


def clock(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,256,256,10")
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-queries", type=int, default=1000)
    ap.add_argument("--kk", type=int, default=16, help="k = (kk, kk) per layer")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--today-batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args, _ = ap.parse_known_args(argv)
    if args.quick:
        args.n_train, args.n_queries, args.today_batches = 1000, 200, 2
    torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    net = build(widths)
    gp = TorchGradientProvider(net, nn.functional.cross_entropy)
    x, y = data(widths, args.n_train, seed=1)
    xq, yq = data(widths, max(args.n_queries, 100 * args.today_batches), seed=2)
    train = batches(x, y, args.batch)
    n, p = len(x), gp.n_parameters
    print(f"== MLP {widths}: P = {p:,}, N = {n:,}, float32, {args.threads} threads")

    model = xi.ProjectedInfluence(
        gp,
        k=(args.kk, args.kk),
        projection="kronecker",
        block_structure="layer",
        regularization=1e-3,
    )
    fit_s, _ = clock(lambda: model.fit(train))
    gp.flat_grads(xi.Batch(x[:8].clone(), y[:8].clone()))  # warm-up
    # fresh tensors: the provider remembers factors of batches it has seen
    fresh = [(a.clone(), b.clone()) for a, b in train]
    floor_g, _ = clock(lambda: [gp.flat_grads(xi.Batch(a, b)) for a, b in fresh])

    def forward_backward():
        for a, b in fresh:
            net.zero_grad()
            nn.functional.cross_entropy(net(a), b).backward()

    forward_backward()
    floor_fb, _ = clock(forward_backward)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.zarr"
        build_s, store = clock(
            lambda: GradientStore.build(model, train, path, progress=False, dtype="float32")
        )
        k = store.shape[1]
        per = 1000 / n
        print(f"fit {fit_s:.2f} s; store: N x k = {n:,} x {k:,}, {store.block_rows} rows/block")
        print(
            f"build {build_s * per:.3f} s / 1,000 points = {build_s / floor_g:.2f}x the "
            f"per-sample-gradient floor ({floor_g * per:.3f} s), {build_s / floor_fb:.2f}x "
            f"the forward+backward floor ({floor_fb * per:.3f} s)"
        )
        # scoring: full matrix of n_queries queries
        q_x, q_y = xq[: args.n_queries], yq[: args.n_queries]
        store.influences(model, q_x[:4], q_y[:4])  # warm-up (the model check)
        score_s, scores = clock(lambda: store.influences(model, q_x, q_y))
        qf_s, qf = clock(lambda: store.query_features(model, q_x, q_y))
        read_s, feats = clock(store.features)
        mm_s, _ = clock(lambda: qf @ torch.from_numpy(feats).T)
        bare = read_s + mm_s
        print(
            f"score {args.n_queries} queries: {score_s:.3f} s = {score_s / bare:.2f}x the "
            f"bare product + reading the store ({mm_s:.3f} + {read_s:.3f} s); of it, query "
            f"featurization {qf_s:.3f} s"
        )
        # against today's path: batches of 100 queries through the calculator
        calc = SequentialInfluenceCalculator(model, progress=False)
        nb = args.today_batches
        today_s, _ = clock(
            lambda: [
                calc.influences(
                    (xq[i * 100 : (i + 1) * 100], yq[i * 100 : (i + 1) * 100]), train
                ).compute()
                for i in range(nb)
            ]
        )
        ours_s, _ = clock(
            lambda: [
                store.influences(model, xq[i * 100 : (i + 1) * 100], yq[i * 100 : (i + 1) * 100])
                for i in range(nb)
            ]
        )
        print(
            f"{nb} batches of 100 queries: store {ours_s:.3f} s, today's calculator "
            f"{today_s:.2f} s: {ours_s / today_s:.4f}x (store build {build_s:.2f} s once)"
        )
        ref = model.influences(q_x[:20], q_y[:20], x, y)
        err = float(torch.linalg.norm(scores[:20] - ref) / torch.linalg.norm(ref))
        print(f"relative error of the float32 store's scores vs model.influences: {err:.2e}")


if __name__ == "__main__":
    main()
