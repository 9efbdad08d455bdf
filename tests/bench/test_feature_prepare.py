"""The feature-prepare benchmark runs end to end at a tiny size and prints every stage with a
positive time (the streaming counters are checked equal to the one-shot ones inside the run)."""

from __future__ import annotations

import pytest

from bench import feature_prepare

STAGES = (
    "baseline: point-in-time history (H=50)",
    "baseline: write base columns (ShardWriter)",
    "baseline total",
    "counters: point-in-time, 2 kinds x 3 windows",
    "counters: CounterStatistics (log1p mean/std)",
    "counters: items/ snapshot",
    "counters: streaming, 8 time-ordered chunks",
    "text: title ids, text_id_column",
    "text: DocumentFrequency + idf weights",
    "text: denormalize ids + weights to events",
    "context: time_context",
    "write new columns (ShardWriter)",
    "new features total (one-shot counters)",
    "baseline + new features",
)


def _table(output: str) -> dict[str, dict[str, str]]:
    """Rows of the printed table by stage name."""
    lines = output.splitlines()
    header_index = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    columns = [c.strip() for c in lines[header_index].split(" | ")]
    rows = {}
    for line in lines[header_index + 2 :]:
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) != len(columns):
            break
        rows[cells[0]] = dict(zip(columns, cells, strict=True))
    return rows


def test_tiny_run_prints_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    feature_prepare.main(["--events", "20000", "--items", "2000", "--repeats", "1"])
    output = capsys.readouterr().out
    assert "cores" in output and "20,000 events, 2,000 items" in output
    rows = _table(output)
    assert set(rows) == set(STAGES)
    for stage, row in rows.items():
        assert float(row["seconds"].replace(",", "")) > 0, stage
        assert float(row["s per 10^6 events"].replace(",", "")) > 0, stage
    assert rows["baseline total"]["ratio to baseline"] == "1"
    assert float(rows["write new columns (ShardWriter)"]["Parquet MiB"]) > 0
    assert rows["text: title ids, text_id_column"]["s per 10^6 items"]


def test_rejects_empty_log() -> None:
    with pytest.raises(SystemExit):
        feature_prepare.main(["--events", "0"])
