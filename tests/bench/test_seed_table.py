"""bench.seed_table reads a sweep's results.json and its runs' metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

from bench.seed_table import table


def _run(root: Path, name: str, seed: int, hr: float) -> dict:
    run_dir = root / name / f"seed-{seed}"
    run_dir.mkdir(parents=True)
    metrics = {
        "model": {"hr@10": hr},
        "popularity": {"hr@10": 0.1},
        "intervals": {"model": {"hr@10": [hr - 0.01, hr + 0.01]}, "popularity": {}},
        "by_exclusion": {},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return {"name": name, "status": "ok", "run_dir": str(run_dir)}


def test_one_seed_with_intervals_and_the_other_seed_beside(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "a", 0, 0.5), _run(tmp_path, "a", 1, 0.6), _run(tmp_path, "b", 0, 0.3)]
    (tmp_path / "results.json").write_text(json.dumps({"variants": runs}))
    lines = table(tmp_path, ["hr@10"], 0, 1).splitlines()
    assert lines[2] == "| a | 0.5000 [0.4900, 0.5100] | 0.6000 |"
    assert lines[3] == "| b | 0.3000 [0.2900, 0.3100] | — |"
    assert lines[4] == "| most-popular | 0.1000 | — |"
