"""Stop requests by signal (SIGTERM from a scheduler or torchrun, SIGUSR1 before preemption).

The handler only raises a flag; the training loop reads it at a step boundary through the same
all-reduce that checks the loss, so every rank stops after the same step and saves together.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)


class StopSignals:
    """Catches ``names`` (e.g. ``["SIGTERM", "SIGUSR1"]``) until :meth:`close`.

    Handlers can only be installed from the main thread; elsewhere (a notebook worker thread)
    signals keep their previous behaviour and a warning says so.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not the main thread: %s will not trigger a checkpoint", list(names))
            return
        for name in names:
            number = int(getattr(signal, name))
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        del frame
        if self.received is None:
            logger.warning(
                "received %s: saving a checkpoint after this step, then stopping",
                signal.Signals(number).name,
            )
        self.received = number

    @property
    def requested(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
