"""Security properties: no unpickling of untrusted bytes, configs are data not code, and the
wandb API key never reaches logs or run directories."""

from __future__ import annotations

import ast
import contextlib
import pickle
from pathlib import Path

import pytest
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from config import ConfigError, load_config
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import write_tiny_dataset
from tests.trainer.test_train import TINY
from trainer.runtime.checkpoint import COMPLETE, load_model

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "models", "data_pipeline", "launch")
# Calls that run or unpickle whatever the bytes say.
FORBIDDEN = {
    "eval",
    "exec",
    "pickle.load",
    "pickle.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "yaml.load",
    "yaml.unsafe_load",
    "marshal.loads",
}
FAKE_KEY = "local-" + "0123456789abcdef" * 2 + "feedbeef"


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def _unsafe_calls(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno}: {name}"
        if name in FORBIDDEN:
            found.append(where)
        elif name == "torch.load" and not _keyword_is(node, "weights_only", True):
            found.append(f"{where} without weights_only=True")
        elif name in ("np.load", "numpy.load") and _keyword_is(node, "allow_pickle", True):
            found.append(f"{where} with allow_pickle=True")
    return found


def test_scanner_catches_unsafe_calls() -> None:
    source = "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\neval(s)\n"
    assert len(_unsafe_calls(source, "x.py")) == 4
    assert _unsafe_calls("torch.load(p, weights_only=True)\nmodel.eval()\n", "x.py") == []


def test_package_sources_never_unpickle_or_evaluate() -> None:
    found = [
        hit
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for hit in _unsafe_calls(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert found == []


class _Payload:
    """Unpickling this creates ``marker``: proof that the loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_loading_a_checkpoint_runs_no_code_from_it(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "step-1"
    folder.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "meta.json").write_text("{}")
    (folder / COMPLETE).touch()
    # Refusing the file is fine (DCP's CheckpointException is a BaseException); running it is not.
    with contextlib.suppress(Exception, CheckpointException):
        load_model(folder, nn.Linear(2, 2))
    assert not marker.exists()


def test_config_cannot_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, ["run.name=${oc.env:WANDB_API_KEY}"])


def test_config_cannot_evaluate_code() -> None:
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, ["run.name=${oc.eval:__import__('os').getcwd()}"])


def _train_rank(rank: int, world_size: int, overrides: list[str]) -> None:
    from trainer.train import train

    train(load_config(None, overrides))


@pytest.mark.slow
def test_wandb_key_never_lands_in_the_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network in tests
    root = write_tiny_dataset(tmp_path / "data", train_rows=128)
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        f"data.path={root}",
        f"run.dir={run_dir}",
        "train.epochs=1",
        "logging.wandb=true",
    ]
    run_distributed(_train_rank, 1, overrides, timeout_s=240)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"config.yaml", "metrics.jsonl", "metrics.json"} <= {p.name for p in files}
    assert any("wandb" in p.parts for p in files)  # the wandb sink really ran
    leaked = [str(p) for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
