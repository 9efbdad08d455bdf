"""The ``twotower`` command line: prepare, train, train-ranker, align, eval, export, retrieve,
launch, sweep, plot."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from launch.prepare_cli import add_prepare_parsers, prepare
from trainer.runtime.logs import configure_logging

NPROC_HELP = "ranks, torchrun on this machine when > 1 (default: %(default)s)"
THREADS_FLAG = "--threads-per-rank"
RUN_HELP = "run directory of a training job (required)"
EVAL_OVERRIDES_HELP = "key=value overrides of the run's saved config (eval.*, data.eval_batch_size)"


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's experiment file and its ``key=value`` overrides."""
    parser.add_argument("config", help="experiment config (YAML), e.g. configs/movielens_100k.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=5"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twotower", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    add_prepare_parsers(commands)

    _add_job_parsers(commands)
    _add_serving_parsers(commands)
    _add_launch_parsers(commands)
    _add_sweep_and_plot_parsers(commands)
    return parser


def _add_job_parsers(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train in this process (world size 1)")
    _add_job_arguments(train)

    ranker = commands.add_parser(
        "train-ranker", help="train the ranking model (teacher / reward model), report AUC"
    )
    _add_job_arguments(ranker)
    ranker.add_argument("--nproc", type=int, default=1, help=NPROC_HELP)

    align = commands.add_parser(
        "align", help="align a retrieval checkpoint to a ranker (reward model, KL to reference)"
    )
    _add_job_arguments(align)
    align.add_argument("--nproc", type=int, default=1, help=NPROC_HELP)

    evaluate = commands.add_parser("eval", help="evaluate a run's latest checkpoint")
    evaluate.add_argument("--run", required=True, type=Path, help=RUN_HELP)
    evaluate.add_argument(
        "--split", default=None, help="split to evaluate (default: the run's eval.split)"
    )
    evaluate.add_argument(
        "--ranker",
        default=None,
        help="ranker run or checkpoint: also report funnel consistency (eval.funnel.ranker; "
        "default: none)",
    )
    evaluate.add_argument("overrides", nargs="*", help=EVAL_OVERRIDES_HELP)


def _add_launch_parsers(commands: argparse._SubParsersAction) -> None:
    launch = commands.add_parser("launch", help="multi-process launchers")
    launchers = launch.add_subparsers(dest="launcher", required=True)
    local = launchers.add_parser("local", help="torchrun on this machine")
    local.add_argument(
        "--nproc", type=int, default=2, help="ranks on this machine (default: %(default)s)"
    )
    local.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="elastic restarts after a rank fails; each resumes from the latest checkpoint "
        "(default: %(default)s)",
    )
    local.add_argument(
        THREADS_FLAG,
        type=int,
        default=None,
        metavar="N",
        help="intra-op and inter-op threads of each rank (default: this machine's cores / "
        "--nproc, at least 1)",
    )
    _add_job_arguments(local)
    _add_slurm_parser(launchers)
    _add_slurm_prepare_parser(launchers)


def _add_sweep_and_plot_parsers(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "sweep", help="train every variant of an experiment file, compare them in tables"
    )
    sweep.add_argument("experiments", type=Path, help="experiment file (see launch/sweep.py)")
    sweep.add_argument(
        "--dataset",
        action="append",
        default=None,
        help="only this dataset (repeatable; default: every dataset of the file)",
    )
    sweep.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="ranks per run, torchrun when > 1 (default: %(default)s)",
    )
    sweep.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help="only these variants, by name or slug (default: every variant)",
    )

    plot = commands.add_parser("plot", help="loss and Recall@K curves of a run as PNG")
    plot.add_argument("--run", required=True, type=Path, help=RUN_HELP)
    plot.add_argument("--out", type=Path, default=None, help="PNG path (default: <run>/curves.png)")


