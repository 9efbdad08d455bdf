"""Process-wide logging set-up shared by the CLI and ``python -m trainer.train``.

The libraries below us talk a lot at start-up: FBGEMM logs every table-batched embedding's
constructor arguments and each ``.so`` it loads (on the root logger), TorchRec's planner prints
its statistics per rank, and several deprecation warnings fire once per rank and per loader
worker. None of it is something a user of this system can act on, so it goes below the default
level here, once; ``TWOTOWER_LIBRARY_LOGS=1`` brings it back for debugging.
"""

from __future__ import annotations

import logging
import os
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Packages whose INFO records are internal detail (matched on the emitting file's path, since
# FBGEMM logs through the root logger).
CHATTY_PACKAGES = ("fbgemm_gpu", "torchrec", "torchdata")
# Library warnings about the libraries' own internals (message prefixes).
UNACTIONABLE_WARNINGS = (
    "The topology was constructed directly",  # our CPU topology is explicit on purpose
    "There is a known issue with TorchRec's dense tensor size calculation",
)
UNACTIONABLE_PYTHON_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, "HeuristicalStorageReservation is known to cause issues"),
    (FutureWarning, "`broadcast_buffers` is deprecated"),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor"),
    (UserWarning, "'set_vital' is deprecated"),
)
# torch.fx warns once per process (every loader worker) that is_fx_tracing changed meaning.
QUIET_LOGGERS = ("torch.fx._symbolic_trace",)


class LibraryNoise(logging.Filter):
    """Drops INFO and below from ``CHATTY_PACKAGES`` and the warnings listed above."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        library = any(f"/{package}/" in path for package in CHATTY_PACKAGES)
        if library and record.levelno < logging.WARNING:
            return False
        return not (library and str(record.msg).startswith(UNACTIONABLE_WARNINGS))


def quiet_libraries() -> None:
    """Install the filters (idempotent); a no-op with ``TWOTOWER_LIBRARY_LOGS=1``."""
    if os.environ.get("TWOTOWER_LIBRARY_LOGS") == "1":
        return
    for category, message in UNACTIONABLE_PYTHON_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, LibraryNoise) for f in handler.filters):
            handler.addFilter(LibraryNoise())


def configure_logging(level: int = logging.INFO) -> None:
    """INFO to stderr; keeps handlers someone else installed (pytest, a notebook)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=FORMAT)
    root.setLevel(level)
    quiet_libraries()
