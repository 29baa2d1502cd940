"""Small-M (decode) forward kernels, M = 1..16: split-K so one weight matrix fills the GPU.

At decode time the product is bound by reading W, so a kernel's job is to stream the packed
codes at full bandwidth with few instructions per weight. Two choices serve that:

* split-K: the grid is ``(N / BLOCK_N, SPLIT_K)``; with N = 4096 and BLOCK_N = 128 there are
  only 32 column tiles, far too few for 132 SMs, so K is cut into ``SPLIT_K`` slices whose
  partial sums are added atomically.
* dot-then-scale: inside one group, ``sum_k x[k] (q[k,n] - z[n]) s[n]
  = s[n] (sum_k x[k] q[k,n] - z[n] sum_k x[k])``: the codes enter the products as exact small
  numbers and the zero point and scale are applied once per step to the partial sums instead
  of once per weight.

``_dq_gemv1_kernel`` (M = 1) does the products on the CUDA cores; ``_dq_gemv_tc_kernel``
(M = 2..16, any K) on the tensor cores (``tl.dot`` pads M to 16 rows). The paired-fp16 kernel
for fp16 x is in :mod:`.half2`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from efficientqat.fused_mlp import silu_mul_interleaved
from efficientqat.packing import chunk_values

from .prefetch import prefetch_code_rows, prefetch_steps
from .prologue import NO_ROW_OPS, RowOps, launch_rows, normalize_steps
from .tiling import (add_bias, add_in_first_slice, aligned_code_rows, decode_output, group_strides, launch_options,
                     launcher, release_next_grid, store_decode, wait_for_previous_grid)
from .tuning import Config
from .unpack import load_chunk_words, load_group_row, slot_unit, unit_constants


@triton.jit
def _gemv1_words(qw_ptr, step, s_hi, offs_c, offs_n, stride_qk, stride_qn, N, BLOCK_C: tl.constexpr,
                 BITS: tl.constexpr):
    """The packed words of step ``step`` (all-zero from ``s_hi`` on: the prefetch after the last
    step; the column limit drops to <= 0 there)."""
    mask = offs_n < tl.minimum(N, (s_hi - step) * N)
    return load_chunk_words(qw_ptr, step * BLOCK_C + offs_c, offs_n * stride_qn, stride_qk, mask[None, :], BITS)


@triton.jit
def _gemv1_step(w0, w1, w2, x_ptr, s_ptr, z_ptr, step, offs_c, offs_n, mask_n, stride_g, stride_gn, field_mask,
                one_bits, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_C: tl.constexpr):
    """One step's contribution ``s (sum_k x q - z sum_k x)`` per column from its words."""
    VPC: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    g = (step * BLOCK_C * VPC) // GROUP
    s, z = load_group_row(s_ptr, z_ptr, g, offs_n, stride_g, stride_gn, mask_n)
    k_first = (step * BLOCK_C + offs_c) * VPC
    x_row = tl.load(x_ptr + k_first).to(tl.float32)
    t = x_row[:, None] * slot_unit(w0, w1, w2, 0, BITS, field_mask, one_bits)  # x * (1 + q 2^-b)
    for j in tl.static_range(1, VPC):
        xj = tl.load(x_ptr + k_first + j).to(tl.float32)
        t += xj[:, None] * slot_unit(w0, w1, w2, j, BITS, field_mask, one_bits)
        x_row += xj
    # sum_k x q = (sum t - sum x) * 2^b: rows are summed inside each thread (BLOCK_N spans the
    # warps), then zero point and scale are folded in once per column.
    x_sum = tl.sum(x_row, axis=0)
    return s * ((tl.sum(t, axis=0) - x_sum) * (1 << BITS) - x_sum * z)


