"""Progress bars over blocks: tqdm when installed and wanted, silent otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Any


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, *, total: int | None, desc: str, initial: int = 0) -> Any:
    """A tqdm bar over ``total`` blocks (``initial`` of them already done), or an
    object with the same ``update`` and ``close`` that does nothing
    (``enabled=False`` or no tqdm)."""
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc=desc, unit="block", leave=False, initial=initial)


def note(enabled: bool, message: str) -> None:
    """A one-line message on stderr where progress is shown, and at INFO level on
    the ``"xinfluence"`` logger always."""
    logging.getLogger("xinfluence").info(message)
    if enabled:
        print(message, file=sys.stderr, flush=True)
