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
