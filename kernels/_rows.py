"""``@triton.jit`` helpers shared by the row-wise loss kernels (:mod:`.cosine_align`, :mod:`.kl`).

Those kernels own a tile of ``BLOCK_M`` rows of two (M, D) inputs, loop over D in ``BLOCK_D``
chunks accumulating in fp32, and write a weighted per-row loss plus 3 fp32 stats per row.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_tile(M, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(rows (BLOCK_M,) int64, row_ok (BLOCK_M,), cols (BLOCK_D,) int64) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    return rows, rows < M, tl.arange(0, BLOCK_D).to(tl.int64)


@triton.jit
def load_pair(A, B, rows, c, msk, stride_am, stride_ad, stride_bm, stride_bd):
    """The (BLOCK_M, BLOCK_D) tiles of A and B at (rows, c) in fp32 (0 outside ``msk``)."""
    a = tl.load(A + rows[:, None] * stride_am + c[None, :] * stride_ad, mask=msk, other=0.0).to(tl.float32)
    b = tl.load(B + rows[:, None] * stride_bm + c[None, :] * stride_bd, mask=msk, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def weighted(v, W, rows, row_ok, HAS_WEIGHT: tl.constexpr):
    """``v * W[rows]`` (0 for rows past M) when HAS_WEIGHT, else ``v``."""
    if HAS_WEIGHT:
        v = v * tl.load(W + rows, mask=row_ok, other=0.0)
    return v


@triton.jit
def store_row_loss(ROWLOSS, STATS, W, rows, row_ok, loss, s0, s1, s2, HAS_WEIGHT: tl.constexpr, NSTATS: tl.constexpr):
    """ROWLOSS[rows] = loss (weighted when HAS_WEIGHT); STATS[rows, :3] = (s0, s1, s2), STATS (M, NSTATS) fp32."""
    tl.store(ROWLOSS + rows, weighted(loss, W, rows, row_ok, HAS_WEIGHT), mask=row_ok)
    tl.store(STATS + rows * NSTATS, s0, mask=row_ok)
    tl.store(STATS + rows * NSTATS + 1, s1, mask=row_ok)
    tl.store(STATS + rows * NSTATS + 2, s2, mask=row_ok)
