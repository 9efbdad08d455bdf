"""User-history encoder for the user tower: jagged history -> padded sequence -> one vector.

The caller looks up, for every history event of every user, the item embedding (unpooled TorchRec
``EmbeddingCollection``: jagged values ``[sum(lengths), D]``, lengths ``[B]``), one embedding per
interaction flag (like, long_view, ...: 2-row tables, off/on) and a recency-bucket embedding
(``data_pipeline.derived.recency_bucket``, computed at batch time). This module then

1. pads every jagged series with :func:`jagged_to_padded` (FBGEMM kernels, no Python row loops),
2. merges the per-event parts with :class:`InteractionCombiner` (sum, concat + MLP, or gated sum),
3. encodes the sequence with :class:`HistoryEncoder` (masked mean, or pre-norm self-attention over
   the whole history followed by a summary) into ``[B, output_dim]``.

History is ordered newest first: index 0 is the most recent event, so truncation keeps the first
``max_length`` events and position ``p`` always means "p events before the newest" whatever the
history length.

Padding never influences real rows. The encoder replaces padded positions by zeros with
``torch.where`` before anything else (so even nan/inf garbage there cannot reach the output or the
gradients), attention masks padded keys, and means/pooling exclude padded outputs. Empty histories
(no real event) would give a fully masked attention row, which some PyTorch kernels turn into nan
(others into 0); instead the zero-filled slot 0 of an empty row is unmasked as a dummy key (always
finite) and the row's output is replaced by zeros with ``where``, so forward and backward stay
finite.

"""

from __future__ import annotations

import math

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.* on CPU and GPU)
import torch
import torch.nn.functional as F
from torch import nn

from config import Combiner, Encoder, Positions, Summary


def jagged_to_padded(
    values: torch.Tensor, lengths: torch.Tensor, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a jagged batch of sequences (newest first) to a dense tensor.

    Args:
        values: [sum(lengths), D] float, rows of user 0, then user 1, ...
        lengths: [B] int64 >= 0.
        max_length: H >= 1; longer histories keep their first (newest) H events.

    Returns:
        padded: [B, H, D], zeros at padded positions; differentiable w.r.t. ``values``.
        mask: [B, H] bool, True where a real event is stored.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if values.dim() != 2 or lengths.dim() != 1:
        raise ValueError(
            f"expected values [sum(lengths), D] and lengths [B], got {tuple(values.shape)} "
            f"and {tuple(lengths.shape)}"
        )
    lengths = lengths.to(torch.int64)
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    padded = torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_length], 0.0)
    positions = torch.arange(max_length, device=lengths.device)
    mask = positions.unsqueeze(0) < lengths.unsqueeze(1)
    return padded, mask


