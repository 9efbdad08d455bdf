"""The CLI end to end on tiny data: torchrun launch with 2 gloo ranks, eval of the run, plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from launch.cli import main
from tests.tiny_dataset import write_tiny_dataset

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, root: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"data: {{path: {root}, batch_size: 32, eval_batch_size: 16}}\n"
        "model: {embedding_dim: 16, user_mlp: [32], item_mlp: [32], output_dim: 16}\n"
        "loss: {label_weights: {click: 1.0, like: 0.5}}\n"
        "train: {epochs: 1, log_every_steps: 2, progress_bar: false}\n"
        f"run: {{dir: {tmp_path / 'run'}}}\n"
        "logging: {wandb: false}\n"
    )
    return path


def test_launch_local_two_ranks_then_eval_and_plot(tmp_path: Path, capsys) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    config = _config(tmp_path, root)
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "launch", "local", "--nproc", "2", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    trained = json.loads((run / "metrics.json").read_text())
    assert main(["eval", "--run", str(run)]) == 0
    table = capsys.readouterr().out
    assert "hr@10" in table and "most-popular" in table and "protocol: split=test" in table
    # Named for its split and checkpoint; the run's own metrics.json stays as training wrote it.
    step = trained["checkpoint"]
    again = json.loads((run / f"eval_test_{step}.json").read_text())
    assert json.loads((run / "metrics.json").read_text()) == trained
    # A world-size-1 evaluation of the 2-rank checkpoint gives the same numbers (DCP reshards).
    assert again["model"] == trained["model"]
    assert again["intervals"]["model"]["hr@10"][0] <= trained["model"]["hr@10"]
    also = "eval.also_exclude=[engaged,none]"
    assert main(["eval", "--run", str(run), "--split", "valid", also]) == 0
    valid = json.loads((run / f"eval_valid_{step}.json").read_text())
    assert valid["split"] == "valid" and valid["protocol"]["exclude"] == "engaged"
    # Scored again under the primary rule: the same numbers; under none, most-popular differs.
    assert valid["by_exclusion"]["engaged"]["model"] == valid["model"]
    assert valid["by_exclusion"]["engaged"]["intervals"] == {
        k: v for k, v in valid["intervals"].items() if k in ("model", "popularity")
    }
    assert set(valid["by_exclusion"]["none"]) == {"model", "popularity", "intervals"}
    assert main(["plot", "--run", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 1000


def test_config_error_exits_with_message(tmp_path: Path, caplog) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    config = _config(tmp_path, root)
    assert main(["train", str(config), "train.epochz=2"]) == 2
    assert "train.epochz" in caplog.text
