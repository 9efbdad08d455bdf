"""Metric sinks behind one small interface: JSON lines in the run directory and wandb.

Only the main rank writes. wandb runs offline unless the user configured it (WANDB_MODE or
WANDB_API_KEY), is imported lazily, and never receives or stores the API key in the run directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from trainer.runtime.run_files import METRICS_LOG_FILE

logger = logging.getLogger(__name__)


class RunLogger:
    """Args:
    run_dir: where ``metrics.jsonl`` goes.
    enabled: False on non-main ranks (every call becomes a no-op).
    use_wandb: also log to wandb.
    project, name: wandb project and run name.
    config: resolved configuration, logged once.
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        use_wandb: bool,
        project: str,
        name: str,
        config: dict[str, Any],
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_LOG_FILE
        self._wandb_run: Any = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if use_wandb:
            self._wandb_run = _start_wandb(run_dir, project, name, config)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if self._wandb_run is not None:
            step = record.get("step")
            self._wandb_run.log(
                {k: v for k, v in record.items() if isinstance(v, int | float)}, step=step
            )

    def start(self, resumed_at: int | None) -> None:
        """A fresh run starts a fresh log; a resumed run keeps the records up to its checkpoint
        step and drops later ones (they are trained again, and logged once), and the cut-short
        window logged at the checkpoint step (the resumed run completes that window)."""
        if not self.enabled:
            return
        if resumed_at is None:
            self.path.unlink(missing_ok=True)
            return
        kept = [
            r
            for r in read_metrics(self.path.parent)
            if r.get("step", 0) < resumed_at
            or (r.get("step", 0) == resumed_at and not r.get("partial_window"))
        ]
        self.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _start_wandb(run_dir: Path, project: str, name: str, config: dict[str, Any]) -> Any:
    import wandb

    mode = os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline"
    )
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return wandb.init(
            project=project,
            name=name,
            dir=str(run_dir),
            mode=mode,  # type: ignore[arg-type]
            config=config,
            reinit=True,
        )
    except Exception as error:  # noqa: BLE001 - a metrics sink must never stop training
        logger.warning("wandb disabled: %s", error)
        return None


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_LOG_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
