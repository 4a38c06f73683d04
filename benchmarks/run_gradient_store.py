"""The gradient store (featurize once, score many) against the floor and today's path.

    python benchmarks/run_gradient_store.py            # issue #22's sizes (about 15 min, 2 cores)
    python benchmarks/run_gradient_store.py --quick    # a small case (under a minute)

Case (defaults): a random-init tanh MLP 100-1024-896-10 in float32 (P = 1,030,794),
``ProjectedInfluence(projection="kronecker", k=(43, 43), block_structure="layer")``:
``(43, 43)`` on each hidden layer and ``(10, 43)`` on the output layer, k = 4,128 in
total; regularization 1e-3, fitted on the first ``--n-fit`` training points (the
fit's cost is not measured here). ``--n-train`` training points (200,000) are
generated batch by batch from seeds, never held whole, so that the memory figure
is the store's. Timing only: tests/test_gradient_store.py checks the numbers.
Figures, each ratio from one process:

* (a) build: ``GradientStore.build`` (float32 storage) per 1,000 points, as a
  multiple of the floor, every forward and backward pass once (what the
  Kronecker projection needs: ``loss.backward()`` over the same batches),
  measured just before the build in the same process;
* (b) scoring ``--n-queries`` queries: ``GradientStore.open`` and
  ``store.influences`` (verifying every block's checksum, featurizing the
  queries, blocked products), against the bare product ``Q F^T`` of the
  precomputed query features with every block plus reading the blocks from
  the zarr store (no checksums), in the same process;
* (c) ``--today-batches`` batches of 100 queries: the store (opened afresh for
  each batch) against today's path, ``SequentialInfluenceCalculator(model)
  .influences(batch, train)``. Today's path passes over the training data once
  per batch, so it is timed on ``--today-n`` training points and 2 batches and
  scaled linearly to ``--n-train`` points and ``--today-batches`` batches;
* (d) peak memory: ``ru_maxrss`` of a fresh subprocess per size (``--n-train / 10``
  and ``--n-train``) after the build and after a streaming ``top_k`` of 100
  queries (before the full ``(N_test, N)`` matrix, which is ``4 N_test N`` bytes).

Results: ``benchmarks/results/gradient_store.{json,md}``. Unknown arguments
(those ``nox -s bench -- ...`` passes to every script) are ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402
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


class Stream:
    """``n`` points in batches of ``batch``, batch ``i`` drawn from seed ``(seed, i)``:
    re-iterable, never held whole."""

    def __init__(self, widths, n, batch, seed):
        self.widths, self.n, self.batch, self.seed = widths, n, batch, seed
        g = torch.Generator().manual_seed(12345)
        self.teacher = torch.randn(widths[0], widths[-1], generator=g)

    def __iter__(self):
        for i, start in enumerate(range(0, self.n, self.batch)):
            m = min(self.batch, self.n - start)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            x = torch.randn(m, self.widths[0], generator=g)
            noise = torch.randn(m, self.widths[-1], generator=g)
            yield x, torch.argmax(x @ self.teacher + noise, dim=1)

    def take(self, n):
        xs, ys = zip(*Stream(self.widths, n, self.batch, self.seed))
        return torch.cat(xs), torch.cat(ys)


def clock(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(args):
    torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    net = build(widths)
    gp = TorchGradientProvider(net, nn.functional.cross_entropy)
    model = xi.ProjectedInfluence(
        gp,
        k=(args.kk, args.kk),
        projection="kronecker",
        block_structure="layer",
        regularization=1e-3,
    )
    fit_s, _ = clock(lambda: model.fit(Stream(widths, args.n_fit, args.batch, seed=1)))
    return widths, net, gp, model, fit_s


def child(args):
    """One size in a fresh process: floor, build, streaming top-k (peak memory), and
    at full size the scoring figures. Prints one JSON line."""
    widths, net, gp, model, fit_s = setup(args)
    n = args.n_train
    train = Stream(widths, n, args.batch, seed=1)
    queries = Stream(widths, max(args.n_queries, 100 * args.today_batches), 1000, seed=2)
    xq, yq = queries.take(queries.n)
    out = {"n": n, "p": gp.n_parameters, "fit_s": fit_s, "n_fit": args.n_fit}

    def forward_backward():
        for a, b in train:
            net.zero_grad()
            nn.functional.cross_entropy(net(a), b).backward()
        net.zero_grad()

    forward_backward_small = Stream(widths, 2 * args.batch, args.batch, seed=3)
    for a, b in forward_backward_small:  # warm-up
        nn.functional.cross_entropy(net(a), b).backward()
    out["floor_s"], _ = clock(forward_backward)
    out["rss_before_build_mb"] = rss_mb()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "store.zarr"
        out["build_s"], store = clock(
            lambda: GradientStore.build(model, train, path, progress=False, dtype="float32")
        )
        out["rss_build_mb"] = rss_mb()
        out["k"], out["block_rows"] = store.shape[1], store.block_rows
        out["store_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        q_x, q_y = xq[: args.n_queries], yq[: args.n_queries]
        # top_k partitions every block: 100 queries suffice for the memory figure
        out["topk_s"], _ = clock(
            lambda: GradientStore.open(path).top_k(model, q_x[:100], q_y[:100], k=10)
        )
        out["rss_topk_mb"] = rss_mb()
        if not args.scoring:
            print(json.dumps(out))
            return
        # (b) scoring against the bare product plus reading the store
        store = GradientStore.open(path)
        qf = store.query_features(model, q_x[:4], q_y[:4])  # warm-up
        out["query_features_s"], qf = clock(lambda: store.query_features(model, q_x, q_y))
        values = store.array

        def bare():
            read = mm = 0.0
            for r0 in range(0, n, store.block_rows):
                t0 = time.perf_counter()
                block = torch.from_numpy(np.asarray(values[r0 : r0 + store.block_rows, :]))
                t1 = time.perf_counter()
                qf @ block.T
                mm += time.perf_counter() - t1
                read += t1 - t0
            return read, mm

        out["bare_read_s"], out["bare_mm_s"] = bare()
        out["score_s"], scores = clock(lambda: GradientStore.open(path).influences(model, q_x, q_y))
        read2, mm2 = bare()
        out["bare_read_s"] = min(out["bare_read_s"], read2)
        out["bare_mm_s"] = min(out["bare_mm_s"], mm2)
        # the numbers: against the model's own influences on the first 2,000 points
        xt, yt = train.take(min(n, 2000))
        ref = model.influences(q_x[:20], q_y[:20], xt, yt)
        got = scores[:20, : len(xt)]
        out["rel_err_float32"] = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
        del scores
        # (c) batches of 100 queries, the store opened afresh for each
        nb = args.today_batches
        out["batches_store_s"], _ = clock(
            lambda: [
                GradientStore.open(path).influences(
                    model, xq[i * 100 : (i + 1) * 100], yq[i * 100 : (i + 1) * 100]
                )
                for i in range(nb)
            ]
        )
    print(json.dumps(out))


def today(args):
    """Today's path on ``--today-n`` points, 2 batches of 100 queries."""
    widths, _, _, model, _ = setup(args)
    train = list(Stream(widths, args.today_n, args.batch, seed=1))
    xq, yq = Stream(widths, 200, 200, seed=2).take(200)
    calc = SequentialInfluenceCalculator(model, progress=False)
    calc.influences((xq[:2], yq[:2]), train[:1]).compute()  # warm-up
    s, _ = clock(
        lambda: [
            calc.influences(
                (xq[i * 100 : (i + 1) * 100], yq[i * 100 : (i + 1) * 100]), train
            ).compute()
            for i in range(2)
        ]
    )
    print(json.dumps({"today_n": args.today_n, "today_batches": 2, "today_s": s}))


