"""``twotower sweep EXPERIMENTS.yaml``: an ablation harness. Every variant of an experiment file is
trained on every dataset with the dataset's seed and budget, then compared in one table per dataset.

Experiment file (YAML; unknown keys, wrong types and missing values are errors naming the key)::

    title: Negatives and loss families    # heading of the result tables
    out: runs/sweeps/negatives            # <out>/<dataset>/<variant-slug>/ is one run's run.dir
    datasets:                             # name (a directory name) -> base config of its runs
      ml-100k:
        config: configs/movielens_100k.yaml
        overrides: [train.epochs=10]      # the budget: applied to every variant of this dataset
    variants:                             # in table order; applied after the dataset's overrides
      - name: in-batch softmax
        overrides: []
      - name: + logQ
        overrides: [negatives.log_q.enabled=true]

Funnel experiments add a ranker per dataset and alignment stages::

    datasets:
      ml-100k:
        config: configs/movielens_100k.yaml
        ranker: {config: configs/ranker_movielens_100k.yaml, overrides: [ranker.train.epochs=2]}
    variants:
      - name: base
      - name: + KD
        overrides: [distillation.listwise.teacher={ranker}]   # {ranker}: its run directory
      - name: + reward alignment
        stage: align                  # python -m trainer.align, starting from ...
        start: base                   # ... this earlier variant's run (same seed)

The ranker trains first (``<out>/<dataset>/ranker``, not a table row); every variant then also
reports funnel consistency against it (``eval.funnel.ranker``: overlap@10, NDCG vs the ranker, and
vs the truth on synthetic worlds), and an ``align`` variant gets ``checkpoint.resume_from`` and
``alignment.reward_checkpoint`` set. A light ranking head's reranked list is its own row.

Paths are relative to the working directory, like the paths inside configs. One run is
``python -m trainer.train CONFIG <dataset overrides> <variant overrides> run.dir=... logging.wandb=false
train.progress_bar=false eval.at_end=true`` (under torchrun for ``--nproc`` > 1), its output in
``<run.dir>/train.log``. Variants may not set ``seed`` (the comparison needs one seed) nor the keys
the sweep sets itself. Every run's full configuration is loaded and validated before the first run
starts, so a typo in the last variant fails at once, naming the variant and the key. A run that
fails is reported as failed in its table (with its log) and the sweep goes on; the exit status is
then 1.

Results: ``<out>/<dataset>/results.md`` (the table) and ``results.json`` (every metric of every
variant, the train summaries, the commands), rewritten after each run.
"""

from launch.sweep.plan import PlannedRun, RunOutcome, RunStatus, plan_sweep
from launch.sweep.report import (
    BASELINE_ROW,
    COLUMNS,
    Column,
    Source,
    collapse_flag,
    protocol_note,
    results_table,
    write_results,
)
from launch.sweep.run import SweepReport, execute, failure_line, run_sweep, train_command
from launch.sweep.spec import Stage, SweepSpec, load_sweep, slugify

__all__ = [
    "BASELINE_ROW",
    "COLUMNS",
    "Column",
    "PlannedRun",
    "RunOutcome",
    "RunStatus",
    "Source",
    "Stage",
    "SweepReport",
    "SweepSpec",
    "collapse_flag",
    "execute",
    "failure_line",
    "load_sweep",
    "plan_sweep",
    "protocol_note",
    "results_table",
    "run_sweep",
    "slugify",
    "train_command",
    "write_results",
]
