"""The demo's report: ``index.html`` and PNG figures in one folder, no network assets."""

from __future__ import annotations

import html
import platform
from pathlib import Path
from typing import Any

import numpy as np

from ._demo import (
    N_TOP,
    DemoError,
    DemoResult,
    average_precision,
    detection_curve,
    recall_at,
    relative_error,
)

METHOD_NAMES = {
    "direct": "DirectInfluence (exact solve)",
    "cg": "CgInfluence (conjugate gradients)",
    "lissa": "LissaInfluence (LiSSA)",
    "arnoldi": "ArnoldiInfluence (Lanczos, low rank)",
    "nystroem": "NystroemSketchInfluence (Nyström sketch)",
    "datainf": "InverseHarmonicMeanInfluence (DataInf)",
    "ekfac": "EkfacInfluence (EK-FAC)",
    "identity": "IdentityInfluence (gradient similarity, no curvature)",
}


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise DemoError(
            "the report needs matplotlib: pip install -e '.[demo]' (see the README)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rankings(result: DemoResult, seed: int = 0) -> dict[str, np.ndarray]:
    """Scores whose descending order is the inspection order of each ranking."""
    rng = np.random.default_rng(seed + 1)
    out = {f"self-influence ({result.method})": result.run.self_influence}
    if result.exact is not None:
        out["self-influence (exact)"] = result.exact.self_influence
    out["training loss"] = result.train_loss
    out["random"] = rng.random(len(result.train_loss))
    return out


# -- figures ---------------------------------------------------------------------
def _image(ax: Any, x: np.ndarray, title: str, color: str = "black") -> None:
    ax.imshow(x.reshape(8, 8), cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8, color=color)


def figure_examples(result: DemoResult, out: Path, plt: Any) -> list[dict[str, Any]]:
    """One figure per shown test point: its image, its most helpful and harmful images."""
    p = result.problem
    flipped = p.flipped
    entries = []
    for k, pos in enumerate(result.shown):
        t = int(result.query_idx[pos])
        scores = result.run.query[pos]
        order = np.argsort(-scores, kind="stable")
        helpful, harmful = order[:N_TOP], order[::-1][:N_TOP]
        fig = plt.figure(figsize=(11.5, 3.4))
        grid = fig.add_gridspec(2, N_TOP + 2, width_ratios=[2.2, 0.3] + [1.0] * N_TOP)
        ax = fig.add_subplot(grid[:, 0])
        _image(
            ax,
            p.x_test[t],
            f"test #{t}\ntrue {p.y_test[t]}, predicted {result.predicted[t]}",
            "firebrick",
        )
        for row, (idx, name) in enumerate(((helpful, "helpful"), (harmful, "harmful"))):
            for c, j in enumerate(idx):
                ax = fig.add_subplot(grid[row, c + 2])
                label = f"{p.y_train[j]}"
                if flipped[j]:
                    label += f" (was {p.y_clean[j]})"
                _image(ax, p.x_train[j], f"{label}\n{scores[j]:+.3g}", "red" if flipped[j] else "k")
                if c == 0:
                    ax.set_ylabel(name, fontsize=9)
        fig.tight_layout()
        fname = f"test_{k}.png"
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        entries.append(
            {
                "file": fname,
                "test": t,
                "true": int(p.y_test[t]),
                "predicted": int(result.predicted[t]),
                "harmful_flipped": int(flipped[harmful].sum()),
                "helpful_flipped": int(flipped[helpful].sum()),
            }
        )
    return entries


def _curve_style(name: str) -> dict[str, Any]:
    """Line styles that keep every ranking visible where curves coincide: the exact
    self-influence is a wide pale band under the method's thin line (they are often
    equal), the training loss dashed with markers, random dotted."""
    if name == "self-influence (exact)":
        return {"color": "tab:orange", "linewidth": 5.0, "alpha": 0.45, "zorder": 2}
    if name.startswith("self-influence"):
        return {"color": "tab:blue", "linewidth": 1.4, "zorder": 4}
    if name == "training loss":
        return {
            "color": "tab:green",
            "linestyle": "--",
            "linewidth": 1.4,
            "marker": "o",
            "markersize": 3.5,
            "markevery": 0.08,
            "zorder": 3,
        }
    return {"color": "tab:red", "linestyle": ":", "linewidth": 1.4, "zorder": 1}


def figure_mislabel(result: DemoResult, out: Path, plt: Any) -> str:
    flipped = result.problem.flipped
    n = len(flipped)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    frac = np.arange(1, n + 1) / n
    for name, scores in rankings(result).items():
        precision, recall = detection_curve(scores, flipped)
        label = f"{name}, AP {average_precision(scores, flipped):.3f}"
        ax1.plot(frac, recall, label=label, **_curve_style(name))
        ax2.plot(recall, precision, label=label, **_curve_style(name))
    ax1.plot(
        [0, flipped.mean(), 1], [0, 1, 1], color="gray", linewidth=0.8, zorder=0, label="perfect"
    )
    ax1.set_xlabel("fraction of training points inspected (highest score first)")
    ax1.set_ylabel("recall: share of flipped labels found")
    ax1.set_xlim(0, min(0.5, 3 * max(float(flipped.mean()), 0.02)))  # zoom on the rise
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")
    ax2.set_xlabel("recall")
    ax2.set_ylabel("precision")
    ax2.set_ylim(0, 1.02)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"Finding the {int(flipped.sum())} flipped labels among {n} training points")
    fig.tight_layout()
    fig.savefig(out / "mislabel.png", dpi=90)
    plt.close(fig)
    return "mislabel.png"


