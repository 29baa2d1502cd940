"""Cross-layer L2 prefetch: a decode matmul, as each of its programs finishes, asks L2 for its
share of the next packed matmul's weights.

At batch 1 a decode step alternates packed matmuls, which stream their weights from DRAM, with
attention, norms, rotary embedding and launch gaps, during which DRAM idles: on an H200 a 7B w4g128
step spent 1441 of its 2284 µs in the packed matmuls (session 9, ``bench_generate.py --profile``).
Every call also pays a fixed ~4.7 µs (ramp-up, one wave's DRAM latency, the split-K reduction) in
which DRAM is far from busy. The weights are frozen and the order of the matmuls is fixed, so the
next matmul's bytes are known in advance: requested at the end of one matmul, they arrive in L2
while the work in between runs, and the next matmul reads them at L2 latency and bandwidth.

``prefetch.global.L2`` is a hint: it has no result, moves no data into registers and cannot fault
on a valid address, so a program issues its lines and exits. What is prefetched is capped
(:data:`PREFETCH_CAP_BYTES`) well below the 50 MB L2 of an H100 / H200, so that the lines are
still there when the next matmul reads them. The CPU interpreter cannot run assembly; there the
prefetch is left out, which changes nothing a kernel computes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

LINE_BYTES = 128
PREFETCH_CAP_BYTES = 24 << 20
"""At most this many bytes of the next matmul are requested: half of an H100 / H200's L2, so the
current matmul's own streaming and the kernels in between leave them in place. A 7B model's
gate/up weights at w4g128 are 45 MB: their first 24 MB come from L2, the rest from DRAM."""
SLOTS = 3
"""Tensors a launch can prefetch: the next layer's scales, zero points and codes."""


@triton.jit
def prefetch_l2(ptr, nbytes, pid, nprog, BLOCK: tl.constexpr):
    """Program ``pid`` of ``nprog`` requests its share of the ``nbytes`` bytes at ``ptr`` into
    L2, one 128-byte line per thread and instruction (``BLOCK`` threads)."""
    base = ptr.to(tl.pointer_type(tl.int8))
    lines = tl.cdiv(nbytes, 128)
    per_program = tl.cdiv(lines, nprog)
    lo = pid * per_program
    hi = tl.minimum(lo + per_program, lines)
    for start in range(lo, hi, BLOCK):
        line = tl.minimum(start + tl.arange(0, BLOCK), hi - 1)  # past the end: the last line again
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                  [base + line.to(tl.int64) * 128], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_l2_bulk(ptr, nbytes, pid, nprog, BLOCK: tl.constexpr):
    """:func:`prefetch_l2` through Hopper's bulk copy engine (``cp.async.bulk.prefetch.L2``),
    one 4 KB piece per thread and instruction; ``nbytes`` and ``ptr`` 16-byte aligned."""
    base = ptr.to(tl.pointer_type(tl.int8))
    pieces = tl.cdiv(nbytes, 4096)
    per_program = tl.cdiv(pieces, nprog)
    lo = pid * per_program
    hi = tl.minimum(lo + per_program, pieces)
    for start in range(lo, hi, BLOCK):
        piece = start + tl.arange(0, BLOCK)
        size = tl.where(piece < hi, tl.minimum(nbytes - piece * 4096, 4096), 0)
        tl.inline_asm_elementwise(
            "{\n\t.reg .pred p;\n\tsetp.gt.s32 p, $2, 0;\n\t@p cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;\n\t}",
            "=r,l,r", [base + tl.minimum(piece, hi - 1).to(tl.int64) * 4096, size], dtype=tl.int32, is_pure=False,
            pack=1)


LINES = 1
"""``prefetch.global.L2``, a 128-byte line per instruction (any CUDA GPU)."""
BULK = 2
"""``cp.async.bulk.prefetch.L2``, 4 KB per instruction (Hopper and later)."""


@triton.jit
def prefetch_next(pf0, n0, pf1, n1, pf2, n2, pid, nprog, BLOCK: tl.constexpr, MODE: tl.constexpr):
    """Prefetch the three slots of :func:`prefetch_args` (empty slots have 0 bytes) by
    :data:`LINES` or :data:`BULK`."""
    if MODE == 2:
        prefetch_l2_bulk(pf0, n0, pid, nprog, BLOCK)
        prefetch_l2_bulk(pf1, n1, pid, nprog, BLOCK)
        prefetch_l2_bulk(pf2, n2, pid, nprog, BLOCK)
    else:
        prefetch_l2(pf0, n0, pid, nprog, BLOCK)
        prefetch_l2(pf1, n1, pid, nprog, BLOCK)
        prefetch_l2(pf2, n2, pid, nprog, BLOCK)


def prefetch_args(tensors: Sequence[torch.Tensor] | None, fallback: torch.Tensor,
                  cap: int = PREFETCH_CAP_BYTES) -> tuple[list, bool]:
    """Kernel arguments ``[ptr0, bytes0, ptr1, bytes1, ptr2, bytes2]`` for up to :data:`SLOTS`
    contiguous tensors, in order, at most ``cap`` bytes in all (the first tensors whole, the
    one that crosses the cap cut), and whether there is anything to prefetch; empty slots point
    at ``fallback`` with 0 bytes."""
    tensors = list(tensors or [])
    if len(tensors) > SLOTS:
        raise ValueError(f"at most {SLOTS} tensors can be prefetched, not {len(tensors)}")
    args: list = []
    left = cap
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("prefetched tensors must be contiguous (one byte range each)")
        nbytes = min(t.numel() * t.element_size(), left)
        left -= nbytes
        args += [t, nbytes]
    args += [fallback, 0] * (SLOTS - len(tensors))
    return args, cap > left
