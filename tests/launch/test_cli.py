"""The CLI end to end on tiny data: torchrun launch with 2 gloo ranks, eval of the run, plot."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from launch.cli import _parser, main
from tests.tiny_dataset import write_tiny_dataset

REPO = Path(__file__).resolve().parents[2]
LAUNCH_LOCAL = [sys.executable, "-m", "launch.cli", "launch", "local", "--nproc", "2"]
NOISE = (
    "Warning",  # FutureWarning, UserWarning, ...
    "terminate called",
    "leaked semaphore",
    "Successfully loaded",  # FBGEMM's .so loads
    "TBE=",  # FBGEMM's per-table constructor dumps
    "is_fx_tracing",
    "Planner Statistics",
)


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
        # Stopped by a step limit inside the epoch: loader workers are still running then.
        [*LAUNCH_LOCAL, str(config), "train.max_steps=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # A clean run's output: no library noise, no deprecation warnings, an orderly shutdown.
    output = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in output, f"{noise!r} in the output of a short run:\n{output[-3000:]}"
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


def _actions(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Action]]:
    """Every argument of ``parser`` and of its sub-commands, with the command path."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            found.append((path, action))
    return found


def test_every_flag_explains_itself_and_its_default() -> None:
    missing = []
    for path, action in _actions(_parser(), "twotower"):
        name = "/".join(action.option_strings) or action.dest
        if not action.help:
            missing.append(f"{path} {name}: no help")
        elif action.option_strings and not isinstance(action, argparse._StoreTrueAction):
            if "default" not in action.help and "required" not in action.help:
                missing.append(f"{path} {name}: help names no default")
    assert not missing, "\n".join(missing)


def _run_quietly(*args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        [sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=300
    )


def test_job_module_help_prints_usage_without_library_noise() -> None:
    for module in ("trainer.train", "trainer.ranker_train", "trainer.align"):
        result = _run_quietly("-m", module, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: python -m " + module in result.stdout
        assert "key=value" in result.stdout
        assert "fbgemm" not in (result.stdout + result.stderr).lower()


def test_cli_help_and_dry_run_print_no_fbgemm_messages(tmp_path: Path) -> None:
    assert "fbgemm" not in (_run_quietly("-m", "launch.cli", "--help").stdout.lower())
    result = _run_quietly(
        "-m",
        "launch.cli",
        "launch",
        "slurm",
        "--dry-run",
        "--cpu-ranks",
        "1",
        "configs/movielens_100k.yaml",
        f"run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr
    assert "#SBATCH" in result.stdout
    assert "fbgemm" not in (result.stdout + result.stderr).lower()
