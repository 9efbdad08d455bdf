"""``twotower launch slurm-prepare``: the global job, a job array of partitions and the merge on
a one-node SLURM cluster on this machine give the dataset the one-process run gives."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from data_pipeline.datasets.example_log import write_example_log
from data_pipeline.manifest import Manifest
from launch.cli import main
from launch.slurm_prepare import PrepareJobs, PrepareStage, stage_arguments
from tests.launch.test_slurm import slurm_cluster  # noqa: F401 (fixture)


def test_stages_in_submission_order() -> None:
    assert stage_arguments(2) == [
        ("--stage", "global", "--partitions", "2"),
        ("--stage", "partition", "--partition", "0"),
        ("--stage", "partition", "--partition", "1"),
        ("--stage", "merge"),
    ]
    stage = PrepareStage(("--input", "log", "--out", "data"))
    assert pickle.loads(pickle.dumps(stage)) == stage
    with pytest.raises(ValueError, match="--partitions must be >= 1"):
        PrepareJobs(0, Path("logs"))


def test_stage_flags_are_the_launchers_own(tmp_path: Path, caplog) -> None:
    argv = ["launch", "slurm-prepare", "--partitions", "2", "--log-dir", str(tmp_path)]
    assert main([*argv, "--", "--input", "x", "--out", "y", "--stage", "merge"]) == 2
    assert "without --stage" in caplog.text


@pytest.mark.usefixtures("slurm_cluster")
def test_job_array_prepares_the_same_dataset(tmp_path: Path) -> None:
    log = write_example_log(tmp_path / "log", shoppers=120, products=80, events=3000)
    arguments = ["--input", str(log / "events"), "--mapping", str(log / "mapping.yaml")]
    local = [*arguments, "--out", str(tmp_path / "local"), "--partitions", "2"]
    assert main(["prepare", "events", *local]) == 0
    argv = ["launch", "slurm-prepare", "--partitions", "2", "--log-dir", str(tmp_path / "slurm")]
    assert (
        main([*argv, "--time", "10", "--wait", "--", *arguments, "--out", str(tmp_path / "d")]) == 0
    )
    for path in sorted((tmp_path / "local").rglob("*.parquet")):
        relative = path.relative_to(tmp_path / "local")
        assert (tmp_path / "d" / relative).read_bytes() == path.read_bytes(), relative
    assert Manifest.load(tmp_path / "d").splits == Manifest.load(tmp_path / "local").splits
    logs = sorted(p.name for p in (tmp_path / "slurm").glob("*_log.out"))
    assert len(logs) == 4, logs  # global, two array elements, merge
