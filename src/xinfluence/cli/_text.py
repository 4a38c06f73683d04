"""The ``xinfluence demo --task text`` computation: a small GPT-2 with planted facts.

A byte-level GPT-2 (vocabulary 256, built from a config: no download) is
trained on docstrings of a fixed list of Python standard-library modules plus
synthetic facts about made-up names ("The capital of Zorbania is Quell."),
each fact planted in a known small set of training sequences. A query is the
fact's prompt ("The capital of Zorbania is") with its answer as the completion,
the loss counting the completion's tokens only. For each influence method the
training sequences are ranked by their influence on the query; the recall@10
of the planted sources measures how well a method finds them.

Everything here is numbers; :mod:`xinfluence.cli._text_report` writes the page.
Needs torch and transformers (the ``text`` extra).
"""

from __future__ import annotations

import importlib
import inspect
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import xinfluence as xi

from ._demo import DemoError

# A fixed list: the corpus is the same on every run of one Python version (the
# docstrings themselves change between Python releases).
STDLIB_MODULES = (
    "abc",
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "hashlib",
    "heapq",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "struct",
    "textwrap",
    "threading",
    "time",
    "typing",
    "unittest",
    "uuid",
    "zipfile",
)

# (template, prompt ends before the answer); every fact uses one template
TEMPLATES = (
    "The capital of {s} is {a}.",
    "The inventor of the {s} was {a}.",
    "The favourite food of {s} is {a}.",
    "The river {s} flows into {a}.",
)
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x")

METHODS = ("ekfac", "kronecker", "identity", "random")
METHOD_NAMES = {
    "ekfac": "EK-FAC (EkfacInfluence)",
    "kronecker": "Kronecker projection, LoGra-style (ProjectedInfluence)",
    "identity": "gradient similarity (IdentityInfluence)",
    "random": "random ranking (baseline)",
}
TOP_K = 10


@dataclass(frozen=True)
class TextSize:
    """Sizes of the text demo (the model, the corpus, the training)."""

    n_embd: int
    n_layer: int
    n_head: int
    seq_len: int  # tokens (bytes) per training sequence
    n_facts: int  # planted facts, each in 2 to 4 training sequences
    n_control: int  # facts never in training: the query loss of an unseen fact
    n_docs: int  # docstring sequences
    steps: int  # AdamW steps
    batch_size: int
    lr: float
    k_proj: tuple[int, int]  # (k_out, k_in) of the Kronecker projection per layer


SIZES = {
    "default": TextSize(64, 2, 4, 64, 100, 20, 700, 1200, 32, 3e-3, (16, 16)),
    "tiny": TextSize(16, 1, 2, 48, 8, 4, 24, 150, 16, 1e-2, (4, 4)),
}


def _need_text() -> tuple[Any, Any]:
    try:
        import torch
    except ImportError as exc:
        raise DemoError(
            "--task text needs PyTorch and transformers: pip install -e '.[demo,torch,text]'"
        ) from exc
    try:
        import transformers
    except ImportError as exc:
        raise DemoError(
            "--task text needs Hugging Face transformers: pip install -e '.[text]'"
        ) from exc
    return torch, transformers


# -- the corpus ----------------------------------------------------------------
def stdlib_text(modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """Docstrings of the modules and of their public functions and classes, in a
    fixed order, whitespace collapsed, ASCII only (one byte per character)."""
    texts: list[str] = []
    seen: set[str] = set()
    for name in modules:
        mod = importlib.import_module(name)
        members = [getattr(mod, attr) for attr in sorted(vars(mod)) if attr[:1] != "_"]
        objects = [mod] + [m for m in members if inspect.isfunction(m) or inspect.isclass(m)]
        for obj in objects:
            with warnings.catch_warnings():  # deprecated aliases (typing.io) warn on access
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj)
            if not doc:
                continue
            doc = re.sub(r"\s+", " ", doc.encode("ascii", "ignore").decode()).strip()
            if len(doc) >= 40 and doc not in seen:
                seen.add(doc)
                texts.append(doc)
    return texts


