"""A tiny MovieLens-100k copy prepared by the real converter: every feature group (ids,
categorical, history, weighted title tokens, counters, time context) on 6 items and 12 users."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.datasets.movielens import prepare_movielens
from tests.data_pipeline.test_movielens import item_line, write_ml100k
from tests.data_pipeline.test_movielens_features import spread_log

# Titles share words ("toy", "story") so idf weights differ within a title.
U_ITEM = "".join(
    [
        item_line(1, "Toy Story (1995)", "01-Jan-1995", ["Comedy"]),
        item_line(2, "Toy Soldiers (1991)", "01-Jan-1991", ["Action", "Adventure"]),
        item_line(3, "Café au lait (1994)", "01-Jan-1994", ["Drama"]),
        item_line(4, "unknown", "", ["unknown"]),
        item_line(5, "Metropolis Story (1927)", "01-Jan-1927", ["Drama", "Sci-Fi"]),
        item_line(6, "Nosferatu (1918)", "01-Jan-1918", ["Drama"]),
    ]
)
TEXT_VOCAB = 1024
HISTORY = 3


def write_tiny_movielens(root: Path) -> Path:
    """Writes the raw files under ``root/src`` and the prepared dataset under ``root/out``;
    returns the dataset directory (36 train, 12 valid and 12 test events)."""
    source = write_ml100k(root / "src", spread_log())
    (source / "u.item").write_bytes(U_ITEM.encode("latin-1"))
    out = root / "out"
    prepare_movielens("100k", out, source, HISTORY, text_vocab_size=TEXT_VOCAB)
    return out
