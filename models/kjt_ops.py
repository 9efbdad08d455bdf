"""Small ``KeyedJaggedTensor`` operations the models share (weights preserved where present)."""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor
from torchrec.pt2.checks import is_non_strict_exporting


def select_keys(features: KeyedJaggedTensor, keys: list[str]) -> KeyedJaggedTensor:
    """The KJT restricted to ``keys`` (in that order), same stride, weights kept."""
    index = {key: i for i, key in enumerate(features.keys())}
    missing = [key for key in keys if key not in index]
    if missing:
        raise KeyError(f"features {missing} are not in the input (have {features.keys()})")
    indices = [index[key] for key in keys]
    if is_non_strict_exporting():
        return _select_by_position(features, keys, indices)
    return features.permute(indices)


def _select_by_position(
    features: KeyedJaggedTensor, keys: list[str], indices: list[int]
) -> KeyedJaggedTensor:
    """``features.permute(indices)`` (distinct keys) for ``torch.export``: the same KJT, built
    by gathering value positions. TorchRec's permute asserts at export time that the selected bags hold at
    least one id, which a served batch breaks whenever every selected bag is empty (the item
    side's features in the user tower, users without history)."""
    num_keys, stride = len(features.keys()), features.stride()
    lengths = features.lengths().view(num_keys, stride)
    values = features.values()
    device = values.device
    key_of_value = torch.repeat_interleave(
        torch.arange(num_keys, device=device), lengths.sum(dim=1), output_size=values.numel()
    )
    new_rank = torch.full((num_keys,), len(indices), dtype=torch.int64, device=device)
    new_rank[torch.tensor(indices, device=device)] = torch.arange(len(indices), device=device)
    rank = new_rank[key_of_value]  # [N]: the value's key in the output order (len: dropped)
    positions = torch.nonzero(rank < len(indices)).squeeze(1)
    positions = positions[torch.argsort(rank[positions], stable=True)]
    weights = features.weights_or_none()
    return KeyedJaggedTensor(
        keys=list(keys),
        values=values[positions],
        weights=weights[positions] if weights is not None else None,
        lengths=lengths[torch.tensor(indices, device=device)].reshape(-1),
        stride=stride,
    )


def without_weights(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The same ids without weights (for unweighted embedding collections)."""
    if features.weights_or_none() is None:
        return features
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=features.values(),
        lengths=features.lengths(),
        offsets=features.offsets(),
        stride=features.stride(),
    )


def with_weights(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The KJT with weights (ones where it had none)."""
    if features.weights_or_none() is not None:
        return features
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=features.values(),
        weights=torch.ones(features.values().shape, device=features.values().device),
        lengths=features.lengths(),
        offsets=features.offsets(),
        stride=features.stride(),
    )


def row_weight_sums(features: KeyedJaggedTensor, keys: list[str]) -> torch.Tensor:
    """[stride, len(keys)] per-row sums of each key's weights, in one segment sum (a counter row
    holds one weight, its dense value; an empty row gives 0).

    Raises:
        ValueError: the KJT carries no weights.
    """
    selected = select_keys(features, keys)
    weights = selected.weights_or_none()
    if weights is None:
        raise ValueError(f"features {keys} are read as dense values but the input has no weights")
    lengths = selected.lengths()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    out = torch.zeros(lengths.numel(), dtype=weights.dtype, device=weights.device)
    return out.index_add(0, rows, weights).view(len(keys), -1).T


def stack_rows(batch: KeyedJaggedTensor, extra: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """Rows of ``extra`` (stride E, any subset of keys) appended under ``batch`` (stride B):
    stride B + E, keys of ``batch``; keys missing from ``extra`` get empty bags there. Weights
    are kept when ``batch`` has them (ones where ``extra`` has none)."""
    extra_rows = extra.to_dict()
    count = extra.stride()
    weighted = batch.weights_or_none() is not None
    values, lengths, weights = [], [], []
    for key, jagged in batch.to_dict().items():
        values.append(jagged.values())
        lengths.append(jagged.lengths())
        if weighted:
            weights.append(jagged.weights())
        if key in extra_rows:
            other = extra_rows[key]
            values.append(other.values())
            lengths.append(other.lengths())
            if weighted:
                own = other.weights_or_none()
                weights.append(
                    own if own is not None else torch.ones_like(other.values(), dtype=torch.float32)
                )
        else:
            lengths.append(torch.zeros(count, dtype=jagged.lengths().dtype, device=jagged.device()))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=batch.keys(),
        values=torch.cat(values),
        lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weighted else None,
    )


def empty_like_rows(keys: list[str], like: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """A KJT with ``keys``, the stride of ``like``, every bag empty; weights iff ``like`` has."""
    rows = like.stride()
    values = like.values().new_zeros(0)
    weighted = like.weights_or_none() is not None
    return KeyedJaggedTensor(
        keys=list(keys),
        values=values,
        weights=like.weights().new_zeros(0) if weighted else None,
        lengths=like.lengths().new_zeros(len(keys) * rows),
        stride=rows,
    )