def run_child(argv, mode, **extra):
    cmd = [sys.executable, __file__, *argv, f"--{mode}"]
    for key, value in extra.items():
        flag = f"--{key.replace('_', '-')}"
        cmd += [flag] if value is True else [flag, str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"{mode} run failed ({res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(args, small, full, old, load):
    n, k = full["n"], full["k"]
    per = 1000 / n
    a = full["build_s"] / full["floor_s"]
    bare = full["bare_read_s"] + full["bare_mm_s"]
    b = full["score_s"] / bare
    today_scaled = old["today_s"] * (n / old["today_n"]) * (args.today_batches / 2)
    c = full["batches_store_s"] / today_scaled
    rows = [
        (
            "(a) build, per 1,000 points",
            f"{full['build_s'] * per:.3f} s = {a:.2f}x the floor "
            f"({full['floor_s'] * per:.3f} s: forward+backward once)",
            "<= 1.5x",
        ),
        (
            f"(b) score {args.n_queries:,} queries x {n:,} rows",
            f"{full['score_s']:.1f} s = {b:.2f}x (bare product {full['bare_mm_s']:.1f} s "
            f"+ reading the store {full['bare_read_s']:.1f} s); of it query features "
            f"{full['query_features_s']:.1f} s",
            "<= 2x",
        ),
        (
            f"(c) {args.today_batches} batches of 100 queries",
            f"store {full['batches_store_s']:.1f} s, today's path {today_scaled:,.0f} s "
            f"(scaled from {old['today_s']:.1f} s for 2 batches on {old['today_n']:,} "
            f"points): {c:.5f}x",
            "<= 0.1x",
        ),
        (
            "(d) peak memory (ru_maxrss), build / + top_k",
            f"N = {small['n']:,}: {small['rss_build_mb']:,.0f} / {small['rss_topk_mb']:,.0f} MB;"
            f" N = {n:,}: {full['rss_build_mb']:,.0f} / {full['rss_topk_mb']:,.0f} MB",
            "flat in N",
        ),
    ]
    lines = [
        f"## Gradient store (issue #22): MLP {args.widths}, P = {full['p']:,}, "
        f"k = {k:,} (Kronecker ({args.kk}, {args.kk}) per layer), N = {n:,}, "
        f"float32 model and storage, {args.threads} threads",
        "",
        f"Load average at start / end: {load[0]} / {load[1]}. Store: {full['block_rows']:,} "
        f"rows per block, {full['store_bytes'] / 2**30:.2f} GiB on disk; "
        f"top_k(10) of 100 queries {full['topk_s']:.1f} s; fit on "
        f"{full['n_fit']:,} points {full['fit_s']:.1f} s (not counted); relative error of the "
        f"float32 store's scores against model.influences: {full['rel_err_float32']:.1e}.",
        "",
        "| figure | measured | goal |",
        "|---|---|---|",
        *(f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows),
        "",
    ]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="100,1024,896,10")
    ap.add_argument("--n-train", type=int, default=200_000)
    ap.add_argument("--n-fit", type=int, default=20_000)
    ap.add_argument("--n-queries", type=int, default=1000)
    ap.add_argument("--kk", type=int, default=43, help="k = (kk, kk) per layer")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--today-batches", type=int, default=10)
    ap.add_argument("--today-n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the temporary stores go")
    ap.add_argument("--output", default=str(HERE / "results" / "gradient_store.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--today", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scoring", action="store_true", help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args(argv)
    if args.quick:
        args.widths, args.kk = "64,256,256,10", 16
        args.n_train, args.n_fit, args.n_queries, args.today_n = 5000, 2000, 200, 500
    if args.child:
        return child(args)
    if args.today:
        return today(args)
    keep = [a for a in argv if a not in ("--quick",)]
    if args.quick:
        keep += ["--widths", args.widths, "--kk", str(args.kk)]
        keep += ["--n-fit", str(args.n_fit), "--n-queries", str(args.n_queries)]
    load0 = os.getloadavg()[0]
    print(f"== gradient store: MLP {args.widths}, N = {args.n_train:,} (load {load0:.1f})")
    small = run_child(keep, "child", n_train=max(1, args.n_train // 10))
    print(f"N = {small['n']:,}: {json.dumps(small)}", flush=True)
    full = run_child(keep, "child", n_train=args.n_train, scoring=True)
    print(f"N = {full['n']:,}: {json.dumps(full)}", flush=True)
    old = run_child(keep, "today", today_n=args.today_n)
    print(f"today's path: {json.dumps(old)}", flush=True)
    load = (f"{load0:.1f}", f"{os.getloadavg()[0]:.1f}")
    text = report(args, small, full, old, load)
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"small": small, "full": full, "today": old, "load": load}))
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
