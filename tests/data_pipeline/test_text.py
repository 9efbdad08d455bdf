"""Text features: normalization, tokenization, stable hashed ids, idf weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.text import (
    DocumentFrequency,
    TextHashConfig,
    bigram_id,
    expected_collisions,
    idf_weight_column,
    normalize_text,
    stable_hash64,
    text_id_column,
    text_ids,
    tokenize,
    unigram_id,
)

REPO = Path(__file__).resolve().parents[2]
MEGA = 1 << 20
SAMPLES = [
    "Hello, World!",
    "",
    "Straße café",
    "東京タワー 2024",
    "ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ",
    "a b a b",
]


def test_pinned_hash_values_never_change() -> None:
    # Changing any of these changes every stored text id: it needs a new format version.
    assert stable_hash64(b"") == 14649905112600754819
    assert stable_hash64(b"twotower") == 5786575328142281623
    assert unigram_id("hello", MEGA) == 949439
    assert bigram_id("hello", "world", MEGA) == 319104
    assert unigram_id("東京", MEGA) == 871147
    assert text_ids("Hello, World!", TextHashConfig(vocab_size=MEGA)) == [949439, 950939, 319104]


def test_ids_agree_across_processes_with_different_hash_seeds() -> None:
    config = TextHashConfig(vocab_size=1000, max_tokens=8)
    code = (
        "import json, sys\n"
        "from data_pipeline.text import TextHashConfig, text_ids\n"
        "config = TextHashConfig(vocab_size=1000, max_tokens=8)\n"
        "print(json.dumps([text_ids(t, config) for t in json.loads(sys.argv[1])]))\n"
    )
    expected = [text_ids(t, config) for t in SAMPLES]
    for seed in ("1", "987654"):
        env = {
            **os.environ,
            "PYTHONHASHSEED": seed,
            "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1",
        }
        result = subprocess.run(
            [sys.executable, "-c", code, json.dumps(SAMPLES)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        assert json.loads(result.stdout) == expected


def test_normalization_folds_width_case_and_ligatures() -> None:
    assert normalize_text("ＡＢＣ") == "abc"
    assert normalize_text("Straße") == "strasse"
    assert normalize_text("ﬁne") == "fine"
    assert tokenize("ＡＢＣ abc ABC", 10) == ["abc"] * 3
    config = TextHashConfig(vocab_size=MEGA, bigrams=False)
    assert len(set(text_ids("ＡＢＣ abc ABC", config))) == 1


@pytest.mark.parametrize("text", [None, "", "   ", "!!! ... ---", "😀 🎬"])
def test_empty_or_wordless_text_gives_no_ids(text: str | None) -> None:
    assert tokenize(text, 5) == []
    assert text_ids(text, TextHashConfig(vocab_size=100)) == []


def test_non_ascii_scripts_tokenize_into_words() -> None:
    assert tokenize("Привет, мир! Καλημέρα κόσμε", 10) == ["привет", "мир", "καλημέρα", "κόσμε"]
    assert tokenize("Amélie (2001) — 東京タワー 😀", 10) == ["amélie", "2001", "東京タワー"]
    # NFC and NFD spellings of the same word are one token.
    assert tokenize("cafe\u0301", 5) == tokenize("café", 5) == ["café"]


def test_very_long_text_is_capped_and_fast() -> None:
    text = " ".join(f"w{i % 5000}" for i in range(1_000_000))
    config = TextHashConfig(vocab_size=MEGA, max_tokens=32)
    start = time.perf_counter()
    ids = text_ids(text, config)
    assert time.perf_counter() - start < 5.0
    assert len(ids) == config.max_ids_per_row == 32 + 31
    assert tokenize(text, 32) == [f"w{i}" for i in range(32)]
    assert ids == text_ids(" ".join(f"w{i}" for i in range(32)), config)


def test_bigrams_follow_unigrams_and_are_ordered_pairs() -> None:
    vocab = MEGA
    ids = text_ids("a b c", TextHashConfig(vocab_size=vocab))
    unigrams = [unigram_id(w, vocab) for w in "abc"]
    assert ids == unigrams + [bigram_id("a", "b", vocab), bigram_id("b", "c", vocab)]
    assert bigram_id("a", "b", vocab) != bigram_id("b", "a", vocab)
    # A bigram is not the unigram of the joined text.
    assert bigram_id("a", "b", vocab) != unigram_id("a b", vocab)
    assert text_ids("a b c", TextHashConfig(vocab_size=vocab, bigrams=False)) == unigrams
    assert text_ids("solo", TextHashConfig(vocab_size=vocab)) == [unigram_id("solo", vocab)]
    # Repeats are kept: sum pooling sees term frequency.
    assert text_ids("a a", TextHashConfig(vocab_size=vocab, bigrams=False)) == unigrams[:1] * 2


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200), vocab=st.integers(2, 50), max_tokens=st.integers(1, 12))
def test_ids_are_in_range_and_bounded(text: str, vocab: int, max_tokens: int) -> None:
    config = TextHashConfig(vocab_size=vocab, max_tokens=max_tokens)
    ids = text_ids(text, config)
    assert all(1 <= i < vocab for i in ids)
    words = tokenize(text, max_tokens)
    assert len(ids) == len(words) + max(len(words) - 1, 0)
    assert len(ids) <= config.max_ids_per_row


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        TextHashConfig(vocab_size=1)
    with pytest.raises(ValueError, match="max_tokens"):
        TextHashConfig(max_tokens=0)


def test_column_matches_per_row_reference_and_keeps_chunks() -> None:
    config = TextHashConfig(vocab_size=997, max_tokens=6)
    rows = [*SAMPLES, None, "Hello again, world"]
    column = pa.chunked_array([pa.array(rows[:3]), pa.array([], pa.string()), pa.array(rows[3:])])
    ids = text_id_column(column, config)
    assert isinstance(ids, pa.ChunkedArray)
    assert ids.type == pa.list_(pa.int64())
    assert [len(c) for c in ids.chunks] == [3, 0, len(rows) - 3]
    assert ids.null_count == 0
    assert ids.to_pylist() == [text_ids(t, config) for t in rows]
    plain = text_id_column(pa.array(rows, pa.large_string()), config)
    assert isinstance(plain, pa.Array) and plain.to_pylist() == ids.to_pylist()
    with pytest.raises(TypeError, match="string"):
        text_id_column(pa.array([1, 2]), config)


def _ids(rows: list[list[int]]) -> pa.Array:
    return pa.array(rows, pa.list_(pa.int64()))


def test_document_frequency_counts_each_id_once_per_document() -> None:
    df = DocumentFrequency.empty(6).update(_ids([[1, 1, 2], [], [2, 5], [1]]))
    assert df.num_documents == 4
    assert df.counts.tolist() == [0, 2, 2, 0, 0, 1]
    idf = df.idf()
    assert idf.dtype == np.float32
    assert idf[1] == pytest.approx(math.log(5 / 3) + 1)
    assert idf[5] == pytest.approx(math.log(5 / 2) + 1)
    assert idf[3] == pytest.approx(math.log(5) + 1)
    assert (idf >= 1).all()
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        DocumentFrequency.empty(6).update(_ids([[6]]))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 9), max_size=6), max_size=20),
    split=st.integers(0, 20),
)
def test_document_frequency_merges_like_one_pass(rows: list[list[int]], split: int) -> None:
    whole = DocumentFrequency.empty(10).update(_ids(rows))
    parts = DocumentFrequency.empty(10).update(_ids(rows[:split]))
    parts = parts.merge(DocumentFrequency.empty(10).update(_ids(rows[split:])))
    assert parts.num_documents == whole.num_documents == len(rows)
    assert parts.counts.tolist() == whole.counts.tolist()
    assert whole.counts.tolist() == [sum(i in r for r in rows) for i in range(10)]


def test_idf_weights_align_with_ids_including_sliced_and_chunked() -> None:
    rows = [[1, 2, 2], [], [3], [0, 1]]
    idf = np.array([0.0, 1.5, 2.5, 3.5], dtype=np.float32)
    weights = idf_weight_column(_ids(rows), idf)
    assert weights.type == pa.list_(pa.float32())
    assert weights.to_pylist() == [[1.5, 2.5, 2.5], [], [3.5], [0.0, 1.5]]
    assert idf_weight_column(_ids(rows)[1:3], idf).to_pylist() == [[], [3.5]]
    chunked = pa.chunked_array([_ids(rows[:1]), _ids(rows[1:])])
    assert idf_weight_column(chunked, idf).to_pylist() == weights.to_pylist()
    with pytest.raises(ValueError, match="idf"):
        idf_weight_column(_ids([[4]]), idf)


def test_end_to_end_text_column_to_idf_weights() -> None:
    config = TextHashConfig(vocab_size=4096, max_tokens=8)
    titles = pa.array(["Toy Story (1995)", "Toy Soldiers", "Story of Us", None])
    ids = text_id_column(titles, config)
    df = DocumentFrequency.empty(config.vocab_size).update(ids)
    weights = idf_weight_column(ids, df.idf())
    toy, of = unigram_id("toy", 4096), unigram_id("of", 4096)
    assert df.counts[toy] == 2 and df.counts[of] == 1
    story_of_us = dict(zip(ids.to_pylist()[2], weights.to_pylist()[2]))
    # "of" is in one title, "toy" in two: the rarer word weighs more.
    assert story_of_us[of] > df.idf()[toy]
    assert [len(r) for r in weights.to_pylist()] == [len(r) for r in ids.to_pylist()]


def test_expected_collisions_is_a_sane_guide() -> None:
    assert expected_collisions(0, 100) == pytest.approx(0.0)
    assert expected_collisions(1, 100) == pytest.approx(0.0)
    assert expected_collisions(5, 2) == 4.0
    # Birthday regime: about k^2 / (2m).
    assert expected_collisions(1000, MEGA + 1) == pytest.approx(1000**2 / (2 * MEGA), rel=0.01)
