"""The GPU set-up's checks (``make setup GPU=1``): one environment, one build of torch and FBGEMM.

    python -m launch.gpu_environment check --venv .venv-gpu   # before installing anything
    python -m launch.gpu_environment verify --venv .venv-gpu  # after installing

Run by the environment's own Python from the repository root. ``check`` refuses an environment
that already holds a CPU build of torch or FBGEMM (``make setup`` puts them in ``.venv``): pip
would keep that torch and add the CUDA FBGEMM beside it, a mix that fails only when the first
CUDA op runs. ``verify`` confirms the CUDA builds are installed and, on a machine with an NVIDIA
GPU, that torch.cuda and FBGEMM's CUDA ops load; without one it says why that part is skipped.
Reads installed package metadata only (no torch import) until the GPU check itself.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import shutil
import sys
from dataclasses import dataclass, field

CPU_FBGEMM = "fbgemm-gpu-cpu"
CUDA_FBGEMM = "fbgemm-gpu"


@dataclass(frozen=True)
class EnvironmentBuilds:
    """What an environment holds of torch and FBGEMM.

    Args:
        torch_version: the installed torch's version (``"2.13.0+cpu"``); None when absent.
        torch_cuda: its ``torch.version.cuda`` (``"13.0"``); None for a CPU build or no torch.
        fbgemm: installed FBGEMM distributions, name -> version (``{"fbgemm-gpu": "1.8.0"}``).
    """

    torch_version: str | None
    torch_cuda: str | None
    fbgemm: dict[str, str] = field(default_factory=dict)

    @property
    def cpu_torch(self) -> bool:
        return self.torch_version is not None and self.torch_cuda is None


def _version_file_values(source: str) -> dict[str, str | None]:
    """``__version__`` and ``cuda`` as torch/version.py assigns them."""
    values: dict[str, str | None] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            values[target.id] = None if value.value is None else str(value.value)
    return values


def describe_environment() -> EnvironmentBuilds:
    """This Python's torch and FBGEMM builds, from package metadata and torch/version.py."""
    fbgemm = {}
    for name in (CPU_FBGEMM, CUDA_FBGEMM):
        try:
            fbgemm[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        torch = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return EnvironmentBuilds(None, None, fbgemm)
    version_file = torch.locate_file("torch/version.py")
    values = _version_file_values(version_file.read_text())
    return EnvironmentBuilds(torch.version, values.get("cuda"), fbgemm)


def cpu_builds_found(builds: EnvironmentBuilds) -> list[str]:
    """The CPU builds ``builds`` holds, in words (empty: none)."""
    found = []
    if builds.cpu_torch:
        found.append(f"torch {builds.torch_version}, a CPU build (torch.version.cuda is None)")
    if CPU_FBGEMM in builds.fbgemm:
        found.append(f"{CPU_FBGEMM} {builds.fbgemm[CPU_FBGEMM]}, the CPU build of FBGEMM")
    return found


def refusal(venv: str, builds: EnvironmentBuilds) -> str | None:
    """Why the GPU set-up must not install into ``venv``, or None when it may.

    Args:
        venv: the environment as the user named it (``VENV``).
        builds: what it holds.
    """
    found = cpu_builds_found(builds)
    if not found:
        return None
    return (
        f"VENV={venv} holds {' and '.join(found)}. The GPU set-up installs the CUDA builds of "
        "torch and FBGEMM into an environment of their own and does not mix them with CPU ones: "
        f"remove it (rm -rf {venv}) or name another (make setup GPU=1 VENV=.venv-gpu)."
    )


def install_problems(venv: str, builds: EnvironmentBuilds) -> list[str]:
    """What keeps ``venv`` from being a CUDA environment after the set-up installed it."""
    problems = [f"VENV={venv} holds {found}" for found in cpu_builds_found(builds)]
    if builds.torch_version is None:
        problems.append(f"VENV={venv} has no torch")
    if CUDA_FBGEMM not in builds.fbgemm:
        problems.append(f"VENV={venv} has no {CUDA_FBGEMM} (the CUDA build of FBGEMM)")
    return problems


def gpu_skip_reason(nvidia_smi: bool, cuda_available: bool | None) -> str | None:
    """Why the CUDA load check cannot run here, or None when it can.

    Args:
        nvidia_smi: whether ``nvidia-smi`` is on PATH (an NVIDIA driver is installed).
        cuda_available: ``torch.cuda.is_available()``; None when not asked yet.
    """
    if not nvidia_smi:
        return "nvidia-smi not found: no NVIDIA driver on this machine"
    if cuda_available is False:
        return "torch.cuda.is_available() is False: no usable GPU (driver too old for the build?)"
    return None


def load_cuda_ops() -> str:
    """Loads torch.cuda, FBGEMM's CUDA ops and torchrec and runs one op; what ran, in words."""
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
    import torch
    import torchrec  # noqa: F401

    lengths = torch.tensor([1, 2, 3], dtype=torch.int64, device="cuda")
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths).tolist()
    if offsets != [0, 1, 3, 6]:
        raise RuntimeError(f"FBGEMM's asynchronous_complete_cumsum on CUDA gave {offsets}")
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) on "
        f"{torch.cuda.get_device_name(0)}; FBGEMM CUDA ops load and run"
    )


def check(venv: str) -> int:
    reason = refusal(venv, describe_environment())
    if reason is not None:
        print(f"make setup GPU=1: {reason}", file=sys.stderr)
        return 1
    return 0


def verify(venv: str) -> int:
    problems = install_problems(venv, describe_environment())
    if problems:
        print("make setup GPU=1: " + "; ".join(problems), file=sys.stderr)
        return 1
    reason = gpu_skip_reason(shutil.which("nvidia-smi") is not None, None)
    if reason is None:
        import torch

        reason = gpu_skip_reason(True, torch.cuda.is_available())
    if reason is not None:
        print(f"CUDA builds installed; load check skipped: {reason}; twotower setup ok")
        return 0
    print(f"{load_cuda_ops()}; twotower setup ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.gpu_environment", description=__doc__)
    parser.add_argument("step", choices=["check", "verify"], help="before or after installing")
    parser.add_argument("--venv", required=True, help="the environment, as VENV names it")
    args = parser.parse_args(argv)
    return check(args.venv) if args.step == "check" else verify(args.venv)


if __name__ == "__main__":
    sys.exit(main())