def _add_serving_parsers(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="item index + user tower program of a run's latest checkpoint"
    )
    export.add_argument("--run", required=True, type=Path, help=RUN_HELP)
    export.add_argument("--out", required=True, type=Path, help="export directory (required)")
    export.add_argument("--faiss", action="store_true", help="also write a faiss IndexFlatIP")
    export.add_argument("overrides", nargs="*", help=EVAL_OVERRIDES_HELP)

    retrieve = commands.add_parser("retrieve", help="top-K items for user rows from an export")
    retrieve.add_argument(
        "--export", required=True, type=Path, help="twotower export's --out (required)"
    )
    retrieve.add_argument(
        "--users", required=True, type=Path, help="Parquet of user rows (required)"
    )
    retrieve.add_argument(
        "--k", type=int, default=100, help="items per user (default: %(default)s)"
    )
    retrieve.add_argument(
        "--out", type=Path, default=None, help="Parquet of the results (default: print them)"
    )


def _add_slurm_prepare_parser(launchers: argparse._SubParsersAction) -> None:
    prepare = launchers.add_parser(
        "slurm-prepare",
        help="prepare events as SLURM jobs: global, a partition job array, merge",
    )
    prepare.add_argument(
        "--partitions", type=int, required=True, help="partition jobs N (required)"
    )
    prepare.add_argument(
        "--log-dir", type=Path, required=True, help="submitit folder on shared storage (required)"
    )
    prepare.add_argument(
        "--partition", default=None, help="SLURM partition (default: the cluster's default)"
    )
    prepare.add_argument("--account", default=None, help="SLURM account (default: none)")
    prepare.add_argument(
        "--time", type=int, default=60, metavar="MIN", help="minutes per job (default: %(default)s)"
    )
    prepare.add_argument(
        "--cpus-per-task", type=int, default=None, help="cores per job (default: SLURM's)"
    )
    prepare.add_argument(
        "--wait", action="store_true", help="wait for the merge and report it (default: off)"
    )
    prepare.add_argument(
        "arguments", nargs=argparse.REMAINDER, help="after --: the prepare events arguments"
    )


def _add_slurm_parser(launchers: argparse._SubParsersAction) -> None:
    slurm = launchers.add_parser(
        "slurm", help="submit to SLURM through submitit (see launch/slurm.py)"
    )
    slurm.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    slurm.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="one rank per GPU (NCCL); 0: CPU nodes (default: %(default)s)",
    )
    slurm.add_argument(
        "--cpu-ranks",
        type=int,
        default=None,
        help="ranks per node on CPU nodes, gloo; this or --gpus-per-node is required "
        "(default: none)",
    )
    slurm.add_argument(
        "--cpus-per-task", type=int, default=None, help="cores per rank (default: SLURM's)"
    )
    slurm.add_argument(
        THREADS_FLAG,
        type=int,
        default=None,
        metavar="N",
        help="intra-op and inter-op threads of each rank (default: --cpus-per-task, else the "
        "node's cores / ranks per node, at least 1)",
    )
    slurm.add_argument(
        "--partition", default=None, help="SLURM partition (default: the cluster's default)"
    )
    slurm.add_argument(
        "--time",
        type=int,
        default=60,
        metavar="MIN",
        help="minutes per attempt, requeued after (default: %(default)s)",
    )
    slurm.add_argument("--account", default=None, help="SLURM account (default: none)")
    slurm.add_argument(
        "--job-name", default="twotower", help="SLURM job name (default: %(default)s)"
    )
    slurm.add_argument(
        "--log-dir", type=Path, default=None, help="submitit folder (default: <run.dir>/slurm)"
    )
    slurm.add_argument(
        "--dry-run", action="store_true", help="print the sbatch script, submit nothing"
    )
    slurm.add_argument(
        "--job",
        default="train",
        choices=["train", "train-ranker", "align"],
        help="what every task runs; each resumes from its run directory when requeued "
        "(default: %(default)s)",
    )
    _add_job_arguments(slurm)


def _train(args: argparse.Namespace) -> int:
    from trainer.train import main as train_main

    return train_main([args.config, *args.overrides])


def _train_ranker(args: argparse.Namespace) -> int:
    from config import load_config

    load_config(args.config, args.overrides)  # config errors before any process starts
    if args.nproc > 1:
        from launch.local import launch_local

        return launch_local(args.nproc, args.config, args.overrides, module="trainer.ranker_train")
    from trainer.ranker_train import main as ranker_main

    return ranker_main([args.config, *args.overrides])


