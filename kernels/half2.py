"""Paired-fp16 step of the M = 1 kernel: two weights per 32-bit instruction (fp16 x, 2/4-bit codes).

The float32 step (``gemv._dq_gemv1_kernel``) spends a shift, an and-or and an FMA on every weight,
~3.9 SASS instructions per weight in all, and on an H200 its issue time is as long as its DRAM
time. Here every instruction works on a pair of fp16 numbers held in one 32-bit register:

* A packed word holds ``32/b`` codes along K, codes ``i`` in its low half and ``i + 16/b`` in its
  high half. ``(w >> shift) & mask | 0x64006400`` turns one b-bit field of each half into the
  fp16 pair ``(1024 + m q_i, 1024 + m q_{i+16/b})`` (0x6400 is 1024, whose fp16 spacing is 1):
  ``m = 1`` for the field at bit 0 ("even"), ``m = 2^b`` for the field at bit b ("odd"), so one
  shift serves two fields (4-bit: one shift per word, 2-bit: three).
* One ``fma.f16x2`` scales by ``2^-8 / m`` and adds ``-(4 / m + z / 256)``: the result
  ``(q - z) / 256`` is exact (every term is a multiple of 2^-8 at most 4 in size).
* One ``fma.f16x2`` multiplies by the x pair ``(x[k + i], x[k + i + 16/b])`` and accumulates.

Per word that is 13 (4-bit, 8 weights) or 27 (2-bit, 16 weights) instructions; with the x pairs
and the widening, ~2.2-2.3 per weight in the sm_90 SASS. The fp16 sums are widened to float32
every ``FLUSH`` rows, chosen so that a lane's sum, ``FLUSH * 16/b`` products of at most
``(2^b - 1) / 256 |x|``, stays below ``|x|``: it cannot overflow, and its rounding (2^-11
relative) is that of an fp16 result.

Triton emits no ``fma.f16x2`` on packed registers, so :func:`fma_h2` is inline PTX on the GPU and
an emulation (unpack, fp16 arithmetic, repack) under the CPU interpreter, which cannot run
assembly (``EMULATE``). Everything else is written once, in plain Triton, and checked on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = 0x64006400
"""The fp16 pair (1024, 1024). Kernels take it as a run-time argument: as a compile-time constant
next to the field mask, ptxas re-materialises one of the two before every lop3 (one MOV per
pair: 2.8 instead of 2.2 instructions per weight in the sm_90 SASS)."""


@triton.jit
def _unpack(h2):
    """An int32 holding an fp16 pair -> (low, high) fp16."""
    lo = (h2 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = ((h2 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _pack(lo, hi):
    """Two fp16 tensors -> int32 holding the pair (low half first)."""
    return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def fma_h2(a, b, c, EMULATE: tl.constexpr):
    """``a * b + c`` on fp16 pairs packed in int32 tensors of one shape (``fma.rn.f16x2``)."""
    if EMULATE:
        al, ah = _unpack(a)
        bl, bh = _unpack(b)
        cl, ch = _unpack(c)
        return _pack(al * bl + cl, ah * bh + ch)
    else:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _splat_h2(v):
    """float32 tensor -> int32 tensor of fp16 pairs ``(v, v)``."""
    h = v.to(tl.float16)
    return _pack(h, h)


@triton.jit
def _x_pair(xw_ptr, row, i: tl.constexpr, HV: tl.constexpr):
    """The fp16 pair ``(x[k + i], x[k + i + HV])`` of word row ``row`` (``k = row * 2 HV``), from the
    int32 view of x: value j sits in word ``j // 2``, low half for even j."""
    a = tl.load(xw_ptr + row * HV + i // 2)
    b = tl.load(xw_ptr + row * HV + HV // 2 + i // 2)
    if i % 2 == 0:
        return (a & 0xFFFF) | (b << 16)
    else:
        return ((a >> 16) & 0xFFFF) | (b & -65536)


@triton.jit
def half2_step_dot(qw_ptr, x_ptr, z, row0, offs_n, mask_n, stride_qk, magic,
                   BITS: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_N: tl.constexpr, EMULATE: tl.constexpr):
    """``sum_k x[k] (q[k, n] - z[n])`` (float32, shaped like ``z``) over the ``BLOCK_C`` word rows
    from ``row0``, for fp16 x and 2/4-bit codes; ``magic`` is :data:`MAGIC`."""
    HV: tl.constexpr = 16 // BITS  # codes per 16-bit half word
    FLUSH: tl.constexpr = min(BLOCK_C, 4 if BITS == 4 else 8)  # FLUSH * HV * (2^b - 1) <= 256
    EVEN_MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    ODD_MASK: tl.constexpr = EVEN_MASK << BITS
    # scale 2^-8 / m as fp16 pairs: 2^-8 for even fields, 2^-12 (4-bit) / 2^-10 (2-bit) for odd ones
    ODD_SCALE: tl.constexpr = 0x0C000C00 if BITS == 4 else 0x14001400
    ODD_BASE: tl.constexpr = 0.25 if BITS == 4 else 1.0  # 1024 * 2^-8 / m
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    ce = tl.full(z.shape, 0x1C001C00, tl.int32)
    co = tl.full(z.shape, ODD_SCALE, tl.int32)
    ze = _splat_h2(-(z * (1.0 / 256) + 4.0))
    zo = _splat_h2(-(z * (1.0 / 256) + ODD_BASE))
    part = tl.zeros(z.shape, dtype=tl.float32)
    for c0 in tl.static_range(0, BLOCK_C, FLUSH):
        h = tl.zeros(z.shape, dtype=tl.int32)  # the fp16 pair (0, 0)
        for c in tl.static_range(c0, c0 + FLUSH):
            row = row0 + c
            if EVEN_N:  # a masked vector load first zeroes its registers: two extra instructions
                w = tl.load(qw_ptr + row * stride_qk + offs_n)
            else:
                w = tl.load(qw_ptr + row * stride_qk + offs_n, mask=mask_n, other=0)
            for shift in tl.static_range(0, 16, 2 * BITS):
                s = w >> shift  # arithmetic: the fields taken stay below bit 16 + 2b <= 24
                even = fma_h2((s & EVEN_MASK) | magic, ce, ze, EMULATE)  # codes shift/b (+ HV)
                odd = fma_h2((s & ODD_MASK) | magic, co, zo, EMULATE)  # codes shift/b + 1 (+ HV)
                h = fma_h2(even, tl.broadcast_to(_x_pair(xw_ptr, row, shift // BITS, HV), h.shape), h, EMULATE)
                h = fma_h2(odd, tl.broadcast_to(_x_pair(xw_ptr, row, shift // BITS + 1, HV), h.shape), h, EMULATE)
        lo, hi = _unpack(h)
        part += lo.to(tl.float32) + hi.to(tl.float32)
    return part * 256.0
