"""mkdocs hook: render the Sphinx cross-reference roles of the docstrings as code.

Docstrings use ``:class:`~xinfluence.Batch``` and friends; mkdocstrings renders
Markdown, where such roles would show as raw text.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:mod|class|func|meth|attr|exc|data|obj):(<code>)~?")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(r"\1", html)