def _align(args: argparse.Namespace) -> int:
    from config import load_config
    from trainer.align import alignment_sources

    # Config and checkpoint errors before any process starts.
    alignment_sources(load_config(args.config, args.overrides))
    if args.nproc > 1:
        from launch.local import launch_local

        return launch_local(args.nproc, args.config, args.overrides, module="trainer.align")
    from trainer.align import main as align_main

    return align_main([args.config, *args.overrides])


def _eval(args: argparse.Namespace) -> int:
    from trainer.evaluation.eval_run import evaluate_run
    from trainer.evaluation.evaluate import format_table
    from trainer.runtime.distributed import shutdown

    try:
        overrides = list(args.overrides)
        if args.ranker is not None:
            overrides.append(f"eval.funnel.ranker={args.ranker}")
        results = evaluate_run(args.run, args.split, overrides)
    finally:
        shutdown()
    print(format_table(results))
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainer.runtime.distributed import shutdown
    from trainer.serving.export import export_run

    try:
        info = export_run(args.run, args.out, args.faiss, args.overrides)
    finally:
        shutdown()
    source = info["source"]
    print(f"exported step {source['step']} of {source['run']} to {args.out}")
    print(
        f"{info['num_items']} items x {info['embedding_dim']}; user features {info['user_features']}"
    )
    return 0


def _retrieve(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from trainer.serving.retrieve import format_rankings, retrieve

    table = retrieve(args.export, args.users, args.k)
    if args.out is None:
        print(format_rankings(table))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.out)
    print(f"wrote {table.num_rows} rankings to {args.out}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    if args.launcher == "slurm":
        return _launch_slurm(args)
    if args.launcher == "slurm-prepare":
        return _launch_slurm_prepare(args)
    from launch.local import launch_local

    return launch_local(
        args.nproc,
        args.config,
        args.overrides,
        args.max_restarts,
        threads_per_rank=args.threads_per_rank,
    )


def _launch_slurm(args: argparse.Namespace) -> int:
    from launch.slurm import SlurmOptions, make_task, sbatch_script, submit

    options = SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpu_ranks=args.cpu_ranks,
        time_min=args.time,
        partition=args.partition,
        account=args.account,
        job_name=args.job_name,
        cpus_per_task=args.cpus_per_task,
        threads_per_rank=args.threads_per_rank,
        log_dir=args.log_dir,
    )
    task = make_task(options, args.config, args.overrides, args.job)
    if args.dry_run:
        print(sbatch_script(options, task))
        return 0
    job = submit(options, task)
    print(f"submitted SLURM job {job.job_id}; logs in {job.paths.folder}")
    print(f"watch: squeue -j {job.job_id}; cancel: scancel {job.job_id}")
    return 0


def _launch_slurm_prepare(args: argparse.Namespace) -> int:
    from launch.slurm_prepare import PrepareJobs, submit_prepare

    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    if not arguments or any(a in arguments for a in ("--stage", "--partition", "--partitions")):
        raise ValueError(
            "launch slurm-prepare: give the prepare events arguments after -- (--input, --out, "
            "the mapping), without --stage / --partition / --partitions"
        )
    jobs = PrepareJobs(
        partitions=args.partitions,
        log_dir=args.log_dir,
        slurm_partition=args.partition,
        account=args.account,
        time_min=args.time,
        cpus_per_task=args.cpus_per_task,
    )
    submitted = submit_prepare(jobs, arguments)
    print(f"submitted {len(submitted)} SLURM jobs; the merge is {submitted[-1].job_id}")
    if args.wait:
        submitted[-1].result()
        print("prepare events finished")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from launch.sweep import run_sweep

    report = run_sweep(args.experiments, args.dataset, args.nproc, args.only)
    for dataset, table in report.tables.items():
        print(f"\n## {report.title}: {dataset}\n\n{table}")
    if report.failed:
        logging.getLogger("twotower").error(
            "%d of %d runs failed; the table names their logs", report.failed, report.runs
        )
    return 1 if report.failed else 0


def _plot(args: argparse.Namespace) -> int:
    from launch.plot import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    handlers = {
        "prepare": prepare,
        "train": _train,
        "train-ranker": _train_ranker,
        "align": _align,
        "eval": _eval,
        "export": _export,
        "retrieve": _retrieve,
        "launch": _launch,
        "sweep": _sweep,
        "plot": _plot,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        # Config and schema errors carry the key/file in their message; show it without a trace.
        logging.getLogger("twotower").error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
