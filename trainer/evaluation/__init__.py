"""Evaluation: corpus and query embeddings, exact ranking with the exclusion rule, metrics with
bootstrap intervals, validation during training, funnel metrics against a ranker, ground truth of
synthetic worlds, and ``twotower eval``."""
