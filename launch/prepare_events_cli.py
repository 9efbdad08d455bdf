"""``twotower prepare events``: a user's own interaction log, mapped by flags or a YAML file.

    twotower prepare events --input logs/ --user-column customer_id --item-column sku \
        --timestamp-column ts --label-columns click,purchase --out data/events
    twotower prepare events --input logs/ --mapping mapping.yaml --out data/events
    twotower prepare events --input ratings.txt --format sequence --out data/beauty

Flags given beside ``--mapping`` override its keys.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_pipeline.datasets.events_mapping import EventMapping
    from data_pipeline.datasets.split import SplitConfig


def add_events_parser(datasets: argparse._SubParsersAction) -> argparse.ArgumentParser:
    events = datasets.add_parser(
        "events",
        help="your own interaction log (Parquet, CSV, TSV, JSONL or user-per-line sequences)",
        description="Your own interaction log: Parquet, CSV, TSV, JSONL, or the one-user-per-line "
        "sequence text of the SASRec/BERT4Rec benchmark files (user item item ...).",
    )
    events.add_argument("--input", required=True, help="a file, folder or glob (required)")
    events.add_argument("--out", required=True, type=Path, help="dataset directory (required)")
    events.add_argument(
        "--mapping", type=Path, default=None, help="YAML column mapping (default: none, flags only)"
    )
    events.add_argument(
        "--format",
        default=None,
        choices=["parquet", "csv", "tsv", "jsonl", "sequence"],
        help="input format of every file (default: by file suffix; .txt is sequence)",
    )
    events.add_argument(
        "--user-column",
        default=None,
        help="raw user id column (default: the mapping's, else user_id)",
    )
    events.add_argument(
        "--item-column",
        default=None,
        help="raw item id column (default: the mapping's, else item_id)",
    )
    events.add_argument(
        "--timestamp-column", default=None, help="event time column (default: order of appearance)"
    )
    events.add_argument(
        "--label-columns",
        default=None,
        help="comma list of numeric labels, > 0 = engaged (default: every row a positive click)",
    )
    events.add_argument(
        "--dedup",
        default=None,
        choices=["keep_all", "first", "last"],
        help="repeated (user, item) pairs (default: keep_all)",
    )
    events.add_argument(
        "--min-user-events",
        type=int,
        default=None,
        help="k-core: fewest events per user (default: the mapping's, else 1)",
    )
    events.add_argument(
        "--min-item-events",
        type=int,
        default=None,
        help="k-core: fewest events per item (default: the mapping's, else 1)",
    )
    events.add_argument(
        "--history-length", type=int, default=50, help="most history events per row (%(default)s)"
    )
    events.add_argument(
        "--partition-events",
        type=int,
        default=2_000_000,
        help="events per on-disk partition, the memory bound of the per-user passes "
        "(default: %(default)s)",
    )
    events.add_argument(
        "--stage",
        default="all",
        choices=["all", "global", "partition", "merge"],
        help="run one stage of a conversion split over several jobs: global (id maps, spill, "
        "k-core, counters), partition (one partition's rows, with --partition), merge "
        "(default: %(default)s, every stage in this process)",
    )
    events.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="spill partitions N, one job each in the partition stage (default: events / "
        "--partition-events)",
    )
    events.add_argument(
        "--partition",
        type=int,
        default=None,
        help="the partition P in 0 .. N-1 that --stage partition writes (default: none)",
    )
    return events


def mapping_from_args(args: argparse.Namespace) -> EventMapping:
    """``--mapping``'s keys, overridden by the flags given."""
    from data_pipeline.datasets.events_mapping import load_mapping

    flags = {
        "user": args.user_column,
        "item": args.item_column,
        "timestamp": args.timestamp_column,
        "dedup": args.dedup,
        "min_user_events": args.min_user_events,
        "min_item_events": args.min_item_events,
    }
    overrides = {key: value for key, value in flags.items() if value is not None}
    if args.label_columns is not None:
        overrides["labels"] = [c.strip() for c in args.label_columns.split(",") if c.strip()]
    try:
        return load_mapping(args.mapping, overrides)
    except ValueError as error:
        raise ValueError(f"prepare events: {error}") from error


def prepare_events_command(args: argparse.Namespace, split: SplitConfig) -> Any:
    from data_pipeline.datasets.events import EventsOptions, Stage, prepare_events
    from data_pipeline.datasets.events_source import InputFormat

    if args.partitions is not None and args.partitions < 1:
        raise ValueError(f"--partitions must be >= 1, got {args.partitions}")
    stage = Stage(args.stage)
    if (stage is Stage.PARTITION) != (args.partition is not None):
        raise ValueError("--partition P goes with --stage partition, and only with it")
    options = EventsOptions(
        split=split,
        history_length=args.history_length,
        partition_events=args.partition_events,
        input_format=InputFormat(args.format) if args.format else None,
        partitions=args.partitions,
    )
    return prepare_events(
        args.input, args.out, mapping_from_args(args), options, stage, args.partition
    )