def figure_accuracy(result: DemoResult, out: Path, plt: Any) -> str | None:
    if result.exact is None:
        return None
    a, e = result.run.query.ravel(), result.exact.query.ravel()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax1.scatter(e, a, s=2, alpha=0.3)
    lo, hi = float(min(e.min(), a.min())), float(max(e.max(), a.max()))
    ax1.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8)
    ax1.set_xlabel("exact influence (DirectInfluence)")
    ax1.set_ylabel(f"{result.method} influence")
    ax1.set_title(f"all {a.size} pairs, relative error {relative_error(a, e):.2e}", fontsize=10)
    row_err = np.linalg.norm(result.run.query - result.exact.query, axis=1) / np.maximum(
        np.linalg.norm(result.exact.query, axis=1), np.finfo(np.float64).tiny
    )
    ax2.hist(np.log10(np.maximum(row_err, 1e-17)), bins=30)
    ax2.set_xlabel("log10 relative error per test point")
    ax2.set_ylabel("test points")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=90)
    plt.close(fig)
    return "accuracy.png"


def figure_self_influence(result: DemoResult, out: Path, plt: Any) -> str:
    flipped = result.problem.flipped
    s = result.run.self_influence
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(float(s.min()), float(s.max()), 50)
    ax.hist(s[~flipped], bins=bins, alpha=0.6, label="labels kept")
    ax.hist(s[flipped], bins=bins, alpha=0.6, label="labels flipped")
    ax.set_yscale("log")
    ax.set_xlabel(f"self-influence I[j, j] ({result.method})")
    ax.set_ylabel("training points")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "self_influence.png", dpi=90)
    plt.close(fig)
    return "self_influence.png"