@triton.jit
def _dq_gemv1_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, h_ptr, g_ptr, res_ptr, stride_h, stride_res, eps,
    N, K, stride_qk, stride_qn, stride_g, stride_gn, field_mask, one_bits,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
    STAGES: tl.constexpr, FIXUP: tl.constexpr, PDL: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
    ROW_BLOCK: tl.constexpr,
):
    """M = 1 on the CUDA cores. Each program streams a contiguous K range of a ``BLOCK_N`` column
    slice; a step covers ``BLOCK_C`` chunk rows (inside one group). Every packed word is loaded
    once (16-byte vectors along N) and its values are peeled off with compile-time shifts
    (``slot_unit``: shift, and-or, FMA per weight); each x[k] a thread loads feeds all of its
    columns. Per step and column the scale and zero point are applied once:
    ``s * (sum_k x q - z sum_k x)``.

    ``PREFETCH`` (variant 1) issues the next step's word loads before the current step's
    arithmetic (a register double buffer, two tiles of DRAM requests per program). It costs
    registers: on an H200 it lost at 8192^2 and won some smaller/taller layers, so the tuner
    decides (``candidates.GEMV1_TABLE``).

    ``NORM`` / ``RESIDUAL``: RMSNorm of the row at ``h_ptr`` as x, the row at ``res_ptr`` added
    to y (:mod:`.prologue`).
    """
    VPC: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    BK: tl.constexpr = BLOCK_C * VPC
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    n_steps = K // BK
    s_lo = pid_k * n_steps // SPLIT_K
    s_hi = (pid_k + 1) * n_steps // SPLIT_K

    # first thing: loading the first words before it, as half2.py does, spilled here (sm_90 SASS:
    # 261 STL/LDL pairs)
    wait_for_previous_grid(PDL)
    normalize_steps(h_ptr, g_ptr, x_ptr, 1, K, stride_h, eps, s_lo, s_hi, 1, 1, BK, 0, NORM, ROW_BLOCK)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if PREFETCH:
        n0, n1, n2 = _gemv1_words(qw_ptr, s_lo, s_hi, offs_c, offs_n, stride_qk, stride_qn, N, BLOCK_C, BITS)
    for step in tl.range(s_lo, s_hi, num_stages=STAGES):
        if PREFETCH:
            w0, w1, w2 = n0, n1, n2
            n0, n1, n2 = _gemv1_words(qw_ptr, step + 1, s_hi, offs_c, offs_n, stride_qk, stride_qn, N, BLOCK_C, BITS)
        else:
            w0, w1, w2 = _gemv1_words(qw_ptr, step, s_hi, offs_c, offs_n, stride_qk, stride_qn, N, BLOCK_C, BITS)
        acc += _gemv1_step(w0, w1, w2, x_ptr, s_ptr, z_ptr, step, offs_c, offs_n, mask_n, stride_g, stride_gn,
                           field_mask, one_bits, BITS, GROUP, BLOCK_C)

    release_next_grid(PDL)
    acc = add_bias(acc, b_ptr, offs_n, mask_n, pid_k, HAS_BIAS)
    acc = add_in_first_slice(acc, res_ptr + offs_n, mask_n, pid_k, RESIDUAL)
    store_decode(y_ptr + offs_n, mask_n, acc, mask_n, ws_ptr + offs_n, count_ptr + pid_n, SPLIT_K, FIXUP, False)


