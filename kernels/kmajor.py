"""M = 1 decode over K-major codes: whole columns a program, no split-K (fp16 x, 2/3/4-bit codes).

The project's codes are N-major (``qweight [K b / 32, N]``, columns contiguous). A program that
reads long contiguous rows of them must take many columns, so the M = 1 kernels split K across
programs and reduce the partial sums at the end. On an H200 that write-back (float atomics, a
GPU-scope fence, the arrival count, the last program's sum) cost a read-only probe 1.0-1.4 µs of
a 10-12 µs call at 8192^2 (``pipelines/read_floor.py``, session 19).

Stored K-major, the same logical tensor with transposed storage (``qweight.t().contiguous().t()``,
each column's words contiguous), with the scales and zero points column-major beside them
(:func:`efficientqat.qlinear.store_codes_k_major`), the codes let one program own ``BLOCK_N``
whole columns, ``BLOCK_N x K b / 8`` contiguous bytes:

* every thread takes a slot inside one group a column and step (one 16-byte vector of 4 code
  words at 2/4 bits, one 32-value chunk of 3 words at 3 bits: :func:`slot_words`), the next
  step's in flight while this one is summed, and its columns' scales and zero points from
  contiguous runs along K;
* it builds its x pairs once a step from vector loads of x (byte permutes, :func:`half2.prmt`)
  and spends them on all its columns;
* the decoding is the paired-fp16 kernel's (:func:`half2.pair_constants` / :func:`half2.field_pairs`,
  :func:`half2.unit3` for 3-bit with the zero point folded per slot);
* the K sum ends inside the program (``tl.sum``) and the output is one plain store.

Timings (H200, ``pipelines/kmajor_study.py``) are in BENCHMARKS.md. Session 19 found the layout of
the scales worth 0.7 µs at 8192^2 w4g128: read ``[G, N]``, the 64 group rows of a program lie 16
KB apart (12.38 µs); column-major, a thread's run of groups is contiguous (11.8 µs, session 20).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .half2 import MAGIC, field_pairs, fma_h2, pair_constants, prmt, unit3, unpack_h2
from .tiling import (add_bias, group_strides, k_major_codes, launch_options, launcher, load_unless_even,
                     release_next_grid, wait_for_previous_grid)
from .tuning import Config, interpreting

VECTOR = tl.constexpr(4)
"""Code words in one 16-byte vector load (a ``tl.constexpr``, which the kernels may read;
``VECTOR.value`` on the host)."""
KMAJOR_BITS = (2, 3, 4)


def slot_words(bits: int, chunks: int = 1) -> int:
    """Code words a thread takes per column and step: one 16-byte vector at 2/4 bits (64 / 32
    values), ``chunks`` 32-value chunks of 3 words at 3 bits (4-byte loads; a tile's ``block_k``,
    1 or 2: a slot of four chunks as three vectors held 246 registers at 8 columns and took 14.6
    µs at 8192^2 where the N-major kernel took 12.1, H200, session 20)."""
    return 3 * chunks if bits == 3 else VECTOR.value


def takes(qweight: torch.Tensor, bits: int, group: int) -> bool:
    """Whether this kernel can run the layer: K-major codes (:func:`tiling.k_major_codes`) of 2-4
    bits, groups and K holding whole thread slots (:func:`slot_words`), 16-byte aligned columns."""
    words = slot_words(bits)
    return (bits in KMAJOR_BITS and k_major_codes(qweight) and group % (words * 32 // bits) == 0
            and qweight.shape[0] % words == 0 and qweight.stride(1) % VECTOR.value == 0
            and qweight.data_ptr() % 16 == 0)


@triton.jit
def _unstack4(t, A: tl.constexpr, B: tl.constexpr):
    """``t [A, B, 4]`` -> its four ``[A, B]`` slices along the last axis, in order (register moves)."""
    a, b = tl.split(tl.reshape(t, (A, B, 2, 2)))
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def _slot_loads(ptrs, mask, BITS: tl.constexpr, SW: tl.constexpr, EVEN: tl.constexpr):
    """A slot's code words a column, requested: one vector load of ``ptrs`` (``[T, BN, 4]``) at
    2/4 bits, ``SW`` word loads from ``ptrs`` (``[T, BN]``) at 3 bits. Split into words by
    :func:`_slot_words` only where they are used, so the loads stay in flight until then."""
    if BITS == 3:
        loads = ()
        for j in tl.static_range(SW):
            loads = loads + (load_unless_even(ptrs + j, mask, 0, EVEN),)
        return loads
    else:
        return (load_unless_even(ptrs, mask, 0, EVEN),)


@triton.jit
def _slot_words(loads, BITS: tl.constexpr, THREADS: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`_slot_loads`' result as a tuple of ``[T, BN]`` code words."""
    if BITS == 3:
        return loads
    else:
        return _unstack4(loads[0], THREADS, BLOCK_N)


