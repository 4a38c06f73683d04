"""Progress bars over blocks: tqdm when installed and wanted, silent otherwise."""

from __future__ import annotations

from typing import Any


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, *, total: int | None, desc: str) -> Any:
    """A tqdm bar over ``total`` blocks, or an object with the same ``update``
    and ``close`` that does nothing (``enabled=False`` or no tqdm)."""
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc=desc, unit="block", leave=False)
