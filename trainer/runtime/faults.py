"""Fault injection for resilience drills and tests.

- ``TWOTOWER_FAULT_KILL=RANK:STEP``: rank RANK kills itself with SIGKILL right after step STEP
  (no cleanup, no final checkpoint: a lost node).
- ``TWOTOWER_FAULT_SIGNAL=RANK:STEP:NAME``: rank RANK sends itself signal NAME (e.g. SIGTERM)
  after step STEP, as a scheduler would before preemption.

Under torchrun a fault fires only in the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), so an
elastic restart runs through.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

logger = logging.getLogger(__name__)

KILL_VARIABLE = "TWOTOWER_FAULT_KILL"
SIGNAL_VARIABLE = "TWOTOWER_FAULT_SIGNAL"


@dataclass(frozen=True)
class PlannedFault:
    """Args:
    step: after which step the fault fires.
    signal_number: what this rank sends itself.
    """

    step: int
    signal_number: int


def planned_fault(rank: int) -> PlannedFault | None:
    """This rank's fault from the environment, or None."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    for variable in (KILL_VARIABLE, SIGNAL_VARIABLE):
        spec = os.environ.get(variable)
        if not spec:
            continue
        parts = spec.split(":")
        try:
            target_rank, step = int(parts[0]), int(parts[1])
            name = "SIGKILL" if variable == KILL_VARIABLE else parts[2]
            number = int(getattr(signal, name))
        except (ValueError, IndexError, AttributeError) as error:
            raise ValueError(
                f"{variable}={spec!r}: expected RANK:STEP (kill) or RANK:STEP:SIGNAL, "
                "e.g. 1:7 or 0:5:SIGTERM"
            ) from error
        if target_rank == rank:
            return PlannedFault(step, number)
    return None


def fire_if_due(fault: PlannedFault | None, step: int) -> None:
    if fault is not None and step == fault.step:
        logger.warning(
            "fault injection: signal %d to this rank after step %d", fault.signal_number, step
        )
        os.kill(os.getpid(), fault.signal_number)