@dataclass(frozen=True)
class Fact:
    subject: str
    answer: str
    template: str

    @property
    def sentence(self) -> str:
        return self.template.format(s=self.subject, a=self.answer)

    @property
    def prompt(self) -> str:
        """The sentence up to the answer, without the space before it."""
        return self.template.split("{a}")[0].format(s=self.subject).rstrip()

    @property
    def completion(self) -> str:
        return " " + self.answer + "."


def _name(rng: np.random.Generator, syllables: int) -> str:
    parts = [
        str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) + str(rng.choice(_CODAS))
        for _ in range(syllables)
    ]
    return "".join(parts).capitalize()


def make_facts(n: int, rng: np.random.Generator) -> list[Fact]:
    """``n`` facts with distinct made-up subjects and answers."""
    facts: list[Fact] = []
    used: set[str] = set()
    while len(facts) < n:
        subject, answer = _name(rng, 3), _name(rng, 2)
        if subject in used or answer in used:
            continue
        used.update((subject, answer))
        facts.append(Fact(subject, answer, TEMPLATES[len(facts) % len(TEMPLATES)]))
    return facts


@dataclass
class TextCorpus:
    """Training sequences of ``seq_len`` bytes and where each fact was planted."""

    texts: list[str]  # (N,) the training sequences
    facts: list[Fact]  # planted facts, the queries
    control: list[Fact]  # facts never in training
    sources: list[np.ndarray]  # per fact, the indices of the sequences that state it
    fact_of: np.ndarray  # (N,) the planted fact of each sequence, -1 for docstrings

    @property
    def n(self) -> int:
        return len(self.texts)


def build_corpus(size: TextSize, seed: int) -> TextCorpus:
    """Docstring windows plus fact sequences (the fact, then a window of docstring
    text), shuffled. Each fact is planted in 2, 3 or 4 sequences."""
    rng = np.random.default_rng(seed)
    stream = " ".join(stdlib_text())
    T = size.seq_len

    def window() -> str:
        start = int(rng.integers(0, len(stream) - T))
        return stream[start : start + T]

    all_facts = make_facts(size.n_facts + size.n_control, rng)
    facts, control = all_facts[: size.n_facts], all_facts[size.n_facts :]
    texts = [window() for _ in range(size.n_docs)]
    fact_of = [-1] * size.n_docs
    for i, fact in enumerate(facts):
        for _ in range(int(rng.integers(2, 5))):
            texts.append((fact.sentence + " " + window())[:T])
            fact_of.append(i)
    order = rng.permutation(len(texts))
    texts = [texts[j] for j in order]
    fact_arr = np.asarray(fact_of, dtype=np.int64)[order]
    sources = [np.flatnonzero(fact_arr == i) for i in range(len(facts))]
    return TextCorpus(texts, facts, control, sources, fact_arr)


# -- the model -----------------------------------------------------------------
def build_model(size: TextSize, seed: int) -> Any:
    """A byte-level ``GPT2LMHeadModel`` from a config (float32, no dropout)."""
    torch, transformers = _need_text()
    config = transformers.GPT2Config(
        vocab_size=256,
        n_positions=size.seq_len,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).float()


def encode(texts: list[str], length: int) -> Any:
    """Byte tokens ``(N, length)`` int64 (texts are ASCII and exactly ``length`` long)."""
    torch, _ = _need_text()
    data = np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint8)
    if data.size != len(texts) * length:
        raise ValueError(f"expected {len(texts)} ASCII texts of {length} characters")
    return torch.from_numpy(data.reshape(len(texts), length).astype(np.int64))


