"""Which training sequences taught a small GPT-2 a fact? (PyTorch, Hugging Face)

Trains a byte-level GPT-2, built from a config (no download), on windows of
Python standard-library docstrings plus made-up facts ("The capital of Zorbania
is Quell."), each fact planted at the start of 2 to 4 known training sequences.
A query is the fact's prompt with the answer as the completion; its loss counts
the completion's tokens only. EK-FAC, a LoGra-style Kronecker projection and
gradient similarity rank the training sequences by their influence on the
query, and recall@10 says how many of the planted sources each one finds.

Only the transformer blocks' dense layers (Hugging Face Conv1D) are tracked:
the embeddings and layer norms are out of the curvature and the scores.
`xinfluence demo --task text` runs the same at a larger size, with a report.

Run: python examples/text_gpt2_facts.py   (needs torch and transformers)
     --quick: a smaller corpus and model (seconds; what the tests run)
     --threads N: torch threads (default 1; 0 keeps torch's default)
"""

import argparse
import collections
import functools
import inspect
import itertools
import json
import re
import string
import textwrap

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import xinfluence as xi
from xinfluence.backends.torch import TorchGradientProvider
from xinfluence.backends.torch_text import (
    CausalLMLogits,
    CausalLMLoss,
    causal_lm_labels,
    encode_bytes,
    prompt_completion,
)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="a smaller run (seconds)")
parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
args = parser.parse_args()
if args.threads > 0:
    torch.set_num_threads(args.threads)
print(f"torch threads: {torch.get_num_threads()}")
n_facts, n_docs, width, steps = (12, 60, 32, 300) if args.quick else (40, 300, 48, 800)
T = 48  # bytes per training sequence
rng = np.random.default_rng(0)

# -- the corpus: docstrings, and facts planted in known sequences ---------------
docs = []
for mod in (collections, functools, itertools, json, string, textwrap):
    for name in sorted(vars(mod)):
        doc = inspect.getdoc(getattr(mod, name)) if not name.startswith("_") else None
        if doc and (inspect.isfunction(getattr(mod, name)) or inspect.isclass(getattr(mod, name))):
            docs.append(re.sub(r"\s+", " ", doc.encode("ascii", "ignore").decode()))
stream = " ".join(docs)


def window():
    start = int(rng.integers(0, len(stream) - T))
    return stream[start : start + T]


def made_up_name(syllables):
    return "".join(
        rng.choice(list("bdfgklmnprstvz")) + rng.choice(["a", "e", "i", "o", "u", "ou"])
        for _ in range(syllables)
    ).capitalize()


templates = ["The capital of {} is", "The inventor of the {} was", "The river {} flows into"]
prompts = [templates[i % 3].format(made_up_name(3)) for i in range(n_facts + 5)]
answers = [" " + made_up_name(2) + "." for _ in prompts]
texts = [window() for _ in range(n_docs)]
sources = []
for prompt, answer in zip(prompts[:n_facts], answers[:n_facts]):
    sources.append([])
    for _ in range(int(rng.integers(2, 5))):
        sources[-1].append(len(texts))
        texts.append((prompt + answer + " " + window())[:T])
ids = torch.tensor([encode_bytes(t) for t in texts])  # (N, T) byte tokens
labels = causal_lm_labels(ids)
print(f"{len(texts)} training sequences, {n_facts} facts planted in {len(texts) - n_docs}")

# -- a byte-level GPT-2 from a config, trained briefly ----------------------------
config = GPT2Config(
    vocab_size=256, n_positions=T, n_embd=width, n_layer=2, n_head=4,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
)  # fmt: skip
torch.manual_seed(0)
lm = CausalLMLogits(GPT2LMHeadModel(config))  # logits out, eager attention, eval mode
loss = CausalLMLoss("mean")  # per sequence: mean token cross-entropy
opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.0)
lm.train()
for _ in range(steps):
    batch = torch.randint(0, len(ids), (32,))
    opt.zero_grad()
    loss(lm(ids[batch]), labels[batch]).backward()
    opt.step()
lm.eval()

# queries: the prompt, and the answer as the completion (its tokens only count)
qx, qy = prompt_completion(prompts, answers)
with torch.no_grad():
    q_loss = loss.per_sequence(lm(qx), qy)
planted, unseen = q_loss[:n_facts].mean().item(), q_loss[n_facts:].mean().item()
print(f"answer loss (nats/token): planted facts {planted:.2f}, never seen {unseen:.2f}")
assert planted < 0.5 * unseen  # the facts were learned from their sources
qx, qy = qx[:n_facts], qy[:n_facts]

# -- influences over the tracked layers ---------------------------------------------
gp = TorchGradientProvider(lm, loss, cast_inputs=False, layers=[Conv1D])
print(f"tracked layers: {len(gp.tracked_layers)}, {gp.n_parameters} parameters")
# damping (kronfluence's heuristic): 0.1 x the mean diagonal of the empirical
# Fisher mean_i g_i g_i^T over the tracked parameters, the mean EK-FAC eigenvalue
reg = 0.1 * gp.flat_grads(xi.Batch(ids, labels)).square().mean().item()
methods = {  # both on the empirical Fisher, damped by reg * I in parameter space
    "EK-FAC": xi.EkfacInfluence(gp, regularization=reg, second_order="empirical_fisher"),
    "Kronecker projection": xi.ProjectedInfluence(
        gp, k=(8, 8), projection="kronecker", regularization=reg, regularization_space="parameter"
    ),
    "gradient similarity": xi.IdentityInfluence(gp),
}
chance = 10 / len(texts)  # the expected recall@10 of a random ranking
top10 = {}
for name, infl in methods.items():
    scores = infl.fit((ids, labels)).influences(qx, qy, ids, labels)  # (n_facts, N)
    top10[name] = torch.argsort(scores, dim=1, descending=True)[:, :10].numpy()
    recall = np.mean([np.isin(src, top10[name][q]).mean() for q, src in enumerate(sources)])
    print(f"recall@10 {name}: {recall:.2f} (random: {chance:.2f})")
    assert recall > 3 * chance

q = 0
print(f"query {prompts[q]!r} -> {answers[q]!r}, planted in {sources[q]}; EK-FAC's top 5:")
for j in top10["EK-FAC"][q][:5].tolist():
    print(f"  {j:4d}  {'source' if j in sources[q] else '      '}  {texts[j]!r}")
