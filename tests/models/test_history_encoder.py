"""History encoder: padding, combiners, masking invariants and a learning check."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from config import Combiner, Encoder, Positions, Summary
from models.history import (
    HistoryEncoder,
    InteractionCombiner,
    MultiHeadAttention,
    jagged_to_padded,
)

DIM = 8
MAX_LENGTH = 8

# (encoder, summary, positions) combinations covered by the invariance tests.
ENCODER_CASES = [
    (Encoder.MEAN, Summary.NEWEST_AND_MEAN, Positions.LEARNED),
    (Encoder.SELF_ATTENTION, Summary.NEWEST_AND_MEAN, Positions.LEARNED),
    (Encoder.SELF_ATTENTION, Summary.NEWEST_AND_MEAN, Positions.SINUSOIDAL),
    (Encoder.SELF_ATTENTION, Summary.ATTENTION_POOLING, Positions.LEARNED),
    (Encoder.SELF_ATTENTION, Summary.ATTENTION_POOLING, Positions.SINUSOIDAL),
]
CASE_IDS = [f"{e.value}-{s.value}-{p.value}" for e, s, p in ENCODER_CASES]


def build_encoder(encoder: Encoder, summary: Summary, positions: Positions) -> HistoryEncoder:
    torch.manual_seed(0)
    return HistoryEncoder(
        encoder, DIM, MAX_LENGTH, num_layers=2, num_heads=2, positions=positions, summary=summary
    )


def reference_padding(
    values: torch.Tensor, lengths: list[int], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    padded = torch.zeros(len(lengths), max_length, values.shape[1])
    mask = torch.zeros(len(lengths), max_length, dtype=torch.bool)
    start = 0
    for row, length in enumerate(lengths):
        for position in range(min(length, max_length)):
            padded[row, position] = values[start + position]
            mask[row, position] = True
        start += length
    return padded, mask


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matmuls are slower multi-threaded, badly so on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- jagged_to_padded


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 7), min_size=1, max_size=5),
    max_length=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_jagged_to_padded_matches_reference(lengths: list[int], max_length: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(sum(lengths), 3, generator=generator)
    padded, mask = jagged_to_padded(values, torch.tensor(lengths), max_length)
    expected_padded, expected_mask = reference_padding(values, lengths, max_length)
    assert padded.shape == (len(lengths), max_length, 3)
    assert torch.equal(mask, expected_mask)
    assert torch.equal(padded, expected_padded)


def test_truncation_keeps_newest_events_and_gradient_reaches_values() -> None:
    # Row 0 has 4 events (newest first: 10, 11, 12, 13), row 1 has 1 event (20).
    values = torch.tensor([[10.0], [11.0], [12.0], [13.0], [20.0]], requires_grad=True)
    padded, mask = jagged_to_padded(values, torch.tensor([4, 1]), max_length=2)
    assert padded.squeeze(-1).tolist() == [[10.0, 11.0], [20.0, 0.0]]
    assert mask.tolist() == [[True, True], [True, False]]
    (padded.squeeze(-1) * torch.tensor([[1.0, 2.0], [3.0, 4.0]])).sum().backward()
    assert values.grad is not None
    assert values.grad.squeeze(-1).tolist() == [1.0, 2.0, 0.0, 0.0, 3.0]


# ---------------------------------------------------------------- combiners


@pytest.mark.parametrize("combiner", list(Combiner))
def test_combiner_shapes(combiner: Combiner) -> None:
    parts = [torch.randn(3, 5, DIM) for _ in range(3)]
    assert InteractionCombiner(combiner, DIM, 3)(parts).shape == (3, 5, DIM)


def test_sum_combiner_equals_manual_sum() -> None:
    parts = [torch.randn(2, 4, DIM) for _ in range(3)]
    combined = InteractionCombiner(Combiner.SUM, DIM, 3)(parts)
    assert torch.allclose(combined, parts[0] + parts[1] + parts[2])


def test_gated_combiner_with_zero_gates_halves_the_extra_parts() -> None:
    combiner = InteractionCombiner(Combiner.GATED, DIM, 3)
    for gate in combiner.gates:
        assert isinstance(gate, nn.Linear)
        nn.init.zeros_(gate.weight)
        nn.init.zeros_(gate.bias)
    parts = [torch.randn(2, 4, DIM) for _ in range(3)]
    assert torch.allclose(combiner(parts), parts[0] + 0.5 * (parts[1] + parts[2]))
    # A large bias opens the gate fully: the gated combiner then equals the sum.
    for gate in combiner.gates:
        assert isinstance(gate, nn.Linear)
        nn.init.constant_(gate.bias, 50.0)
    assert torch.allclose(combiner(parts), parts[0] + parts[1] + parts[2])


def test_combiner_rejects_wrong_part_count() -> None:
    with pytest.raises(ValueError):
        InteractionCombiner(Combiner.SUM, DIM, 3)([torch.randn(1, 1, DIM)])


# ---------------------------------------------------------------- encoder invariants


@pytest.mark.parametrize("combiner_kind", list(Combiner), ids=[c.value for c in Combiner])
@pytest.mark.parametrize(("encoder_kind", "summary", "positions"), ENCODER_CASES, ids=CASE_IDS)
@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    garbage=st.sampled_from([1e4, -1e4, math.nan]),
    extra_padding=st.integers(0, MAX_LENGTH - 5),
    train_mode=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_output_ignores_padded_values_and_padding_length(
    combiner_kind: Combiner,
    encoder_kind: Encoder,
    summary: Summary,
    positions: Positions,
    lengths: list[int],
    garbage: float,
    extra_padding: int,
    train_mode: bool,
    seed: int,
) -> None:
    model = build_encoder(encoder_kind, summary, positions).train(train_mode)
    combiner = InteractionCombiner(combiner_kind, DIM, 3).train(train_mode)
    generator = torch.Generator().manual_seed(seed)
    jagged_parts = [torch.randn(sum(lengths), DIM, generator=generator) for _ in range(3)]
    length_tensor = torch.tensor(lengths)

    def encode(height: int, fill: float | None) -> torch.Tensor:
        parts, mask = [], torch.empty(0)
        for values in jagged_parts:
            padded, mask = jagged_to_padded(values, length_tensor, height)
            if fill is not None:
                padded = padded.masked_fill(~mask.unsqueeze(-1), fill)
            parts.append(padded)
        return model(combiner(parts), mask)

    tight = max(max(lengths), 1)
    reference = encode(tight, None)
    assert reference.shape == (len(lengths), model.output_dim)
    assert torch.isfinite(reference).all()
    perturbed = encode(tight + extra_padding, garbage)
    assert torch.allclose(perturbed, reference, atol=1e-5)


@pytest.mark.parametrize(("encoder_kind", "summary", "positions"), ENCODER_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("lengths", [[0], [0, 0], [1], [0, 1, 3]], ids=str)
def test_empty_and_single_event_histories_have_finite_outputs_and_gradients(
    encoder_kind: Encoder, summary: Summary, positions: Positions, lengths: list[int]
) -> None:
    model = build_encoder(encoder_kind, summary, positions)
    values = torch.randn(sum(lengths), DIM, requires_grad=True)
    padded, mask = jagged_to_padded(values, torch.tensor(lengths), 4)
    # nan in padded positions must not reach the output or any gradient.
    padded = padded.masked_fill(~mask.unsqueeze(-1), math.nan)
    output = model(padded, mask)
    assert torch.isfinite(output).all()
    empty = torch.tensor([length == 0 for length in lengths])
    if encoder_kind is Encoder.SELF_ATTENTION:
        assert (output[empty] == 0).all()
    (output.square().sum() + output.sum()).backward()
    assert values.grad is not None and torch.isfinite(values.grad).all()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("summary", list(Summary), ids=[s.value for s in Summary])
def test_no_attention_row_is_fully_masked(summary: Summary) -> None:
    # Some attention kernels (CPU SDPA) return 0 for an all-masked row, others nan: the encoder
    # must never rely on either, so every attention call sees at least one usable key per row.
    model = build_encoder(Encoder.SELF_ATTENTION, summary, Positions.LEARNED)
    seen: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.register_forward_pre_hook(lambda _, args: seen.append(args[2]))
    padded, mask = jagged_to_padded(torch.randn(2, DIM), torch.tensor([0, 2, 0]), 3)
    model(padded, mask)
    assert len(seen) == len(model.blocks) + (summary is Summary.ATTENTION_POOLING)
    for key_mask in seen:
        assert key_mask.any(dim=1).all()
        assert torch.equal(key_mask[1], mask[1])  # real rows keep exactly their own keys


def test_mean_of_single_event_is_the_event_and_empty_is_zero() -> None:
    model = build_encoder(Encoder.MEAN, Summary.NEWEST_AND_MEAN, Positions.LEARNED)
    values = torch.randn(4, DIM)
    padded, mask = jagged_to_padded(values, torch.tensor([1, 0, 3]), 5)
    output = model(padded, mask)
    assert torch.allclose(output[0], values[0])
    assert (output[1] == 0).all()
    assert torch.allclose(output[2], values[1:4].mean(dim=0))


def test_output_dims_and_length_check() -> None:
    for encoder_kind, summary, positions in ENCODER_CASES:
        model = build_encoder(encoder_kind, summary, positions)
        sequence, mask = torch.randn(2, 3, DIM), torch.ones(2, 3, dtype=torch.bool)
        assert model(sequence, mask).shape == (2, model.output_dim)
    expected = {Encoder.MEAN: DIM}
    assert (
        build_encoder(Encoder.MEAN, Summary.NEWEST_AND_MEAN, Positions.LEARNED).output_dim
        == (expected[Encoder.MEAN])
    )
    attention = build_encoder(Encoder.SELF_ATTENTION, Summary.NEWEST_AND_MEAN, Positions.LEARNED)
    assert attention.output_dim == 2 * DIM
    with pytest.raises(ValueError, match="history length"):
        attention(torch.randn(1, MAX_LENGTH + 1, DIM), torch.ones(1, MAX_LENGTH + 1).bool())


def test_newest_event_position_matters_for_self_attention() -> None:
    # Reversing a history must change the self-attention output (positions are used) but not the
    # mean encoder's.
    values = torch.randn(3, DIM)
    sequence, mask = values.unsqueeze(0), torch.ones(1, 3, dtype=torch.bool)
    flipped = sequence.flip(1)
    attention = build_encoder(Encoder.SELF_ATTENTION, Summary.ATTENTION_POOLING, Positions.LEARNED)
    assert not torch.allclose(attention(sequence, mask), attention(flipped, mask), atol=1e-4)
    mean = build_encoder(Encoder.MEAN, Summary.NEWEST_AND_MEAN, Positions.LEARNED)
    assert torch.allclose(mean(sequence, mask), mean(flipped, mask), atol=1e-6)


# ---------------------------------------------------------------- learning sanity check


def random_histories(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, H, D] histories with 1..H real events (newest first) and their mask [batch, H].

    Every event's first coordinate is at least 0.5 away from 0, so its sign is well defined.
    """
    lengths = torch.randint(1, MAX_LENGTH + 1, (batch,), generator=generator)
    values = torch.randn(int(lengths.sum()), DIM, generator=generator)
    values[:, 0] = torch.sign(values[:, 0]) * (0.5 + values[:, 0].abs())
    return jagged_to_padded(values, lengths, MAX_LENGTH)


