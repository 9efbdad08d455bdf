"""The GPU set-up's checks: an environment holding a CPU build is refused, a CUDA one passes,
and the CUDA load check says why it is skipped without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.gpu_environment import (
    EnvironmentBuilds,
    _version_file_values,
    describe_environment,
    gpu_skip_reason,
    install_problems,
    refusal,
)

REPO = Path(__file__).resolve().parents[2]
CPU = EnvironmentBuilds("2.13.0+cpu", None, {"fbgemm-gpu-cpu": "1.8.0"})
CUDA = EnvironmentBuilds("2.13.0", "13.0", {"fbgemm-gpu": "1.8.0"})


def test_cpu_builds_are_refused_naming_the_environment_and_the_build() -> None:
    reason = refusal(".venv", CPU)
    assert reason is not None
    assert "VENV=.venv" in reason and "torch 2.13.0+cpu, a CPU build" in reason
    assert "fbgemm-gpu-cpu 1.8.0" in reason and "rm -rf .venv" in reason
    # A CUDA torch beside a CPU FBGEMM is a mix too.
    mixed = EnvironmentBuilds("2.13.0", "13.0", {"fbgemm-gpu-cpu": "1.8.0"})
    assert "fbgemm-gpu-cpu" in (refusal(".venv-gpu", mixed) or "")


@pytest.mark.parametrize("builds", [CUDA, EnvironmentBuilds(None, None, {})], ids=["cuda", "empty"])
def test_cuda_and_empty_environments_may_be_set_up(builds: EnvironmentBuilds) -> None:
    assert refusal(".venv-gpu", builds) is None


def test_after_install_only_the_cuda_builds_pass() -> None:
    assert install_problems(".venv-gpu", CUDA) == []
    problems = install_problems(".venv-gpu", EnvironmentBuilds("2.13.0+cpu", None, {}))
    assert any("CPU build" in p for p in problems) and any("no fbgemm-gpu" in p for p in problems)
    assert "VENV=.venv-gpu has no torch" in install_problems(
        ".venv-gpu", EnvironmentBuilds(None, None, {})
    )


def test_cuda_load_check_says_why_it_is_skipped() -> None:
    assert "nvidia-smi not found" in (gpu_skip_reason(False, None) or "")
    assert "torch.cuda.is_available() is False" in (gpu_skip_reason(True, False) or "")
    assert gpu_skip_reason(True, None) is None and gpu_skip_reason(True, True) is None


def test_torch_build_is_read_from_its_version_file() -> None:
    cuda = "__version__ = '2.13.0'\ndebug = False\ncuda: Optional[str] = '13.0'\nhip = None\n"
    assert _version_file_values(cuda) == {
        "__version__": "2.13.0",
        "debug": "False",
        "cuda": "13.0",
        "hip": None,
    }
    here = describe_environment()  # this test environment, whichever build it holds
    assert (here.torch_version, here.torch_cuda) == (torch.__version__, torch.version.cuda)


def _fake_environment(root: Path, torch_version: str, cuda: str | None, fbgemm: str) -> Path:
    """A site folder holding only a torch and an FBGEMM distribution's metadata."""
    for name, version in (("torch", torch_version), (fbgemm.replace("-", "_"), "1.8.0")):
        info = root / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (root / "torch").mkdir()
    (root / "torch" / "version.py").write_text(
        f"__version__ = {torch_version!r}\ncuda = {cuda!r}\n"
    )
    return root


@pytest.mark.parametrize(
    ("build", "code"),
    [(("2.13.0+cpu", None, "fbgemm-gpu-cpu"), 1), (("2.13.0", "13.0", "fbgemm-gpu"), 0)],
    ids=["cpu-refused", "cuda-accepted"],
)
def test_make_setup_check_step(tmp_path: Path, build: tuple, code: int) -> None:
    """What the Makefile runs, on an environment that holds only the fake builds (-S: no site)."""
    site = _fake_environment(tmp_path / "site", *build)
    result = subprocess.run(
        [sys.executable, "-S", "-m", "launch.gpu_environment", "check", "--venv", "old-env"],
        cwd=REPO,
        env={"PYTHONPATH": f"{site}:{REPO}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == code, result.stderr
    if code:
        assert "VENV=old-env holds torch 2.13.0+cpu, a CPU build" in result.stderr
