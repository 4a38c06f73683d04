"""The text demo's report: one ``index.html``, no figures, no network assets."""

from __future__ import annotations

import html
import platform
from pathlib import Path
from typing import Any

import numpy as np

from ._report import _CSS, _table
from ._text import (
    METHOD_NAMES,
    TOP_K,
    TextDemoResult,
    recall_at_k,
    source_ranks,
    top_k_composition,
)

N_SHOWN = 3  # queries shown with their top training sequences

_TEXT_CSS = """
td.text { font-family: ui-monospace, monospace; text-align: left; white-space: pre; }
tr.source td { background: #e8f5e9; }
"""


def escape_text(text: str) -> str:
    """``text`` for a page: control and non-ASCII characters as Python escapes,
    then HTML-escaped."""
    shown = "".join(c if c.isprintable() and c.isascii() else ascii(c)[1:-1] for c in text)
    return html.escape(shown)


def recall_rows(result: TextDemoResult) -> list[list[Any]]:
    """Per method: recall@10, recall at the number of sources, the share of
    queries with every source in the top 10, what fills the top 10, seconds."""
    c = result.corpus
    rows = []
    for name, run in result.methods.items():
        r_prec = np.mean(
            [recall_at_k(run.scores[q : q + 1], [s], len(s))[0] for q, s in enumerate(c.sources)]
        )
        comp = top_k_composition(run.scores, c)
        rows.append(
            [
                METHOD_NAMES[name],
                f"{run.recall.mean():.3f}",
                f"{r_prec:.3f}",
                f"{np.mean(run.recall == 1.0):.2f}",
                " / ".join(f"{comp[k]:.2f}" for k in comp),
                "" if name == "random" else f"{run.seconds:.1f}",
            ]
        )
    return rows


def _query_tables(result: TextDemoResult, q: int) -> list[str]:
    c = result.corpus
    fact, sources = c.facts[q], set(c.sources[q].tolist())
    parts = [
        f"<h3>Query {q}: <code>{escape_text(fact.prompt)}</code> → "
        f"<code>{escape_text(fact.completion)}</code></h3>",
        f"<p class='note'>Completion loss {result.loss_trained[q]:.3f} nats per token "
        f"(untrained {result.loss_init[q]:.3f}). Planted in {len(sources)} training "
        f"sequences: {sorted(sources)} (green rows).</p>",
    ]
    for name, run in result.methods.items():
        if name == "random":
            continue
        order = np.argsort(-run.scores[q], kind="stable")[:TOP_K]
        rows = []
        for rank, j in enumerate(order, 1):
            cls = " class='source'" if int(j) in sources else ""
            rows.append(
                f"<tr{cls}><td>{rank}</td><td>{int(j)}</td><td>{run.scores[q, j]:+.3g}</td>"
                f"<td class='text'>{escape_text(c.texts[j])}</td></tr>"
            )
        parts.append(
            f"<p><b>{html.escape(METHOD_NAMES[name])}</b>: recall@{TOP_K} "
            f"{run.recall[q]:.2f}</p><table><tr><th>rank</th><th>sequence</th><th>score</th>"
            f"<th>text ({result.size.seq_len} bytes)</th></tr>{''.join(rows)}</table>"
        )
    return parts


def shown_queries(result: TextDemoResult) -> list[int]:
    """The first query of each template, up to :data:`N_SHOWN`."""
    seen: dict[str, int] = {}
    for q, fact in enumerate(result.corpus.facts):
        seen.setdefault(fact.template, q)
    return list(seen.values())[:N_SHOWN]


