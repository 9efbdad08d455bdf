"""The names of what a run directory holds, in one place for every job, the launcher and the
benchmarks.

```
<run.dir>/
  config.yaml            the resolved config of the run (what eval, export and align rebuild)
  train.log              the job's log (written by ``twotower sweep``)
  metrics.jsonl          one JSON record per logging window and validation
  metrics.json           the final evaluation (retrieval)
  ranker_metrics.json    the final evaluation (ranker)
  train_summary.json     steps, rows, samples/s, best step (retrieval and ranker)
  align_summary.json     before / after alignment
  eval_<split>_<checkpoint>.json   ``twotower eval``
  curves.png             ``twotower plot``
  checkpoints/step-N, checkpoints/best
  bad_batches/           batches of skipped non-finite steps
```
"""

from __future__ import annotations

CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
METRICS_LOG_FILE = "metrics.jsonl"
METRICS_FILE = "metrics.json"
RANKER_METRICS_FILE = "ranker_metrics.json"
TRAIN_SUMMARY_FILE = "train_summary.json"
ALIGN_SUMMARY_FILE = "align_summary.json"
CURVES_FILE = "curves.png"
CHECKPOINTS_DIR = "checkpoints"
BAD_BATCHES_DIR = "bad_batches"


def eval_file(split: str, checkpoint: str) -> str:
    """``twotower eval``'s output: named for the split and the checkpoint it scored."""
    return f"eval_{split}_{checkpoint}.json"
