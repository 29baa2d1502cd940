"""Asking L2 for a decode program's next packed codes before it loads them.

The M = 16 tensor-core decode kernel fits two programs an SM (about 200 registers a thread), and
each waits on one step's codes at a time: session 17's profile put long-scoreboard stalls first
at 12% occupancy. A register prefetch of the next step (``pipelines/layout_study.py``) cost more in
layout conversions and registers than it hid. ``prefetch.global.L2`` writes no register: one
128-byte line a thread, the rows of a later step requested while the program works on this one,
its own loads (or TMA copies) of that step then served from L2.

Measured on an H200 at 8192^2 (``pipelines/prefetch_study.py``, session 18): with the codes through
TMA at three stages, one step ahead took M = 16 w4g128 from 29.5 to 24.4 us. The paired-fp16 M = 1
kernels only lost by it (w4g128: 13.2 -> 14.4 us one step ahead), as they did with ``cp.async.bulk.prefetch``,
whose warp-uniform address ptxas issues one lane at a time; so only the tensor-core kernel takes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from .tiling import aligned_code_rows
from .tuning import interpreting

if TYPE_CHECKING:
    from .tuning import Config

LINE = 128  # bytes a prefetch asks for


@triton.jit
def prefetch_rows(row0_ptr, rows, stride_bytes, ROW_BYTES: tl.constexpr, MAX_ROWS: tl.constexpr):
    """The program asks L2 for the ``ROW_BYTES`` bytes at ``row0_ptr + r * stride_bytes`` for
    ``r < rows <= MAX_ROWS`` (addresses and ``ROW_BYTES`` multiples of 128): thread ``t`` takes
    line ``t % LINES`` of row ``t // LINES``, as many passes as one warp would need."""
    tl.static_assert(ROW_BYTES % 128 == 0, "rows of whole 128-byte lines")
    LINES: tl.constexpr = ROW_BYTES // 128
    for p in tl.static_range(triton.cdiv(MAX_ROWS * LINES, 32)):
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .u32 t, n, r; .reg .u64 a, b; "
            f"mov.u32 t, %tid.x; mov.u32 n, %ntid.x; mad.lo.u32 t, n, {p}, t; div.u32 r, t, {LINES}; "
            f"rem.u32 t, t, {LINES}; setp.lt.u32 p, r, $2; mad.wide.u32 a, r, $3, $1; mul.wide.u32 b, t, 128; "
            "add.u64 a, a, b; @p prefetch.global.L2 [a]; mov.u32 $0, 0; }",
            "=r,l,r,r", [row0_ptr, rows, stride_bytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_code_rows(qw_ptr, row0, rows, row_end, col0, stride_qk, BLOCK_N: tl.constexpr, MAX_ROWS: tl.constexpr,
                       ON: tl.constexpr):
    """With ``ON``, ask L2 for int32 code rows ``row0 .. row0 + rows`` (cut at ``row_end``) of the
    ``BLOCK_N`` columns from ``col0`` (N-major codes, row stride ``stride_qk`` words). A hint with
    no result: off under the interpreter, which cannot run PTX, so a kernel computes the same
    with it on or off."""
    if ON:
        prefetch_rows(qw_ptr + row0 * stride_qk + col0, tl.maximum(tl.minimum(rows, row_end - row0), 0),
                      stride_qk * 4, BLOCK_N * 4, MAX_ROWS)


def prefetch_steps(cfg: Config, qweight: torch.Tensor, N: int) -> int:
    """``cfg.prefetch`` where a launch can take it, else 0: on the GPU, over N-major codes whose
    rows of a tile are whole 128-byte lines from a 16-byte aligned start (no partial last tile)."""
    whole = N % cfg.block_n == 0 and cfg.block_n * 4 % LINE == 0
    return cfg.prefetch if aligned_code_rows(qweight) and whole and not interpreting() else 0
