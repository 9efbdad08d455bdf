"""``models.kjt_ops``: the export-time key selection equals TorchRec's permute."""

from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from models.kjt_ops import _select_by_position, select_keys


def _features(weighted: bool) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 3, (4 * 5,), generator=g)
    lengths[5:10] = 0  # key "b": every bag empty
    values = torch.arange(int(lengths.sum()))
    return KeyedJaggedTensor(
        keys=["a", "b", "c", "d"],
        values=values,
        lengths=lengths,
        weights=torch.rand(values.shape, generator=g) if weighted else None,
        stride=5,
    )


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("keys", [["c", "a"], ["b"], ["d", "b", "a", "c"], ["d"]])
def test_selection_by_position_equals_permute(weighted: bool, keys: list[str]) -> None:
    features = _features(weighted)
    want = select_keys(features, keys)
    index = {key: i for i, key in enumerate(features.keys())}
    got = _select_by_position(features, keys, [index[k] for k in keys])
    assert got.keys() == want.keys() and got.stride() == want.stride()
    assert torch.equal(got.lengths(), want.lengths())
    assert torch.equal(got.values(), want.values())
    if weighted:
        assert torch.equal(got.weights(), want.weights())
    with pytest.raises(KeyError, match="'z'"):
        select_keys(features, ["a", "z"])
