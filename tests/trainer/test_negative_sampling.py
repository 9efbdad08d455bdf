"""Negative sources wired into training: every source and family trains, masking holds, the
estimator stays synchronized over ranks, logQ is the log expected count over the mixture of
sources, the cross-batch memory neither penalises head items nor unbalances the item tower's
gradient, and unsupported combinations fail at start."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torchrec import KeyedJaggedTensor

from config import ConfigError, load_config
from data_pipeline.batch import Batch
from data_pipeline.loader import build_event_loader
from data_pipeline.manifest import Manifest
from data_pipeline.negatives import CorpusSampler, CrossBatchMemory
from data_pipeline.streaming_frequency import StreamingFrequencyEstimator
from models.blocked_softmax import shared_softmax_loss
from models.retrieval_loss import family_loss, retrieval_loss
from models.tower_outputs import TowerOutputs
from tests.dist_helpers import run_distributed
from tests.tiny_dataset import write_tiny_dataset
from trainer.build import build_sharded_model, build_unsharded_model, loader_spec
from trainer.negatives.negative_sampling import (
    ExtraItems,
    NegativeSampling,
    check_supported,
    mixture_log_expected_count,
    routed_memory_scores,
    step_generator,
)
from trainer.runtime.distributed import DistributedEnv, init_distributed
from trainer.train import train

TINY = [
    "model.embedding_dim=8",
    "model.user_mlp=[16]",
    "model.item_mlp=[16]",
    "model.output_dim=8",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "data.num_workers=0",
    "train.epochs=1",
    "train.log_every_steps=5",
    "train.progress_bar=false",
    "logging.wandb=false",
]

VARIANTS = {
    "log_q": ["negatives.log_q.enabled=true", "negatives.log_q.hash_size=256"],
    "mixed_uniform": ["negatives.mixed.num_samples=16", "negatives.mixed.distribution=uniform"],
    "mixed_unigram_log_q": ["negatives.mixed.num_samples=16", "negatives.log_q.enabled=true"],
    "memory": [
        "negatives.memory.size=64",
        "negatives.memory.warmup_steps=2",
        "negatives.memory.max_staleness_steps=4",
    ],
    "impressions": ["negatives.impressions.per_row=2", "negatives.impressions.weight=2.0"],
    "mined": [
        "negatives.mined.per_row=2",
        "negatives.mined.top_k=12",
        "negatives.mined.skip_top=3",
        "negatives.mined.refresh_every_steps=4",
    ],
    "sampled_softmax": ["loss.family=sampled_softmax", "loss.negatives_per_row=5"],
    "sigmoid": ["loss.family=sigmoid", "loss.negatives_per_row=4"],
    "cosine": ["loss.family=cosine", "loss.negatives_per_row=3"],
    "triplet": ["loss.family=triplet", "loss.margin=0.3"],
    "bpr_learned_temperature": ["loss.family=bpr", "model.learn_temperature=true"],
    "logged_bce": ["loss.family=logged_bce"],
    "whole_corpus": ["loss.candidates=corpus"],
}


def _train_variants(rank: int, world_size: int, root: str, out: str) -> dict[str, float]:
    losses = {}
    for name, overrides in VARIANTS.items():
        config = load_config(
            None, [*TINY, f"data.path={root}", f"run.dir={out}/{name}", *overrides]
        )
        result = train(config)
        assert result.steps == 20, (name, result)
        losses[name] = result.final_loss
    return losses


def test_every_source_and_family_trains(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", impressions=True)
    (losses,) = run_distributed(_train_variants, 1, str(root), str(tmp_path / "runs"))
    assert set(losses) == set(VARIANTS)
    assert all(math.isfinite(v) for v in losses.values()), losses
    for name in VARIANTS:
        assert (tmp_path / "runs" / name / "metrics.json").exists()
        assert (tmp_path / "runs" / name / "train_summary.json").exists()
    # The frequency estimator is checkpointed with the model.
    checkpoint = tmp_path / "runs" / "log_q" / "checkpoints" / "step-20"
    keys = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    assert "samplers.frequency_estimator.decayed_count" in keys
    assert not any(
        k.startswith("samplers")
        for k in FileSystemReader(str(tmp_path / "runs" / "memory" / "checkpoints" / "step-20"))
        .read_metadata()
        .state_dict_metadata
    )


ALL_ON = [
    "loss.global_negatives=true",
    "negatives.log_q.enabled=true",
    "negatives.log_q.hash_size=256",
    "negatives.mixed.num_samples=16",
    "negatives.memory.size=64",
    "negatives.memory.warmup_steps=1",
    "negatives.impressions.per_row=2",
    "negatives.mined.per_row=2",
    "negatives.mined.top_k=12",
    "negatives.mined.refresh_every_steps=3",
]


def _score_rank(rank: int, world_size: int, root: str, mask: bool) -> dict[str, torch.Tensor]:
    """A few steps with every source on; returns what the masks and the estimator saw."""
    env = init_distributed()
    config = load_config(
        None,
        [
            *TINY,
            f"data.path={root}",
            *ALL_ON,
            "negatives.mixed.num_samples=200",
            f"loss.mask_accidental_hits={mask}",
        ],
    )
    manifest = Manifest.load(root)
    torch.manual_seed(0)
    model = build_sharded_model(manifest, config, env)
    negatives = NegativeSampling.build(config, manifest, env)
    from data_pipeline.loader import build_event_loader

    loader = build_event_loader(
        loader_spec(config, "train", True, manifest), manifest, rank, world_size
    )
    hits = 0
    live = 0
    for step, batch in enumerate(loader):
        if step == 4:
            break
        generator = step_generator(config.seed, rank, step, env.device)
        extra = negatives.plan(model, batch, step, generator, manifest)
        outputs = model(batch.user_features, batch.item_features, negatives.features(extra))
        negatives.observe(batch, step)
        scored, in_batch = negatives.score(outputs, batch, extra, step)
        assert scored.ids is not None
        counted = scored.weights > 0
        hits += int((counted & (scored.ids == batch.item_ids.unsqueeze(1))).sum())
        live += int(counted.sum())
        # One correction per item wherever it appears, the positive's included (the last 4
        # columns are the uncorrected hard negatives).
        shared_ids, shared_log_q = scored.ids[:, :-4], scored.negative_log_q[:, :-4]
        same = shared_ids == batch.item_ids.unsqueeze(1)
        positive = scored.positive_log_q.unsqueeze(1).expand_as(shared_log_q)
        torch.testing.assert_close(shared_log_q[same], positive[same])
        assert bool((scored.negative_log_q[:, -4:] == 0).all())
        negatives.remember(in_batch, step)
    assert negatives.estimator is not None
    return {
        "hits": torch.tensor(hits),
        "live": torch.tensor(live),
        **negatives.estimator.state_dict(),
    }


def test_no_negative_equals_the_positive_and_ranks_agree(tmp_path: Path) -> None:
    """200 corpus samples over 60 items collide with positives constantly: none may count."""
    root = write_tiny_dataset(tmp_path / "data", impressions=True)
    results = run_distributed(_score_rank, 2, str(root), True)
    for result in results:
        assert int(result["hits"]) == 0 and int(result["live"]) > 0
    # The check can fail: without masking, sampled copies of the positive do count.
    unmasked = run_distributed(_score_rank, 1, str(root), False)
    assert int(unmasked[0]["hits"]) > 0
    for key, value in results[0].items():
        if key not in ("hits", "live"):
            assert torch.equal(value, results[1][key]), key


def test_impression_negatives_on_data_without_impressions_fail_naming_keys(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data")
    manifest = Manifest.load(root)
    config = load_config(None, [f"data.path={root}", "negatives.impressions.per_row=2"])
    with pytest.raises(
        ConfigError, match=r"negatives\.impressions\.per_row.*impression_negative_ids"
    ):
        check_supported(config, manifest)
    config = load_config(
        None, [f"data.path={root}", "negatives.mined.per_row=2", "negatives.mined.top_k=500"]
    )
    with pytest.raises(ConfigError, match=r"negatives\.mined\.top_k"):
        check_supported(config, manifest)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["loss.family=cosine"], "loss.negatives_per_row"),
        (["loss.family=softmax", "loss.negatives_per_row=3"], "loss.negatives_per_row"),
        (["negatives.mined.per_row=2", "negatives.mined.skip_top=100"], "negatives.mined.top_k"),
        (["negatives.mined.per_row=50", "negatives.mined.top_k=20"], "negatives.mined.per_row"),
        (["negatives.memory.size=8", "negatives.memory.max_staleness_steps=0"], "negatives.memory"),
        (["model.learn_temperature=true", "model.temperature=5.0"], "model.temperature"),
        (["negatives.log_q.alpha=0"], "negatives.log_q.alpha"),
        (["negatives.impressions.weight=0"], "negatives.impressions.weight"),
    ],
)
def test_bad_combinations_name_their_keys(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


# ---------------------------------------------------------------------------------------------
# logQ over the mixture of candidate sources, and the cross-batch memory
# ---------------------------------------------------------------------------------------------


def _zipf(num_items: int, exponent: float) -> torch.Tensor:
    """[num_items] float64 probabilities proportional to rank ** -exponent."""
    weights = torch.arange(1, num_items + 1, dtype=torch.float64) ** -exponent
    return weights / weights.sum()


def test_mixture_log_expected_count_matches_drawn_candidate_sets() -> None:
    """Three sources over 40 items with different distributions (32 in-batch draws from
    Zipf(1.2), 96 memory draws from a flatter Zipf(0.6), 16 uniform corpus samples), 20,000
    candidate sets drawn and counted: every item's mean count is within 4.5 standard errors
    of ``sum_s C_s p_s(j)`` (standard error from the multinomial variance
    ``sum_s C_s p_s (1 - p_s)``; 40 items at 4.5 sigma fail by chance with p < 1e-3)."""
    num_items, sets = 40, 20_000
    sources = [(32, _zipf(num_items, 1.2)), (96, _zipf(num_items, 0.6))]
    sources.append((16, torch.full((num_items,), 1.0 / num_items, dtype=torch.float64)))
    generator = torch.Generator().manual_seed(0)
    items = torch.arange(num_items)
    counts = torch.zeros(sets, num_items, dtype=torch.float64)
    for draws, probability in sources:
        drawn, _ = CorpusSampler.from_weights(items, probability).sample(draws * sets, generator)
        set_index = torch.arange(sets).repeat_interleave(draws)
        ones = torch.ones(len(drawn), dtype=torch.float64)
        counts.view(-1).index_add_(0, set_index * num_items + drawn, ones)
    expected = mixture_log_expected_count(
        [float(d) for d, _ in sources], [p.log() for _, p in sources]
    ).double()
    standard_error = (sum(d * p * (1 - p) for d, p in sources) / sets).sqrt()
    error = (counts.mean(0) - expected.exp()).abs() / standard_error
    assert float(error.max()) < 4.5
    assert torch.allclose(counts.sum(1), torch.full((sets,), 144.0, dtype=torch.float64))


def test_mixture_log_expected_count_edge_cases() -> None:
    log_p = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    never = torch.tensor([float("-inf"), 0.0, float("-inf")])  # a source drawing only item 1
    got = mixture_log_expected_count([4.0, 0.0, 2.0], [log_p, log_p * 3, never])
    torch.testing.assert_close(got, torch.log(torch.tensor([2.0, 3.0, 1.0])))
    with pytest.raises(ValueError, match="no source"):
        mixture_log_expected_count([0.0], [log_p])
    with pytest.raises(ValueError, match=">= 0"):
        mixture_log_expected_count([-1.0], [log_p])


def _batch(item_ids: torch.Tensor, weight: torch.Tensor) -> Batch:
    rows = item_ids.shape[0]
    empty = KeyedJaggedTensor.from_lengths_sync(
        keys=[], values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(0, dtype=torch.int32)
    )
    return Batch(
        user_features=empty,
        item_features=empty,
        labels=torch.ones(rows, 1),
        position=torch.full((rows,), -1),
        user_ids=torch.arange(rows),
        item_ids=item_ids,
        ranker_score=torch.full((rows,), float("nan")),
        impression_negatives=torch.zeros(rows, 0, dtype=torch.int64),
        weight=weight,
        timestamp=torch.full((rows,), -1),
    )


def _fake_step(
    negatives: NegativeSampling, item_ids: torch.Tensor, step: int, dim: int
) -> torch.Tensor:
    """One observe / score / remember round on random embeddings; returns the shared block's
    per-candidate [ids; log q] as a [2, C] tensor (row 0 of the scores: shared by all rows)."""
    rows = item_ids.shape[0]
    generator = step_generator(0, 0, step, torch.device("cpu"))
    batch = _batch(item_ids, torch.ones(rows))
    assert negatives.sampler is not None
    samples = negatives.config.negatives.mixed.num_samples
    sample_ids, sample_log_prob = negatives.sampler.sample(samples, generator)
    none = torch.zeros(rows, 0, dtype=torch.int64)
    extra = ExtraItems(sample_ids, sample_log_prob, none, none)
    outputs = TowerOutputs(
        user=torch.randn(rows, dim, generator=generator),
        item=torch.randn(rows, dim, generator=generator),
        extra_items=torch.randn(samples, dim, generator=generator),
        temperature=torch.tensor(0.05),
    )
    negatives.observe(batch, step)
    scored, in_batch = negatives.score(outputs, batch, extra, step)
    negatives.remember(in_batch, step)
    assert scored.ids is not None
    return torch.stack([scored.ids[0].double(), scored.negative_log_q[0].double()])


def _denominator_weights(steps: int, warmup: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Zipf(1) stream over 300 items, B = 128 rows per step (the top item has 20 copies per
    batch) through the real estimator, memory (512 entries, 4 batches, duplicates kept) and
    ``score``, with 64 uniform corpus samples. Returns, per item, the mean over steps after
    ``warmup`` of ``sum over its copies of exp(-log q)`` (the weight it gets in a row's softmax
    denominator relative to ``exp(s / t)``) and of its plain number of copies."""
    num_items, rows, dim, capacity = 300, 128, 8, 512
    config = load_config(
        None,
        [
            "negatives.log_q.enabled=true",
            "negatives.mixed.num_samples=64",
            "negatives.mixed.distribution=uniform",
            f"negatives.memory.size={capacity}",
            f"data.batch_size={rows}",
        ],
    )
    items = torch.arange(num_items)
    negatives = NegativeSampling(
        config,
        DistributedEnv(0, 1, 0, torch.device("cpu"), "gloo"),
        sampler=CorpusSampler.uniform(items),
        estimator=StreamingFrequencyEstimator(hash_size=2**12, alpha=0.005),
        memory=CrossBatchMemory(capacity, dim, warmup_steps=0, max_staleness_steps=50),
    )
    stream = CorpusSampler.from_weights(items, _zipf(num_items, 1.0))
    generator = torch.Generator().manual_seed(0)
    corrected = torch.zeros(num_items, dtype=torch.float64)
    copies = torch.zeros(num_items, dtype=torch.float64)
    for step in range(steps):
        ids, log_q = _fake_step(negatives, stream.sample(rows, generator)[0], step, dim)
        if step >= warmup:
            live = ids >= 0
            corrected.index_add_(0, ids[live].long(), (-log_q[live]).exp())
            copies.index_add_(0, ids[live].long(), torch.ones_like(log_q[live]))
    return corrected / (steps - warmup), copies / (steps - warmup)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Hundreds of steps of tiny tensor ops: on a busy machine, intra-op thread handoffs
    cost more than the ops (60x here), so run them on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_corrected_memory_candidates_do_not_penalise_head_items() -> None:
    """With the mixture logQ, an item's expected weight in the softmax denominator is 1 whether
    it is a head item (10 items, over 10 expected copies per step) or a tail item (260 items,
    under 0.5 copies per batch): no popularity penalty. Uncorrected it is the expected count,
    tens of times larger for the head. Tolerance 10%: estimator noise (alpha = 0.005, about
    20% relative error for one tail item) averages out over the tail group, leaving the bias
    of 1 / p-hat (a few %). Measured: head 1.00, tail 0.99."""
    corrected, copies = _denominator_weights(steps=250, warmup=50)
    p_data = _zipf(300, 1.0)
    expected_count = (128 + 512) * p_data + 64 / 300
    head, tail = expected_count > 10, 128 * p_data < 0.5
    assert int(head.sum()) == 10 and int(tail.sum()) == 260
    head_weight, tail_weight = float(corrected[head].mean()), float(corrected[tail].mean())
    assert abs(head_weight - 1) < 0.1 and abs(tail_weight - 1) < 0.1, (head_weight, tail_weight)
    assert float(copies[head].mean()) > 20 * float(copies[tail].mean())


