"""A small GPT-2: EK-FAC against kronfluence 1.0.1, and LoGra-style projections
against the floor (measurements, not tests).

Problem (``_lm_problem.py``): Hugging Face ``GPT2LMHeadModel`` built from a config
(byte vocabulary of 256 tokens, no download), trained briefly on deterministic
synthetic text, float64; sequences of ``--seq-len`` tokens, every token counted.
Tracked layers: every ``Conv1D`` of every block, ``attn.c_attn``, ``attn.c_proj``,
``mlp.c_fc`` and ``mlp.c_proj`` (embeddings, LayerNorms and the tied head are out
of the curvature and the scores on both sides). The per-sequence loss is the sum
of its token cross-entropies (``CausalLMLoss("sum")``; kronfluence: ``reduction=
"sum"`` over the batch), queries are held-out sequences with the same loss.

Rows, each in a fresh process (peak memory: that process's peak RSS over the
timed calls minus its RSS before them):

* **floor**: one forward and backward pass of the batch's summed loss over the
  training sequences (all parameters, plain autograd);
* **ekfac**: ``EkfacInfluence(second_order="empirical_fisher")`` over the tracked
  layers: ``fit`` and ``influences`` of the queries against every training
  sequence, timed separately;
* **kronfluence**: its EK-FAC (``use_empirical_fisher=True``, every dtype
  float64, the same absolute damping, all examples), ``fit_all_factors`` and
  ``compute_pairwise_scores``, in its own environment ``benchmarks/.envs/
  kronfluence`` (``run_large_models.kronfluence_python``; ``transformers`` added).
  kronfluence tracks ``nn.Linear`` only: its worker replaces each ``Conv1D`` by
  the equivalent ``nn.Linear`` (weight transposed), as kronfluence's own GPT-2
  example does;
* **logra**: ``ProjectedInfluence(projection="kronecker", k=(64, 64),
  block_structure="layer")`` (LoGra: per layer ``R_s kron R_a``, 4,096 numbers),
  ``fit`` (one pass: the projected empirical Fisher) and ``influences``, each as
  a multiple of the floor.

Sizes: the default GPT-2 has width 256, 2 blocks, 4 heads (1,661,952 parameters,
1,577,472 of them in the 8 tracked layers), 2,000 training sequences of 64
tokens and 16 queries; ``--quick``: width 64, 2 blocks (120,576 parameters),
256 sequences, 8 queries. xinfluence's memory budget (``--memory-budget``, sizes
its query chunks) defaults to 1 GiB (``--quick``: 64 MiB), about kronfluence's
peak with batches of ``--batch-size`` 32 sequences.

    python benchmarks/run_language_model.py [--quick] [--n-train N] [--seq-len T]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from run_large_models import (  # noqa: E402
    kronfluence_float64_arguments,
    kronfluence_python,
    peak_bytes,
    reset_peak,
    rss_bytes,
    run_worker,
)

REG = 1e-3
FULL = dict(n_embd=256, n_layer=2, n_head=4, seq_len=64, n_train=2000, n_test=16, train_steps=30)
QUICK = dict(n_embd=64, n_layer=2, n_head=2, seq_len=64, n_train=256, n_test=8, train_steps=30)
BUDGET = {"full": 2**30, "quick": 2**26}


# -- worker (one configuration per process) ------------------------------------------


def worker(args: argparse.Namespace) -> dict:
    import _lm_problem as lp
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    model, config, data = lp.load_problem(args.problem)
    x, xt = data["train"], data["test"]
    bs = args.batch_size
    if args.method == "kronfluence":
        return kronfluence_run(model, config, x, xt, args)
    if args.method == "floor":
        return floor_run(model, x, bs)

    import xinfluence as xi
    from xinfluence.backends.torch import TorchGradientProvider
    from xinfluence.backends.torch_text import CausalLMLogits, CausalLMLoss

    lm = CausalLMLogits(model)
    layers = ["model." + k for k in lp.tracked_layers(config)]
    gp = TorchGradientProvider(lm, CausalLMLoss("sum"), cast_inputs=False, layers=layers)
    train = [(x[i : i + bs], x[i : i + bs]) for i in range(0, len(x), bs)]
    if args.method == "ekfac":
        infl = xi.EkfacInfluence(gp, regularization=REG, second_order="empirical_fisher")
    elif args.method == "logra":
        # the floor again in this process, just before: the ratio is then measured
        # under the same machine load (shared machines drift between processes)
        own_floor = floor_run(model, x, bs)["seconds"]
        infl = xi.ProjectedInfluence(
            gp,
            k=(64, 64),
            projection="kronecker",
            block_structure="layer",
            regularization=REG,
        )
    else:
        raise ValueError(args.method)
    base = rss_bytes()
    reset_peak()
    start = time.perf_counter()
    infl.fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = infl.influences(xt, xt, train)
    score_s = time.perf_counter() - start
    np.save(args.scores_out, scores.numpy())
    out = {
        "fit_s": fit_s,
        "score_s": score_s,
        "peak_extra": peak_bytes() - base,
        "peak_rss": peak_bytes(),
        "p_tracked": gp.n_parameters,
    }
    if args.method == "logra":
        out["floor_same_process_s"] = own_floor
        out["fit_to_own_floor"] = fit_s / own_floor
        out["score_to_own_floor"] = score_s / own_floor
    return out


def floor_run(model, x, bs) -> dict:
    """One forward and backward pass over ``x`` (the summed token cross-entropy of
    each batch; every parameter gets its gradient)."""
    import torch
    import torch.nn.functional as F

    def one_pass() -> None:
        for i in range(0, len(x), bs):
            ids = x[i : i + bs]
            logits = model(input_ids=ids, use_cache=False).logits
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="sum")
            model.zero_grad(set_to_none=True)
            loss.backward()

    with torch.no_grad():  # warm-up, untimed
        model(input_ids=x[:2], use_cache=False)
    base = rss_bytes()
    reset_peak()
    start = time.perf_counter()
    one_pass()
    return {"seconds": time.perf_counter() - start, "peak_extra": peak_bytes() - base}


def kronfluence_run(model, config, x, xt, args) -> dict:
    import _lm_problem as lp
    import numpy as np
    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.task import Task
    from torch import nn
    from torch.utils.data import TensorDataset
    from transformers.pytorch_utils import Conv1D

    def replace_conv1d(module: nn.Module) -> None:
        # kronfluence tracks nn.Linear and nn.Conv2d: Conv1D (y = x W + b) becomes
        # the nn.Linear with weight W^T, as in kronfluence's GPT-2 example
        for name, child in module.named_children():
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1], dtype=torch.float64)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    lin.bias.copy_(child.bias)
                setattr(module, name, lin)
            else:
                replace_conv1d(child)

    replace_conv1d(model)
    tracked = lp.tracked_layers(config)

    def summed_loss(model, ids, sample: bool = False):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        logits = logits.reshape(-1, logits.shape[-1])
        if sample:  # the true Fisher's sampled labels (not used: empirical Fisher)
            with torch.no_grad():
                target = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
        else:
            target = ids[:, 1:].reshape(-1)
        return F.cross_entropy(logits, target, reduction="sum")

    class LanguageModelTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return summed_loss(model, batch[0], sample)

        def compute_measurement(self, batch, model):
            return summed_loss(model, batch[0])

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return None

    task = LanguageModelTask()
    model = prepare_model(model, task)
    # every example (the defaults stop at 100,000)
    factor_args, score_args = kronfluence_float64_arguments(
        REG, covariance_max_examples=None, lambda_max_examples=None
    )
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(
            analysis_name="lm",
            model=model,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=tmp,
        )
        train, test = TensorDataset(x), TensorDataset(xt)
        base = rss_bytes()
        reset_peak()
        start = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name="f",
            dataset=train,
            per_device_batch_size=args.batch_size,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name="s",
            factors_name="f",
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=len(xt),
            per_device_train_batch_size=args.batch_size,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        score_s = time.perf_counter() - start
        scores = analyzer.load_pairwise_scores("s")["all_modules"]
        np.save(args.scores_out, scores.numpy())
    return {
        "fit_s": fit_s,
        "score_s": score_s,
        "peak_extra": peak_bytes() - base,
        "peak_rss": peak_bytes(),
    }


# -- orchestrator ------------------------------------------------------------------------


def run_one(python: str, problem: str, method: str, opts: argparse.Namespace) -> dict:
    args = [
        "--problem",
        problem,
        "--method",
        method,
        "--threads",
        str(opts.threads),
        "--batch-size",
        str(opts.batch_size),
    ]
    return run_worker(
        python,
        str(Path(__file__).resolve()),
        args,
        threads=opts.threads,
        budget=int(opts.memory_budget),
        error_lines=3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--scores-out", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a 2-layer model, 256 sequences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    parser.add_argument("--n-train", type=int, help="training sequences")
    parser.add_argument("--n-test", type=int, help="query sequences")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence")
    parser.add_argument("--n-layer", type=int, help="GPT-2 blocks")
    parser.add_argument("--n-embd", type=int, help="GPT-2 width")
    parser.add_argument("--lm-methods", default="floor,ekfac,kronfluence,logra")
    parser.add_argument(
        "--memory-budget",
        type=float,
        help="xinfluence's memory budget in bytes (sizes its query chunks; default 1 GiB, "
        "--quick 64 MiB: about kronfluence's peak)",
    )
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--output", default=str(HERE / "results" / "language_model.json"))
    args, _ = parser.parse_known_args()  # nox -s bench passes the other scripts' options
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import _lm_problem as lp

    config = dict(QUICK if args.quick else FULL)
    for key in ("n_train", "n_test", "seq_len", "n_layer", "n_embd"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.memory_budget is None:
        args.memory_budget = BUDGET["quick" if args.quick else "full"]
    methods = args.lm_methods.split(",")
    kf = None
    if "kronfluence" in methods and not args.skip_kronfluence:
        kf = kronfluence_python(extra=("transformers==5.25.0",))
    path = os.path.join(tempfile.gettempdir(), f"xinfluence_lm_{os.getpid()}.npz")
    start = time.perf_counter()
    info = lp.make_problem(config, path)
    info["train_s"] = time.perf_counter() - start
    report: dict = {"conditions": conditions(args, config), "problem": info}
    print(json.dumps(report), flush=True)
    rows: dict = {}
    try:
        for method in methods:
            if method == "kronfluence":
                if kf is None:
                    continue
                rows[method] = run_one(str(kf), path, method, args)
            else:
                rows[method] = run_one(sys.executable, path, method, args)
            print(method, json.dumps(rows[method]), flush=True)
    finally:
        os.unlink(path)
    summarize(rows, config)
    report["rows"] = rows
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1, default=str))
    print(format_report(rows, config))


def summarize(rows: dict, config: dict) -> None:
    """Score differences against kronfluence and ratios to the floor, in place."""
    import numpy as np

    ours, theirs = rows.get("ekfac", {}), rows.get("kronfluence", {})
    if "scores_path" in ours and "scores_path" in theirs:
        a, b = np.load(ours["scores_path"]), np.load(theirs["scores_path"])
        ours["max_rel_diff"] = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
        ours["max_elementwise_rel_diff"] = float(np.max(np.abs(a - b) / np.abs(b)))
        for key in ("fit_s", "score_s", "peak_extra"):
            ours[f"{key}_vs_kronfluence"] = ours[key] / theirs[key]
    floor = rows.get("floor", {}).get("seconds")
    per_k = 1000 / config["n_train"]
    if floor:
        rows["floor"]["per_1000_s"] = floor * per_k
        for key in ("ekfac", "kronfluence", "logra"):
            r = rows.get(key, {})
            if "fit_s" in r:
                r["fit_per_1000_s"] = r["fit_s"] * per_k
                r["fit_to_floor"] = r["fit_s"] / floor
                r["score_to_floor"] = r["score_s"] / floor
    for r in rows.values():
        path = r.pop("scores_path", None)
        if path and os.path.exists(path):
            os.unlink(path)


def format_report(rows: dict, config: dict) -> str:
    out = [
        f"## GPT-2 ({config['n_layer']} blocks, width {config['n_embd']}), "
        f"{config['n_train']} x {config['seq_len']} tokens, {config['n_test']} queries"
    ]
    for key, r in rows.items():
        if "error" in r:
            out.append(f"  {key}: error {r['error']}")
            continue
        if key == "floor":
            out.append(f"  floor: {r['seconds']:.3g} s ({r['per_1000_s']:.3g} s per 1,000)")
            continue
        bits = [f"fit {r['fit_s']:.3g} s", f"score {r['score_s']:.3g} s"]
        bits.append(f"peak +{r['peak_extra'] / 2**20:.0f} MiB")
        for m in (
            "fit_to_floor",
            "score_to_floor",
            "fit_to_own_floor",
            "score_to_own_floor",
            "fit_s_vs_kronfluence",
            "score_s_vs_kronfluence",
            "peak_extra_vs_kronfluence",
            "max_rel_diff",
            "max_elementwise_rel_diff",
        ):
            if m in r:
                bits.append(f"{m} {r[m]:.3g}")
        out.append(f"  {key}: " + ", ".join(bits))
    return "\n".join(out)


def conditions(args: argparse.Namespace, config: dict) -> dict:
    return {
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "loadavg": os.getloadavg(),
        "batch_size": args.batch_size,
        "memory_budget": int(args.memory_budget),
        "regularization": REG,
        **config,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


if __name__ == "__main__":
    main()
