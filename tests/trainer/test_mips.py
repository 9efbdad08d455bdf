"""Exact MIPS: single-process and sharded top-k against a float64 brute force."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.dist_helpers import run_distributed
from trainer.mips import (
    ItemLists,
    bruteforce_topk,
    candidates,
    distributed_topk,
    exact_topk,
    precision,
    score_error_bound,
    shard_range,
)
from trainer.mips import sweep as mips_sweep  # the bf16 test patches bfloat16_at_least here


def _random_case(seed: int, num_queries: int, num_items: int, dim: int, integer: bool):
    """Queries [Q, D], corpus [N, D], shuffled unique ids [N] and exclusions (some absent ids)."""
    generator = torch.Generator().manual_seed(seed)
    if integer:  # few distinct scores: many exact ties
        queries = torch.randint(-2, 3, (num_queries, dim), generator=generator).float()
        corpus = torch.randint(-2, 3, (num_items, dim), generator=generator).float()
    else:
        queries = torch.randn(num_queries, dim, generator=generator)
        corpus = torch.randn(num_items, dim, generator=generator)
    ids = torch.randperm(3 * num_items + 1, generator=generator)[:num_items]
    lengths = torch.randint(0, 8, (num_queries,), generator=generator).tolist()
    lists = [
        torch.randint(0, 3 * num_items + 1, (n,), generator=generator).tolist() for n in lengths
    ]
    return queries, corpus, ids, ItemLists.from_lists(lists)


def _assert_matches_reference(queries, corpus, k, ids=None, exclude=None, **chunks) -> None:
    expected_scores, expected_ids = bruteforce_topk(
        queries, corpus, k, corpus_ids=ids, exclude=exclude
    )
    scores, got_ids = exact_topk(queries, corpus, k, corpus_ids=ids, exclude=exclude, **chunks)
    assert scores.dtype == torch.float32 and got_ids.dtype == torch.int64
    assert scores.shape == got_ids.shape == (queries.shape[0], k)
    torch.testing.assert_close(got_ids, expected_ids, rtol=0, atol=0)
    torch.testing.assert_close(scores, expected_scores.float(), rtol=0, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_queries=st.integers(1, 20),
    num_items=st.integers(1, 300),
    dim=st.integers(1, 8),
    k=st.integers(1, 40),
    integer=st.booleans(),
    query_chunk=st.sampled_from([1, 3, 16]),
    corpus_chunk=st.sampled_from([7, 64, 128, 1000]),
    filter_precision=st.sampled_from(["float32", "bfloat16"]),
)
def test_exact_topk_matches_float64_bruteforce(
    seed, num_queries, num_items, dim, k, integer, query_chunk, corpus_chunk, filter_precision
) -> None:
    queries, corpus, ids, exclude = _random_case(seed, num_queries, num_items, dim, integer)
    chunks = {
        "query_chunk": query_chunk,
        "corpus_chunk": corpus_chunk,
        "filter_precision": filter_precision,
    }
    _assert_matches_reference(queries, corpus, k, ids, exclude, **chunks)
    _assert_matches_reference(queries, corpus, k, **chunks)


@pytest.mark.parametrize("kind", ["gaussian", "integer", "near_duplicates", "scaled"])
def test_bfloat16_filter_matches_float64_bruteforce(kind: str, monkeypatch) -> None:
    generator = torch.Generator().manual_seed(3)
    num_queries, num_items, dim = 24, 6000, 32
    queries = torch.randn(num_queries, dim, generator=generator)
    corpus = torch.randn(num_items, dim, generator=generator)
    if kind == "integer":
        queries = torch.randint(-2, 3, (num_queries, dim), generator=generator).float()
        corpus = torch.randint(-2, 3, (num_items, dim), generator=generator).float()
    elif kind == "near_duplicates":  # differences far below bf16 resolution
        base = corpus[:40]
        picks = torch.randint(0, 40, (num_items,), generator=generator)
        corpus = base[picks] + 1e-5 * torch.randn(num_items, dim, generator=generator)
    elif kind == "scaled":
        corpus = corpus * torch.rand(num_items, 1, generator=generator) * 1e3
    _, _, ids, exclude = _random_case(4, num_queries, num_items, dim, integer=False)
    bfloat16_chunks = []
    original = mips_sweep.bfloat16_at_least
    monkeypatch.setattr(
        mips_sweep,
        "bfloat16_at_least",
        lambda scores, threshold: bfloat16_chunks.append(1) or original(scores, threshold),
    )
    chunks = {"query_chunk": 8, "corpus_chunk": 256, "filter_precision": "bfloat16"}
    _assert_matches_reference(queries, corpus, 25, ids, exclude, **chunks)
    assert bfloat16_chunks, "the bf16 path was not exercised"


@pytest.mark.parametrize("filter_precision", ["float32", "bfloat16"])
def test_excluded_best_items_do_not_raise_the_threshold(filter_precision: str) -> None:
    # Query 0's best items fill the chunks that seed the threshold (4 of 64) and are excluded:
    # counting them would push the threshold above its true top-k.
    generator = torch.Generator().manual_seed(9)
    queries = torch.randn(4, 16, generator=generator)
    corpus = torch.randn(64 * 256, 16, generator=generator)
    corpus[:1024] = queries[0] * 5.0
    exclude = ItemLists.from_lists([list(range(1024)), [], list(range(0, 600, 2)), [7]])
    chunks = {"query_chunk": 4, "corpus_chunk": 256, "filter_precision": filter_precision}
    _assert_matches_reference(queries, corpus, 10, exclude=exclude, **chunks)


def test_score_error_bound_holds() -> None:
    generator = torch.Generator().manual_seed(5)
    for dim in (3, 64, 300):
        queries = torch.randn(64, dim, generator=generator) * 7
        corpus = torch.randn(4000, dim, generator=generator) * torch.rand(4000, 1) * 1e-2
        exact = queries.double() @ corpus.double().T
        for bfloat16 in (False, True):
            left, right = (queries.bfloat16(), corpus.bfloat16()) if bfloat16 else (queries, corpus)
            error = ((left @ right.T).double() - exact).abs()
            bound = score_error_bound(queries, corpus, bfloat16=bfloat16).double().unsqueeze(1)
            assert bool((error <= bound).all())


def test_bfloat16_filter_bound_holds() -> None:
    # |bf16 GEMM output - exact| <= filter bound + the output's own rounding (which the filter
    # needs no margin for); the adversarial corpus rounds every coordinate by 0.75 ulp / 2.
    generator = torch.Generator().manual_seed(6)
    adversarial = torch.full((50, 64), 1.0 + 3 * 2.0**-10)
    cases = [(torch.ones(4, 64), adversarial)]
    for dim in (3, 64, 300):
        queries = torch.randn(64, dim, generator=generator) * 7
        corpus = torch.randn(4000, dim, generator=generator) * torch.rand(4000, 1) * 1e-2
        cases.append((queries, corpus))
    for queries, corpus in cases:
        output = (queries.bfloat16() @ corpus.bfloat16().T).double()
        error = (output - queries.double() @ corpus.double().T).abs()
        bound = precision.bfloat16_filter_bound(queries, precision.input_norms(queries, corpus))
        assert bool((error <= bound.double().unsqueeze(1) + 2.0**-8 * 1.01 * output.abs()).all())
        assert bool((bound <= score_error_bound(queries, corpus, bfloat16=True)).all())


def test_tightened_threshold_stays_below_kth_score() -> None:
    generator = torch.Generator().manual_seed(8)
    queries, corpus = torch.randn(6, 8, generator=generator), torch.randn(300, 8)
    buffer = candidates.CandidateBuffer(queries, corpus, torch.arange(300), 10, torch.zeros(6))
    scores = torch.randn(6, 40, generator=generator)
    scores[1] = 2.0  # all tied: the k-th score itself is the tightest valid threshold
    scores[2, 5:] = float("-inf")  # fewer than k entries: nothing to tighten
    buffer.scores[:, :40], buffer.fill[:] = scores, 40
    buffer.positions[:, :40] = torch.arange(40)
    buffer._tighten_threshold()
    kth = torch.topk(scores, 10, dim=1).values[:, -1]
    rows = [0, 3, 4, 5]
    assert bool((buffer.threshold[rows] <= kth[rows]).all())
    # Within one bucket (1/64 of the span of the scores) of the k-th score.
    spans = scores[rows].amax(dim=1) - scores[rows].amin(dim=1)
    assert bool((buffer.threshold[rows] >= kth[rows] - spans / 64).all())
    assert float(buffer.threshold[1]) == 2.0
    assert float(buffer.threshold[2]) == torch.finfo(torch.float32).min


def test_heavy_ties_are_broken_by_lower_id_with_bounded_buffer() -> None:
    # 2,000 identical items per query: float32 pruning cannot separate them, the exact path must.
    queries = torch.ones(5, 4)
    corpus = torch.ones(2000, 4)
    corpus[::7] = 2.0
    ids = torch.randperm(2000, generator=torch.Generator().manual_seed(0)) + 10
    _assert_matches_reference(queries, corpus, 30, ids, query_chunk=2, corpus_chunk=128)
    _, top = exact_topk(queries, torch.zeros(2000, 4), 10, corpus_ids=ids, corpus_chunk=64)
    assert top[0].tolist() == sorted(ids.tolist())[:10]


def test_float32_near_ties_follow_float64_order() -> None:
    # In float32 both items score exactly 1.0; in float64 the higher id scores 2^-30 more.
    queries = torch.tensor([[1.0, 1.0]])
    corpus = torch.tensor([[1.0, 0.0], [1.0, 2.0**-30], [0.5, 0.0]])
    assert float((queries @ corpus.T)[0, 0]) == float((queries @ corpus.T)[0, 1])
    scores, ids = exact_topk(queries, corpus, 2)
    assert ids.tolist() == [[1, 0]]
    assert scores.tolist() == [[1.0, 1.0]]


def test_padding_when_fewer_valid_items_than_k() -> None:
    queries, corpus = torch.randn(3, 4), torch.randn(5, 4)
    exclude = ItemLists.from_lists([[0, 1, 2, 3, 4], [2], []])
    scores, ids = exact_topk(queries, corpus, 8, exclude=exclude)
    assert (ids[0] == -1).all() and torch.isinf(scores[0]).all()
    assert (ids[1, 4:] == -1).all() and 2 not in ids[1].tolist()
    assert sorted(ids[2, :5].tolist()) == [0, 1, 2, 3, 4] and (ids[2, 5:] == -1).all()
    _assert_matches_reference(queries, corpus, 8, exclude=exclude, corpus_chunk=2)
    empty_scores, empty_ids = exact_topk(queries, corpus[:0], 4)
    assert (empty_ids == -1).all() and torch.isinf(empty_scores).all()


def test_many_queries_and_items_with_default_chunks() -> None:
    queries, corpus, ids, exclude = _random_case(7, 300, 20_000, 16, integer=False)
    _assert_matches_reference(queries[:40], corpus, 100, ids, exclude.slice(0, 40))
    _assert_matches_reference(queries, corpus[:3000], 100, query_chunk=128, corpus_chunk=1024)


def test_shard_range_covers_contiguously() -> None:
    for n in (0, 1, 7, 10):
        for world_size in (1, 2, 3, 4):
            ranges = [shard_range(n, rank, world_size) for rank in range(world_size)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [stop - start for start, stop in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_item_lists_slice_and_rows() -> None:
    lists = ItemLists.from_lists([[5, 6], [], [7]])
    assert lists.rows().tolist() == [0, 0, 2]
    tail = lists.slice(1, 3)
    assert tail.offsets.tolist() == [0, 0, 1] and tail.ids.tolist() == [7]


# Per rank: (queries owned, fraction of the corpus owned) - deliberately uneven.
_QUERY_COUNTS = (3, 11)
_CORPUS_SPLIT = 0.3


def _distributed_case(integer: bool):
    queries, corpus, ids, exclude = _random_case(11, sum(_QUERY_COUNTS), 500, 6, integer)
    return queries, corpus, ids, exclude


def _distributed_rank(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    results = {}
    for integer in (False, True):
        queries, corpus, ids, exclude = _distributed_case(integer)
        if world_size == 1:
            query_range, corpus_range = (0, queries.shape[0]), (0, corpus.shape[0])
        else:
            cut = int(_CORPUS_SPLIT * corpus.shape[0])
            query_range = (0, _QUERY_COUNTS[0]) if rank == 0 else (_QUERY_COUNTS[0], None)
            corpus_range = (0, cut) if rank == 0 else (cut, None)
        q_slice, c_slice = slice(*query_range), slice(*corpus_range)
        local_exclude = exclude.slice(q_slice.start, q_slice.stop or queries.shape[0])
        scores, top = distributed_topk(
            queries[q_slice], corpus[c_slice], ids[c_slice], 40, exclude=local_exclude
        )
        results[f"scores_{integer}"], results[f"ids_{integer}"] = scores, top
    # A rank with no queries and one with no items still take part in the collectives.
    no_queries = torch.zeros(0, 6) if rank == 0 else torch.randn(4, 6)
    no_items = slice(0, 0) if rank == 1 else slice(None)
    corpus = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    results["empty_ids"] = distributed_topk(
        no_queries, corpus[no_items], torch.arange(50)[no_items], 5
    )[1]
    results["world_size"] = torch.tensor(dist.get_world_size())
    return results


def _check_distributed(per_rank: list[dict[str, torch.Tensor]]) -> None:
    for integer in (False, True):
        queries, corpus, ids, exclude = _distributed_case(integer)
        expected_scores, expected_ids = bruteforce_topk(
            queries, corpus, 40, corpus_ids=ids, exclude=exclude
        )
        got_ids = torch.cat([r[f"ids_{integer}"] for r in per_rank])
        got_scores = torch.cat([r[f"scores_{integer}"] for r in per_rank])
        torch.testing.assert_close(got_ids, expected_ids, rtol=0, atol=0)
        torch.testing.assert_close(got_scores, expected_scores.float(), rtol=0, atol=1e-5)


def test_distributed_topk_two_ranks_uneven_matches_bruteforce() -> None:
    per_rank = run_distributed(_distributed_rank, 2)
    assert [r["ids_False"].shape[0] for r in per_rank] == list(_QUERY_COUNTS)
    _check_distributed(per_rank)
    assert per_rank[0]["empty_ids"].shape == (0, 5)
    assert per_rank[1]["empty_ids"].shape == (4, 5) and (per_rank[1]["empty_ids"] >= 0).all()


def test_distributed_topk_world_size_one_same_path() -> None:
    per_rank = run_distributed(_distributed_rank, 1)
    assert int(per_rank[0]["world_size"]) == 1
    _check_distributed(per_rank)
