"""Progress of long fits and solves, through :mod:`logging` (logger ``"xinfluence"``).

Solvers and curvature passes call :meth:`Reporter.due` (one clock read) in
their loops; a report is logged at INFO level only once the work has run for
more than :data:`AFTER` seconds, then at most every :data:`EVERY` seconds.
Python shows nothing below WARNING by default; to see the reports::

    import logging
    logging.basicConfig()
    logging.getLogger("xinfluence").setLevel(logging.INFO)
"""

from __future__ import annotations

import logging
import time

__all__ = ["Reporter", "AFTER", "EVERY"]

logger = logging.getLogger("xinfluence")

#: Seconds of work before the first report.
AFTER = 1.0
#: Seconds between reports.
EVERY = 1.0


class Reporter:
    """Throttled INFO reports of one loop (``what``: "block CG", "LiSSA", ...)."""

    def __init__(self, what: str, total: int | None = None, *, unit: str = "iteration"):
        self.what, self.total, self.unit = what, total, unit
        self._start = self._last = time.perf_counter()
        self._reported = False

    def due(self) -> bool:
        """Whether a report would be logged now (cheap: call it every iteration)."""
        now = time.perf_counter()
        if now - self._start < AFTER or now - self._last < EVERY:
            return False
        return logger.isEnabledFor(logging.INFO)

    def report(self, iteration: int, detail: str = "") -> None:
        """Log ``iteration`` (of ``total``) and a detail such as the largest residual."""
        self._last = time.perf_counter()
        self._reported = True
        of = f"/{self.total}" if self.total is not None else ""
        more = f", {detail}" if detail else ""
        logger.info(
            "%s: %s %d%s%s (%.1f s)",
            self.what,
            self.unit,
            iteration,
            of,
            more,
            self._last - self._start,
        )

    def close(self, iteration: int, detail: str = "") -> None:
        """The final report, only if this loop reported before."""
        if self._reported:
            self.report(iteration, detail)
