"""``manifest.json``: what a prepared dataset holds (schema, tables, splits, counts, checksums).

Every converter writes one; the reader trusts nothing else about the directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.schema import EventSchema, SchemaError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
EVENT_SPLITS = ("train", "valid", "test")
SIDE_SPLITS = ("items", "users")


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardFile:
    """One Parquet file of a split. ``path`` is relative to the dataset directory."""

    path: str
    rows: int
    row_groups: int
    sha256: str


@dataclass
class SplitInfo:
    files: list[ShardFile] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


@dataclass
class Manifest:
    """Args:
    dataset: human name (``movielens-100k``, ``synthetic``).
    schema: event schema (features, labels, history actions).
    tables: embedding table name -> number of rows (ids are ``0 .. n-1``).
    splits: split name -> files.
    history_length: H, the longest history kept per row.
    source: where the raw data came from (kind, path/url, sha256).
    extra: converter-specific facts (id ranges, generator parameters).
    counters: normalization statistics of every counter feature, fitted on the train split:
        ``{name: {"mean", "std", "count"}}`` of ``log1p(count)``
        (:meth:`data_pipeline.counters.CounterStatistics.to_manifest`).
    """

    dataset: str
    schema: EventSchema
    tables: dict[str, int]
    splits: dict[str, SplitInfo]
    history_length: int
    source: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "schema": self.schema.to_json(),
            "tables": self.tables,
            "history_length": self.history_length,
            "splits": {
                name: {"rows": info.rows, "files": [vars(f) for f in info.files]}
                for name, info in self.splits.items()
            },
            "source": self.source,
            "extra": self.extra,
            "counters": self.counters,
        }

    def save(self, directory: Path | str) -> Path:
        """Write atomically: a reader never sees a half-written manifest."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(directory: Path | str) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.exists():
            raise SchemaError(f"{path}: no manifest; run `twotower prepare ...` first")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SchemaError(f"{path}: not valid JSON ({error})") from error
        if data.get("format_version") != FORMAT_VERSION:
            raise SchemaError(
                f"{path}: format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        return Manifest(
            dataset=data["dataset"],
            schema=EventSchema.from_json(data["schema"]),
            tables={k: int(v) for k, v in data["tables"].items()},
            splits={
                name: SplitInfo([ShardFile(**f) for f in info["files"]])
                for name, info in data["splits"].items()
            },
            history_length=int(data["history_length"]),
            source=data.get("source", {}),
            extra=data.get("extra", {}),
            counters=data.get("counters", {}),
        )

    def split_paths(self, directory: Path | str, split: str) -> list[Path]:
        if split not in self.splits:
            raise SchemaError(
                f"{Path(directory) / MANIFEST_NAME}: no split '{split}' "
                f"(have {sorted(self.splits)})"
            )
        return [Path(directory) / f.path for f in self.splits[split].files]

    def verify_checksums(self, directory: Path | str, split: str) -> None:
        """Recompute sha256 of every file of ``split``; raise naming the first mismatch."""
        for shard, path in zip(
            self.splits[split].files, self.split_paths(directory, split), strict=True
        ):
            if not path.exists():
                raise SchemaError(f"{path}: listed in the manifest but missing")
            found = sha256_file(path)
            if found != shard.sha256:
                raise SchemaError(
                    f"{path}: sha256 {found[:12]}… does not match the manifest's "
                    f"{shard.sha256[:12]}… (file changed or corrupt)"
                )
