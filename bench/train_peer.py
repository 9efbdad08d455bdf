"""The trainer against the peer a user would pick, TorchRec's own retrieval example, in one run.

    python -m bench.train --peer --data data/synthetic-1m --batch-size 1024 4096 16384 \
        --ranks 1 2 --threads 1 [--families logged_bce softmax] [--steps 100]

For every (ranks, batch per rank): ``bench.peer_torchrec_example`` (random ids, BCE on random
labels, fused RowWiseAdagrad, ``TrainPipelineSparseDist``) and the trainer's own loop on the
Parquet data at the same table rows, embedding dim, MLP and batch, ids only
(``features.groups=[id]``), once per loss family. Each process runs ``--threads`` intra-op threads
on both sides. The ratio is the trainer's samples/s over the peer's at the same ranks and batch.

When both ``logged_bce`` and ``softmax`` run, a bound row adds the softmax's irreducible score
work (``bench.score_floor``: three GEMMs and three passes over the [B, B] scores, timed alone at
the same thread count) to the BCE step of the same run; the softmax row's "step vs bound" is
its step time over that bound's.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.peer_torchrec_example import PeerSpec, run_peer
from bench.runs import samples_per_second
from bench.score_floor import score_work_seconds
from data_pipeline.manifest import Manifest

COLUMNS = ["implementation", "ranks", "batch", "samples/s", "ratio vs peer", "step vs bound"]
PEER = "TorchRec examples/retrieval"
BOUND = "bound: logged_bce step + softmax score work alone"


@dataclass(frozen=True)
class Shape:
    """The sizes both sides share: embedding dim, hidden MLP widths, output dim."""

    embedding_dim: int = 64
    hidden: tuple[int, ...] = (128,)
    output_dim: int = 64

    def overrides(self) -> list[str]:
        """The trainer's config for this shape, ids only."""
        hidden = ",".join(map(str, self.hidden))
        return [
            "features.groups=[id]",
            f"model.embedding_dim={self.embedding_dim}",
            f"model.user_mlp=[{hidden}]",
            f"model.item_mlp=[{hidden}]",
            f"model.output_dim={self.output_dim}",
        ]


def family_overrides(family: str) -> list[str]:
    """``loss.family=F``, with the negatives a family needs (sampled ones: 1 per row)."""
    per_row = {"sampled_softmax": 1, "sigmoid": 1, "cosine": 1}.get(family)
    return [f"loss.family={family}"] + ([f"loss.negatives_per_row={per_row}"] if per_row else [])


def table_rows(data: str) -> int:
    """The peer's rows per table: the larger of the data's user and item tables."""
    tables = Manifest.load(data).tables
    return max(tables["user_id"], tables["item_id"])


def run(
    config: str,
    data: str,
    steps: int,
    batch_sizes: tuple[int, ...],
    ranks: tuple[int, ...],
    families: tuple[str, ...],
    threads: int,
    extra: list[str] | None = None,
    shape: Shape = Shape(),
) -> list[dict]:
    """One row for the peer and one per family at every (ranks, batch), keyed by ``COLUMNS``."""
    rows_per_table = table_rows(data)
    layer_sizes = (*shape.hidden, shape.output_dim)
    rows = []
    for nproc in ranks:
        for batch in batch_sizes:
            spec = PeerSpec(
                batch, nproc, steps, rows_per_table, shape.embedding_dim, layer_sizes, threads
            )
            peer = run_peer(spec)["samples_per_s"]
            rows.append(_row(PEER, nproc, batch, peer, peer))
            rates = {}
            for family in families:
                overrides = [
                    *shape.overrides(),
                    f"data.batch_size={batch}",
                    *family_overrides(family),
                    *(extra or []),
                ]
                rate = samples_per_second(
                    config, data, nproc, steps, overrides, threads_per_rank=threads
                )
                rates[family] = rate
                rows.append(_row(f"twotower, loss.family={family}", nproc, batch, rate, peer))
            if {"logged_bce", "softmax"} <= rates.keys():
                rows += _bound_rows(rates, nproc, batch, peer, threads, shape)
    return rows


def _bound_rows(
    rates: dict[str, float], nproc: int, batch: int, peer: float, threads: int, shape: Shape
) -> list[dict]:
    """The bound row, and the softmax row's step time against it (rates are global samples/s,
    so one rank's step takes ``nproc * batch / rate`` seconds)."""
    bce_step = nproc * batch / rates["logged_bce"]
    bound_step = bce_step + score_work_seconds(batch, batch, shape.output_dim, threads)
    bound = _row(BOUND, nproc, batch, nproc * batch / bound_step, peer)
    softmax_step = nproc * batch / rates["softmax"]
    versus = {
        "implementation": "  softmax step time / bound",
        "step vs bound": softmax_step / bound_step,
    }
    return [bound, versus]


def _row(name: str, ranks: int, batch: int, rate: float, peer: float) -> dict:
    return {
        "implementation": name,
        "ranks": ranks,
        "batch": batch,
        "samples/s": rate,
        "ratio vs peer": rate / peer,
    }
