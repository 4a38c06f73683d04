"""ProjectedInfluence (TRAK / LoGra) against the floor: every per-sample gradient once.

    python benchmarks/run_projection.py                 # 1M MLP (10,000 points) and 99k MLP
    python benchmarks/run_projection.py --cases mlp99k  # the quick one
    python benchmarks/run_projection.py --device cuda

Workload per case: ``fit`` on a DataLoader, then ``influences`` of the test
points against every training point (mode up). The *floor* is the time of
``TorchGradientProvider.flat_grads`` over all training points once (batches of
``--floor-batch``), measured in the same run; every method is reported as a
ratio to it. Models are random-init tanh MLPs on synthetic data (timing only;
accuracy is what tests/test_projection.py checks against DirectInfluence), in
float32 (``--dtype float64`` possible). Each timing is the best of
``--repeats`` runs after one untimed warm-up on a small workload.

Cases:

* ``mlp1m``: 100-1024-896-10, 1,030,794 parameters, 10,000 training and 100 test
  points, batches of 500;
* ``mlp99k``: 64-300-256-10, 99,126 parameters (the size of benchmarks/_problem.py's
  large case), 1,000 training and 100 test points, batches of 250.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import xinfluence as xi  # noqa: E402
from xinfluence.backends.torch import TorchGradientProvider  # noqa: E402

CASES = {
    "mlp1m": dict(widths=(100, 1024, 896, 10), n_train=10_000, n_test=100, batch=500),
    "mlp99k": dict(widths=(64, 300, 256, 10), n_train=1_000, n_test=100, batch=250),
}


def build(widths, dtype, device, seed=0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(device=device, dtype=dtype).eval()


def data(widths, n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g, dtype=torch.float64)
    teacher = torch.randn(widths[0], widths[-1], generator=g, dtype=torch.float64)
    y = torch.argmax(x @ teacher + torch.randn(n, widths[-1], generator=g), dim=1)
    return x.to(device=device, dtype=dtype), y.to(device)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def run_case(name, args):
    cfg = dict(CASES[name])
    if args.n_train:
        cfg["n_train"] = args.n_train
    dtype = getattr(torch, args.dtype)
    device = args.device
    model = build(cfg["widths"], dtype, device)
    gp = TorchGradientProvider(model, nn.functional.cross_entropy)
    x, y = data(cfg["widths"], cfg["n_train"], dtype, device, seed=1)
    xt, yt = data(cfg["widths"], cfg["n_test"], dtype, device, seed=2)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg["batch"], shuffle=False)
    small = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32, shuffle=False)
    p = gp.n_parameters
    print(f"\n== {name}: P = {p:,}, n = {len(x):,}, test = {len(xt)}, {args.dtype}, {device}")

    def floor(xs=x, ys=y):
        for start in range(0, len(xs), args.floor_batch):
            sl = slice(start, start + args.floor_batch)
            gp.flat_grads(xi.Batch(xs[sl], ys[sl]))

    floor(x[:64], y[:64])  # warm-up
    floor_s = timed(floor, device, args.repeats)
    print(f"floor (all per-sample gradients once): {floor_s:.3f} s")
    rows = []
    configs = []
    for spec in args.methods.split(","):
        kind, _, rest = spec.partition(":")
        configs.append((kind, rest))
    for kind, rest in configs:
        if kind == "dense" and p > args.dense_max_p:
            print(f"skip dense on P = {p:,} (> --dense-max-p {args.dense_max_p:,})")
            continue
        if kind == "dense":
            kw = dict(projection="dense", k=int(rest or 1024))
        elif kind == "kron":
            parts = (rest or "32x32").split("x")
            k = int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
            kw = dict(projection="kronecker", k=k)
        elif kind == "kronlayer":
            kw = dict(projection="kronecker", k=int(rest or 1024), block_structure="layer")
        else:
            raise SystemExit(f"unknown method {kind!r}")
        label = f"{kind}:{rest}" if rest else kind

        def make(kw=kw):
            return xi.ProjectedInfluence(gp, regularization=args.regularization, seed=0, **kw)

        model_ = make()
        model_.fit(small).influences(xt[:4], yt[:4], x[:64], y[:64])  # warm-up

        state = {}

        def fit(state=state, make=make):
            state["m"] = make().fit(loader)

        def scores(state=state):
            state["s"] = state["m"].influences(xt, yt, x, y)

        fit_s = timed(fit, device, args.repeats)
        score_s = timed(scores, device, args.repeats)
        k_total = sum(pr.output_size for pr in state["m"].projections().values())
        total = fit_s + score_s
        rows.append(
            dict(
                case=name,
                method=label,
                k_total=k_total,
                fit_s=fit_s,
                scores_s=score_s,
                total_s=total,
                floor_s=floor_s,
                ratio=total / floor_s,
            )
        )
        print(
            f"{label:>14}: k = {k_total:5d}  fit {fit_s:.3f} s  scores {score_s:.3f} s  "
            f"total {total:.3f} s  = {total / floor_s:.2f} x floor"
        )
        assert tuple(state["s"].shape) == (len(xt), len(x))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default="mlp1m,mlp99k")
    ap.add_argument(
        "--methods",
        default="kron:341,kron:32x32,kronlayer:1024,dense:1024",
        help="kron:K (per-layer k, blocks 'full'), kron:AxB (k_out x k_in per layer), "
        "kronlayer:K (per-layer blocks), dense:K",
    )
    ap.add_argument("--n-train", type=int, default=0, help="override the cases' training size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--floor-batch", type=int, default=200)
    ap.add_argument("--regularization", type=float, default=1e-3)
    ap.add_argument("--dense-max-p", type=int, default=200_000)
    ap.add_argument("--output", default=str(HERE / "results" / "projection.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.cases.split(","):
        rows.extend(run_case(name, args))
    env = dict(
        platform=platform.platform(),
        torch=torch.__version__,
        threads=args.threads,
        device=args.device,
        gpu=torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
        load=os.getloadavg(),
        dtype=args.dtype,
    )
    print("\n| case | method | k (total) | fit s | scores s | floor s | total / floor |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['method']} | {r['k_total']} | {r['fit_s']:.2f} | "
            f"{r['scores_s']:.2f} | {r['floor_s']:.2f} | {r['ratio']:.2f} |"
        )
    print("environment:", env)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(rows=rows, env=env), indent=1))


if __name__ == "__main__":
    main()
