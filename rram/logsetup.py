"""Logging for the process entry points (``rram ...`` and ``python -m rram.frontends.requester``).

A library never configures logging (pyverbs' ``basicConfig`` at import is the counter-example):
only a ``main`` calls this, once, before it starts work.
"""
from __future__ import annotations

import logging
import sys


def configure_logging(verbose: int, quiet: int) -> None:
    """WARNING by default, INFO at -v, DEBUG at -vv; ERROR only at -q.  Lines go to stderr."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    if quiet:
        level = logging.ERROR
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
