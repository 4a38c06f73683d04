"""Every ``python`` snippet of the README and of the documentation runs as written.

The snippets of one page share a namespace and run in order, as a reader would
paste them. A snippet that imports torch or jax is self-contained and runs in
that backend's session only (``XINFLUENCE_BACKEND``); the others run in the
numpy session. Snippets whose optional packages are missing are skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

BACKEND = os.environ.get("XINFLUENCE_BACKEND", "numpy")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _framework(code: str) -> str:
    if re.search(r"^\s*import torch|^\s*from torch", code, re.M):
        return "torch"
    if re.search(r"^\s*import jax|^\s*from jax", code, re.M):
        return "jax"
    return "numpy"


def _needs(code: str) -> list[str]:
    mods = {"sklearn": "sklearn", "xinfluence.compute": "zarr", "zarr": "zarr", "dask": "dask"}
    return sorted({m for key, m in mods.items() if key in code})


def _snippets(page: Path) -> list[str]:
    return FENCE.findall(page.read_text(encoding="utf-8")) if page.exists() else []


def test_pages_have_snippets():
    if not (ROOT / "docs").exists():  # an installed package without the source tree
        pytest.skip("docs/ not found")
    assert _snippets(ROOT / "README.md"), "the README lost its python snippets"
    assert sum(len(_snippets(p)) for p in PAGES) >= 8


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_snippets_run(page, tmp_path, monkeypatch):
    snippets = [s for s in _snippets(page) if _framework(s) == BACKEND]
    if not snippets:
        pytest.skip(f"no {BACKEND} snippet in {page.name}")
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    namespace: dict = {"__name__": "__snippet__"}
    for code in snippets:
        for mod in _needs(code):
            pytest.importorskip(mod)
        if BACKEND != "numpy":
            namespace = {"__name__": "__snippet__"}  # framework snippets stand alone
        exec(compile(code, str(page), "exec"), namespace)


def test_readme_example_values():
    """The README's first example computes what its comment says."""
    if BACKEND != "numpy" or not (ROOT / "README.md").exists():
        pytest.skip("numpy session with the source tree")
    namespace: dict = {}
    exec(compile(_snippets(ROOT / "README.md")[0], "README.md", "exec"), namespace)
    assert namespace["scores"].shape == (3, 200)


def test_large_data_examples_run(tmp_path, monkeypatch):
    if not README.exists():
        pytest.skip("README.md not found")
    pytest.importorskip("zarr")
    pytest.importorskip("dask.array")
    text = README.read_text()
    section = text[text.index("## Large data") :]
    section = section[: section.index("\n## ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    first: dict = {}
    exec(compile(blocks[0], str(README), "exec"), first)
    assert first["scores"].shape == (50, 1000)
    assert first["best"].helpful_indices.shape == (50, 5)
    assert first["memorisation"].shape == (1000,)
    second: dict = {}
    exec(compile(blocks[1], str(README), "exec"), second)
    assert second["scores"].shape == (100, 1000)
