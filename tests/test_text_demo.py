"""``xinfluence demo --task text`` at its tiny size: the planted ground truth, the
methods' scores against references built here, the recall recomputed from the
scores, and the command's report.

torch session only; skips where ``transformers`` (the ``text`` extra) is missing.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from xinfluence.cli import main

BACKEND = os.environ.get("XINFLUENCE_BACKEND", "numpy")
pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="runs in the torch session")


@pytest.fixture(scope="module")
def tiny():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from xinfluence.cli._text import run_text_demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CLI's default: the same numbers as main() below
    try:
        yield run_text_demo("tiny", seed=0)
    finally:
        torch.set_num_threads(threads)


def test_planted_sources_are_the_only_sequences_stating_the_fact(tiny):
    c = tiny.corpus
    assert len(c.facts) == 8 and c.n == len(c.texts) == len(c.fact_of)
    for q, fact in enumerate(c.facts):
        holders = [j for j, t in enumerate(c.texts) if fact.subject in t]
        assert sorted(c.sources[q].tolist()) == holders
        assert 2 <= len(holders) <= 4
        assert all(c.texts[j].startswith(fact.prompt + fact.completion) for j in holders)
    for fact in c.control:  # the unseen facts are unseen
        assert not any(fact.subject in t or fact.answer in t for t in c.texts)
    # the model learned the planted facts beyond the templates: checked here, so
    # that a recall below measures the attribution, not a model that knows nothing
    assert tiny.loss_trained.mean() < 0.8 * tiny.loss_control.mean()
    assert tiny.loss_trained.mean() < 0.5 * tiny.loss_init.mean()


def test_gradient_similarity_scores_match_autograd_over_the_tracked_layers(tiny):
    """The demo's identity scores are ``g_t^T g_j`` over the blocks' Conv1D
    weights and biases (nothing else), per-sequence gradients by autograd here."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from xinfluence.backends.torch_text import CausalLMLoss, prompt_completion
    from xinfluence.cli._text import encode

    lm, c = tiny.model, tiny.corpus
    params = [p for m in lm.modules() if isinstance(m, Conv1D) for p in (m.weight, m.bias)]
    assert sum(p.numel() for p in params) == tiny.n_tracked
    loss = CausalLMLoss("mean")

    def grads(ids, labels):
        rows = []
        for i in range(len(ids)):
            g = torch.autograd.grad(loss(lm(ids[i : i + 1]), labels[i : i + 1]), params)
            rows.append(torch.cat([t.reshape(-1) for t in g]).double())
        return torch.stack(rows)

    ids = encode(c.texts, tiny.size.seq_len)
    qx, qy = prompt_completion([f.prompt for f in c.facts], [f.completion for f in c.facts])
    want = (grads(qx, qy) @ grads(ids, ids).T).numpy()
    got = tiny.methods["identity"].scores
    assert got.shape == (len(c.facts), c.n)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_recall_recomputed_from_the_scores(tiny):
    c, k = tiny.corpus, 10
    for name, run in tiny.methods.items():
        recall = []
        for q, src in enumerate(c.sources):
            top = set(np.argpartition(-run.scores[q], k)[:k].tolist())
            recall.append(len(top & set(src.tolist())) / len(src))
        np.testing.assert_array_equal(run.recall, recall, err_msg=name)
    # the planted sources are found far above chance (k / N = 0.2 for random);
    # measured at this size: EK-FAC 1.0, gradient similarity 0.875
    assert tiny.methods["ekfac"].recall.mean() > 0.6
    assert tiny.methods["identity"].recall.mean() > 0.6
    assert tiny.methods["random"].recall.mean() < 0.5


def test_recall_at_k_at_the_boundary():
    pytest.importorskip("torch")
    from xinfluence.cli._text import recall_at_k, source_ranks

    scores = -np.arange(30.0)[None, :].repeat(2, axis=0)  # rank r holds index r - 1
    sources = [np.array([0, 9, 10]), np.array([29, 3])]
    np.testing.assert_array_equal(recall_at_k(scores, sources, 10), [2 / 3, 1 / 2])
    np.testing.assert_array_equal(recall_at_k(scores, sources, 11), [1.0, 1 / 2])
    assert [r.tolist() for r in source_ranks(scores, sources)] == [[1, 10, 11], [30, 4]]


def test_escape_text():
    from xinfluence.cli._text_report import escape_text

    assert escape_text("a<b>&\x01\u00e9") == "a&lt;b&gt;&amp;\\x01\\xe9"


def test_demo_text_command_writes_the_report(tiny, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--task", "text", "--size", "tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]
    page = (out / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    fact = tiny.corpus.facts[0]
    assert f"<code>{fact.prompt}</code>" in page  # the shown query, and its sources' text
    assert page.count("class='source'") >= 3
    # the same run as the fixture (seed 0, one thread): the printed recall equals it
    printed_recall = dict(re.findall(r"recall@10 (\w+): ([0-9.]+)", printed))
    assert set(printed_recall) == set(tiny.methods)
    for name, run in tiny.methods.items():
        assert float(printed_recall[name]) == pytest.approx(run.recall.mean(), abs=5e-4)


def test_demo_text_bad_options(capsys):
    assert main(["demo", "--task", "text", "--method", "cg", "--out", "x"]) == 1
    assert "--method applies to --task digits" in capsys.readouterr().err
    assert main(["demo", "--task", "text", "--backend", "jax", "--out", "x"]) == 1
    assert "runs on torch" in capsys.readouterr().err
    assert main(["demo", "--task", "text", "--flip-fraction", "0.2", "--out", "x"]) == 1
    assert "--flip-fraction applies to --task digits" in capsys.readouterr().err
    assert main(["demo", "--size", "tiny", "--out", "x"]) == 1
    assert "--size applies to --task text" in capsys.readouterr().err