@triton.jit
def _x_chunk_words(x_ptr, offs_m, chunks, stride_xw, mask_x, VPC: tl.constexpr, XPW: tl.constexpr):
    """x of ``chunks`` as a tuple of ``VPC / XPW`` int64 ``[BLOCK_M, len(chunks)]`` tiles: tile
    ``t`` holds values ``t XPW .. (t + 1) XPW - 1`` of each chunk (masked rows and chunks read 0)."""
    rows = x_ptr.to(tl.pointer_type(tl.int64)) + offs_m[:, None] * stride_xw + (chunks * (VPC // XPW))[None, :]
    words = ()
    for t in tl.static_range(VPC // XPW):
        words = words + (tl.load(rows + t, mask=mask_x, other=0),)
    return words


@triton.jit
def _x_slot(x_words, J: tl.constexpr, XPW: tl.constexpr, dtype: tl.constexpr):
    """Value ``J`` of every chunk from :func:`_x_chunk_words`' tiles, as ``dtype``."""
    BITS: tl.constexpr = 64 // XPW
    field = (x_words[J // XPW] >> (BITS * (J % XPW))) & ((1 << BITS) - 1)
    if BITS == 16:
        return field.to(tl.int16).to(dtype, bitcast=True)
    else:
        return field.to(tl.int32).to(dtype, bitcast=True)


@triton.jit
def _x_pair(x_words, J: tl.constexpr, VPC: tl.constexpr, XPW: tl.constexpr, dtype: tl.constexpr):
    """x of slots ``J`` and ``J + VPC / 2`` of every chunk, ``[BLOCK_M, BLOCK_C, 2]``: the order
    in which :func:`_code_pair` lays out the codes."""
    return tl.join(_x_slot(x_words, J, XPW, dtype), _x_slot(x_words, J + VPC // 2, XPW, dtype))


@triton.jit
def _x_word_pairs(x_words, VPC: tl.constexpr, XPW: tl.constexpr, dtype: tl.constexpr):
    """Every slot pair of :func:`_x_chunk_words`' tiles: pair ``J`` is :func:`_x_pair` ``J``."""
    pairs = ()
    for j in tl.static_range(VPC // 2):
        pairs = pairs + (_x_pair(x_words, j, VPC, XPW, dtype),)
    return pairs


@triton.jit
def _x_tile_pairs(x_ptr, offs_m, it, K, stride_xm, mask_m, BK: tl.constexpr, VPC: tl.constexpr):
    """The slot pairs of :func:`_x_word_pairs` from one coalesced ``[BLOCK_M, BK]`` load of step
    ``it``'s x, split in registers (values ``k >= K`` read 0), and each row's sum over the step.
    A chunk's ``VPC`` values are ``2 x VPC / 2`` (half ``h``, slot ``j``), so pair ``J`` is
    ``j = J`` of both halves; the splits peel ``j``'s bits, lowest first."""
    BM: tl.constexpr = offs_m.shape[0]
    BC: tl.constexpr = BK // VPC
    offs_k = it * BK + tl.arange(0, BK)
    xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :],
                 other=0.0)
    x_sum = tl.sum(xt.to(tl.float32), axis=1)[:, None]
    if VPC == 8:  # j = 2 j1 + j0
        j0_0, j0_1 = tl.split(tl.reshape(xt, (BM, BC, 2, 2, 2)))
        x0, x2 = tl.split(j0_0)
        x1, x3 = tl.split(j0_1)
        return (x0, x1, x2, x3), x_sum
    else:  # VPC == 16, j = 4 j2 + 2 j1 + j0
        j0_0, j0_1 = tl.split(tl.reshape(xt, (BM, BC, 2, 2, 2, 2)))
        j1_00, j1_01 = tl.split(j0_0)
        j1_10, j1_11 = tl.split(j0_1)
        x0, x4 = tl.split(j1_00)
        x2, x6 = tl.split(j1_01)
        x1, x5 = tl.split(j1_10)
        x3, x7 = tl.split(j1_11)
        return (x0, x1, x2, x3, x4, x5, x6, x7), x_sum


@triton.jit
def _code_pair(w0, J: tl.constexpr, BITS: tl.constexpr, PAIR_MAGIC: tl.constexpr, dtype: tl.constexpr):
    """Codes of slots ``J`` and ``J + 16 / BITS`` (bits ``J b`` and ``J b + 16`` of each word) as
    the 16-bit floats ``OFFSET + q``, ``[BLOCK_C, 2, BLOCK_N]``. One shift and one and-or make
    both: the two fields land in the low mantissa bits of the two halves of a word whose exponent
    bits ``PAIR_MAGIC`` sets (``0x6400``: fp16 1024, ``0x4300``: bf16 128; exact for 2/4-bit
    codes). No float conversion: the halves are the two k-adjacent values that a tensor-core B
    fragment holds in one register."""
    FIELDS: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    pair = ((w0 >> (J * BITS)) & FIELDS) | PAIR_MAGIC
    lo = (pair & 0xFFFF).to(tl.int16)
    hi = (pair >> 16).to(tl.int16)
    return tl.permute(tl.join(lo, hi), (0, 2, 1)).to(dtype, bitcast=True)


@triton.jit
def _paired_operands(w0, x_pairs, J: tl.constexpr, PAIRS: tl.constexpr, BITS: tl.constexpr,
                     PAIR_MAGIC: tl.constexpr, dtype: tl.constexpr):
    """x ``[BLOCK_M, D]`` and codes ``[D, BLOCK_N]`` of one dot over ``PAIRS`` (1 or 2) slot pairs
    from slot pair ``J`` on, ``D = 2 PAIRS BLOCK_C`` (``PAIRS = 2`` gives 4-chunk steps the depth
    16 a dot needs, so a step of 2-bit codes fits a group of 64). Along D the two halves of a
    pair stay adjacent (one B-fragment register), x in the same order (``x_pairs``: the step's
    pairs, :func:`_x_word_pairs` or :func:`_x_tile_pairs`)."""
    xs = x_pairs[J]
    codes = _code_pair(w0, J, BITS, PAIR_MAGIC, dtype)
    if PAIRS == 2:
        # [C, 2 (half), *] twice -> [2 (pair), C, 2 (half), *]: pair-major, so each B-fragment
        # register is still one word's pair
        xs = tl.permute(tl.join(xs, x_pairs[J + 1]), (0, 3, 1, 2))
        codes = tl.permute(tl.join(codes, _code_pair(w0, J + 1, BITS, PAIR_MAGIC, dtype)), (3, 0, 1, 2))
    D: tl.constexpr = 2 * PAIRS * w0.shape[0]
    return tl.reshape(xs, (xs.shape[0], D)), tl.reshape(codes, (D, w0.shape[1]))


@triton.jit
def _paired_dot(xj, codes, part, W_AS_A: tl.constexpr, DOT_PREC: tl.constexpr):
    """``part + xj @ codes``; with ``W_AS_A`` ``part`` is held transposed, ``[BLOCK_N, BLOCK_M]``,
    and the codes are the register operand of ``wgmma`` (:data:`PAIRED_WGMMA`)."""
    if W_AS_A:
        return tl.dot(tl.trans(codes), tl.trans(xj), part, input_precision=DOT_PREC)
    else:
        return tl.dot(xj, codes, part, input_precision=DOT_PREC)


@triton.jit
def _dq_gemv_tc_kernel(
    x_ptr, qw_ptr, qw_desc, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, h_ptr, g_ptr, res_ptr, stride_h, stride_res,
    eps, M, N, K,
    stride_xw, stride_qk, stride_qn, stride_g, stride_gn, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_PREC: tl.constexpr, FIELD_MASK: tl.constexpr, ONE_BITS: tl.constexpr,
    FOLD_SCALES: tl.constexpr, EVEN_K: tl.constexpr, FIXUP: tl.constexpr, PDL: tl.constexpr, XPW: tl.constexpr,
    PAIR_MAGIC: tl.constexpr, PAIR_OFFSET: tl.constexpr, PAIRS: tl.constexpr, W_AS_A: tl.constexpr,
    X_TILE: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr, ROW_BLOCK: tl.constexpr,
    PREFETCH: tl.constexpr, CODES_TMA: tl.constexpr,
):
    """M = 1..16 on the tensor cores, loading each packed word once: for each value slot j of
    a chunk, the ``[BLOCK_C, BLOCK_N]`` tile of codes pairs with the x columns ``k = chunk*VPC + j``
    (a strided gather from the small, cache-resident x) in one ``tl.dot`` of depth BLOCK_C.

    ``FOLD_SCALES`` (a step lies inside one group, and ``1 + q 2^-b`` is exact in x's dtype):
    the dots take the bare codes as ``f = 1 + q 2^-b`` (shift, and-or, half a convert per
    weight) and scale and zero point are applied once per step to the float32 partial sum,
    ``s (sum x q - z sum x)`` with ``sum x q = (sum x f - sum x) 2^b``. Otherwise every weight
    is dequantized before its dot (one more FMA per weight).

    x is read as 64-bit words (``XPW`` values each, ``stride_xw`` words a row): one
    ``[BLOCK_M, BLOCK_C]`` tile per word of a chunk, from which each slot's x operand is a
    shift and mask. Being elementwise on a loaded tile, that goes to the tensor cores' operand
    layout through shared memory once per word, not once per slot (a gather per slot cost a
    shared-memory round trip and a barrier for each of the 8-32 slots of a step).

    ``PAIR_MAGIC`` (2/4 bits, fp16/bf16 x): the codes enter the dots two per register as
    ``PAIR_OFFSET + q`` (:func:`_code_pair`), ``PAIRS`` slot pairs per dot, offset and zero point
    folded per step; ``W_AS_A`` turns each dot around so the codes are ``wgmma``'s register operand;
    ``X_TILE``: x arrives as one ``[BLOCK_M, BK]`` load a step, split into its slot pairs in
    registers (:func:`_x_tile_pairs`), as the layout study's prototype reads it.

    Without ``EVEN_K`` the last step is ragged (3-bit K = 11008: 344 chunks, steps of 16): its
    missing chunks read zero words and zero x, and never fold (a folded step ends a group).

    ``ACT`` (whole sums only: ``FIXUP`` or no split): the tile is a gate/up layer's interleaved
    columns and the kernel writes ``silu(gate) * up``, half as wide (:func:`.tiling.finish_tile`).

    ``NORM``: x is RMSNorm(h) of the rows at ``h_ptr``, which the program writes for the steps
    it reads into ``x_ptr`` first; ``RESIDUAL``: the rows at ``res_ptr`` are added (:mod:`.prologue`).

    ``CODES_TMA`` (2/4-bit codes, one word row a chunk): the codes of a step come as one
    ``[BLOCK_C, BLOCK_N]`` tile through the tensor-memory accelerator from ``qw_desc`` (a
    ``TensorDescriptor`` of qweight), which with ``num_stages`` > 1 keeps the next steps' tiles in
    flight into shared memory without registers or copy instructions; rows past K and columns past
    N arrive as zeros.

    ``PREFETCH`` > 0: the codes of this program's next ``PREFETCH`` steps are asked of L2 ahead of
    their loads (:mod:`.prefetch`), the first ones before the wait for the previous grid."""
    VPC: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    BK: tl.constexpr = BLOCK_C * VPC
    WORDS: tl.constexpr = 3 if BITS == 3 else 1  # code word rows a chunk
    STEP_ROWS: tl.constexpr = BLOCK_C * WORDS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    code_rows = (K // VPC) * WORDS
    for j in tl.static_range(PREFETCH):
        prefetch_code_rows(qw_ptr, (pid_k + j * SPLIT_K) * STEP_ROWS, STEP_ROWS, code_rows, pid_n * BLOCK_N, stride_qk,
                           BLOCK_N, STEP_ROWS, True)
    wait_for_previous_grid(PDL)
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype = x_ptr.dtype.element_ty
    normalize_steps(h_ptr, g_ptr, x_ptr, M, K, stride_h, eps, pid_k, tl.cdiv(K, BK), SPLIT_K, BLOCK_M, BK, 0, NORM,
                    ROW_BLOCK)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(pid_k, tl.cdiv(K, BK), SPLIT_K):
        prefetch_code_rows(qw_ptr, (it + PREFETCH * SPLIT_K) * STEP_ROWS, STEP_ROWS, code_rows, pid_n * BLOCK_N,
                           stride_qk, BLOCK_N, STEP_ROWS, PREFETCH > 0)
        chunks = it * BLOCK_C + offs_c
        mask_w = mask_n[None, :]
        mask_x = mask_m[:, None]
        if not EVEN_K:
            mask_w = mask_w & (chunks < K // VPC)[:, None]
            mask_x = mask_x & (chunks < K // VPC)[None, :]
        if CODES_TMA:
            w0 = qw_desc.load([it * BLOCK_C, pid_n * BLOCK_N])
            w1 = w0
            w2 = w0
        else:
            w0, w1, w2 = load_chunk_words(qw_ptr, chunks, offs_n * stride_qn, stride_qk, mask_w, BITS)
        k_first = chunks * VPC
        if not X_TILE:
            x_words = _x_chunk_words(x_ptr, offs_m, chunks, stride_xw, mask_x, VPC, XPW)
        if PAIR_MAGIC:
            # codes as OFFSET + q in pairs: sum x q = part - OFFSET sum x
            if X_TILE:
                x_pairs, x_sum = _x_tile_pairs(x_ptr, offs_m, it, K, stride_xw * XPW, mask_m, BK, VPC)
            else:
                x_pairs = _x_word_pairs(x_words, VPC, XPW, dtype)
                x_tot = tl.zeros((BLOCK_M, 2 * PAIRS * BLOCK_C), dtype=tl.float32)
            if W_AS_A:
                part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(0, VPC // 2, PAIRS):
                xj, codes = _paired_operands(w0, x_pairs, j, PAIRS, BITS, PAIR_MAGIC, dtype)
                part = _paired_dot(xj, codes, part, W_AS_A, DOT_PREC)
                if not X_TILE:
                    x_tot += xj.to(tl.float32)
            if W_AS_A:
                part = tl.trans(part)
            if not X_TILE:
                x_sum = tl.sum(x_tot, axis=1)[:, None]
            s, z = load_group_row(s_ptr, z_ptr, (it * BK) // GROUP, offs_n, stride_g, stride_gn, mask_n)
            acc += (part - x_sum * (z[None, :] + PAIR_OFFSET)) * s[None, :]
        elif FOLD_SCALES:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            x_tot = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for j in tl.static_range(VPC):
                xj = _x_slot(x_words, j, XPW, dtype)
                f = slot_unit(w0, w1, w2, j, BITS, FIELD_MASK, ONE_BITS).to(dtype)
                part = tl.dot(xj, f, part, input_precision=DOT_PREC)
                x_tot += xj.to(tl.float32)
            x_sum = tl.sum(x_tot, axis=1)[:, None]
            s, z = load_group_row(s_ptr, z_ptr, (it * BK) // GROUP, offs_n, stride_g, stride_gn, mask_n)
            acc += ((part - x_sum) * (1 << BITS) - x_sum * z[None, :]) * s[None, :]
        else:
            sz_off = (k_first // GROUP)[:, None] * stride_g + offs_n[None, :] * stride_gn
            s = tl.load(s_ptr + sz_off, mask=mask_w, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz_off, mask=mask_w, other=0).to(tl.float32)
            # (q - z) s = f * s 2^b - (1 + z 2^-b) s 2^b with f = 1 + q 2^-b: one FMA per weight.
            s_mul = s * (1 << BITS)
            s_add = -(1.0 + z * (1.0 / (1 << BITS))) * s_mul
            for j in tl.static_range(VPC):
                xj = _x_slot(x_words, j, XPW, dtype)
                w = (slot_unit(w0, w1, w2, j, BITS, FIELD_MASK, ONE_BITS) * s_mul + s_add).to(dtype)
                acc = tl.dot(xj, w, acc, input_precision=DOT_PREC)

    release_next_grid(PDL)
    acc = add_bias(acc, b_ptr, offs_n, mask_n, pid_k, HAS_BIAS)
    mask = mask_m[:, None] & mask_n[None, :]
    acc = add_in_first_slice(acc, res_ptr + offs_m[:, None] * stride_res + offs_n[None, :], mask, pid_k, RESIDUAL)
    if ACT:
        offs_y = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        y_mask = mask_m[:, None] & (offs_y < N // 2)[None, :]
    else:
        offs_y = offs_n
        y_mask = mask
    store_decode(y_ptr + offs_m[:, None] * stride_ym + offs_y[None, :], y_mask, acc, mask,
                 ws_ptr + offs_m[:, None] * N + offs_n[None, :], count_ptr + pid_n, SPLIT_K, FIXUP, ACT)


PAIRED_CODES = 1
"""``Config.variant`` of the tensor-core kernel that takes the codes in 16-bit pairs (``_code_pair``)."""
PAIRED_WGMMA = 2
"""The same with the codes as the register (A) operand of Hopper's asynchronous ``wgmma`` and x^T as
its shared-memory operand (``y^T = W x^T``), instead of ``mma.sync`` with x as A: sm_90 SASS at
128 columns 3.86 instead of 4.13 lane-instructions per weight and 116 instead of 124 registers (at
256 both 3.12), and tensor-core work that does not hold the issuing warp."""
PAIRED_XTILE = 3
""":data:`PAIRED_CODES` with x read as one ``[BLOCK_M, BK]`` load a step and split into its slot
pairs in registers (``X_TILE``), instead of as 64-bit words split by a shift and mask per slot:
how the layout study's prototype (``pipelines/layout_study.py``) reads it. On an H200 at M = 16,
8192^2 w4g128, one-stage 256-column tile, split 8: 26.8 us against 32.5 with x as words (session 17,
the prototype 25.2); the shifts per slot were most of the gap."""
PAIRED_TMA = 4
""":data:`PAIRED_XTILE` with the codes brought in by the tensor-memory accelerator (``CODES_TMA``),
pipelined over ``num_stages``: a one-stage program waits on each step's codes, and at two programs
an SM (200 registers) nothing else hides that wait (session 17's profile: long-scoreboard stalls
first, 12% occupancy). H200, 8192^2 w4g128, M = 16, 256 columns, split 8, three stages (session 18):
29.5 us alone, 24.4 with the step after its stages asked of L2 (``Config.prefetch`` 1), where the
one-stage x-tile tile took 26.2; the profile's long-scoreboard stalls halved (2.21 -> 1.08 an instruction)."""
PAIRED_VARIANTS = (PAIRED_CODES, PAIRED_WGMMA, PAIRED_XTILE, PAIRED_TMA)
PAIR_MAGIC = {torch.float16: 0x64006400, torch.bfloat16: 0x43004300}
"""Exponent bits that make a code field ``q`` the 16-bit float ``PAIR_OFFSET + q``."""
PAIR_OFFSET = {torch.float16: 1024.0, torch.bfloat16: 128.0}


def pairs_codes(bits: int, group: int, dtype: torch.dtype, block_c: int) -> bool:
    """Whether the paired-code path applies: 2/4-bit codes (two fields 16 bits apart in a word),
    fp16/bf16 x, and a step (``block_c`` chunks) inside one group (the offset and zero point are
    folded per step)."""
    return bits in (2, 4) and dtype in PAIR_MAGIC and block_c in (4, 8, 16, 32) \
        and group % (block_c * chunk_values(bits)) == 0


def pairs_per_dot(block_c: int) -> int:
    """Slot pairs in one paired-code dot: depth ``2 pairs block_c`` must reach the 16 a dot needs."""
    return 1 if block_c >= 8 else 2


def gemv1_forward(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, bits: int, group: int, cfg: Config, ops: RowOps = NO_ROW_OPS,
) -> torch.Tensor:
    """M = 1; ``cfg.block_k`` is the number of chunks per step (BLOCK_C), ``cfg.variant`` 1
    prefetches the next step's words; ``ops``: RMSNorm x first, add a residual (:mod:`.prologue`)."""
    M, K = x.shape
    N = qweight.shape[1]
    y, ws, count, fixup = decode_output(x, N, cfg)
    xs, row_args, row_constants = launch_rows(ops, x, x, 1)
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    launcher(_dq_gemv1_kernel, grid)(
        xs, qweight, scales, zeros, bias if bias is not None else x, y, ws, count, *row_args,
        N, K, qweight.stride(0), qweight.stride(1), *group_strides(scales, zeros), *unit_constants(bits),
        BITS=bits, GROUP=group, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_k, SPLIT_K=cfg.split_k, PREFETCH=cfg.variant == 1,
        STAGES=cfg.num_stages, FIXUP=fixup, PDL=cfg.pdl, **row_constants,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(cfg),
    )
    return y if y.dtype == x.dtype else y.to(x.dtype)


def gemv_tc_forward(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, bits: int, group: int, cfg: Config, silu_mul: bool = False,
    ops: RowOps = NO_ROW_OPS,
) -> torch.Tensor:
    """M = 1..16 on tensor cores; ``cfg.block_k`` is BLOCK_C (chunks per step, >= 16; >= 4 with
    ``cfg.variant`` in :data:`PAIRED_VARIANTS`, the codes in fp16 / bf16 pairs,
    see :func:`pairs_codes`). ``silu_mul``: ``silu(gate) * up`` of an interleaved gate/up layer,
    ``[M, N / 2]``, written by the kernel (split-K only with the in-kernel reduction). ``ops``:
    RMSNorm x first, add a residual (:mod:`.prologue`)."""
    M, K = x.shape
    N = qweight.shape[1]
    field_mask, one_bits = unit_constants(bits)
    # 1 + q 2^-8 needs 8 mantissa bits, bf16 has 7: 8-bit codes under bf16 are scaled per weight
    step = cfg.block_k * chunk_values(bits)
    fold = group % step == 0 and (bits < 8 or x.dtype != torch.bfloat16)
    paired = cfg.variant in PAIRED_VARIANTS
    if paired and not pairs_codes(bits, group, x.dtype, cfg.block_k):
        raise ValueError(f"paired codes need 2/4-bit codes, fp16/bf16 x and a step of {step} values "
                         f"inside a group (got {bits} bits, group {group}, {x.dtype})")
    y, ws, count, fixup = decode_output(x, N, cfg, N // 2 if silu_mul else None)
    if silu_mul and cfg.split_k > 1 and not fixup:  # no workspace inside a capture: the epilogue in torch
        return silu_mul_interleaved(gemv_tc_forward(x, qweight, scales, zeros, bias, bits, group, cfg, ops=ops))
    if x.data_ptr() % 8 or x.stride(0) * x.element_size() % 8:  # the kernel reads x in 64-bit words
        x = x.clone()
    xs, row_args, row_constants = launch_rows(ops, x, x, 16)
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    tma = cfg.variant == PAIRED_TMA and aligned_code_rows(qweight)  # else the same tile with pointer loads
    codes = TensorDescriptor.from_tensor(qweight, [cfg.block_k, cfg.block_n]) if tma else qweight
    launcher(_dq_gemv_tc_kernel, grid)(
        xs, qweight, codes, scales, zeros, bias if bias is not None else x, y, ws, count, *row_args,
        M, N, K,
        xs.stride(0) * xs.element_size() // 8, qweight.stride(0), qweight.stride(1), *group_strides(scales, zeros),
        y.stride(0),
        BITS=bits, GROUP=group, HAS_BIAS=bias is not None,
        BLOCK_M=16, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_k, SPLIT_K=cfg.split_k,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", FIELD_MASK=field_mask, ONE_BITS=one_bits,
        FOLD_SCALES=fold, EVEN_K=K % step == 0, FIXUP=fixup, PDL=cfg.pdl, XPW=8 // x.element_size(),
        PAIR_MAGIC=PAIR_MAGIC[x.dtype] if paired else 0, PAIR_OFFSET=PAIR_OFFSET[x.dtype] if paired else 0.0,
        PAIRS=pairs_per_dot(cfg.block_k), W_AS_A=cfg.variant == PAIRED_WGMMA,
        X_TILE=cfg.variant in (PAIRED_XTILE, PAIRED_TMA), ACT=silu_mul, **row_constants,
        PREFETCH=prefetch_steps(cfg, qweight, N), CODES_TMA=tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(cfg),
    )
    return y if y.dtype == x.dtype else y.to(x.dtype)
