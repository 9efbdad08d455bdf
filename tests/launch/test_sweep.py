"""``twotower sweep``: experiment-file errors name the key (and the variant); the results table;
an end-to-end sweep of two variants and a failing one on the tiny dataset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from config import ConfigError
from launch.cli import main
from launch.sweep import (
    BASELINE_ROW,
    COLUMNS,
    PlannedRun,
    RunOutcome,
    RunStatus,
    Source,
    execute,
    failure_line,
    load_sweep,
    plan_sweep,
    results_table,
    slugify,
    train_command,
    write_results,
)
from tests.tiny_dataset import write_tiny_dataset


def _tiny_config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"data: {{path: {data}, batch_size: 32, eval_batch_size: 16, num_workers: 0}}\n"
        "model: {embedding_dim: 8, user_mlp: [16], item_mlp: [16], output_dim: 8}\n"
        "loss: {label_weights: {click: 1.0, like: 0.5}}\n"
        "train: {epochs: 1, max_steps: 4, log_every_steps: 2}\n"
        "eval: {ks: [10, 50, 100]}\n"
    )
    return path


def _experiment(tmp_path: Path, body: str, config: str = "tiny.yaml") -> Path:
    path = tmp_path / "experiments.yaml"
    path.write_text(
        "title: Temperatures\n"
        f"out: {tmp_path / 'sweep'}\n"
        f"datasets:\n  tiny:\n    config: {tmp_path / config}\n    overrides: [train.max_steps=3]\n"
        + body
    )
    return path


TWO_VARIANTS = (
    "variants:\n"
    "  - {name: t=0.1, overrides: [model.temperature=0.1]}\n"
    "  - {name: + hotter, overrides: [model.temperature=0.2]}\n"
)


def test_valid_file_plans_one_validated_run_per_variant(tmp_path: Path) -> None:
    _tiny_config(tmp_path, tmp_path / "data")
    spec = load_sweep(_experiment(tmp_path, TWO_VARIANTS))
    runs = plan_sweep(spec)
    assert [(r.dataset, r.variant, r.run_dir.name) for r in runs] == [
        ("tiny", "t=0.1", "t-0.1"),
        ("tiny", "+ hotter", "hotter"),
    ]
    assert runs[1].overrides[:2] == ("train.max_steps=3", "model.temperature=0.2")
    assert f"run.dir={tmp_path / 'sweep' / 'tiny' / 'hotter'}" in runs[1].overrides
    assert "logging.wandb=false" in runs[1].overrides
    # --only takes names or slugs and keeps file order.
    assert [r.variant for r in plan_sweep(spec, only=["hotter", "t=0.1"])] == ["t=0.1", "+ hotter"]
    with pytest.raises(ConfigError, match="unknown variant 'colder'.*'t=0.1', '\\+ hotter'"):
        plan_sweep(spec, only=["colder"])
    with pytest.raises(ConfigError, match="unknown dataset 'ml-1m'"):
        plan_sweep(spec, datasets=["ml-1m"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("variant:\n  - {name: a}\n", "key 'variant': Key 'variant' not in 'SweepSpec'"),
        (
            "variants:\n  - {name: a}\n  - {name: b, override: [model.temperature=0.1]}\n",
            r"key 'variants\[1\]\.override'",
        ),
        ("variants:\n  - {name: a, overrides: model.temperature=0.1}\n", "variants\\[0\\]"),
        ("variants:\n  - {overrides: []}\n", r"key 'variants\[0\]\.name'.*missing"),
        ("variants: {name: a}\n", "key 'variants': expected a list"),
        ("variants: []\n", "key 'variants': list at least one variant"),
        (
            "variants:\n  - {name: a b}\n  - {name: A-B}\n",
            r"variants\[1\]\.name.*'A-B' and 'a b' share the directory name 'a-b'",
        ),
        (
            "variants:\n  - {name: a, overrides: [seed=3]}\n",
            r"variants\[0\] \('a'\)\.overrides.*share their dataset's 'seed'",
        ),
        (
            "variants:\n  - {name: a, overrides: [run.dir=/tmp/x]}\n",
            "'run.dir' is set by the sweep",
        ),
        (
            "variants:\n  - {name: a, datasets: [ml-1m]}\n",
            r"variants\[0\] \('a'\)\.datasets.*\['ml-1m'\] are not among datasets \['tiny'\]",
        ),
    ],
)
def test_experiment_file_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(_experiment(tmp_path, body))


def test_variant_limited_to_some_datasets(tmp_path: Path) -> None:
    _tiny_config(tmp_path, tmp_path / "data")
    body = (
        "variants:\n  - {name: everywhere}\n"
        "  - {name: tiny only, datasets: [tiny]}\n"
        "  - {name: elsewhere, datasets: [other]}\n"
    )
    path = _experiment(tmp_path, body)
    text = path.read_text().replace(
        "variants:", f"  other:\n    config: {tmp_path / 'tiny.yaml'}\nvariants:", 1
    )
    path.write_text(text)
    runs = plan_sweep(load_sweep(path))
    assert [(r.dataset, r.variant) for r in runs] == [
        ("tiny", "everywhere"),
        ("tiny", "tiny only"),
        ("other", "everywhere"),
        ("other", "elsewhere"),
    ]


def test_missing_top_level_key_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "experiments.yaml"
    path.write_text("title: x\ndatasets: {}\nvariants: []\n")
    with pytest.raises(ConfigError, match="key 'out'"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")


def test_bad_override_fails_before_any_run_naming_variant_and_key(tmp_path: Path) -> None:
    _tiny_config(tmp_path, tmp_path / "data")
    body = TWO_VARIANTS + "  - {name: typo, overrides: [model.temprature=0.3]}\n"
    spec = load_sweep(_experiment(tmp_path, body))
    with pytest.raises(ConfigError, match=r"variant 'typo'.*model\.temprature"):
        plan_sweep(spec)
    assert not (tmp_path / "sweep").exists()
    missing = load_sweep(_experiment(tmp_path, TWO_VARIANTS, config="absent.yaml"))
    with pytest.raises(ConfigError, match="dataset 'tiny', variant 't=0.1'.*does not exist"):
        plan_sweep(missing)


def test_commands_for_one_and_several_ranks(tmp_path: Path) -> None:
    run = PlannedRun("tiny", "a", "c.yaml", ("x=1", "run.dir=r"), tmp_path / "r", 0)
    assert train_command(run, 1) == [
        sys.executable,
        "-m",
        "trainer.train",
        "c.yaml",
        "x=1",
        "run.dir=r",
    ]
    torchrun = train_command(run, 2)
    assert "torch.distributed.run" in torchrun and "--nproc_per_node=2" in torchrun
    assert torchrun[-4:] == ["trainer.train", "c.yaml", "x=1", "run.dir=r"]
    assert slugify("+ logQ") == "logq" and slugify("in-batch softmax") == "in-batch-softmax"


def test_failure_line_prefers_the_ranks_exception() -> None:
    log = (
        "[rank1]: Traceback (most recent call last):\n"
        "[rank1]: data_pipeline.schema.SchemaError: /x/manifest.json: no manifest\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "============================================================\n"
    )
    assert failure_line(log).endswith("SchemaError: /x/manifest.json: no manifest")
    assert failure_line("starting\nkilled\n") == "killed"
    assert failure_line("") == ""


def test_results_table_rows_failures_and_baseline(tmp_path: Path) -> None:
    def outcome(name: str, status: RunStatus, value: float) -> RunOutcome:
        run = PlannedRun("tiny", name, "c.yaml", (), tmp_path / slugify(name), 0)
        metrics = {c.key: value for c in COLUMNS}
        return RunOutcome(
            run,
            status,
            0 if status is RunStatus.OK else 1,
            1.0,
            [],
            metrics={"model": metrics, "popularity": {**metrics, "recall@10": 0.01}},
            summary={"samples_per_second": 12345.6},
            error=None if status is RunStatus.OK else "exit code 1",
        )

    table = results_table(
        [outcome("a|b", RunStatus.OK, 0.5), outcome("broken", RunStatus.FAILED, 0.0)]
    ).splitlines()
    assert table[0].startswith("| variant | Recall@10 | Recall@50 |")
    shown = [
        c for c in COLUMNS if c.source not in (Source.FUNNEL, Source.EXCLUSION)
    ]  # no run measured the funnel
    assert table[2] == "| a\\|b | " + " | ".join(["0.5000"] * (len(shown) - 1)) + " | 12,346 |"
    assert table[3].startswith("| broken | **failed** (exit code 1): `") and "broken" in table[3]
    assert table[4].startswith(f"| {BASELINE_ROW} | 0.0100 | 0.5000 |") and table[4].endswith(
        "| — |"
    )


def test_seeds_run_every_variant_per_seed_and_report_mean_and_spread(tmp_path: Path) -> None:
    _tiny_config(tmp_path, tmp_path / "data")
    path = _experiment(tmp_path, TWO_VARIANTS)
    path.write_text(path.read_text() + "seeds: [0, 7]\n")
    runs = plan_sweep(load_sweep(path))
    assert [(r.variant, r.seed, r.run_dir.name) for r in runs] == [
        ("t=0.1", 0, "seed-0"),
        ("t=0.1", 7, "seed-7"),
        ("+ hotter", 0, "seed-0"),
        ("+ hotter", 7, "seed-7"),
    ]
    assert "seed=7" in runs[1].overrides
    seeded = path.read_text().replace("overrides: [train.max_steps=3]", "overrides: [seed=3]")
    path.write_text(seeded)
    with pytest.raises(ConfigError, match=r"datasets\.tiny\.overrides.*'seeds'"):
        load_sweep(path)

    def outcome(seed: int, value: float) -> RunOutcome:
        run = PlannedRun("tiny", "v", "c.yaml", (), tmp_path / f"seed-{seed}", seed)
        metrics = {c.key: value for c in COLUMNS}
        return RunOutcome(
            run,
            RunStatus.OK,
            0,
            1.0,
            [],
            metrics={"model": metrics, "popularity": metrics},
            summary={"samples_per_second": 1000.0 * (1 + seed)},
        )

    row = results_table([outcome(0, 0.2), outcome(1, 0.4)]).splitlines()[2]
    assert row.startswith("| v | 0.3000 ± 0.1414 | 0.3000 ± 0.1414 |")
    assert row.endswith("| 1,500 ± 707 |")


def test_sweep_end_to_end_two_variants_and_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    _tiny_config(tmp_path, write_tiny_dataset(tmp_path / "data"))
    broken = f"  - {{name: broken, overrides: ['data.path={tmp_path / 'missing'}']}}\n"
    experiments = _experiment(tmp_path, TWO_VARIANTS + broken)
    assert main(["sweep", str(experiments)]) == 1  # one run failed, the others still ran
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line for line in out.splitlines() if line.startswith("| ")}
    for name in ("t=0.1", "+ hotter", BASELINE_ROW):
        cells = rows[name].strip("| ").split(" | ")[1:]
        assert len(cells) == len(
            [c for c in COLUMNS if c.source not in (Source.FUNNEL, Source.EXCLUSION)]
        )
        # A cell is "value [low, high]" (a single run's interval) or a bare value.
        values = [float(cell.split(" [")[0].replace(",", "")) for cell in cells[:-1]]
        assert all(value >= 0 for value in values), rows[name]
    assert float(rows["t=0.1"].split(" | ")[-1].strip(" |").replace(",", "")) > 0  # samples/s
    assert "**failed** (exit code 1)" in rows["broken"]
    dataset_dir = tmp_path / "sweep" / "tiny"
    assert (dataset_dir / "broken" / "train.log").read_text().startswith("$ ")
    results = json.loads((dataset_dir / "results.json").read_text())
    by_name = {v["name"]: v for v in results["variants"]}
    assert [v["status"] for v in results["variants"]] == ["ok", "ok", "failed"]
    assert "no manifest" in by_name["broken"]["failure_line"]
    for name in ("t=0.1", "+ hotter"):
        model_metrics = by_name[name]["metrics"]["model"]
        assert {"tail_recall@50", "cold_recall@50", "cold_rows"} <= set(model_metrics)
        assert by_name[name]["train"]["steps"] == 3
    # Same seed and data, different temperatures: the runs really differ.
    assert by_name["t=0.1"]["metrics"]["model"] != by_name["+ hotter"]["metrics"]["model"]
    assert results["seeds"] == [0] and "recall@10" in results["popularity"]
    assert "| t=0.1 |" in (dataset_dir / "results.md").read_text()
    assert "| tail Recall@50 | cold Recall@50 |" in (dataset_dir / "results.md").read_text()


FUNNEL = (
    "    ranker: {config: RANKER, overrides: [ranker.train.epochs=1]}\n"
    "variants:\n"
    "  - {name: base}\n"
    "  - {name: + KD, overrides: ['run.name={ranker}']}\n"
    "  - {name: + aligned, stage: align, start: base}\n"
)


def test_funnel_sweep_plans_the_ranker_first_and_wires_its_stages(tmp_path: Path) -> None:
    _tiny_config(tmp_path, tmp_path / "data")
    body = FUNNEL.replace("RANKER", str(tmp_path / "tiny.yaml"))
    runs = plan_sweep(load_sweep(_experiment(tmp_path, body)))
    ranker, base, kd, aligned = runs
    ranker_dir = tmp_path / "sweep" / "tiny" / "ranker"
    assert (ranker.module, ranker.run_dir, ranker.in_table) == (
        "trainer.ranker_train",
        ranker_dir,
        False,
    )
    assert "ranker.train.epochs=1" in ranker.overrides
    for run in (base, kd, aligned):
        assert f"eval.funnel.ranker={ranker_dir}" in run.overrides
    assert f"run.name={ranker_dir}" in kd.overrides  # {ranker} substituted
    assert aligned.module == "trainer.align" and aligned.summary_file == "align_summary.json"
    assert f"checkpoint.resume_from={base.run_dir}" in aligned.overrides
    assert f"alignment.reward_checkpoint={ranker_dir}" in aligned.overrides
    assert train_command(aligned, 1)[1:3] == ["-m", "trainer.align"]


@pytest.mark.parametrize(
    "variants,message",
    [
        ("  - {name: a, stage: align}\n", "variants[0] ('a').start"),
        ("  - {name: a}\n  - {name: b, stage: align, start: c}\n", "variants[1] ('b').start"),
        ("  - {name: a, start: a}\n", "only an 'align' variant"),
        ("  - {name: a, overrides: ['run.name={ranker}']}\n", "declare none"),
    ],
)
def test_stage_errors_name_the_variant(tmp_path: Path, variants: str, message: str) -> None:
    _tiny_config(tmp_path, tmp_path / "data")
    with pytest.raises(
        ConfigError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        load_sweep(_experiment(tmp_path, "variants:\n" + variants))


def test_funnel_columns_and_reranked_rows_appear_when_measured(tmp_path: Path) -> None:
    run = PlannedRun("tiny", "head", "c.yaml", (), tmp_path / "head", 0)
    metrics = {
        "model": {"hr@10": 0.2},
        "reranked": {"hr@10": 0.3},
        "popularity": {"hr@10": 0.1},
        "funnel": {"overlap@10": 0.7, "ranker_ndcg@10": 0.6},
    }
    ranker_run = PlannedRun("tiny", "ranker", "r.yaml", (), tmp_path / "ranker", 0, in_table=False)
    outcomes = [
        RunOutcome(ranker_run, RunStatus.OK, 0, 1.0, [], metrics={"auc/click": 0.9}),
        RunOutcome(run, RunStatus.OK, 0, 1.0, [], metrics=metrics),
    ]
    table = results_table(outcomes).splitlines()
    assert "ranker top-10 in top-100" in table[0] and "NDCG@10 vs ranker" in table[0]
    assert "NDCG@10 vs truth" not in table[0]
    assert table[2].startswith("| head |") and table[2].endswith("| 0.7000 | 0.6000 |")
    assert table[3].startswith("| head (reranked by the light head) |") and "0.3000" in table[3]
    assert table[4].startswith(f"| {BASELINE_ROW} |") and len(table) == 5


def test_a_run_never_resumes_an_earlier_sweeps_checkpoints(tmp_path: Path) -> None:
    """An earlier sweep's checkpoint in the run directory would be resumed as if it were this
    run's (the config or data may have changed): ``execute`` removes it before training."""
    _tiny_config(tmp_path, tmp_path / "missing")
    (run,) = plan_sweep(load_sweep(_experiment(tmp_path, "variants:\n  - {name: base}\n")))
    stale = run.run_dir / "checkpoints" / "step-7"
    stale.mkdir(parents=True)
    (stale / ".complete").write_text("")
    (run.run_dir / run.metrics_file).write_text("{}")
    outcome = execute(run, 1)
    assert outcome.status is RunStatus.FAILED  # no data: the run stops at start
    assert not (run.run_dir / "checkpoints").exists()
    assert not (run.run_dir / run.metrics_file).exists()


