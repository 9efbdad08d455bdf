"""Process-wide logging set-up shared by the CLI and ``python -m trainer.train``."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    """INFO to stderr; keeps handlers someone else installed (pytest, a notebook)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=FORMAT)
    root.setLevel(level)