def test_routed_memory_scores_balance_the_item_gradient() -> None:
    """Routed memory scores equal ``user @ memory.T``. A softmax is unchanged when every item
    embedding moves by one vector, so a row's item gradients must sum to zero: with plain
    detached memory scores they sum to ``-sum_rows P(memory) u / t`` instead (the pull that
    made the item tower drift). Routed, they sum to zero: the item tower gets exactly the
    in-batch softmax gradient scaled by each row's ``1 - P(memory)``, and the user tower the
    gradient of the whole candidate set, unchanged."""
    generator = torch.Generator().manual_seed(0)
    rows, entries, dim, temperature = 8, 24, 4, 0.1
    users = torch.randn(rows, dim, generator=generator).requires_grad_(True)
    items = torch.randn(rows, dim, generator=generator).requires_grad_(True)
    memory = torch.randn(entries, dim, generator=generator)
    target = torch.arange(rows)

    def gradients(routed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        users.grad = items.grad = None
        scores = routed_memory_scores(users, memory, items) if routed else users @ memory.T
        torch.testing.assert_close(scores, users @ memory.T)
        logits = torch.cat([users @ items.T, scores], dim=1) / temperature
        torch.nn.functional.cross_entropy(logits, target, reduction="sum").backward()
        assert users.grad is not None and items.grad is not None
        memory_mass = logits.detach().softmax(dim=1)[:, rows:].sum(dim=1)
        return users.grad.clone(), items.grad.clone(), memory_mass

    plain_users, plain_items, _ = gradients(routed=False)
    routed_users, routed_items, memory_mass = gradients(routed=True)
    assert float(plain_items.sum(0).norm()) > 1.0
    assert float(routed_items.sum(0).norm()) < 1e-4
    torch.testing.assert_close(routed_users, plain_users)
    items.grad = None
    in_batch = torch.nn.functional.cross_entropy(
        users.detach() @ items.T / temperature, target, reduction="none"
    )
    ((1 - memory_mass) * in_batch).sum().backward()
    assert items.grad is not None
    torch.testing.assert_close(routed_items, items.grad)


@pytest.mark.parametrize(
    ("overrides", "memory", "blocked"),
    [
        ([], False, True),
        (["negatives.mixed.num_samples=8"], False, True),
        ([], True, False),
        (["loss.family=sampled_softmax", "loss.negatives_per_row=3"], False, False),
    ],
)
def test_linear_memory_softmax_serves_only_shared_candidate_softmax(
    overrides: list[str], memory: bool, blocked: bool
) -> None:
    """The blocked softmax serves the softmax over shared candidates; memory, other families and
    listwise distillation (which reads the per-row layout) take the per-row path, built once."""
    config = load_config(None, overrides)
    env = DistributedEnv(0, 1, 0, torch.device("cpu"), "gloo")
    store = CrossBatchMemory(8, 4, 0, 4, torch.device("cpu")) if memory else None
    negatives = NegativeSampling(config, env, memory=store)
    samples = config.negatives.mixed.num_samples
    no_hard = torch.zeros(2, 0, dtype=torch.int64)
    extra = ExtraItems(torch.arange(samples), torch.zeros(samples), no_hard, no_hard)
    assert negatives.uses_shared_softmax(extra) is blocked
    # One impression negative per row: per-row candidates, so the per-row layout.
    impressions = torch.zeros(2, 1, dtype=torch.int64)
    hard = ExtraItems(torch.arange(samples + 2), torch.zeros(samples), impressions, no_hard)
    assert not negatives.uses_shared_softmax(hard)
    config.distillation.listwise.enabled = True
    assert not negatives.uses_shared_softmax(extra)


@pytest.mark.parametrize(
    ("family", "per_row"),
    [("sampled_softmax", 5), ("sigmoid", 3), ("cosine", 2), ("triplet", 4), ("bpr", 40)],
)
@pytest.mark.parametrize("mask", [True, False])
def test_drawn_columns_equal_the_full_layout_then_sampling(
    family: str, per_row: int, mask: bool
) -> None:
    """Scoring only the drawn columns gives the loss and gradients of laying every candidate
    out and sampling them (same draws): duplicates, padding rows, corpus samples and logQ on.
    40 per row out of 40 + 12 candidates takes the exact fallback for every row."""
    rows, dim, samples = 40, 8, 12
    config = load_config(
        None,
        [
            f"loss.family={family}",
            f"loss.negatives_per_row={per_row}",
            f"loss.mask_accidental_hits={mask}",
            "negatives.log_q.enabled=true",
            f"negatives.mixed.num_samples={samples}",
            "negatives.mixed.distribution=uniform",
        ],
    )
    items = torch.arange(30)
    negatives = NegativeSampling(
        config,
        DistributedEnv(0, 1, 0, torch.device("cpu"), "gloo"),
        sampler=CorpusSampler.uniform(items),
        estimator=StreamingFrequencyEstimator(hash_size=2**10, alpha=0.1),
    )
    generator = torch.Generator().manual_seed(3)
    item_ids = torch.randint(0, 10, (rows,), generator=generator)  # many duplicates
    weight = torch.ones(rows)
    weight[-3:] = 0.0  # padding rows
    batch = _batch(item_ids, weight)
    sample_ids, sample_log_prob = negatives.sampler.sample(samples, generator)  # type: ignore[union-attr]
    none = torch.zeros(rows, 0, dtype=torch.int64)
    extra = ExtraItems(sample_ids, sample_log_prob, none, none)
    negatives.observe(batch, 0)
    assert negatives.uses_drawn_columns(extra)
    user = torch.randn(rows, dim, generator=generator, requires_grad=True)
    item = torch.randn(rows, dim, generator=generator, requires_grad=True)
    sampled = torch.randn(samples, dim, generator=generator, requires_grad=True)
    outputs = TowerOutputs(user=user, item=item, extra_items=sampled, temperature=torch.tensor(0.1))
    row_weights = torch.rand(rows, generator=generator) * weight
    results = []
    for drawn in (True, False):
        draw = torch.Generator().manual_seed(11)
        if drawn:
            scored, _ = negatives.score_drawn(outputs, batch, extra, per_row, draw)
            loss = family_loss(scored, outputs.temperature, row_weights, config.loss)
        else:
            scored, _ = negatives.score(outputs, batch, extra, 0)
            loss = retrieval_loss(scored, outputs.temperature, row_weights, config.loss, draw)
        gradients = torch.autograd.grad(loss, [user, item, sampled])
        results.append((loss, gradients))
    (drawn_loss, drawn_grads), (full_loss, full_grads) = results
    assert torch.allclose(drawn_loss, full_loss, atol=1e-6), (drawn_loss, full_loss)
    for got, want in zip(drawn_grads, full_grads):
        assert torch.allclose(got, want, atol=1e-6)


def test_whole_corpus_candidates_are_the_full_softmax(tmp_path: Path) -> None:
    """``loss.candidates=corpus``: every row's softmax over every corpus item, brute force."""
    root = write_tiny_dataset(tmp_path / "data")
    config = load_config(None, [*TINY, f"data.path={root}", "loss.candidates=corpus"])
    manifest = Manifest.load(root)
    env = DistributedEnv(0, 1, 0, torch.device("cpu"), "gloo")
    negatives = NegativeSampling.build(config, manifest, env)
    torch.manual_seed(0)
    model = build_unsharded_model(manifest, config)
    batch = next(
        iter(build_event_loader(loader_spec(config, "train", True, manifest), manifest, 0, 1))
    )
    extra = negatives.plan(model, batch, 0, torch.Generator().manual_seed(0), manifest)
    assert negatives.uses_shared_softmax(extra)
    outputs = model(batch.user_features, batch.item_features, negatives.features(extra))
    shared = negatives.shared(outputs, batch, extra)
    weights = torch.rand(batch.size)
    loss = shared_softmax_loss(
        outputs.user,
        shared.block.embeddings,
        shared.block.ids,
        shared.log_q,
        shared.positive_index,
        batch.item_ids,
        outputs.temperature,
        weights,
        True,
        7,
    )
    corpus = negatives.store.corpus_ids()
    assert torch.equal(shared.block.ids, corpus) and corpus.shape[0] == manifest.tables["item_id"]
    all_items = model.item_tower(
        model._lookup(model._with_empty(negatives.store.lookup(corpus)), 0)
    )
    logits = outputs.user @ all_items.T / outputs.temperature  # [B, every item]
    target = (batch.item_ids.unsqueeze(1) == corpus.unsqueeze(0)).float().argmax(dim=1)
    per_row = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(loss, (per_row * weights).sum() / weights.sum())