def test_single_runs_show_intervals_and_collapsed_runs_are_flagged(tmp_path: Path) -> None:
    def outcome(name: str, recall: float) -> RunOutcome:
        run = PlannedRun("tiny", name, "c.yaml", (), tmp_path / slugify(name), 0)
        metrics = {
            "num_items": 1000,
            "model": {"recall@100": recall, "hr@10": recall / 2},
            "popularity": {"recall@100": 0.3, "hr@10": 0.1},
            "intervals": {"model": {"recall@100": [recall - 0.01, recall + 0.02]}},
            "by_exclusion": {
                "engaged": {
                    "model": {"hr@10": recall / 4},
                    "popularity": {"hr@10": 0.05},
                    "intervals": {"model": {"hr@10": [0.0, 1.0]}},
                }
            },
            "protocol": {
                "split": "test",
                "exclude": "none",
                "corpus_items": 1000,
                "queries": 812,
                "cutoffs": [10, 100],
                "interval": "95% interval, percentile bootstrap over users (1000 replicates)",
            },
        }
        return RunOutcome(run, RunStatus.OK, 0, 1.0, [], metrics=metrics)

    good, below_popular, below_random = outcome("good", 0.5), outcome("m", 0.2), outcome("z", 0.05)
    rows = results_table([good, below_popular, below_random]).splitlines()
    assert rows[2].startswith("| good | —") and "| 0.5000 [0.4900, 0.5200] |" in rows[2]
    assert "HR@10, engaged excluded" in rows[0] and "NDCG@10, engaged" not in rows[0]
    assert rows[2].endswith("| 0.1250 [0.0000, 1.0000] |")  # measured under engaged too
    assert "| 0.2500 |" in rows[2]  # no interval: value only
    assert rows[3].startswith("| m | —") and rows[4].startswith("| z | —")
    assert "- **m**: below most-popular: recall@100 0.2000 < 0.3000" in rows
    assert "- **z**: collapsed: recall@100 0.0500 below random (0.1000)" in rows
    assert not any(line.startswith("- **good**") for line in rows)
    write_results(tmp_path / "out", "t", [good])
    text = (tmp_path / "out" / "results.md").read_text()
    assert "exclusion `none`" in text and "812 queries" in text