@triton.jit
def _x_pairs(xw, row0, valid, lane, ROWS: tl.constexpr, HV: tl.constexpr, THREADS: tl.constexpr,
             EVEN: tl.constexpr, EMULATE: tl.constexpr):
    """For each of ``ROWS`` rows of ``2 HV`` x values from row ``row0`` (``[T, 1, 1]``, a thread's
    own), the ``HV`` pairs ``(x[k + i], x[k + i + HV])`` (``k`` the row's first value) that the
    codes' half words meet, as ``[T, 1]`` tensors in one flat tuple: vector loads of the int32
    view of x (word ``j`` holds ``(x[2j], x[2j + 1])``; zeros where ``valid`` is off unless
    ``EVEN``), then one byte permute a pair."""
    pairs = ()
    for r in tl.static_range(ROWS):
        xv = ()
        for q in tl.static_range(0, HV, 4):
            words = load_unless_even(xw + (row0 + r) * HV + q + lane, valid, 0, EVEN)
            xv = xv + _unstack4(words, THREADS, 1)
        for i in tl.static_range(HV):
            pairs = pairs + (prmt(xv[i // 2], xv[HV // 2 + i // 2], 0x5410 if i % 2 == 0 else 0x7632, EMULATE),)
    return pairs


@triton.jit
def _slot_dot(w, pairs, z, magic, BITS: tl.constexpr, THREADS: tl.constexpr, BLOCK_N: tl.constexpr,
              EMULATE: tl.constexpr):
    """``sum x (q - z) / 256`` (float32 ``[T, BN]``) over a 2/4-bit slot: its 4 words ``w`` (``[T, BN]``
    each), decoded by :func:`half2.field_pairs` and summed in fp16 pairs (4 words x 32/b products
    of at most (2^b - 1)/256 |x|)."""
    HV: tl.constexpr = 16 // BITS
    ce, co, ze, zo = pair_constants(z, magic, BITS, EMULATE)
    h = tl.zeros((THREADS, BLOCK_N), tl.int32)
    for v in tl.static_range(VECTOR):
        for shift in tl.static_range(0, 16, 2 * BITS):
            even, odd = field_pairs(w[v], shift, ce, co, ze, zo, magic, BITS, EMULATE)
            h = fma_h2(even, tl.broadcast_to(pairs[v * HV + shift // BITS], (THREADS, BLOCK_N)), h, EMULATE)
            h = fma_h2(odd, tl.broadcast_to(pairs[v * HV + shift // BITS + 1], (THREADS, BLOCK_N)), h, EMULATE)
    lo, hi = unpack_h2(h)
    return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def _slot_dot3(w, pairs, z, magic, CHUNKS: tl.constexpr, THREADS: tl.constexpr, BLOCK_N: tl.constexpr,
               EMULATE: tl.constexpr):
    """:func:`_slot_dot` for a 3-bit slot, ``CHUNKS`` (1 or 2) 32-value chunks of 3 words: pairs
    ``(a, a + 8)`` by :func:`half2.unit3` as ``q / 256``, the zero point folded once (``sum x q -
    z sum x``, the x sum shared by the thread's columns), as the paired-fp16 kernel's 3-bit step
    (``half2._step_dot3``, which sums two chunks in fp16 too)."""
    inv256 = tl.full((THREADS, 1), 0x1C001C00, tl.int32)  # the fp16 pair (2^-8, 2^-8)
    h = tl.zeros((THREADS, BLOCK_N), tl.int32)
    hx = tl.zeros((THREADS, 1), tl.int32)
    for c in tl.static_range(CHUNKS):
        for half in tl.static_range(2):
            for a in tl.static_range(8):
                u = unit3(w[3 * c + half], w[3 * c + half + 1], a, half, magic, (THREADS, BLOCK_N), EMULATE)
                xp = pairs[(2 * c + half) * 8 + a]
                h = fma_h2(u, tl.broadcast_to(xp, (THREADS, BLOCK_N)), h, EMULATE)
                hx = fma_h2(xp, inv256, hx, EMULATE)
    lo, hi = unpack_h2(h)
    x_lo, x_hi = unpack_h2(hx)
    return lo.to(tl.float32) + hi.to(tl.float32) - (x_lo.to(tl.float32) + x_hi.to(tl.float32)) * z.to(tl.float32)


@triton.jit
def _dq_gemv_kmajor_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, stride_qn, stride_g, stride_gn, magic,
                           BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                           THREADS: tl.constexpr, CHUNKS: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr,
                           EMULATE: tl.constexpr):
    """``y[0, n] = sum_k x[0, k] W[n, k] (+ bias)`` for program 0's ``BLOCK_N`` columns over the whole
    of K, in steps of ``THREADS`` slots of ``SW`` code words a column (:func:`slot_words`; ``qw_ptr``:
    word ``w`` of column ``n`` at ``n * stride_qn + w``); ``EVEN``: the steps fill K, else the
    thread slots past it are masked (codes and x read as zeros). Thread slots are axis 0 of every
    tile: Triton 3.6 then keeps a warp's threads on them (with the columns first it put 4 threads
    of a warp across 4 columns and moved every x pair through shared memory). Triton 3.9 does that
    to this layout, and keeps the threads on the slots with the columns first (sm_90 SASS,
    ``pipelines/sass_stats.py --kmajor``, BENCHMARKS.md session 20); the GPU the kernel is timed
    on runs 3.6."""
    SW: tl.constexpr = 3 * CHUNKS if BITS == 3 else VECTOR
    SLOT_VALUES: tl.constexpr = SW * 32 // BITS  # inside one group (takes)
    HV: tl.constexpr = 8 if BITS == 3 else 16 // BITS  # x pairs a row of 2 HV values
    ROWS: tl.constexpr = SLOT_VALUES // (2 * HV)
    STEP: tl.constexpr = THREADS * SW  # code words a column and step
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]  # [1, BN, 1]
    slot3 = tl.arange(0, THREADS)[:, None, None] * SW  # [T, 1, 1]: a thread slot's first word
    slot2 = tl.arange(0, THREADS)[:, None] * SW  # [T, 1]
    lane = tl.arange(0, VECTOR)[None, None, :]  # [1, 1, 4]
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [1, BN]
    n_words = K * BITS // 32
    if BITS == 3:  # three word loads a column
        col_slots = qw_ptr + cols * stride_qn + slot2  # [T, BN]
        slot_mask = slot2
    else:  # one vector load a column
        col_slots = qw_ptr + offs_n * stride_qn + lane + slot3  # [T, BN, 4]
        slot_mask = slot3
    xw = x_ptr.to(tl.pointer_type(tl.int32))
    wait_for_previous_grid(PDL)  # (codes requested before it lost every tile timed, session 19)
    loads = _slot_loads(col_slots, slot_mask < n_words, BITS, SW, EVEN)
    acc = tl.zeros((THREADS, BLOCK_N), tl.float32)
    for w0 in range(0, n_words, STEP):
        w = _slot_words(loads, BITS, THREADS, BLOCK_N)
        loads = _slot_loads(col_slots + w0 + STEP, slot_mask + w0 + STEP < n_words, BITS, SW, False)  # the next
        first = w0 + slot3
        pairs = _x_pairs(xw, (first // SW) * ROWS, first < n_words, lane, ROWS, HV, THREADS, EVEN, EMULATE)
        slot = w0 + slot2
        group = (slot // SW * SLOT_VALUES) // GROUP
        here = slot < n_words
        s = load_unless_even(s_ptr + group * stride_g + cols * stride_gn, here, 0.0, EVEN).to(tl.float32)
        z = load_unless_even(z_ptr + group * stride_g + cols * stride_gn, here, 0, EVEN).to(tl.int32)
        if BITS == 3:
            acc += s * _slot_dot3(w, pairs, z, magic, CHUNKS, THREADS, BLOCK_N, EMULATE)
        else:
            acc += s * _slot_dot(w, pairs, z, magic, BITS, THREADS, BLOCK_N, EMULATE)
    release_next_grid(PDL)
    offs_y = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    y = add_bias(tl.sum(acc, axis=0) * 256.0, b_ptr, offs_y, offs_y < N, 0, HAS_BIAS)
    tl.store(y_ptr + offs_y, y.to(y_ptr.dtype.element_ty))


def gemv_kmajor_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        bias: torch.Tensor | None, bits: int, group: int, cfg: Config) -> torch.Tensor:
    """``x [1, K]`` fp16 -> ``[1, N]`` over K-major ``qweight`` (:func:`takes`); ``cfg.block_n``
    columns a program, ``cfg.num_warps`` warps, one thread slot along K a thread (a last step that K does
    not fill is masked); at 3 bits ``cfg.block_k`` 32-value chunks a slot (1 or 2)."""
    M, K = x.shape
    N = qweight.shape[1]
    chunks = max(cfg.block_k, 1) if bits == 3 else 1
    words = slot_words(bits, chunks)
    if (M != 1 or x.dtype != torch.float16 or not takes(qweight, bits, group) or N % cfg.block_n or chunks > 2
            or group % (32 * chunks) or qweight.shape[0] % words):
        raise ValueError(f"the K-major decode kernel takes one fp16 row and K-major {KMAJOR_BITS}-bit codes in "
                         f"groups and K of whole thread slots ({words} words) and N a multiple of BLOCK_N; "
                         f"not {M} {x.dtype} rows, codes of strides {tuple(qweight.stride())}, {bits}-bit, "
                         f"group {group}, N = {N}, BLOCK_N = {cfg.block_n}, K = {K}, {chunks} chunks a slot")
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    launcher(_dq_gemv_kmajor_kernel, (N // cfg.block_n,))(
        x, qweight, scales, zeros, bias if bias is not None else x, y, N, K, qweight.stride(1),
        *group_strides(scales, zeros), MAGIC,
        BITS=bits, GROUP=group, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, THREADS=32 * cfg.num_warps,
        CHUNKS=chunks, EVEN=(K * bits // 32) % (words * 32 * cfg.num_warps) == 0, PDL=cfg.pdl,
        EMULATE=interpreting(), num_warps=cfg.num_warps, **launch_options(cfg))
    return y
