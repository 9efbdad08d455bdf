"""Unpooled lookups for the user-history encoder, in one TorchRec ``EmbeddingCollection``.

With the history encoder on, the ``item_id`` table moves from the pooled
``EmbeddingBagCollection`` into this collection, still declared once: the item tower reads the
``item_id`` feature (one id per row) and the history reads ``hist_item_ids`` (jagged), so a
gradient through the history moves the same rows the item tower reads. Each action flag series
and the recency buckets are per-event id features of small tables of their own. All tables share
the item embedding dimension (the combiner adds or concatenates them per event).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor

from config import HistoryConfig
from data_pipeline.schema import HISTORY_ITEMS, ITEM_ID
from models.history import HistoryEncoder, InteractionCombiner, jagged_to_padded


def sequence_feature_names(history_tables: dict[str, int]) -> list[str]:
    """Features looked up unpooled: the item id, the history items and the per-event tables."""
    return [ITEM_ID, HISTORY_ITEMS, *history_tables]


def sequence_table_configs(
    tables: dict[str, int], history_tables: dict[str, int], dim: int
) -> list[EmbeddingConfig]:
    """The shared ``item_id`` table (features ``item_id`` and ``hist_item_ids``) and one table
    per derived history feature (``hist_<action>``: 2 rows, ``hist_recency``: buckets)."""
    configs = [
        EmbeddingConfig(
            name=ITEM_ID,
            embedding_dim=dim,
            num_embeddings=tables[ITEM_ID],
            feature_names=[ITEM_ID, HISTORY_ITEMS],
        )
    ]
    for name, rows in history_tables.items():
        configs.append(
            EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[name])
        )
    return configs


class HistoryArch(nn.Module):
    """Per-event combination, then the sequence encoder.

    Args:
        history_tables: derived per-event features (``hist_<action>``, ``hist_recency``), in
            the order their embeddings join the item embedding.
        config: the ``model.history`` section.
        dim: D, the item embedding dimension.
    """

    def __init__(self, history_tables: dict[str, int], config: HistoryConfig, dim: int) -> None:
        super().__init__()
        self.event_features = [HISTORY_ITEMS, *history_tables]
        self.max_length = config.max_length
        self.combiner = InteractionCombiner(config.combiner, dim, len(self.event_features))
        self.encoder = HistoryEncoder(
            config.encoder,
            dim,
            config.max_length,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            dropout=config.dropout,
            positions=config.positions,
            summary=config.summary,
            causal=config.causal,
        )

    @property
    def output_dim(self) -> int:
        return self.encoder.output_dim

    def forward(self, sequences: dict[str, JaggedTensor], rows: int) -> torch.Tensor:
        """sequences: feature -> JaggedTensor (values [sum(lengths), D]) with stride >= rows;
        only the first ``rows`` rows have history. Returns [rows, output_dim]."""
        events, mask = self._events(sequences, rows)
        return self.encoder(events, mask)

    def at_positions(
        self, sequences: dict[str, JaggedTensor], rows: int, counts: torch.Tensor
    ) -> torch.Tensor:
        """Sequence mode: the user vector after each of the first ``counts[r]`` (newest) events
        of every row's history, in one causal pass.

        Args:
            sequences, rows: as :meth:`forward`; ``rows`` windows.
            counts: [rows] int64, ``counts[r] <= min(len_r, max_length)``.

        Returns:
            [sum(counts), output_dim], row-major: row 0's positions 0..counts[0]-1 (position p
            = the user just after history event p, newest first), then row 1's, ...
        """
        events, mask = self._events(sequences, rows)
        hidden = self.encoder.outputs_at_every_event(events, mask)  # [rows, H, D]
        positions = torch.arange(hidden.shape[1], device=counts.device)
        used = (positions.unsqueeze(0) < counts.unsqueeze(1)) & mask
        if int(used.sum()) != int(counts.sum()):
            raise ValueError(
                f"window targets {counts.tolist()[:8]} exceed the windows' history lengths "
                f"(at most {self.max_length} positions each)"
            )
        return hidden[used]

    def _events(
        self, sequences: dict[str, JaggedTensor], rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Combined per-event vectors [rows, max_length, D] and the real-event mask."""
        lengths = sequences[HISTORY_ITEMS].lengths()[:rows]
        padded = []
        mask = torch.zeros(0, dtype=torch.bool)
        for name in self.event_features:
            jagged = sequences[name]
            # The check reads data; torch.export (serving) traces shapes only and skips it.
            aligned = torch.compiler.is_exporting() or torch.equal(jagged.lengths()[:rows], lengths)
            if not aligned:
                raise ValueError(f"history feature '{name}' is not aligned with '{HISTORY_ITEMS}'")
            total = lengths.sum().item()  # symbolic under torch.export, an int otherwise
            torch._check(total <= jagged.values().shape[0])
            values = jagged.values().narrow(0, 0, total)
            events, mask = jagged_to_padded(values, lengths, self.max_length)
            padded.append(events)
        return self.combiner(padded), mask