class InteractionCombiner(nn.Module):
    """Merges the per-event parts of a history into one vector per event.

    Args:
        combiner: the merge rule (see :class:`Combiner`).
        dim: D, the width of every part and of the output.
        num_parts: P >= 1, the number of parts (item embedding first).

    ``gated`` computes ``item + sum_{k>=1} sigmoid(W_k [item; part_k] + b_k) * part_k`` with one
    ``Linear(2D, D)`` gate per non-item part; with zero gate weights and biases every gate is 0.5.
    Padded positions are combined like real ones; :class:`HistoryEncoder` discards them.
    """

    def __init__(self, combiner: Combiner, dim: int, num_parts: int) -> None:
        super().__init__()
        if num_parts < 1:
            raise ValueError(f"num_parts must be >= 1, got {num_parts}")
        self.combiner = combiner
        self.dim = dim
        self.num_parts = num_parts
        self.mlp: nn.Sequential | None = None
        self.gates = nn.ModuleList()
        if combiner is Combiner.CONCAT_MLP:
            self.mlp = nn.Sequential(
                nn.Linear(num_parts * dim, dim), nn.ReLU(), nn.Linear(dim, dim)
            )
        elif combiner is Combiner.GATED:
            self.gates.extend(nn.Linear(2 * dim, dim) for _ in range(num_parts - 1))

    def forward(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Args: parts: P tensors [B, H, D], parts[0] the item embedding. Returns [B, H, D]."""
        if len(parts) != self.num_parts:
            raise ValueError(f"expected {self.num_parts} parts, got {len(parts)}")
        item = parts[0]
        if self.combiner is Combiner.SUM:
            return torch.stack(parts, dim=0).sum(dim=0)
        if self.mlp is not None:
            return self.mlp(torch.cat(parts, dim=-1))
        combined = item
        for gate, part in zip(self.gates, parts[1:]):
            combined = combined + torch.sigmoid(gate(torch.cat([item, part], dim=-1))) * part
        return combined


def sinusoidal_positions(max_length: int, dim: int) -> torch.Tensor:
    """Fixed transformer position encodings [max_length, dim] (sin on even, cos on odd dims)."""
    position = torch.arange(max_length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(1e4) / dim))
    table = torch.zeros(max_length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return table


def masked_mean(sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of sequence [B, H, D] with mask [B, H] -> [B, D]; 0 if empty.

    Uses ``where`` (not multiply) so non-finite padded values reach neither value nor gradient.
    """
    kept = torch.where(mask.unsqueeze(-1), sequence, torch.zeros_like(sequence))
    count = mask.sum(dim=1, keepdim=True).clamp_min(1).to(sequence.dtype)
    return kept.sum(dim=1) / count


class MultiHeadAttention(nn.Module):
    """Multi-head attention of queries over keys, where ``key_mask`` selects the usable keys.

    Every row of ``key_mask`` must have at least one True entry (see :class:`HistoryEncoder`).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.output = nn.Linear(dim, dim)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """Args: queries [B, Q, D], keys [B, H, D], key_mask [B, H] bool (usable keys), or a
        full mask [B, 1 or heads, Q, H]: bool (True = attend) or float (added to the logits,
        -inf = masked). Returns [B, Q, D]."""
        batch, num_queries, dim = queries.shape
        head_dim = dim // self.num_heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, heads, N, D/heads]
            return x.view(batch, -1, self.num_heads, head_dim).transpose(1, 2)

        key, value = self.key_value(keys).chunk(2, dim=-1)
        mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask
        attended = F.scaled_dot_product_attention(
            split_heads(self.query(queries)),
            split_heads(key),
            split_heads(value),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.output(attended.transpose(1, 2).reshape(batch, num_queries, dim))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block; the attention mask decides bidirectional or causal.

    The point-wise feed-forward is D -> D -> D as in SASRec (Kang & McAuley 2018), not the 4D
    of language models: it halves the FLOPs per event, which dominate on CPU."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = MultiHeadAttention(dim, num_heads, dropout)
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, sequence: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Args: sequence [B, H, D], key_mask as :class:`MultiHeadAttention` takes it.
        Returns [B, H, D]."""
        normed = self.attention_norm(sequence)
        sequence = sequence + self.dropout(self.attention(normed, normed, key_mask))
        return sequence + self.dropout(self.feed_forward(self.feed_forward_norm(sequence)))


class HistoryEncoder(nn.Module):
    """Encodes a padded, newest-first history into one vector per user.

    Args:
        encoder: ``mean`` (masked mean, output D) or ``self_attention``.
        dim: D, the event vector width (divisible by ``num_heads`` for self-attention).
        max_length: the largest H accepted (size of the position table).
        num_layers, num_heads, dropout: self-attention blocks.
        positions: learned or sinusoidal recency-rank encodings added to the events, or a
            relative attention bias per head and query-key distance (self-attention only).
        summary: how self-attention outputs become one vector (output 2D or D).
        causal: each event attends to itself and older events only (newest first: event p to
            keys p..H-1), so the output at p depends on events p..H-1 alone; with relative
            positions, the output at index p of a history equals the newest output of the
            history that starts at its event p (:meth:`outputs_at_every_event`).
    """

    def __init__(
        self,
        encoder: Encoder,
        dim: int,
        max_length: int,
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.0,
        positions: Positions = Positions.LEARNED,
        summary: Summary = Summary.NEWEST_AND_MEAN,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.encoder = encoder
        self.dim = dim
        self.max_length = max_length
        self.positions = positions
        self.summary = summary
        self.causal = causal
        self.blocks = nn.ModuleList()
        self.position_table: nn.Embedding | None = None
        self.relative_bias: nn.Parameter | None = None
        self.pooling: MultiHeadAttention | None = None
        if encoder is Encoder.MEAN:
            return
        if positions is Positions.RELATIVE:
            # [heads, 2 * max_length - 1]: distance key - query, shifted by max_length - 1.
            self.relative_bias = nn.Parameter(torch.zeros(num_heads, 2 * max_length - 1))
        elif positions is Positions.LEARNED:
            self.position_table = nn.Embedding(max_length, dim)
            nn.init.normal_(self.position_table.weight, std=0.02)
        else:
            self.register_buffer(
                "sinusoidal_table", sinusoidal_positions(max_length, dim), persistent=False
            )
        self.blocks.extend(SelfAttentionBlock(dim, num_heads, dropout) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim)
        if summary is Summary.ATTENTION_POOLING:
            self.pooling_query = nn.Parameter(torch.randn(dim) * dim**-0.5)
            self.pooling = MultiHeadAttention(dim, num_heads, dropout)

    @property
    def output_dim(self) -> int:
        """Width of :meth:`forward`'s output."""
        if self.encoder is Encoder.MEAN or self.summary is not Summary.NEWEST_AND_MEAN:
            return self.dim
        return 2 * self.dim

    def forward(self, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args:
            sequence: [B, H, D] event vectors, newest first; padded values are ignored (any value,
                nan included).
            mask: [B, H] bool, True = real event; each row's real events come first (a prefix,
                as :func:`jagged_to_padded` returns), so index 0 is the newest event.

        Returns:
            [B, output_dim]; zeros for the self-attention summary of an empty history, and the
            masked mean (zeros when empty) for ``mean``.
        """
        height = sequence.shape[1]
        if height < 1 or height > self.max_length:
            raise ValueError(f"history length H={height} must be in [1, {self.max_length}]")
        sequence = torch.where(mask.unsqueeze(-1), sequence, torch.zeros_like(sequence))
        if self.encoder is Encoder.MEAN:
            return masked_mean(sequence, mask)
        return self._self_attention(sequence, mask)

    def outputs_at_every_event(self, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The final-layer output of every event (self-attention only).

        With ``causal`` attention, relative positions and the ``newest`` summary, index p of
        the result is what :meth:`forward` gives the history made of events p..H-1 of this one:
        the user vector just after event p, which packed sequence training reads at every
        position in one pass.

        Args: sequence [B, H, D] newest first, mask [B, H] (a prefix of real events).
        Returns: [B, H, D]; rows past a history's length hold finite values to be discarded.
        """
        if self.encoder is Encoder.MEAN:
            raise ValueError("outputs_at_every_event needs the self_attention encoder")
        height = sequence.shape[1]
        if height < 1 or height > self.max_length:
            raise ValueError(f"history length H={height} must be in [1, {self.max_length}]")
        sequence = torch.where(mask.unsqueeze(-1), sequence, torch.zeros_like(sequence))
        return self._hidden(sequence, mask)

    def _position_encodings(self, height: int) -> torch.Tensor:
        """[H, D] encodings of recency ranks 0..H-1 (zeros with relative positions)."""
        if self.position_table is not None:
            return self.position_table.weight[:height]
        if self.relative_bias is not None:
            return torch.zeros(height, self.dim, device=self.relative_bias.device)
        return self.get_buffer("sinusoidal_table")[:height]

    def _attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of histories with real events ``mask`` [B, H].

        Bidirectional without relative positions: the key mask [B, H], where an empty row's
        (zero-filled, finite) slot 0 is unmasked so no attention row is all masked. Otherwise
        [B, 1, H, H] bool or [B, heads, H, H] float (relative bias, -inf where masked), where
        causal rows see keys at or after their own index and every query sees itself (a padded
        query attends to its own finite zeros; its output is discarded).
        """
        if not self.causal and self.relative_bias is None:
            return _key_mask(mask)
        height = mask.shape[1]
        index = torch.arange(height, device=mask.device)
        distance = index.unsqueeze(0) - index.unsqueeze(1)  # [Q, K]: key - query
        allowed = mask.unsqueeze(1).expand(-1, height, -1)  # [B, Q, K]
        if self.causal:
            allowed = allowed & (distance >= 0)
        allowed = allowed | (distance == 0)
        if self.relative_bias is None:
            return allowed.unsqueeze(1)
        bias = self.relative_bias[:, distance + self.max_length - 1]  # [heads, Q, K]
        masked = torch.full_like(bias, float("-inf"))
        return torch.where(allowed.unsqueeze(1), bias.unsqueeze(0), masked.unsqueeze(0))

    def _hidden(self, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, H, D] zero-padded -> final-layer outputs [B, H, D]."""
        attention_mask = self._attention_mask(mask)
        hidden = sequence + self._position_encodings(sequence.shape[1]).to(sequence.dtype)
        for block in self.blocks:
            hidden = block(hidden, attention_mask)
        return self.final_norm(hidden)

    def _self_attention(self, sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args: sequence [B, H, D] with zeros at padding, mask [B, H]. Returns [B, output_dim]."""
        non_empty = mask.any(dim=1)  # [B]
        hidden = self._hidden(sequence, mask)
        if self.pooling is not None:
            queries = self.pooling_query.expand(hidden.shape[0], 1, -1)
            summary = self.pooling(queries, hidden, _key_mask(mask)).squeeze(1)
        elif self.summary is Summary.NEWEST:
            summary = hidden[:, 0]
        else:
            summary = torch.cat([hidden[:, 0], masked_mean(hidden, mask)], dim=-1)
        # where, not multiply: empty rows get exactly 0 and a zero (finite) gradient.
        return torch.where(non_empty.unsqueeze(1), summary, torch.zeros_like(summary))


def _key_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, H] real events with the (zero-filled, finite) slot 0 of empty rows unmasked, so no
    attention row is all masked."""
    non_empty = mask.any(dim=1)
    dummy_slot = torch.zeros_like(mask)
    dummy_slot[:, 0] = True
    return mask | (dummy_slot & ~non_empty.unsqueeze(1))
