"""Float precision for ``trainer.mips``: score error bounds and the bf16 candidate filter.

The sweep (``trainer.mips.sweep``) keeps an item when its filter score clears a threshold lowered
by these bounds, so every bound here must hold for any summation order the GEMM may use.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable
from typing import Literal

import torch

logger = logging.getLogger(__name__)

FilterPrecision = Literal["auto", "bfloat16", "float32"]


def input_norms(queries: torch.Tensor, corpus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|q| [Q] float64 and max_n |c_n| (scalar float64), inflated 1.001x for float32 rounding."""
    max_norm = corpus.norm(dim=1).max().double() if corpus.shape[0] else torch.zeros(())
    return 1.001 * queries.norm(dim=1).double(), 1.001 * max_norm.to(queries.device)


def bound_from_norms(
    query_norms: torch.Tensor,
    max_norm: torch.Tensor,
    dim: int,
    bfloat16: bool,
    device: torch.device,
) -> torch.Tensor:
    unit = 2.0**-24
    gamma = dim * unit / (1.0 - dim * unit)
    reduced = torch.get_float32_matmul_precision() != "highest"
    if device.type == "cuda":
        reduced = reduced or torch.backends.cuda.matmul.allow_tf32
    input_rounding = 2.0**-8 if (reduced or bfloat16) else 0.0  # bf16: the coarsest in use
    output_rounding = 2.0**-8 if bfloat16 else 0.0
    inflation = (1.0 + input_rounding) ** 2
    factor = 2.0 * input_rounding + input_rounding**2 + gamma * inflation
    factor += output_rounding * (1.0 + gamma) * inflation
    bound = 2.0 * factor * query_norms * max_norm
    bound += dim * 2.0**-126 * (1.0 + query_norms + max_norm)
    return bound.float()


def bfloat16_filter_bound(
    queries: torch.Tensor, norms: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Bound [Q] float32 on |v - q.c| for the bf16 filter GEMM, v its fp32 accumulator.

    ~4x tighter than ``score_error_bound(bfloat16=True)``, for two reasons. Input rounding:
    q.c - q~.c~ = q.r_c + r_q.c~ with r = x - bf16(x), and |r_c| <= 2^-8 |c| (round to
    nearest) while r_q is measured, so |.| <= 2^-8 |q| max|c| + |r_q| max|c~| instead of
    2^-7 |q| max|c|. Output rounding needs no margin: round-to-nearest is monotone, so
    v >= t implies bf16(v) >= bf16(t), and the filter compares against a key rounded down to
    bf16. Accumulation (gamma_D) and subnormal terms are as in ``score_error_bound``.

    Args:
        queries: [Q, D] float32.
        norms: (|q| [Q] float64, max_n |c_n|) from ``norms`` (inflated for float32 rounding).
    """
    dim = queries.shape[1]
    unit, bfloat16_unit = 2.0**-24, 2.0**-8
    gamma = dim * unit / (1.0 - dim * unit)
    query_norms, max_norm = norms
    max_norm16 = max_norm * (1.0 + bfloat16_unit)  # |c~| <= (1 + 2^-8) |c|, same for q~
    query_residuals = 1.001 * (queries - queries.bfloat16().float()).norm(dim=1).double()
    bound = bfloat16_unit * query_norms * max_norm + query_residuals * max_norm16
    bound += gamma * query_norms * (1.0 + bfloat16_unit) * max_norm16
    bound += dim * 2.0**-126 * (1.0 + query_norms + max_norm16)
    return (1.01 * bound).float()  # 1.01: slack for rounding in the bound's own arithmetic


def resolve_filter_precision(
    corpus: torch.Tensor, filter_precision: FilterPrecision, corpus_chunk: int
) -> Literal["bfloat16", "float32"]:
    """``trainer.mips.resolved_filter_precision``: decided here so that its one-off timing runs
    under the sweep's intra-op thread setting."""
    if filter_precision == "float32" or corpus.device.type != "cpu":
        return "float32"  # GPU bf16 GEMMs may reduce in bf16: the error bound would not hold
    if filter_precision == "auto":
        if corpus.shape[0] < 4 * corpus_chunk or not _bfloat16_matmul_is_faster():
            return "float32"
    return "bfloat16"


def bfloat16_corpus(corpus: torch.Tensor) -> torch.Tensor:
    """bf16 copy [N, D] of the corpus for the bf16 pre-filter."""
    _silence_sparse_csr_beta_warning()
    return corpus.bfloat16()


@functools.cache
def _silence_sparse_csr_beta_warning() -> None:
    """torch warns once per process that sparse CSR is beta; use up that warning, silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        empty = torch.zeros(0, dtype=torch.int64)
        torch.sparse_csr_tensor(
            torch.zeros(2, dtype=torch.int64), empty, torch.zeros(0), size=(1, 1)
        )


@functools.cache
def _bfloat16_matmul_is_faster() -> bool:
    """Whether this CPU multiplies bf16 well (native bf16 dot products): timed once."""
    left, right = torch.randn(256, 64), torch.randn(8192, 64)
    out32, out16 = torch.empty(256, 8192), torch.empty(256, 8192, dtype=torch.bfloat16)
    left16, right16 = left.bfloat16(), right.bfloat16()

    def best_time(run: Callable[[], object]) -> float:
        times = []
        for _ in range(5):
            begin = time.perf_counter()
            run()
            times.append(time.perf_counter() - begin)
        return min(times)

    float32_s = best_time(lambda: torch.mm(left, right.T, out=out32))
    bfloat16_s = best_time(lambda: torch.mm(left16, right16.T, out=out16))
    logger.debug("matmul float32 %.2e s, bfloat16 %.2e s", float32_s, bfloat16_s)
    return bfloat16_s * 1.4 < float32_s