def train(lm: Any, ids: Any, size: TextSize, seed: int) -> list[float]:
    """AdamW without weight decay, cosine learning rate, on the loss the
    influences use (:class:`CausalLMLoss` ``"mean"``: per sequence its mean token
    cross-entropy, averaged over the batch); returns the batch loss every 50
    steps and at the last."""
    torch, _ = _need_text()
    from ..backends.torch_text import CausalLMLoss

    loss_fn = CausalLMLoss("mean")
    opt = torch.optim.AdamW(lm.parameters(), lr=size.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, size.steps)
    gen = torch.Generator().manual_seed(seed)
    lm.train()
    history = []
    for step in range(size.steps):
        idx = torch.randint(0, len(ids), (size.batch_size,), generator=gen)
        batch = ids[idx]
        loss = loss_fn(lm(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == size.steps - 1:
            history.append(float(loss.detach()))
    lm.eval()
    return history


def completion_losses(lm: Any, facts: list[Fact]) -> np.ndarray:
    """Per fact: the completion's loss in nats per token, given the prompt."""
    torch, _ = _need_text()
    from ..backends.torch_text import CausalLMLoss, prompt_completion

    qx, qy = prompt_completion([f.prompt for f in facts], [f.completion for f in facts])
    with torch.no_grad():
        return CausalLMLoss("mean").per_sequence(lm(qx), qy).double().numpy()


# -- influences ----------------------------------------------------------------
def recall_at_k(scores: np.ndarray, sources: list[np.ndarray], k: int = TOP_K) -> np.ndarray:
    """Per query ``q``: the share of ``sources[q]`` among the ``k`` highest
    ``scores[q]`` (ties broken by index)."""
    out = np.empty(len(sources))
    for q, src in enumerate(sources):
        top = np.argsort(-scores[q], kind="stable")[:k]
        out[q] = np.isin(src, top).mean()
    return out


def source_ranks(scores: np.ndarray, sources: list[np.ndarray]) -> list[np.ndarray]:
    """Per query, the ranks (1 = highest score, ties by index) of its sources."""
    out = []
    for q, src in enumerate(sources):
        rank = np.empty(scores.shape[1], dtype=np.int64)
        rank[np.argsort(-scores[q], kind="stable")] = np.arange(1, scores.shape[1] + 1)
        out.append(rank[src])
    return out


def top_k_composition(scores: np.ndarray, corpus: TextCorpus, k: int = TOP_K) -> dict[str, float]:
    """What the ``k`` highest-scored sequences of a query are, as shares of the
    ``k`` places averaged over the queries: the query's own sources, sequences
    of other facts stated with the same template, of facts with another
    template, and docstrings."""
    counts = dict.fromkeys(("sources", "same template", "other facts", "docstrings"), 0.0)
    for q, fact in enumerate(corpus.facts):
        for j in np.argsort(-scores[q], kind="stable")[:k]:
            f = int(corpus.fact_of[j])
            if f == q:
                counts["sources"] += 1
            elif f < 0:
                counts["docstrings"] += 1
            elif corpus.facts[f].template == fact.template:
                counts["same template"] += 1
            else:
                counts["other facts"] += 1
    return {key: v / (k * len(corpus.facts)) for key, v in counts.items()}


@dataclass
class MethodResult:
    name: str
    scores: np.ndarray  # (Q, N) up-weighting influences of the training sequences
    recall: np.ndarray  # (Q,) recall@10 of the planted sources
    seconds: float
    warnings: list[str] = field(default_factory=list)


def fisher_damping(gp: Any, ids: Any, labels: Any, factor: float = 0.1) -> float:
    """``factor`` times the mean diagonal of the empirical Fisher over the tracked
    parameters, ``mean_i |g_i|^2 / P`` (the mean EK-FAC eigenvalue: kronfluence's
    heuristic, over all layers at once). One pass of per-sample gradients."""
    total = 0.0
    for start in range(0, len(ids), 64):
        g = gp.flat_grads(xi.Batch(ids[start : start + 64], labels[start : start + 64]))
        total += float((g.double() ** 2).sum())
    return factor * total / (len(ids) * gp.n_parameters)


def make_influence(
    method: str, gp: Any, damping: float, k_proj: tuple[int, int], seed: int
) -> xi.ComposableInfluence:
    """The text demo's influence model for ``method`` (all on the empirical Fisher)."""
    if method == "ekfac":
        return xi.EkfacInfluence(gp, regularization=damping, second_order="empirical_fisher")
    if method == "kronecker":
        # one block over all tracked layers: the layers' projections are computed in
        # one forward and backward pass (per-layer blocks would take one pass each)
        return xi.ProjectedInfluence(
            gp,
            k=k_proj,
            projection="kronecker",
            regularization=damping,
            regularization_space="parameter",
            seed=seed,
        )
    if method == "identity":
        return xi.IdentityInfluence(gp)
    raise DemoError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")


def run_method(
    method: str,
    gp: Any,
    damping: float,
    train: tuple[Any, Any],
    query: tuple[Any, Any],
    k_proj: tuple[int, int],
    sources: list[np.ndarray],
    seed: int,
) -> MethodResult:
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if method == "random":
            rng = np.random.default_rng(seed + 7)
            scores = rng.random((len(query[0]), len(train[0])))
        else:
            infl = make_influence(method, gp, damping, k_proj, seed).fit(train)
            scores = np.asarray(
                infl.influences(query[0], query[1], train[0], train[1]).double().numpy()
            )
    seconds = time.perf_counter() - start
    messages = list(dict.fromkeys(str(w.message).split(" (")[0] for w in caught))
    return MethodResult(method, scores, recall_at_k(scores, sources), seconds, messages)


@dataclass
class TextDemoResult:
    size_name: str
    size: TextSize
    corpus: TextCorpus
    model: Any  # the trained CausalLMLogits (eval mode)
    n_parameters: int  # of the whole model
    n_tracked: int  # parameters in the tracked layers
    tracked_layers: tuple[str, ...]
    train_history: list[float]
    loss_init: np.ndarray  # (Q,) query completion loss before training
    loss_trained: np.ndarray  # (Q,) after
    loss_control: np.ndarray  # (n_control,) unseen facts, after training
    damping: float  # the regularization of EK-FAC and the projection
    methods: dict[str, MethodResult]
    seconds: dict[str, float]


def run_text_demo(
    size_name: str = "default", seed: int = 0, methods: tuple[str, ...] = METHODS
) -> TextDemoResult:
    """Build the corpus, train the model, rank the training sequences per method."""
    if size_name not in SIZES:
        raise DemoError(f"unknown size {size_name!r}: expected one of {', '.join(SIZES)}")
    torch, _ = _need_text()
    from ..backends.torch import TorchGradientProvider
    from ..backends.torch_text import (
        CausalLMLogits,
        CausalLMLoss,
        causal_lm_labels,
        prompt_completion,
    )

    size = SIZES[size_name]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = build_corpus(size, seed)
    ids = encode(corpus.texts, size.seq_len)
    seconds["corpus"] = time.perf_counter() - t0

    hf = build_model(size, seed)
    lm = CausalLMLogits(hf)  # eager attention, eval mode, logits out
    loss_init = completion_losses(lm, corpus.facts)
    t0 = time.perf_counter()
    history = train(lm, ids, size, seed)
    seconds["train"] = time.perf_counter() - t0
    loss_trained = completion_losses(lm, corpus.facts)
    loss_control = completion_losses(lm, corpus.control)

    from transformers.pytorch_utils import Conv1D

    # the transformer blocks' dense layers; the embeddings (tied to the output
    # layer), the layer norms and their gradients are left out, on purpose
    gp = TorchGradientProvider(lm, CausalLMLoss("mean"), cast_inputs=False, layers=[Conv1D])
    labels = causal_lm_labels(ids)
    qx, qy = prompt_completion(
        [f.prompt for f in corpus.facts], [f.completion for f in corpus.facts]
    )
    t0 = time.perf_counter()
    damping = fisher_damping(gp, ids, labels)
    seconds["damping"] = time.perf_counter() - t0
    results = {
        m: run_method(m, gp, damping, (ids, labels), (qx, qy), size.k_proj, corpus.sources, seed)
        for m in methods
    }
    for m, r in results.items():
        seconds[m] = r.seconds
    return TextDemoResult(
        size_name=size_name,
        size=size,
        corpus=corpus,
        model=lm,
        n_parameters=sum(p.numel() for p in hf.parameters()),
        n_tracked=gp.n_parameters,
        tracked_layers=tuple(gp.tracked_layers or ()),
        train_history=history,
        loss_init=loss_init,
        loss_trained=loss_trained,
        loss_control=loss_control,
        damping=damping,
        methods=results,
        seconds=seconds,
    )
