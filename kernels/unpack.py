"""In-kernel decoders for GPTQ-packed integer codes (shared by every kernel in this package).

The weights stay in the on-disk GPTQ(-v2) layout: ``qweight[K*b/32, N]`` holds column ``n``'s
codes as a little-endian bit stream along K. A tile ``[BLOCK_K, BLOCK_N]`` of codes is decoded by
pointing every row ``k`` at the word that holds it (``k*b // 32``) and shifting. Rows that share
a word load the same address: those repeats are served by L1 and cost an instruction, not DRAM
bandwidth, and they let Triton keep the plain 2-D blocked layout that ``tl.dot`` wants (a
``[words, values_per_word, N]`` expansion followed by a reshape would force a shared-memory
round trip for the layout change).

3-bit codes are GPTQ's dense stream: 32 values in 3 words, values 10 and 21 of each chunk
straddle a word boundary. Those are read from two words; all other rows load the same word
twice (again an L1 hit), which keeps the decode branch-free.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_codes(qw_ptr, offs_k, offs_n, stride_qk, mask_n, BITS: tl.constexpr):
    """Integer codes ``q[k, n]`` as int32 ``[len(offs_k), len(offs_n)]`` for absolute rows ``offs_k``.

    ``qw_ptr`` points at ``qweight[0, 0]``; ``offs_n`` are the columns' word offsets (column index
    times the column stride: 1 for N-major codes, the word rows for K-major ones).
    """
    if BITS == 3:
        bit = offs_k * 3
        shift = bit % 32
        w_lo = bit // 32
        w_hi = (bit + 2) // 32
        col = offs_n[None, :]
        lo = tl.load(qw_ptr + w_lo[:, None] * stride_qk + col, mask=mask_n[None, :], other=0)
        hi = tl.load(qw_ptr + w_hi[:, None] * stride_qk + col, mask=mask_n[None, :], other=0)
        # Logical shifts: an arithmetic right shift would smear the sign bit into bit 2 of
        # value 10 (stream bits 30..32).
        lo = lo.to(tl.uint32, bitcast=True)
        hi = hi.to(tl.uint32, bitcast=True)
        straddle = shift > 29
        up = tl.where(straddle, 32 - shift, 0).to(tl.uint32)
        v = (lo >> shift.to(tl.uint32)[:, None]) | tl.where(straddle[:, None], hi << up[:, None], 0)
        return (v & 7).to(tl.int32)
    else:
        PER_WORD: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        ptrs = qw_ptr + (offs_k // PER_WORD)[:, None] * stride_qk + offs_n[None, :]
        w = tl.load(ptrs, mask=mask_n[None, :], other=0)
        # An arithmetic shift is fine here: the mask drops the sign-extended bits.
        return (w >> ((offs_k % PER_WORD) * BITS)[:, None]) & MASK


@triton.jit
def load_group_row(s_ptr, z_ptr, g, offs_n, stride_g, stride_gn, mask_n):
    """Scale and zero point of group ``g`` for columns ``offs_n``, both as float32 ``[BLOCK_N]``."""
    s = tl.load(s_ptr + g * stride_g + offs_n * stride_gn, mask=mask_n, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g * stride_g + offs_n * stride_gn, mask=mask_n, other=0).to(tl.float32)
    return s, z


@triton.jit
def dequant_tile(q, s, z, DTYPE: tl.constexpr):
    """``(q - z) * s`` rounded once to the activation dtype, the same arithmetic as the torch path
    (float32 product, then one cast), so kernel and fallback see bit-identical weights."""
    # int -> float through the exponent bits: (q | 0x4B000000) is the float 2^23 + q, and
    # subtracting 2^23 + z is exact, so this equals (float(q) - z) * s bit for bit while
    # avoiding I2F, which runs at a quarter of the FP32 rate on Hopper.
    qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
    return ((qf - (z + 8388608.0)[None, :]) * s[None, :]).to(DTYPE)


@triton.jit
def load_chunk_words(qw_ptr, offs_c, offs_n, stride_qk, mask, BITS: tl.constexpr):
    """The packed words of chunks ``offs_c`` (a chunk = one word for 2/4/8 bits, three words = 32
    values for 3 bits), each as a ``[len(offs_c), len(offs_n)]`` tile, loaded once (no repeats);
    ``mask`` broadcasts to that tile (masked words read 0); ``offs_n`` are word offsets, as in
    :func:`load_codes`. For 3 bits the words come back as uint32 so that right shifts are logical."""
    if BITS == 3:
        base = qw_ptr + (offs_c * 3)[:, None] * stride_qk + offs_n[None, :]
        w0 = tl.load(base, mask=mask, other=0).to(tl.uint32, bitcast=True)
        w1 = tl.load(base + stride_qk, mask=mask, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(base + 2 * stride_qk, mask=mask, other=0).to(tl.uint32, bitcast=True)
        return w0, w1, w2
    else:
        w0 = tl.load(qw_ptr + offs_c[:, None] * stride_qk + offs_n[None, :], mask=mask, other=0)
        return w0, w0, w0


@triton.jit
def slot_code(w0, w1, w2, J: tl.constexpr, BITS: tl.constexpr):
    """Code number ``J`` of every chunk in the tiles (compile-time shifts: 2-3 ops per value).

    Chunk value ``J`` sits at stream bits ``[b*J, b*J + b)``; for 3 bits values 10 and 21
    straddle words 0/1 and 1/2."""
    if BITS == 3:
        if J < 10:
            v = w0 >> (3 * J)
        elif J == 10:
            v = (w0 >> 30) | (w1 << 2)
        elif J < 21:
            v = w1 >> (3 * J - 32)
        elif J == 21:
            v = (w1 >> 31) | (w2 << 1)
        else:
            v = w2 >> (3 * J - 64)
        return (v & 7).to(tl.int32)
    else:
        return (w0 >> (J * BITS)) & ((1 << BITS) - 1)


def unit_constants(bits: int) -> tuple[int, int]:
    """The two bit patterns :func:`slot_unit` combines, passed to kernels as *runtime* arguments:
    the code field ``(2^b - 1) << (23 - b)`` and the exponent of 1.0. As compile-time constants
    ptxas can put only one of them in LOP3's immediate slot and re-materialises the other into a
    register before nearly every use (~0.5 extra instructions per weight in the M = 1 kernel's
    SASS); as parameters both stay in registers / the constant bank."""
    return ((1 << bits) - 1) << (23 - bits), 0x3F800000


@triton.jit
def slot_unit(w0, w1, w2, J: tl.constexpr, BITS: tl.constexpr, field_mask, one_bits):
    """Value ``J`` of every chunk as the float ``1 + q * 2^-BITS``: the code is shifted straight
    into the top mantissa bits under the exponent of 1.0 (one shift, one and-or, no I2F).
    Callers undo the affine map once per row: ``sum x q = (sum x f - sum x) * 2^BITS``.
    ``field_mask, one_bits`` are :func:`unit_constants` (run-time or compile-time values)."""
    T: tl.constexpr = 23 - BITS
    P: tl.constexpr = J * BITS
    if BITS == 3 and (J == 10 or J == 21):
        v = slot_code(w0, w1, w2, J, BITS) << T
    else:
        if BITS == 3:
            if J < 10:
                w = w0
                P2: tl.constexpr = P
            elif J < 21:
                w = w1
                P2: tl.constexpr = P - 32
            else:
                w = w2
                P2: tl.constexpr = P - 64
        else:
            w = w0
            P2: tl.constexpr = P
        if P2 <= T:
            v = w << (T - P2)
        else:
            v = w >> (P2 - T)
        v = v & field_mask
    return (v | one_bits).to(tl.float32, bitcast=True)
