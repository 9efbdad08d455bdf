"""Checks of sequence mode (``model.history.packed``) and of the whole-corpus candidate set
(``loss.candidates=corpus``), which span the model, data, loss and negatives sections."""

from __future__ import annotations

from typing import Protocol

from config.distillation import DistillationConfig
from config.errors import Fail
from config.loss import Candidates, LossConfig
from config.model import Encoder, ModelConfig, Positions, Summary
from config.negatives import NegativesConfig


class _Sections(Protocol):
    """The sections these checks read (an ``ExperimentConfig``)."""

    model: ModelConfig
    loss: LossConfig
    negatives: NegativesConfig
    distillation: DistillationConfig


def validate_sequence(config: _Sections, fail: Fail) -> None:
    """Packed training reads the causal encoder at every position, so every per-row input the
    window cannot give per position is an error naming its key."""
    _validate_corpus_candidates(config, fail)
    history = config.model.history
    if not history.packed:
        return
    needs = {
        "model.history.enabled": (history.enabled, "true"),
        "model.history.encoder": (history.encoder is Encoder.SELF_ATTENTION, "self_attention"),
        "model.history.causal": (history.causal, "true"),
        "model.history.positions": (history.positions is Positions.RELATIVE, "relative"),
        "model.history.summary": (history.summary is Summary.NEWEST, "newest"),
        "model.history.recency_buckets": (history.recency_buckets == 0, "0"),
    }
    for key, (ok, value) in needs.items():
        if not ok:
            fail(
                key,
                f"model.history.packed=true needs {key}={value}: one causal pass must give "
                "every position the user vector the per-row encoder would give it (recency "
                "is measured from each query's own time, so it cannot be packed)",
            )
    unsupported = {
        "negatives.impressions.per_row": config.negatives.impressions.per_row > 0,
        "negatives.mined.per_row": config.negatives.mined.per_row > 0,
        "model.light_head.enabled": config.model.light_head.enabled,
        "distillation.pointwise.enabled": config.distillation.pointwise.enabled,
        "distillation.listwise.enabled": config.distillation.listwise.enabled,
    }
    for key, enabled in unsupported.items():
        if enabled:
            fail(
                key,
                "needs one logged row per example, and model.history.packed=true trains on "
                "windows of events; turn one of them off",
            )


def _validate_corpus_candidates(config: _Sections, fail: Fail) -> None:
    if config.loss.candidates is not Candidates.CORPUS:
        return
    conflicts = {
        "negatives.mixed.num_samples": config.negatives.mixed.num_samples > 0,
        "negatives.memory.size": config.negatives.memory.size > 0,
        "negatives.log_q.enabled": config.negatives.log_q.enabled,
        "loss.global_negatives": config.loss.global_negatives,
    }
    for key, enabled in conflicts.items():
        if enabled:
            fail(
                key,
                "loss.candidates=corpus scores every item of the corpus, with nothing sampled "
                "to add or correct; turn it off",
            )
