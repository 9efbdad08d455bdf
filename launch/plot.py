"""Loss curve and Recall@K curve of a run, as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.run_logger import read_metrics  # noqa: E402


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out_path = Path(out) if out else run_dir / "curves.png"
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    figure, (loss_axis, recall_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([r["step"] for r in records], [r["loss"] for r in records])
    loss_axis.set(title="training loss", xlabel="step", ylabel="weighted in-batch softmax")
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        for name in ("model", "popularity"):
            points = sorted(
                (int(k.split("@")[1]), v)
                for k, v in metrics[name].items()
                if k.startswith("recall@")
            )
            recall_axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                marker="o",
                label="two-tower" if name == "model" else "most popular",
            )
        recall_axis.set(title=f"Recall@K ({metrics['split']})", xlabel="K", ylabel="recall")
        recall_axis.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
    return out_path
