"""``twotower prepare``: the dataset converters' command line (MovieLens, the synthetic world, a
user's own log), their split protocols and the synthetic world's feature breadth. Converters load
lazily, so ``twotower --help`` imports none of them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from launch.prepare_events_cli import add_events_parser, prepare_events_command

if TYPE_CHECKING:
    from data_pipeline.datasets.split import SplitConfig
    from data_pipeline.datasets.synthetic_features import SyntheticFeatures


def add_prepare_parsers(commands: argparse._SubParsersAction) -> None:
    prepare = commands.add_parser(
        "prepare",
        help="convert raw data into Parquet shards",
        description="Convert raw data into Parquet shards (train/ valid/ test/ items/ users/).",
    )
    datasets = prepare.add_subparsers(dest="dataset", required=True)
    _add_movielens_parser(datasets)
    _add_synthetic_parser(datasets)
    events = add_events_parser(datasets)
    _add_split_options(
        events,
        SPLIT_DEFAULTS["events"],
        "leave-last-out: per user, last event test, second-to-last valid; temporal (needs "
        "--timestamp-column): global cut at event-time quantiles T1 < T2",
        "event-time",
    )


def _add_movielens_parser(datasets: argparse._SubParsersAction) -> None:
    movielens = datasets.add_parser(
        "movielens", help="GroupLens MovieLens ratings", description="GroupLens MovieLens ratings."
    )
    movielens.add_argument(
        "--variant",
        default="100k",
        choices=["100k", "1m", "10m", "20m", "25m", "32m"],
        help="MovieLens release (default: %(default)s)",
    )
    movielens.add_argument("--out", required=True, type=Path, help="dataset directory (required)")
    movielens.add_argument(
        "--source",
        type=Path,
        default=None,
        help="GroupLens zip or unpacked folder (default: the cache, else download, else the "
        "offline ml-100k copy)",
    )
    movielens.add_argument(
        "--history-length",
        type=int,
        default=50,
        help="most history events per row (default: %(default)s)",
    )
    movielens.add_argument(
        "--text-vocab-size",
        type=int,
        default=1 << 15,
        help="rows of the hashed title-token table text_tokens (default: %(default)s)",
    )
    movielens.add_argument(
        "--text-max-tokens",
        type=int,
        default=16,
        help="title words kept, bigrams are added (default: %(default)s)",
    )
    _add_split_options(
        movielens,
        SPLIT_DEFAULTS["movielens"],
        "leave-last-out: per user, last event test, second-to-last valid; temporal: global cut "
        "at event-time quantiles T1 < T2, train before T1, valid [T1, T2), test from T2, every "
        "held-out event a query",
        "event-time",
    )


def _add_synthetic_parser(datasets: argparse._SubParsersAction) -> None:
    synthetic = datasets.add_parser(
        "synthetic",
        help="latent-factor world with a logged feed",
        description="Latent-factor world with a logged feed.",
    )
    synthetic.add_argument("--users", type=int, default=10_000, help="users (default: %(default)s)")
    synthetic.add_argument("--items", type=int, default=5_000, help="items (default: %(default)s)")
    synthetic.add_argument(
        "--events", type=int, default=1_000_000, help="impressions (default: %(default)s)"
    )
    synthetic.add_argument(
        "--seed", type=int, default=0, help="seed of the world and feed (default: %(default)s)"
    )
    synthetic.add_argument(
        "--history-length",
        type=int,
        default=50,
        help="most history events per row (default: %(default)s)",
    )
    synthetic.add_argument("--out", required=True, type=Path, help="dataset directory (required)")
    synthetic.add_argument(
        "--promotion-std",
        type=float,
        default=0.0,
        help="per-item promotion boost the logging ranker adds to its ordering, 0: off "
        "(default: %(default)s)",
    )
    synthetic.add_argument(
        "--new-item-fraction",
        type=float,
        default=0.0,
        help="share of items launched during the last 30%% of the feed (cold-start items), "
        "0: off (default: %(default)s)",
    )
    synthetic.add_argument(
        "--shuffled-fraction",
        type=float,
        default=0.0,
        help="share of sessions shown in random order, 0: off (default: %(default)s)",
    )
    synthetic.add_argument(
        "--session-interval-s",
        type=int,
        default=10,
        help="seconds between sessions, sets the feed's time span (default: %(default)s)",
    )
    _add_split_options(
        synthetic,
        SPLIT_DEFAULTS["synthetic"],
        "temporal only: train = sessions before the valid quantile, valid = up to the test "
        "quantile, test = the rest (leave-last-out is refused)",
        "session-time",
    )
    _add_feature_breadth_options(synthetic)


# dataset -> (--split, --valid-quantile, --test-quantile) defaults; the synthetic ones are its
# valid_fraction = test_fraction = 0.05.
SPLIT_DEFAULTS = {
    "movielens": ("leave-last-out", 0.8, 0.9),
    "synthetic": ("temporal", 0.9, 0.95),
    "events": ("leave-last-out", 0.8, 0.9),
}


def _add_split_options(
    parser: argparse.ArgumentParser,
    defaults: tuple[str, float, float],
    protocols: str,
    quantile_of: str,
) -> None:
    split, valid_quantile, test_quantile = defaults
    parser.add_argument(
        "--split",
        default=split,
        choices=["leave-last-out", "temporal"],
        help=f"{protocols} (default: %(default)s)",
    )
    # None: not given, so a quantile passed with leave-last-out is an error, not ignored.
    parser.add_argument(
        "--valid-quantile",
        type=float,
        default=None,
        help=f"temporal: {quantile_of} quantile T1 where valid starts, 0 < q < --test-quantile "
        f"(default: {valid_quantile})",
    )
    parser.add_argument(
        "--test-quantile",
        type=float,
        default=None,
        help=f"temporal: {quantile_of} quantile T2 where test starts, --valid-quantile < q < 1 "
        f"(default: {test_quantile})",
    )


def _split_config(args: argparse.Namespace) -> SplitConfig:
    """``--split``, ``--valid-quantile``, ``--test-quantile`` of ``prepare <dataset>``, checked.

    Raises:
        ValueError: a quantile out of order or range, or given with ``--split leave-last-out``.
    """
    from data_pipeline.datasets.split import SplitConfig, SplitProtocol

    _, valid_default, test_default = SPLIT_DEFAULTS[args.dataset]
    protocol = SplitProtocol(args.split)
    if protocol is SplitProtocol.LEAVE_LAST_OUT and args.dataset == "synthetic":
        raise ValueError(
            "prepare synthetic: --split leave-last-out is not supported; the synthetic feed is "
            "split by session time only (--split temporal)"
        )
    flags = {"--valid-quantile": args.valid_quantile, "--test-quantile": args.test_quantile}
    given = [flag for flag, value in flags.items() if value is not None]
    if protocol is SplitProtocol.LEAVE_LAST_OUT and given:
        raise ValueError(
            f"prepare {args.dataset}: {', '.join(given)} applies to --split temporal only"
        )
    return SplitConfig(
        protocol,
        args.valid_quantile if args.valid_quantile is not None else valid_default,
        args.test_quantile if args.test_quantile is not None else test_default,
    )


def _add_feature_breadth_options(synthetic: argparse.ArgumentParser) -> None:
    synthetic.add_argument(
        "--feature-groups",
        default="all",
        help="extra feature groups: 'all', 'none' or a comma list of text, search, context, "
        "counter, affinity (default: %(default)s)",
    )
    synthetic.add_argument(
        "--topics", type=int, default=16, help="topics of titles and queries (default: %(default)s)"
    )
    synthetic.add_argument(
        "--text-vocab-size",
        type=int,
        default=1 << 15,
        help="rows of the hashed text table (default: %(default)s)",
    )
    synthetic.add_argument(
        "--search-probability",
        type=float,
        default=0.3,
        help="chance of a search per session (default: %(default)s)",
    )
    synthetic.add_argument(
        "--search-history",
        type=int,
        default=5,
        help="last queries kept per event row (default: %(default)s)",
    )
    synthetic.add_argument(
        "--counter-windows",
        default="1h,1d,7d",
        help="comma list of counter windows, units s/m/h/d/w (default: %(default)s)",
    )
    synthetic.add_argument(
        "--device-effect",
        type=float,
        default=0.0,
        help="how much the session's device shifts relevance towards its topics, 0: off "
        "(default: %(default)s)",
    )


def _synthetic_features(args: argparse.Namespace) -> SyntheticFeatures:
    from data_pipeline.datasets.synthetic_features import EXTRA_GROUPS, SyntheticFeatures
    from data_pipeline.datasets.synthetic_topics import TopicConfig
    from data_pipeline.schema import FeatureGroup

    names = [n.strip() for n in args.feature_groups.split(",") if n.strip()]
    groups: tuple[FeatureGroup, ...]
    if names == ["all"]:
        groups = EXTRA_GROUPS
    elif names in ([], ["none"]):
        groups = ()
    else:
        try:
            groups = tuple(FeatureGroup(n) for n in names)
        except ValueError as error:
            raise SystemExit(f"--feature-groups: {error}") from error
    return SyntheticFeatures(
        groups=groups,
        topics=TopicConfig(topics=args.topics, affinity_top_k=min(3, args.topics)),
        text_vocab_size=args.text_vocab_size,
        search_probability=args.search_probability,
        search_history=args.search_history,
        counter_windows=tuple(w.strip() for w in args.counter_windows.split(",") if w.strip()),
        device_effect=args.device_effect,
    )


def prepare(args: argparse.Namespace) -> int:
    split = _split_config(args)
    if args.dataset == "events":
        manifest = prepare_events_command(args, split)
        if manifest is None:
            print(f"prepare events: stage {args.stage} done in the staging folder of {args.out}")
            return 0
    elif args.dataset == "movielens":
        from data_pipeline.datasets.movielens import prepare_movielens

        manifest = prepare_movielens(
            variant=args.variant,
            out=args.out,
            source=args.source,
            history_length=args.history_length,
            text_vocab_size=args.text_vocab_size,
            text_max_tokens=args.text_max_tokens,
            split=split,
        )
    else:
        from data_pipeline.datasets.split import session_fractions
        from data_pipeline.datasets.synthetic import prepare_synthetic
        from data_pipeline.datasets.synthetic_world import WorldConfig

        valid_fraction, test_fraction = session_fractions(split.valid_quantile, split.test_quantile)

        world = WorldConfig(
            promotion_std=args.promotion_std,
            shuffled_fraction=args.shuffled_fraction,
            session_interval_s=args.session_interval_s,
            new_item_fraction=args.new_item_fraction,
        )
        manifest = prepare_synthetic(
            users=args.users,
            items=args.items,
            events=args.events,
            seed=args.seed,
            out=args.out,
            history_length=args.history_length,
            world=world,
            features=_synthetic_features(args),
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
        )
    rows = {name: info.rows for name, info in manifest.splits.items()}
    print(f"prepared {manifest.dataset} in {args.out}: rows {rows}")
    print(f"source: {manifest.source.get('kind')} {manifest.source.get('path', '')}")
    return 0
