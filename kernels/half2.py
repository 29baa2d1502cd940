"""Paired-fp16 decode kernel for M = 1..8: two weights per 32-bit instruction (fp16 x, 2/3/4-bit codes).

The float32 M = 1 kernel (``gemv._dq_gemv1_kernel``) spends a shift, an and-or and an FMA on
every weight, ~3.9 SASS instructions per weight in all, and on an H200 its issue time is as long
as its DRAM time. Here every instruction works on a pair of fp16 numbers in one 32-bit register:

* A packed word holds ``32/b`` codes along K, codes ``i`` in its low half and ``i + 16/b`` in its
  high half. ``(w >> shift) & mask | 0x64006400`` turns one b-bit field of each half into the
  fp16 pair ``(1024 + m q_i, 1024 + m q_{i+16/b})`` (0x6400 is 1024, whose fp16 spacing is 1):
  ``m = 1`` for the field at bit 0 ("even"), ``m = 2^b`` for the field at bit b ("odd"), so one
  shift serves two fields (4-bit: one shift per word, 2-bit: three).
* One ``fma.f16x2`` scales by ``2^-8 / m`` and adds ``-(4 / m + z / 256)``: the result
  ``(q - z) / 256`` is exact (every term is a multiple of 2^-8 at most 4 in size).
* One ``fma.f16x2`` multiplies by the x pair ``(x[k + i], x[k + i + 16/b])`` and accumulates.

Per word that is 13 (4-bit, 8 weights) or 27 (2-bit, 16 weights) instructions, of which only the
x fma repeats for further x rows. In the sm_90 SASS, x pairs and widening included: 2.3-2.4
instructions per weight at M = 1, 1.7-2.1 per weight and row at M = 2..8 (the float32 M = 1
kernel: 3.7-3.9). The fp16 sums are widened to float32 every ``FLUSH`` word rows, chosen so that
a lane's sum, ``FLUSH * 16/b`` products of at most ``(2^b - 1) / 256 |x|``, stays below ``|x|``:
it cannot overflow, and its rounding (2^-11 relative) is that of an fp16 result.

3-bit codes form a dense stream (32 values in 3 words) whose fields never sit 16 bits apart; a
byte permute brings values a and a + 8 (same bit of bytes three apart) into the two halves first,
left at their bit offset, which per-offset fma constants absorb, the zero point folded per step
(:func:`_step_dot3`): 2.44 SASS instructions per weight at M = 1 (2.82 with a shift per pair and
the zero point in the fma, 13.9 µs at 8192^2 on an H200) against 3.75 for the float32 kernel.

Triton emits no ``fma.f16x2`` or ``prmt`` on packed registers, so :func:`fma_h2` and :func:`prmt`
are inline PTX on the GPU and emulations (unpack, fp16 arithmetic, repack; byte moves) under the
CPU interpreter, which cannot run assembly (``EMULATE``). Everything else is written once, in
plain Triton, and checked on the CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from efficientqat.fused_mlp import silu_mul_interleaved
from efficientqat.packing import chunk_values

from .prologue import NO_ROW_OPS, RowOps, launch_rows, normalize_steps
from .tiling import (add_bias, add_in_first_slice, decode_output, group_strides, launch_options, launcher,
                     release_next_grid, store_decode, wait_for_previous_grid)
from .tuning import HALF2_BITS, Config, interpreting

MAGIC = 0x64006400
"""The fp16 pair (1024, 1024). Kernels take it as a run-time argument: as a compile-time constant
next to the field mask, ptxas re-materialises one of the two before every lop3 (one MOV per
pair: 2.8 instead of 2.2 instructions per weight in the sm_90 SASS)."""


@triton.jit
def unpack_h2(h2):
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
        al, ah = unpack_h2(a)
        bl, bh = unpack_h2(b)
        cl, ch = unpack_h2(c)
        return _pack(al * bl + cl, ah * bh + ch)
    else:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def prmt(a, b, SEL: tl.constexpr, EMULATE: tl.constexpr):
    """Byte permute (``prmt.b32``): output byte i is byte ``(SEL >> 4i) & 7`` of the 8 bytes
    ``b:a`` (a's bytes 0-3, b's 4-7); int32 tensors of one shape."""
    if EMULATE:
        out = tl.zeros(a.shape, tl.int32)
        for i in tl.static_range(4):
            src: tl.constexpr = (SEL >> (4 * i)) & 7
            word = a if src < 4 else b
            out |= ((word >> (8 * (src % 4))) & 0xFF) << (8 * i)
        return out
    else:
        return tl.inline_asm_elementwise(f"prmt.b32 $0, $1, $2, {SEL};", "=r,r,r", [a, b],
                                         dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _x_pair(xw_rows, mask_m, row, i: tl.constexpr, HV: tl.constexpr, X_PAIRED: tl.constexpr, EMULATE: tl.constexpr):
    """Per x row, the fp16 pair ``(x[k + i], x[k + i + HV])`` of word row ``row``
    (``k = row * 2 HV``); ``xw_rows`` points at each row's first 32-bit word, rows past M read
    zeros. ``X_PAIRED``: x comes as :func:`pair_x` made it, the pair is word ``row * HV + i``.
    Otherwise from the int32 view of x: value j sits in word ``j // 2``, low half for even j (two
    loads and one byte permute a pair, which every thread repeats for every x row; the masks and
    shift they replace took two instructions a pair in the sm_90 SASS)."""
    if X_PAIRED:
        return tl.load(xw_rows + (row * HV + i), mask=mask_m, other=0)
    else:
        a = tl.load(xw_rows + (row * HV + i // 2), mask=mask_m, other=0)
        b = tl.load(xw_rows + (row * HV + HV // 2 + i // 2), mask=mask_m, other=0)
        return prmt(a, b, 0x5410 if i % 2 == 0 else 0x7632, EMULATE)  # (a.lo, b.lo) or (a.hi, b.hi)


def half_values(bits: int) -> int:
    """Distance between the two codes of a pair: the codes per 16-bit half word (2/4-bit), 8 for
    3-bit (values a and a + 8 of a 32-value chunk, see :func:`_step_dot3`)."""
    return 8 if bits == 3 else 16 // bits


def pair_x(x: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 ``x [M, K]`` as int32 ``[M, K / 2]`` in the kernel's pair order: word ``r HV + i``
    holds ``(x[r 2HV + i], x[r 2HV + HV + i])``, ``HV =`` :func:`half_values`: one permute launch that
    spares every thread rebuilding the pairs of every row."""
    hv = half_values(bits)
    M, K = x.shape
    return x.view(M, K // (2 * hv), 2, hv).transpose(2, 3).contiguous().view(torch.int32).view(M, K // 2)


@triton.jit
def _step_words(qw_ptr, row0, offs_n, mask_n, stride_qk, BLOCK_C: tl.constexpr, EVEN_N: tl.constexpr,
                BITS: tl.constexpr):
    """The word rows of ``BLOCK_C`` chunks from chunk ``row0`` (one word a chunk, three for 3-bit)
    as a tuple of ``[1, BLOCK_N]`` tensors, requested together before any is used (a program can
    issue them before waiting for the previous grid)."""
    WORDS: tl.constexpr = 3 if BITS == 3 else 1
    words = ()
    for c in tl.static_range(BLOCK_C * WORDS):
        ptrs = qw_ptr + (row0 * WORDS + c) * stride_qk + offs_n
        if EVEN_N:  # a masked vector load first zeroes its registers: two extra instructions
            words = words + (tl.load(ptrs),)
        else:
            words = words + (tl.load(ptrs, mask=mask_n, other=0),)
    return words


@triton.jit
def _group_row(s_ptr, z_ptr, g, offs_n, stride_g, stride_gn, mask_n):
    """Group ``g``'s scales (float32) and zero points (int32, as stored: the fp16 offsets are
    built from the integer, :func:`_step_dot`) for the ``[1, BLOCK_N]`` columns ``offs_n``."""
    s = tl.load(s_ptr + g * stride_g + offs_n * stride_gn, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * stride_g + offs_n * stride_gn, mask=mask_n, other=0).to(tl.int32)
    return s, z


@triton.jit
def pair_constants(z, magic, BITS: tl.constexpr, EMULATE: tl.constexpr):
    """``(ce, co, ze, zo)`` in ``z``'s shape (int32 zero points): the fp16-pair scales of the even
    and odd fields and the offsets that :func:`field_pairs` needs to make ``(q - z) / 256`` of them."""
    # scale 2^-8 / m as fp16 pairs: 2^-8 for even fields, 2^-12 (4-bit) / 2^-10 (2-bit) for odd ones
    ODD_SCALE: tl.constexpr = 0x0C000C00 if BITS == 4 else 0x14001400
    ODD_SHIFT: tl.constexpr = 0x43804380 if BITS == 4 else 0x42004200  # 4 - 1024 * 2^-8 / m: 3.75 / 3.0
    ce = tl.full(z.shape, 0x1C001C00, tl.int32)
    co = tl.full(z.shape, ODD_SCALE, tl.int32)
    # offsets -(z / 256 + 4) and -(z / 256 + ODD_BASE) from the pair (1024 + z, 1024 + z) by one fma
    # each: (1024 + z) * -2^-8 = -(4 + z / 256), exact in fp16 (the float route took ~12
    # instructions a column: conversions, negation, packing)
    z_pair = z * 0x10001 | magic
    return ce, co, zero_offset(z_pair, 0, EMULATE), zero_offset(z_pair, ODD_SHIFT, EMULATE)


@triton.jit
def zero_offset(z_pair, SHIFT: tl.constexpr, EMULATE: tl.constexpr):
    """``(1024 + z) * -2^-8 + SHIFT`` (fp16 pairs; ``z_pair`` holds ``1024 + z``): ``SHIFT - 4 -
    z / 256``, the offset an ``fma.f16x2`` adds to an and-or pair ``1024 + m q`` scaled by
    ``2^-8 / m`` to make ``(q - z) / 256``, with ``SHIFT`` = ``4 - 4 / m``."""
    return fma_h2(z_pair, tl.full(z_pair.shape, 0x9C009C00 - (1 << 32), tl.int32),
                  tl.full(z_pair.shape, SHIFT, tl.int32), EMULATE)


@triton.jit
def field_pairs(w, shift: tl.constexpr, ce, co, ze, zo, magic, BITS: tl.constexpr, EMULATE: tl.constexpr):
    """The fp16 pairs ``(q - z) / 256`` of the two b-bit fields of each half word of ``w`` at bits
    ``shift`` ("even") and ``shift + b`` ("odd"), constants from :func:`pair_constants`."""
    EVEN_MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    ODD_MASK: tl.constexpr = EVEN_MASK << BITS
    s = w >> shift  # arithmetic: the fields taken stay below bit 16 + 2b <= 24
    even = fma_h2((s & EVEN_MASK) | magic, ce, ze, EMULATE)
    odd = fma_h2((s & ODD_MASK) | magic, co, zo, EMULATE)
    return even, odd


@triton.jit
def _step_dot(words, xw_rows, mask_m, z, row0, magic,
              BITS: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE: tl.constexpr, X_PAIRED: tl.constexpr):
    """``sum_k x[m, k] (q[k, n] - z[n])`` (float32 ``[BLOCK_M, BLOCK_N]``) over the ``BLOCK_C``
    word rows ``words`` (:func:`_step_words` from ``row0``); ``z``: int32 zero points (:func:`_group_row`);
    ``magic`` is :data:`MAGIC`. Column
    tensors come in as ``[1, BLOCK_N]`` and x rows as ``[BLOCK_M, 1]``: every tensor then shares
    the words' blocked layout (all rows in each thread), where 1-D operands broadcast to 2-D took
    a shared-memory round trip per pair."""
    HV: tl.constexpr = 16 // BITS  # codes per 16-bit half word
    LIMIT: tl.constexpr = 4 if BITS == 4 else 8  # FLUSH * HV * (2^b - 1) <= 256
    FLUSH: tl.constexpr = BLOCK_C if BLOCK_C < LIMIT else LIMIT
    ce, co, ze, zo = pair_constants(z, magic, BITS, EMULATE)
    shape: tl.constexpr = (xw_rows.shape[0], z.shape[1])
    part = tl.zeros(shape, dtype=tl.float32)
    for c0 in tl.static_range(0, BLOCK_C, FLUSH):
        h = tl.zeros(shape, dtype=tl.int32)  # the fp16 pair (0, 0)
        for c in tl.static_range(c0, c0 + FLUSH):
            row = row0 + c
            w = words[c]
            for shift in tl.static_range(0, 16, 2 * BITS):
                even, odd = field_pairs(w, shift, ce, co, ze, zo, magic, BITS, EMULATE)
                x_even = _x_pair(xw_rows, mask_m, row, shift // BITS, HV, X_PAIRED, EMULATE)
                x_odd = _x_pair(xw_rows, mask_m, row, shift // BITS + 1, HV, X_PAIRED, EMULATE)
                h = fma_h2(tl.broadcast_to(even, shape), tl.broadcast_to(x_even, shape), h, EMULATE)
                h = fma_h2(tl.broadcast_to(odd, shape), tl.broadcast_to(x_odd, shape), h, EMULATE)
        lo, hi = unpack_h2(h)
        part += lo.to(tl.float32) + hi.to(tl.float32)
    return part * 256.0


@triton.jit
def _pair3(lo_word, hi_word, A: tl.constexpr, HALF: tl.constexpr, EMULATE: tl.constexpr):
    """3-bit values ``a = A + 16 HALF`` and ``a + 8`` of a chunk, from the words holding them
    (words 0:1 for HALF 0, 1:2 for HALF 1), in place at bits ``OFF..OFF + 2`` (``OFF = 3A mod 8``,
    at most bit 9) of the low and high half: no shift, the caller's scale absorbs ``2^OFF``."""
    BIT: tl.constexpr = 3 * A + 16 * HALF  # value a's bit, counted from lo_word's bit 0
    BYTE: tl.constexpr = BIT // 8
    OFF: tl.constexpr = BIT % 8
    BYTE2: tl.constexpr = BYTE + 1 if OFF > 5 else BYTE  # the field crosses into the next byte
    SEL: tl.constexpr = BYTE | (BYTE2 << 4) | ((BYTE + 3) << 8) | ((BYTE2 + 3) << 12)
    return prmt(lo_word, hi_word, SEL, EMULATE) & (0x00070007 << OFF)


@triton.jit
def unit3(lo_word, hi_word, A: tl.constexpr, HALF: tl.constexpr, magic, SHAPE: tl.constexpr, EMULATE: tl.constexpr):
    """The fp16 pair ``(q_a / 256, q_{a+8} / 256)`` of :func:`_pair3`: ``1024 + 2^OFF q`` times
    ``2^(-8 - OFF)`` plus ``-2^(2 - OFF)``, both exact (2^-15 is an fp16 subnormal, 0x0200)."""
    OFF: tl.constexpr = (3 * A) % 8
    SCALE: tl.constexpr = ((7 - OFF) << 10 if OFF < 7 else 0x0200) * 0x10001
    BASE: tl.constexpr = (0x8000 | ((17 - OFF) << 10)) * 0x10001 - (1 << 32)  # sign bits set: as int32
    scale = tl.full(SHAPE, SCALE, tl.int32)
    base = tl.full(SHAPE, BASE, tl.int32)
    return fma_h2(_pair3(lo_word, hi_word, A, HALF, EMULATE) | magic, scale, base, EMULATE)


@triton.jit
def _step_dot3(words, xw_rows, mask_m, z, row0, magic,
               BLOCK_C: tl.constexpr, EMULATE: tl.constexpr, X_PAIRED: tl.constexpr):
    """:func:`_step_dot` for 3-bit chunks (32 values in 3 words, a dense bit stream). Value a sits
    at stream bit 3a and value a + 8 at 3a + 24: the same bit of the byte three further on. One
    ``prmt`` takes bytes (B, B + 1) and (B + 3, B + 4) of a word pair into the low and high half,
    so the pair (a, a + 8) lands at the same offset ``OFF`` in both halves (:func:`_pair3`): pairs
    a = 0..7 from words 0:1, a = 16..23 from words 1:2. The lop3 of the 2/4-bit kernel makes it
    ``(1024 + 2^OFF q)`` and one ``fma.f16x2`` by constants of ``OFF`` alone gives ``q / 256``
    exactly; the zero point is not in that fma (it would take one register per ``OFF`` and
    column) but folded per step: ``sum x (q - z) = sum x q - z sum x``, with ``sum x / 256``
    accumulated per x row like the products. Four instructions a pair, x fma included."""
    shape: tl.constexpr = (xw_rows.shape[0], z.shape[1])
    inv256 = tl.full(xw_rows.shape, 0x1C001C00, tl.int32)  # 2^-8
    FLUSH: tl.constexpr = 1 if BLOCK_C < 2 else 2  # FLUSH * 16 pairs * 7 <= 256
    part = tl.zeros(shape, dtype=tl.float32)
    x_sum = tl.zeros(xw_rows.shape, dtype=tl.float32)
    for c0 in tl.static_range(0, BLOCK_C, FLUSH):
        h = tl.zeros(shape, dtype=tl.int32)
        hx = tl.zeros(xw_rows.shape, dtype=tl.int32)
        for c in tl.static_range(c0, c0 + FLUSH):
            for half in tl.static_range(2):
                lo_word = words[3 * c + half]
                hi_word = words[3 * c + half + 1]
                for a in tl.static_range(8):
                    w = unit3(lo_word, hi_word, a, half, magic, z.shape, EMULATE)
                    xp = _x_pair(xw_rows, mask_m, 2 * (row0 + c) + half, a, 8, X_PAIRED, EMULATE)
                    h = fma_h2(tl.broadcast_to(w, shape), tl.broadcast_to(xp, shape), h, EMULATE)
                    hx = fma_h2(xp, inv256, hx, EMULATE)
        lo, hi = unpack_h2(h)
        part += lo.to(tl.float32) + hi.to(tl.float32)
        lo, hi = unpack_h2(hx)
        x_sum += lo.to(tl.float32) + hi.to(tl.float32)
    return (part - x_sum * z.to(tl.float32)) * 256.0


@triton.jit
def _chunk_dot(words, xw_rows, mask_m, z, row0, magic,
               BITS: tl.constexpr, BLOCK_C: tl.constexpr, EMULATE: tl.constexpr, X_PAIRED: tl.constexpr):
    """One step's ``sum_k x (q - z)``: :func:`_step_dot3` for 3-bit chunks, else :func:`_step_dot`."""
    if BITS == 3:
        return _step_dot3(words, xw_rows, mask_m, z, row0, magic, BLOCK_C, EMULATE, X_PAIRED)
    else:
        return _step_dot(words, xw_rows, mask_m, z, row0, magic, BITS, BLOCK_C, EMULATE, X_PAIRED)


@triton.jit
def _dq_gemv_half2_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, h_ptr, g_ptr, res_ptr, stride_h, stride_res, eps,
    M, N, K, stride_xw, stride_qk, stride_qn, stride_g, stride_gn, stride_ym, magic,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr, EMULATE: tl.constexpr, FIXUP: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
    ONE_STEP: tl.constexpr,
    X_PAIRED: tl.constexpr, ACT: tl.constexpr, LANES: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
):
    """M <= BLOCK_M rows on the CUDA cores: each program streams a contiguous K range of a
    ``BLOCK_N`` column slice in steps of ``BLOCK_C`` word rows (inside one group), and every
    decoded pair of weights meets the x pairs of all rows. ``ONE_STEP``: split-K equals the
    step count. ``x_ptr`` is fp16 x or, with ``X_PAIRED``, :func:`pair_x` of it; ``stride_xw``
    is its row stride in 32-bit words. ``ACT``: the output is ``silu(gate) * up`` of the tile's
    interleaved columns (``tiling.silu_mul_interleaved``), ``N / 2`` wide.

    ``LANES`` > 1 (M = 1 only): a program sums ``LANES`` K steps side by side, lane ``l`` taking
    steps ``l, l + LANES, ...`` of its range, the lanes standing where the x rows do (each lane's
    x pointer and codes offset by its step), and adds the lanes up at the end in the program
    (``tl.sum``): K is split inside the program, so split-K across programs, with its atomics and
    the fence before the last program's reduction, can be small or gone.

    ``NORM``: x is RMSNorm(h) of the rows at ``h_ptr`` (weight ``g_ptr``), which the program
    writes for its K range into ``x_ptr`` first (:mod:`.prologue`); ``RESIDUAL``: the rows at
    ``res_ptr`` are added to the output."""
    BK: tl.constexpr = BLOCK_C * (32 if BITS == 3 else 32 // BITS)
    PAIR_HV: tl.constexpr = (8 if BITS == 3 else 16 // BITS) if X_PAIRED else 0  # x's pair order (pair_x)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)[:, None]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask_m = offs_m < M
    mask_n = offs_n < N
    n_steps = K // BK
    s_lo = pid_k * n_steps // SPLIT_K
    s_hi = (pid_k + 1) * n_steps // SPLIT_K
    cols = offs_n * stride_qn  # word offsets of the columns (1: the standard N-major codes)
    if LANES > 1:  # x rows stand for K lanes: lane l reads x and codes one step (BLOCK_C chunks) on
        lane = tl.arange(0, LANES)[:, None]
        xw_rows = x_ptr.to(tl.pointer_type(tl.int32)) + lane * (BLOCK_C * (16 if BITS == 3 else 16 // BITS))
        cols = cols + lane * (BLOCK_C * (3 if BITS == 3 else 1) * stride_qk)
        mask_x = lane < LANES
    else:
        lane = tl.zeros((1, 1), tl.int32)
        xw_rows = x_ptr.to(tl.pointer_type(tl.int32)) + offs_m * stride_xw
        mask_x = mask_m
    # EARLY (under PDL, a tuned choice): the first step's codes are requested before the wait for
    # the previous grid and the RMSNorm prologue, so that their DRAM latency runs under the previous
    # kernel's tail. It costs registers: the wait makes the compiler issue all of the step's loads
    # before it (sm_90 SASS, w2g64 2048 columns, 4 chunks, one step: 128 -> 205 registers, two
    # waves instead of one), and held through the prologue 56 -> 80 (q/k/v) and 72 -> 96 (gate/up).
    # On an H200 it won w2g64 2048 x 8 warps at 8192^2 (11.3 against 12.7 us chained) and lost
    # every w4g128 and w3g128 half2 tile swept there by 1-5 us (session 15), so the tuner times both.
    # PEEL: the first step outside the loop (all of them with ONE_STEP).
    PEEL: tl.constexpr = ONE_STEP or EARLY
    first = s_lo
    if EARLY:
        words = _step_words(qw_ptr, s_lo * BLOCK_C, cols, mask_n, stride_qk, BLOCK_C, EVEN_N, BITS)
    wait_for_previous_grid(PDL)
    normalize_steps(h_ptr, g_ptr, x_ptr, M, K, stride_h, eps, s_lo, s_hi, 1, BLOCK_M, BK, PAIR_HV, NORM, ROW_BLOCK)
    if PEEL:
        if not EARLY:
            words = _step_words(qw_ptr, s_lo * BLOCK_C, cols, mask_n, stride_qk, BLOCK_C, EVEN_N, BITS)
        s, z = _group_row(s_ptr, z_ptr, ((s_lo + lane) * BK) // GROUP, offs_n, stride_g, stride_gn, mask_n)
        acc = s * _chunk_dot(words, xw_rows, mask_x, z, s_lo * BLOCK_C, magic, BITS, BLOCK_C, EMULATE, X_PAIRED)
        first += LANES
    else:
        acc = tl.zeros((xw_rows.shape[0], BLOCK_N), dtype=tl.float32)
    if not ONE_STEP:
        for step in range(first, s_hi, LANES):
            words = _step_words(qw_ptr, step * BLOCK_C, cols, mask_n, stride_qk, BLOCK_C, EVEN_N, BITS)
            s, z = _group_row(s_ptr, z_ptr, ((step + lane) * BK) // GROUP, offs_n, stride_g, stride_gn, mask_n)
            acc += s * _chunk_dot(words, xw_rows, mask_x, z, step * BLOCK_C, magic, BITS, BLOCK_C, EMULATE, X_PAIRED)
    release_next_grid(PDL)
    if LANES > 1:
        acc = tl.sum(acc, axis=0)[None, :]
    acc = add_bias(acc, b_ptr, offs_n, mask_n, pid_k, HAS_BIAS)
    acc = add_in_first_slice(acc, res_ptr + offs_m * stride_res + offs_n, mask_m & mask_n, pid_k, RESIDUAL)
    if ACT:
        offs_y = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)[None, :]
        y_mask = mask_m & (offs_y < N // 2)
    else:
        offs_y = offs_n
        y_mask = mask_m & mask_n
    store_decode(y_ptr + offs_m * stride_ym + offs_y, y_mask, acc, mask_m & mask_n, ws_ptr + offs_m * N + offs_n,
                 count_ptr + pid_n, SPLIT_K, FIXUP, ACT)


def gemv_half2_forward(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, bits: int, group: int, cfg: Config, silu_mul: bool = False,
    ops: RowOps = NO_ROW_OPS,
) -> torch.Tensor:
    """``x [M <= cfg.block_m, K]`` fp16 -> ``[M, N]`` through the paired-fp16 kernel (2/3/4-bit
    codes); ``cfg.block_k`` is BLOCK_C (chunks per step, one step inside one group). With
    ``silu_mul``, of a gate/up layer in the interleaved column order (``ACT_BLOCK``):
    ``silu(gate) * up``, ``[M, N / 2]``. ``ops``: RMSNorm x first, add a residual (:mod:`.prologue`)."""
    M, K = x.shape
    N = qweight.shape[1]
    if x.dtype != torch.float16 or bits not in HALF2_BITS or M > cfg.block_m:
        raise ValueError(f"the paired-fp16 kernel takes fp16 x of at most {cfg.block_m} rows and {HALF2_BITS}-bit "
                         f"codes, not {x.dtype}, {M} rows, {bits}-bit")
    y, ws, count, fixup = decode_output(x, N, cfg, N // 2 if silu_mul else None)
    if silu_mul and cfg.split_k > 1 and not fixup:  # no workspace inside a capture: the epilogue in torch
        return silu_mul_interleaved(gemv_half2_forward(x, qweight, scales, zeros, bias, bits, group, cfg, ops=ops))
    # sm_90 SASS, per weight and row: 2.16 -> 1.65 at 8 rows, 1.75 -> 1.52 at 4, where the
    # permute launch (~2 us) would cost about what it saves
    paired = M > 4
    xs, row_args, row_constants = launch_rows(ops, x, pair_x(x, bits) if paired and ops.norm_weight is None else x,
                                              cfg.block_m)
    steps = K // (cfg.block_k * chunk_values(bits))
    if cfg.lanes > 1 and (M > 1 or cfg.block_m != 1 or steps % (cfg.split_k * cfg.lanes)):
        raise ValueError(f"K lanes take one x row and split-K x lanes dividing the {steps} steps, not M = {M}, "
                         f"split-K {cfg.split_k} x {cfg.lanes} lanes")
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    launcher(_dq_gemv_half2_kernel, grid)(
        xs, qweight, scales, zeros, bias if bias is not None else x, y, ws, count, *row_args,
        M, N, K, xs.stride(0) * xs.element_size() // 4, qweight.stride(0), qweight.stride(1),
        *group_strides(scales, zeros), y.stride(0), MAGIC,
        BITS=bits, GROUP=group, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_k, SPLIT_K=cfg.split_k,
        EVEN_N=N % cfg.block_n == 0, EMULATE=interpreting(), FIXUP=fixup, PDL=cfg.pdl,
        EARLY=cfg.pdl and cfg.early,
        ONE_STEP=steps == cfg.split_k * cfg.lanes, X_PAIRED=paired, ACT=silu_mul, LANES=cfg.lanes, **row_constants,
        num_warps=cfg.num_warps, **launch_options(cfg),
    )
    return y