def newest_sign_accuracy(model: HistoryEncoder, steps: int = 200) -> float:
    """Trains model + linear head to predict sign(newest event[0]); held-out accuracy."""
    head = nn.Linear(model.output_dim, 1)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        sequence, mask = random_histories(64, generator)
        logits = head(model(sequence, mask)).squeeze(-1)
        labels = (sequence[:, 0, 0] > 0).float()
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        sequence, mask = random_histories(2048, generator)
        predictions = head(model(sequence, mask)).squeeze(-1) > 0
        return float((predictions == (sequence[:, 0, 0] > 0)).float().mean())


def test_self_attention_learns_which_event_is_newest() -> None:
    # Attention pooling has no built-in notion of "newest": it must learn it from the positions.
    # An order-blind mean encoder cannot do the task, which shows the task needs the order.
    torch.manual_seed(0)
    attention = HistoryEncoder(
        Encoder.SELF_ATTENTION, DIM, MAX_LENGTH, num_layers=1, summary=Summary.ATTENTION_POOLING
    )
    accuracy = newest_sign_accuracy(attention)
    assert accuracy > 0.9, f"self-attention accuracy {accuracy:.3f}"
    mean_accuracy = newest_sign_accuracy(HistoryEncoder(Encoder.MEAN, DIM, MAX_LENGTH))
    assert mean_accuracy < 0.8, f"mean accuracy {mean_accuracy:.3f}: the task is too easy"