# -- the page --------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } code { background: #f3f3f3; padding: 0 .2em; }
.note { color: #555; font-size: .92em; }
"""


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def detection_rows(result: DemoResult) -> list[list[Any]]:
    flipped = result.problem.flipped
    return [
        [
            name,
            f"{average_precision(s, flipped):.3f}",
            f"{recall_at(s, flipped, 0.1):.3f}",
            f"{recall_at(s, flipped, 0.2):.3f}",
        ]
        for name, s in rankings(result).items()
    ]


def timing_rows(result: DemoResult) -> list[list[Any]]:
    rows = [["load data", f"{result.seconds['data']:.2f}"]]
    rows.append(["train the model", f"{result.seconds['train']:.2f}"])
    for run in (result.run, result.exact):
        if run is None:
            continue
        for step, sec in run.seconds.items():
            rows.append([f"{run.name}: {step}", f"{sec:.2f}"])
    return rows


def _curvature_note(method: str) -> str:
    if method in ("ekfac", "datainf"):
        return (
            "<p class='note'>This method approximates the empirical Fisher "
            "<code>mean_i g_i g_iᵀ</code>, not the Hessian: part of the difference is the "
            "curvature it uses, not only its approximation of it.</p>"
        )
    if method == "identity":
        return "<p class='note'>Gradient similarity uses no curvature at all: a baseline.</p>"
    return ""


def write_report(result: DemoResult, out: Path, command: str) -> Path:
    """Write ``index.html`` and the figures into ``out``; return the page's path."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    p, m = result.problem, result.model
    examples = figure_examples(result, out, plt)
    mislabel = figure_mislabel(result, out, plt)
    self_fig = figure_self_influence(result, out, plt)
    accuracy = figure_accuracy(result, out, plt)
    n, n_flip = len(p.y_train), int(p.flipped.sum())
    method = METHOD_NAMES[result.method]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>xinfluence demo: {html.escape(result.method)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>xinfluence demo: which training images explain a prediction?</h1>",
        f"<p>Command: <code>{html.escape(command)}</code></p>",
        "<h2>Setup</h2>",
        _table(
            ["", ""],
            [
                ["data", f"scikit-learn digits (8x8 images): {n} training, {len(p.y_test)} test"],
                ["label noise", f"{n_flip} training labels ({n_flip / n:.0%}) flipped at random"],
                ["model", m.description],
                ["parameters", m.n_parameters],
                ["backend", result.backend],
                ["accuracy", f"train {result.train_accuracy:.3f}, test {result.test_accuracy:.3f}"],
                ["influence model", method],
                ["regularization λ", f"{m.regularization:.3g} (from the L2 strength of training)"],
                ["machine", f"{platform.machine()}, Python {platform.python_version()}"],
            ],
        ),
        "<p class='note'>Scores are up-weighting influences "
        "<code>I[t, j] = g_tᵀ (H + λI)⁻¹ g_j</code> (H the Hessian of the mean training "
        "loss). Removing training image <i>j</i> changes the loss at test image <i>t</i> by "
        f"about <code>I[t, j] / n</code> (n = {n}): a positive score means the image helped "
        "the prediction of the test image's true label, a negative one that it hurt.</p>",
        "<h2>Misclassified test images and the training images behind them</h2>",
        f"<p>For {len(examples)} misclassified test images: the {N_TOP} most helpful (top row) "
        f"and the {N_TOP} most harmful (bottom row) training images, with their training "
        "label and score. Flipped labels are red, with the original label in brackets.</p>",
    ]
    for e in examples:
        parts.append(
            f"<h3>Test image #{e['test']}: true {e['true']}, predicted {e['predicted']}</h3>"
            f"<p class='note'>{e['harmful_flipped']} of the {N_TOP} most harmful and "
            f"{e['helpful_flipped']} of the {N_TOP} most helpful have a flipped label.</p>"
            f"<img src='{e['file']}' alt='test image {e['test']}'>"
        )
    parts += [
        "<h2>Finding the flipped labels by self-influence</h2>",
        "<p>Self-influence <code>I[j, j] = g_jᵀ (H + λI)⁻¹ g_j</code> measures how much a "
        "training image supports its own label: mislabeled images rank high. Inspecting the "
        "training set in order of decreasing score, against the order of decreasing training "
        f"loss and a random order (whose expected precision is {n_flip / n:.2f}).</p>",
        "<p class='note'>Why training loss can match or beat self-influence here: a flipped "
        "label has a high training loss by construction. Self-influence "
        "<code>g_jᵀ (H + λI)⁻¹ g_j</code> is large for high-loss points (a large gradient) "
        "<i>and</i> for high-leverage points (gradients along directions of low curvature), "
        "correctly labelled or not. On a model that fits the clean labels well, the loss is "
        "therefore the sharper signal for label noise; the self-influence ranking adds "
        "leverage, which matters where most training losses are small (models that "
        "memorise) or the outliers to find are not mislabelled.</p>",
        _table(
            ["ranking", "average precision", "recall at 10% inspected", "recall at 20%"],
            detection_rows(result),
        ),
        f"<img src='{mislabel}' alt='mislabel detection curves'>",
        f"<img src='{self_fig}' alt='self-influence histogram'>",
        "<h2>Accuracy against the exact influences</h2>",
    ]
    if accuracy is None or result.exact is None:
        parts.append(
            "<p>The chosen method is the exact solve (<code>DirectInfluence</code>); run the "
            "demo with <code>--method cg</code>, <code>arnoldi</code>, <code>ekfac</code>, ... "
            "to compare an approximation with it.</p>"
        )
    else:
        err = relative_error(result.run.query, result.exact.query)
        corr = float(np.corrcoef(result.run.query.ravel(), result.exact.query.ravel())[0, 1])
        parts += [f"<p class='note'>Warning: {html.escape(w)}</p>" for w in result.run.warnings]
        parts += [
            f"<p>On {result.run.query.shape[0]} test images x {n} training images: relative "
            f"error <code>|I - I_exact|_F / |I_exact|_F</code> = {err:.3e}, Pearson correlation "
            f"{corr:.6f}. The exact influences come from <code>DirectInfluence</code> (dense "
            f"Hessian, {m.n_parameters} parameters).</p>",
            _curvature_note(result.method),
            f"<img src='{accuracy}' alt='approximate against exact influences'>",
        ]
    parts += [
        "<h2>Timings</h2>",
        f"<p class='note'>Wall-clock seconds; influences for {result.run.query.shape[0]} test "
        f"images against all {n} training images, self-influence of every training image "
        "(factors and gradients of the training set).</p>",
        _table(["step", "seconds"], timing_rows(result)),
        "<p class='note'>Generated by <code>xinfluence demo</code>. "
        "Everything on this page is local: no scripts, fonts or images from the network.</p>",
        "</body></html>",
    ]
    page = out / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page
