"""``xinfluence compute`` and ``xinfluence report`` (built on :mod:`xinfluence.compute`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_compute_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``compute`` (filled in below once the calculators exist)."""


def add_report_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``report``."""
