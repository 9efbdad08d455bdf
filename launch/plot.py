"""Loss curve and Recall@K curve of a run, as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.runtime.run_files import CURVES_FILE, METRICS_FILE
from trainer.runtime.run_logger import read_metrics  # noqa: E402


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``curves.png``: the training loss, the validation metrics over steps (Recall@K and
    NDCG@10, when the run validated during training) and the final Recall@K against
    most-popular."""
    run_dir = Path(run_dir)
    out_path = Path(out) if out else run_dir / CURVES_FILE
    records = read_metrics(run_dir)
    losses = [r for r in records if "loss" in r]
    validations = [r for r in records if any(k.startswith("valid/") for k in r)]
    panels = 3 if validations else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    loss_axis, recall_axis = axes[0], axes[-1]
    loss_axis.plot([r["step"] for r in losses], [r["loss"] for r in losses])
    loss_axis.set(title="training loss", xlabel="step", ylabel="loss")
    if validations:
        _plot_validation(axes[1], validations)
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.exists():
        _plot_recall(recall_axis, json.loads(metrics_path.read_text()))
    figure.tight_layout()
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return out_path


def _plot_validation(axis: plt.Axes, validations: list[dict]) -> None:
    names = sorted(
        {k for r in validations for k in r if k.startswith("valid/recall@")},
        key=lambda k: int(k.split("@")[1]),
    )
    for name in [*names, "valid/ndcg@10"]:
        points = [(r["step"], r[name]) for r in validations if name in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name[6:])
    axis.set(title="validation", xlabel="step", ylabel="metric")
    axis.legend()


def _plot_recall(axis: plt.Axes, metrics: dict) -> None:
    for name in ("model", "popularity"):
        points = sorted(
            (int(k.split("@")[1]), v) for k, v in metrics[name].items() if k.startswith("recall@")
        )
        axis.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            label="two-tower" if name == "model" else "most popular",
        )
    axis.set(title=f"Recall@K ({metrics['split']})", xlabel="K", ylabel="recall")
    axis.legend()
