"""The README's numpy example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_numpy_example_runs():
    if not README.exists():  # an installed package without the source tree
        pytest.skip("README.md not found")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
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
