"""``twotower launch slurm``: sbatch script, rank environment and options without a cluster; real
2-rank gloo training jobs (and a requeue) on a one-node SLURM cluster on this machine."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config import load_config
from launch.cli import main
from launch.slurm import (
    PORT_BASE,
    PORT_SPAN,
    SlurmOptions,
    TrainTask,
    job_folder,
    make_task,
    master_port,
    rank_environment,
    sbatch_script,
    submit,
)
from tests.tiny_dataset import write_tiny_dataset
from trainer.ranker_train import train_ranker
from trainer.runtime.checkpoint import latest_checkpoint
from trainer.runtime.distributed import shutdown
from trainer.runtime.run_logger import read_metrics
from trainer.train import train

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "launch" / "slurm_local_cluster.sh"
TRAIN_ROWS = 640  # write_tiny_dataset's default
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _config(tmp_path: Path, data: Path, epochs: int = 1) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"data: {{path: {data}, batch_size: 32, eval_batch_size: 16, num_workers: 0}}\n"
        "model: {embedding_dim: 16, user_mlp: [32], item_mlp: [32], output_dim: 16}\n"
        "loss: {label_weights: {click: 1.0, like: 0.5}}\n"
        f"train: {{epochs: {epochs}, log_every_steps: 2, progress_bar: false}}\n"
        f"run: {{dir: {tmp_path / 'run'}}}\n"
        "logging: {wandb: false}\n"
        "checkpoint: {every_n_steps: 10}\n"
    )
    return path


# -- without a cluster ------------------------------------------------------------------------


def test_dry_run_prints_the_sbatch_script(tmp_path: Path, capsys) -> None:
    config = _config(tmp_path, tmp_path / "data")
    args = ["launch", "slurm", "--nodes", "1", "--cpu-ranks", "2", "--partition", "debug"]
    args += ["--time", "7", "--account", "recsys", "--job-name", "tiny", "--dry-run"]
    assert main([*args, str(config), "train.epochs=3"]) == 0
    script = capsys.readouterr().out
    folder = tmp_path / "run" / "slurm"  # default --log-dir: <run.dir>/slurm
    for line in (
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --partition=debug",
        "#SBATCH --time=7",
        "#SBATCH --account=recsys",
        "#SBATCH --job-name=tiny",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@90",
        f"#SBATCH --output={folder}/%j_0_log.out",
    ):
        assert line in script.splitlines(), (line, script)
    assert "--gpus-per-node" not in script
    assert f"srun --unbuffered --output {folder}/%j_%t_log.out" in script
    assert f"{sys.executable} -u -m submitit.core._submit {folder}" in script
    assert not folder.exists()  # a dry run writes nothing


def test_gpu_nodes_get_one_task_per_gpu(tmp_path: Path) -> None:
    options = SlurmOptions(nodes=2, gpus_per_node=8, log_dir=tmp_path / "logs", cpus_per_task=10)
    task = make_task(options, str(_config(tmp_path, tmp_path / "data")), [])
    script = sbatch_script(options, task).splitlines()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10"):
        assert f"#SBATCH {line}" in script
    assert not task.cpu_only
    assert job_folder(options, task) == (tmp_path / "logs").absolute()


@pytest.mark.parametrize(
    ("arguments", "flag"),
    [
        (["--nodes", "0", "--cpu-ranks", "2"], "--nodes"),
        (["--nodes", "1"], "--gpus-per-node"),
        (["--gpus-per-node", "4", "--cpu-ranks", "2"], "--cpu-ranks"),
        (["--cpu-ranks", "0"], "--cpu-ranks"),
        (["--cpu-ranks", "2", "--time", "0"], "--time"),
        (["--cpu-ranks", "2", "--cpus-per-task", "0"], "--cpus-per-task"),
        (["--cpu-ranks", "2", "--job-name", " "], "--job-name"),
    ],
)
def test_bad_options_exit_naming_the_flag(
    tmp_path: Path, caplog, arguments: list[str], flag: str
) -> None:
    config = _config(tmp_path, tmp_path / "data")
    assert main(["launch", "slurm", *arguments, "--dry-run", str(config)]) == 2
    assert flag in caplog.text


def test_bad_config_key_fails_before_submitting(tmp_path: Path, caplog) -> None:
    config = _config(tmp_path, tmp_path / "data")
    assert main(["launch", "slurm", "--cpu-ranks", "2", str(config), "train.epochz=2"]) == 2
    assert "train.epochz" in caplog.text


def test_rank_environment_agrees_across_tasks() -> None:
    hosts = ["gpu-a17", "gpu-a18"]
    environments = [rank_environment("4242", rank, rank % 8, 16, hosts) for rank in range(16)]
    assert [e["RANK"] for e in environments] == [str(r) for r in range(16)]
    assert {e["LOCAL_RANK"] for e in environments} == {str(r) for r in range(8)}
    assert {(e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]) for e in environments} == {
        ("16", "gpu-a17", str(master_port("4242")))
    }
    with pytest.raises(ValueError, match="no hosts"):
        rank_environment("1", 0, 0, 1, [])


def test_master_port_is_a_function_of_the_job_id() -> None:
    ports = [master_port(str(job_id)) for job_id in range(1000, 1000 + PORT_SPAN)]
    assert len(set(ports)) == PORT_SPAN  # consecutive jobs on one node never share a port
    assert min(ports) >= PORT_BASE and max(ports) < PORT_BASE + PORT_SPAN < 32768
    assert master_port("77_3") == master_port("80") != master_port("77_4")  # array elements
    with pytest.raises(ValueError, match="job id"):
        master_port("abc")


def test_checkpoint_requeues_the_same_task() -> None:
    task = TrainTask("/shared/tiny.yaml", ("train.epochs=3",), cpu_only=True)
    requeued = task.checkpoint()
    assert requeued.function == task and requeued.args == () and requeued.kwargs == {}
    assert pickle.loads(pickle.dumps(task)) == task


def test_every_job_can_be_submitted(tmp_path: Path) -> None:
    config = _config(tmp_path, write_tiny_dataset(tmp_path / "data"))
    options = SlurmOptions(nodes=1, cpu_ranks=2)
    for job in ("train", "train-ranker", "align"):
        task = make_task(options, str(config), [], job)
        assert task.job == job and pickle.loads(pickle.dumps(task)) == task
    with pytest.raises(ValueError, match="--job 'rank'"):
        make_task(options, str(config), [], "rank")


# -- on a one-node SLURM cluster on this machine ------------------------------------------------


def _node_idle() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and bool({"idle", "mixed"} & set(result.stdout.split()))


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """Uses the running cluster, else starts one with launch/slurm_local_cluster.sh (root)."""
    if _node_idle():
        return
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("no SLURM node is up and starting one needs root on Linux")
    started = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT)], capture_output=True, text=True, timeout=600
    )
    if started.returncode != 0:
        reason = (started.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"{CLUSTER_SCRIPT.name} could not start a SLURM cluster: {reason}")


def _job_state(job_id: str) -> tuple[str, str]:
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    ).stdout
    state = re.search(r"JobState=(\S+)", shown)
    reason = re.search(r"Reason=(\S+)", shown)
    return (state.group(1) if state else "UNKNOWN", reason.group(1) if reason else "")


def _wait_until(job_id: str, states: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state, reason = _job_state(job_id)
        if state in states or state in FINISHED:
            return state
        if state == "PENDING" and reason == "BeginTime":
            # Slurm holds a requeued batch job ~2 minutes before it may start again.
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        time.sleep(1)
    return _job_state(job_id)[0]


def _finish(job, timeout_s: float = 600) -> list:
    """Waits through scontrol (sacct needs accounting storage, which the test cluster lacks)."""
    state = _wait_until(job.job_id, {"COMPLETED"}, timeout_s)
    if state != "COMPLETED":
        subprocess.run(["scancel", job.job_id], check=False)
        logs = "\n".join(f"{path}:\n{path.read_text()[-3000:]}" for path in _logs(job))
        pytest.fail(f"SLURM job {job.job_id} ended {state}\n{logs}")
    return job.results()


def _logs(job) -> list[Path]:
    return sorted(Path(job.paths.folder).glob(f"{job.job_id}_*_log.*"))


def _check_run(run: Path, epochs: int, results: list) -> None:
    assert len(results) == 2
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["rows_trained"] == epochs * TRAIN_ROWS  # every row once per epoch
    assert summary["steps"] == results[0].steps == results[1].steps > 0
    assert (run / "checkpoints" / f"step-{summary['steps']}" / ".complete").exists()
    assert "hr@10" in json.loads((run / "metrics.json").read_text())["model"]


@pytest.mark.slow
def test_two_cpu_ranks_train_through_slurm(tmp_path: Path, slurm_cluster: None) -> None:
    config = _config(tmp_path, write_tiny_dataset(tmp_path / "data"))
    options = SlurmOptions(nodes=1, cpu_ranks=2, time_min=10, job_name="twotower-test")
    task = make_task(options, str(config), [])
    job = submit(options, task)
    assert job.paths.submission_file.read_text() == sbatch_script(options, task)
    results = _finish(job)
    _check_run(tmp_path / "run", 1, results)
    assert {r.steps for r in results} == {TRAIN_ROWS // (32 * 2)}
    # Each rank takes the CPUs SLURM gave the job on the node, split between its 2 tasks.
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job.job_id], capture_output=True, text=True, timeout=30
    ).stdout
    allocated = int(re.search(r"NumCPUs=(\d+)", shown).group(1))
    rank_log = (Path(job.paths.folder) / f"{job.job_id}_0_log.err").read_text()
    threads = max(1, allocated // 2)
    line = f"threads per rank: {threads} intra-op, {threads} inter-op ({allocated} cores / 2 ranks"
    assert rank_log.count(line) == 1, rank_log[-3000:]


def _requeue_once_saved(job, run: Path) -> list:
    """Requeues ``job`` (`scontrol requeue`, as an administrator would) once its run saved a
    complete checkpoint; the results of the second attempt."""
    deadline = time.monotonic() + 300
    while latest_checkpoint(run) is None:
        assert _job_state(job.job_id)[0] in {"PENDING", "RUNNING"}, _job_state(job.job_id)
        assert time.monotonic() < deadline, "the job never saved a checkpoint"
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    assert _wait_until(job.job_id, {"PENDING"}, 120) == "PENDING"
    results = _finish(job)
    first_rank_log = (Path(job.paths.folder) / f"{job.job_id}_0_log.err").read_text()
    assert "restart 1" in first_rank_log
    return results


@pytest.mark.slow
def test_requeued_job_finishes(tmp_path: Path, slurm_cluster: None) -> None:
    """Retrieval training requeued mid-run; the second attempt resumes from the latest
    complete checkpoint and runs the run to its end."""
    epochs = 10
    config = _config(tmp_path, write_tiny_dataset(tmp_path / "data"), epochs)
    options = SlurmOptions(nodes=1, cpu_ranks=2, time_min=30, job_name="twotower-requeue")
    job = submit(options, make_task(options, str(config), []))
    results = _requeue_once_saved(job, tmp_path / "run")
    run = tmp_path / "run"
    _check_run(run, epochs, results)
    logged = [record["step"] for record in read_metrics(run) if "loss" in record]
    assert logged == list(range(2, results[0].steps + 1, 2))  # each step logged once
    resumed = json.loads((run / "train_summary.json").read_text())["resumed_from"]
    assert resumed is not None and "checkpoints/step-" in resumed


SMALL_RANKER = ["ranker.embedding_dim=8", "ranker.mlp=[16]", "ranker.cross_layers=1"]


def _start_runs(tmp_path: Path, config: Path) -> list[str]:
    """A retrieval run and a ranker run (in this process) for alignment to start from."""
    short = ["train.max_steps=4", "ranker.train.max_steps=4", "eval.at_end=false", *SMALL_RANKER]
    try:
        train(load_config(config, [*short, f"run.dir={tmp_path / 'base'}"]))
        train_ranker(load_config(config, [*short, f"run.dir={tmp_path / 'ranker'}"]))
    finally:
        shutdown()
    return [
        f"checkpoint.resume_from={tmp_path / 'base'}",
        f"alignment.reward_checkpoint={tmp_path / 'ranker'}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("job", ["train-ranker", "align"])
def test_requeued_ranker_and_alignment_jobs_finish(
    job: str, tmp_path: Path, slurm_cluster: None
) -> None:
    """Any job runs through SLURM on two tasks and survives a requeue: the ranker and
    alignment resume from their latest checkpoint and finish, each step logged once."""
    config = _config(tmp_path, write_tiny_dataset(tmp_path / "data"), epochs=6)
    # The job's own loop section, as tiny.yaml's train section sets it for retrieval.
    section = "alignment.train" if job == "align" else "ranker.train"
    overrides = [*SMALL_RANKER, "eval.at_end=false", f"{section}.log_every_steps=2"]
    overrides += [f"{section}.progress_bar=false"]
    if job == "align":
        overrides += [*_start_runs(tmp_path, config), "alignment.train.max_steps=40"]
        overrides += ["alignment.k=8", "alignment.top_n=3"]
    else:
        overrides.append("ranker.train.epochs=6")
    options = SlurmOptions(nodes=1, cpu_ranks=2, time_min=30, job_name=f"twotower-{job}")
    submitted = submit(options, make_task(options, str(config), overrides, job))
    results = _requeue_once_saved(submitted, tmp_path / "run")
    steps = 40 if job == "align" else 6 * TRAIN_ROWS // 64
    assert len(results) == 2 and results[0].steps == results[1].steps == steps
    summary_file = "align_summary.json" if job == "align" else "train_summary.json"
    summary = json.loads((tmp_path / "run" / summary_file).read_text())
    assert summary["steps"] == steps and summary.get("stopped_by_signal") is None
    assert "checkpoints/step-" in summary["resumed_from"]
    logged = [r["step"] for r in read_metrics(tmp_path / "run") if "samples_per_s" in r]
    assert logged == list(range(2, steps + 1, 2))