def write_text_report(result: TextDemoResult, out: Path, command: str) -> Path:
    """Write ``index.html`` into ``out``; return its path."""
    out.mkdir(parents=True, exist_ok=True)
    c, s = result.corpus, result.size
    n, n_docs = c.n, int(np.sum(c.fact_of < 0))
    copies = np.bincount([len(src) for src in c.sources], minlength=5)
    planted = ", ".join(f"{copies[k]} facts in {k}" for k in range(2, 5) if copies[k])
    proj = s.k_proj[0] * s.k_proj[1]
    n_layers = len(result.tracked_layers)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>xinfluence demo: text</title>",
        f"<style>{_CSS}{_TEXT_CSS}</style></head><body>",
        "<h1>xinfluence demo: which training sequences taught a language model a fact?</h1>",
        f"<p>Command: <code>{html.escape(command)}</code></p>",
        "<h2>Setup</h2>",
        _table(
            ["", ""],
            [
                [
                    "corpus",
                    f"{n} training sequences of {s.seq_len} bytes: {n_docs} windows of the "
                    f"docstrings of {len(_modules())} standard-library modules, "
                    f"{n - n_docs} stating one of {len(c.facts)} made-up facts",
                ],
                ["planted", f"each fact at the start of 2-4 sequences ({planted})"],
                [
                    "model",
                    f"GPT-2 from a config (byte vocabulary of 256, {s.n_layer} layers, width "
                    f"{s.n_embd}, {s.n_head} heads), float32, {result.n_parameters} parameters",
                ],
                [
                    "training",
                    f"{s.steps} AdamW steps of {s.batch_size} sequences, learning rate "
                    f"{s.lr:g} (cosine); batch loss {result.train_history[0]:.2f} (first) → "
                    f"{result.train_history[-1]:.2f} (last) nats per token",
                ],
                [
                    "tracked layers",
                    f"the {n_layers} dense (Conv1D) layers of the transformer blocks, "
                    f"{result.n_tracked} parameters; embeddings and layer norms are left out",
                ],
                ["damping λ", f"{result.damping:.3g} (0.1 × mean empirical-Fisher diagonal)"],
                ["machine", f"{platform.machine()}, Python {platform.python_version()}"],
            ],
        ),
        "<h2>Did the model learn the facts?</h2>",
        "<p>Loss of the answer given the prompt (the query's loss: completion tokens only), "
        "in nats per token, averaged over the facts:</p>",
        _table(
            ["facts", "before training", "after training"],
            [
                [
                    f"planted ({len(c.facts)}, the queries)",
                    f"{result.loss_init.mean():.3f}",
                    f"{result.loss_trained.mean():.3f}",
                ],
                [
                    f"never in training ({len(c.control)}, the same templates)",
                    "",
                    f"{result.loss_control.mean():.3f}",
                ],
            ],
        ),
        "<p class='note'>The gap between planted and unseen facts is what the model "
        "memorised from the planted sequences, beyond the templates and the spelling of "
        "made-up names.</p>",
        "<h2>Recall of the planted sources</h2>",
        f"<p>For each of the {len(c.facts)} facts, the query's up-weighting influences "
        "<code>I[t, j] = g_tᵀ (H + λI)⁻¹ g_j</code> rank the training sequences; "
        f"recall@{TOP_K} is the share of the fact's planted sequences among the {TOP_K} "
        "highest, averaged over the facts. A random ranking expects "
        f"{TOP_K}/{n} = {TOP_K / n:.3f}.</p>",
        _table(
            [
                "method",
                f"recall@{TOP_K}",
                "recall@r (r = number of sources)",
                f"queries with all sources in top {TOP_K}",
                f"top {TOP_K}: sources / same template / other facts / docstrings",
                "seconds (fit + scores)",
            ],
            recall_rows(result),
        ),
        "<p class='note'>EK-FAC: one block per tracked layer, the empirical Fisher "
        "(<code>second_order='empirical_fisher'</code>), eigenvalues corrected on the data. "
        f"Kronecker projection: each layer's gradient projected to {s.k_proj[0]} × "
        f"{s.k_proj[1]} = {proj} coordinates without forming it (LoGra), the "
        f"{proj * n_layers}-dimensional empirical Fisher of all layers together solved "
        "exactly, damping <code>λI</code> in parameter space. Gradient similarity: "
        "<code>g_tᵀ g_j</code> over the same layers, no curvature.</p>",
        _reading(result),
        f"<h2>Top {TOP_K} training sequences of {len(shown_queries(result))} queries</h2>",
    ]
    for q in shown_queries(result):
        parts += _query_tables(result, q)
    parts += [
        "<h2>Timings</h2>",
        _table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in result.seconds.items()]),
        "<p class='note'>Generated by <code>xinfluence demo --task text</code>. "
        "Everything on this page is local: no scripts, fonts or images from the network.</p>",
        "</body></html>",
    ]
    page = out / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page


def _modules() -> tuple[str, ...]:
    from ._text import STDLIB_MODULES

    return STDLIB_MODULES


def _reading(result: TextDemoResult) -> str:
    """How to read the recall figures: what makes this benchmark easy, and where
    each method puts the sources it misses (computed, not assumed)."""
    c = result.corpus
    lines = []
    for name, run in result.methods.items():
        if name == "random":
            continue
        ranks = np.concatenate(source_ranks(run.scores, c.sources))
        missed = ranks[ranks > TOP_K]
        comp = top_k_composition(run.scores, c)
        where = (
            f"the {missed.size} missed sources (of {ranks.size}) rank "
            f"{int(np.median(missed))} in the median, {int(missed.max())} at worst"
            if missed.size
            else f"no source of the {ranks.size} ranks below {TOP_K}"
        )
        lines.append(
            f"<li>{html.escape(METHOD_NAMES[name])}: {where}; the other places in the top "
            f"{TOP_K} go to other facts' sequences "
            f"({comp['same template'] + comp['other facts']:.0%} of all places, "
            f"{comp['same template']:.0%} with the query's template) and to docstrings "
            f"({comp['docstrings']:.0%}).</li>"
        )
    planted, unseen = float(result.loss_trained.mean()), float(result.loss_control.mean())
    if planted < 0.5 * unseen:
        learned = (
            f"The model learned the facts ({planted:.2f} nats per answer token against "
            f"{unseen:.2f} for unseen ones), so a low recall would point at the attribution, "
            "not at the data."
        )
    else:
        learned = (
            f"The model learned the facts only in part ({planted:.2f} nats per answer token "
            f"against {unseen:.2f} for unseen ones): a fact it did not learn leaves little "
            "in the gradients to attribute, and lowers every method's recall."
        )
    return (
        "<p>How to read these figures. The benchmark is easy by construction: each "
        "made-up subject occurs only in its fact's planted sequences, each of which starts "
        "with the fact, so the sources hold the query's exact tokens at the same positions "
        "(a text search for the subject would find every one). What the recall shows is "
        "that the attributions recover them from the trained model's gradients alone. "
        + learned
        + " With 2 to 4 sources per fact, recall@10 leaves "
        "room for 6 to 8 other sequences; recall@r, the share found among the r highest "
        "(r the number of sources), is the stricter figure.</p><ul>" + "".join(lines) + "</ul>"
    )
