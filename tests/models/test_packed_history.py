"""Causal encoding with relative positions: one pass over a history gives, at every event, what
the per-row encoder gives the history that starts there (the basis of packed sequence
training)."""

from __future__ import annotations

import pytest
import torch

from config import Encoder, Positions, Summary
from models.history import HistoryEncoder, jagged_to_padded

DIM, MAX_LENGTH = 8, 12


def _encoder(causal: bool = True, positions: Positions = Positions.RELATIVE) -> HistoryEncoder:
    torch.manual_seed(0)
    encoder = HistoryEncoder(
        Encoder.SELF_ATTENTION,
        DIM,
        MAX_LENGTH,
        num_layers=2,
        num_heads=2,
        positions=positions,
        summary=Summary.NEWEST,
        causal=causal,
    )
    if encoder.relative_bias is not None:
        with torch.no_grad():  # a non-trivial bias, so a wrong distance shows
            encoder.relative_bias.normal_(std=0.5)
    return encoder.eval()


def _suffixes(events: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row input of every (row, p < len) pair: the history from event p on, and its mask."""
    rows, starts = [], []
    offsets = torch.cumsum(lengths, 0) - lengths
    for row, length in enumerate(lengths.tolist()):
        for p in range(length):
            rows.append(row)
            starts.append(int(offsets[row]) + p)
    values = torch.cat([events[s : int(offsets[r] + lengths[r])] for r, s in zip(rows, starts)])
    suffix_lengths = torch.tensor([int(offsets[r] + lengths[r]) - s for r, s in zip(rows, starts)])
    return values, suffix_lengths


@pytest.mark.parametrize("lengths", [[5, 1, 12, 7], [3, 3, 3], [12, 12]])
def test_every_position_of_one_pass_equals_the_per_row_encoder(lengths: list[int]) -> None:
    encoder = _encoder()
    lengths_t = torch.tensor(lengths)
    events = torch.randn(int(lengths_t.sum()), DIM)
    padded, mask = jagged_to_padded(events, lengths_t, MAX_LENGTH)
    packed = encoder.outputs_at_every_event(padded, mask)[mask]  # [sum(lengths), D], row-major

    values, suffix_lengths = _suffixes(events, lengths_t)
    per_row = encoder(*jagged_to_padded(values, suffix_lengths, MAX_LENGTH))
    torch.testing.assert_close(packed, per_row, atol=2e-5, rtol=1e-4)


def test_gradients_of_one_pass_equal_the_per_row_encoder() -> None:
    lengths = torch.tensor([6, 2, 9])
    events = torch.randn(int(lengths.sum()), DIM)
    weights = torch.randn(int(lengths.sum()), DIM)
    grads = []
    for packed in (True, False):
        encoder = _encoder()
        if packed:
            padded, mask = jagged_to_padded(events, lengths, MAX_LENGTH)
            out = encoder.outputs_at_every_event(padded, mask)[mask]
        else:
            out = encoder(*jagged_to_padded(*_suffixes(events, lengths), MAX_LENGTH))
        (out * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-4, rtol=1e-3, msg=name)


def test_causal_output_ignores_newer_events_and_bidirectional_does_not() -> None:
    """The output at event p must not move when a newer event (index < p) changes."""
    lengths = torch.tensor([8])
    events = torch.randn(8, DIM)
    changed = events.clone()
    changed[0] += 3.0 * torch.randn(DIM)  # the newest event (not a constant: LayerNorm hides one)
    for causal, moves in ((True, False), (False, True)):
        encoder = _encoder(causal=causal)
        outs = [
            encoder.outputs_at_every_event(*jagged_to_padded(x, lengths, MAX_LENGTH))[0, 1:]
            for x in (events, changed)
        ]
        assert torch.allclose(outs[0], outs[1], atol=1e-6) is not moves


def test_padding_and_empty_histories_stay_finite() -> None:
    encoder = _encoder().train()
    lengths = torch.tensor([0, 4, 0])
    events = torch.randn(4, DIM, requires_grad=True)
    padded, mask = jagged_to_padded(events, lengths, MAX_LENGTH)
    padded = torch.where(mask.unsqueeze(-1), padded, torch.full_like(padded, float("nan")))
    out = encoder(padded, mask)
    assert torch.equal(out[0], torch.zeros(DIM)) and torch.equal(out[2], torch.zeros(DIM))
    every = encoder.outputs_at_every_event(padded, mask)
    (out.sum() + every[mask].sum()).backward()
    assert torch.isfinite(events.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)
