"""M = 1 decode over K-major codes: whole columns a program, no split-K (fp16 x, 2/4-bit codes).

The project's codes are N-major (``qweight [K b / 32, N]``, columns contiguous). A program that
reads long contiguous rows of them must take many columns, so the M = 1 kernels split K across
programs and reduce the partial sums at the end. On an H200 that write-back (float atomics, a
GPU-scope fence, the arrival count, the last program's sum) cost a read-only probe 1.0-1.4 µs of
a 10-12 µs call at 8192^2 (``pipelines/read_floor.py``, session 19).

Stored K-major, the same logical tensor with transposed storage (``qweight.t().contiguous().t()``,
each column's words contiguous; :func:`efficientqat.qlinear.store_codes_k_major`), the codes let
one program own ``BLOCK_N`` whole columns, ``BLOCK_N x K b / 8`` contiguous bytes:

* every thread loads 16-byte vectors of 4 code words a column and step, the next step's in flight
  while this one is summed;
* it builds its x pairs once a step from vector loads of x (byte permutes, :func:`half2.prmt`)
  and spends them on all its columns;
* the decoding is the paired-fp16 kernel's (:func:`half2.pair_constants`, :func:`half2.field_pairs`);
* the K sum ends inside the program (``tl.sum``) and the output is one plain store.

Timed as a study (``pipelines/kmajor_study.py``, session 19, H200, CUDA-graph chains), in a first
version that read scales and zero points transposed: 8192^2 w4g128 11.66 µs against 13.05 for the
N-major kernel's then-tuned tile (12.59 with this session's), w2g64 10.34 against 10.96; faster on
7 of 8 layer shapes and bit widths (by 3-15%), slower on the 22016-row gate/up layer at w4g128
(16.08 against 15.38). This version reads them as the layer holds them (``[G, N]``): a thread's
columns are contiguous there, one vector load each (sm_90 SASS, 8 columns on 2 warps: 80
registers and 2.30 loop instructions a weight at w4g128, 2.06 at w2g64, against 128 and 2.54 /
2.25 for the study's version), but it took 12.38 µs at 8192^2 w4g128 where the study's took 11.66
(session 19, run 6), likely because the 64 group rows a program reads lie 16 KB apart. Scales
and zero points stored column-major too are the next step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .half2 import MAGIC, field_pairs, fma_h2, pair_constants, prmt, unpack_h2
from .tiling import (add_bias, group_strides, k_major_codes, launch_options, launcher, release_next_grid,
                     wait_for_previous_grid)
from .tuning import Config, interpreting

VECTOR = tl.constexpr(4)
"""Code words a thread loads per column and step: one 16-byte vector (a ``tl.constexpr``, which
the kernels may read; ``VECTOR.value`` on the host)."""
KMAJOR_BITS = (2, 4)


def takes(qweight: torch.Tensor, bits: int, group: int) -> bool:
    """Whether this kernel can run the layer: K-major codes (:func:`tiling.k_major_codes`) of 2 or 4 bits,
    groups and K holding whole thread vectors, 16-byte aligned columns."""
    vector_values = VECTOR.value * 32 // bits
    return (bits in KMAJOR_BITS and k_major_codes(qweight) and group % vector_values == 0
            and qweight.shape[0] % VECTOR.value == 0 and qweight.stride(1) % VECTOR.value == 0
            and qweight.data_ptr() % 16 == 0)


@triton.jit
def _unstack4(t, A: tl.constexpr, B: tl.constexpr):
    """``t [A, B, 4]`` -> its four ``[A, B]`` slices along the last axis, in order (register moves)."""
    a, b = tl.split(tl.reshape(t, (A, B, 2, 2)))
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def _load(ptrs, mask, other, EVEN: tl.constexpr):
    """``tl.load(ptrs)``, or with ``EVEN`` off masked (``other`` where ``mask`` is off)."""
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def _x_pairs(xw, first, lane, n_words, HV: tl.constexpr, THREADS: tl.constexpr, EVEN: tl.constexpr,
             EMULATE: tl.constexpr):
    """Per code word ``v`` of a thread's vector (``first``: its first word, ``[T, 1, 1]``), the
    ``HV`` x pairs ``(x[k + i], x[k + i + HV])`` its half words meet (``k`` its first value), as
    ``[T, 1]`` tensors in one flat tuple: vector loads of the int32 view of x (word ``j`` holds
    ``(x[2j], x[2j + 1])``; zeros for slots past ``n_words`` unless ``EVEN``), then one byte permute a pair."""
    pairs = ()
    for v in tl.static_range(VECTOR):
        xv = ()
        for q in tl.static_range(0, HV, 4):
            xv = xv + _unstack4(_load(xw + (first + v) * HV + q + lane, first < n_words, 0, EVEN), THREADS, 1)
        for i in tl.static_range(HV):
            pairs = pairs + (prmt(xv[i // 2], xv[HV // 2 + i // 2], 0x5410 if i % 2 == 0 else 0x7632, EMULATE),)
    return pairs


@triton.jit
def _dq_gemv_kmajor_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, stride_qn, stride_g, stride_gn, magic,
                           BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                           THREADS: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr, EMULATE: tl.constexpr):
    """``y[0, n] = sum_k x[0, k] W[n, k] (+ bias)`` for program 0's ``BLOCK_N`` columns over the whole
    of K, in steps of ``THREADS`` x :data:`VECTOR` code words a column (``qw_ptr``: word ``w`` of
    column ``n`` at ``n * stride_qn + w``); ``EVEN``: the steps fill K, else the thread slots past it
    are masked (codes and x read as zeros). Thread slots are axis 0 of every tile: where the
    compiler sees no contiguity it spreads threads over the first axis (with the columns first,
    Triton put 4 threads of a warp across 4 columns and moved every x pair through shared memory)."""
    HV: tl.constexpr = 16 // BITS  # x words (fp16 pairs) a code word
    VALUES: tl.constexpr = 32 // BITS
    STEP: tl.constexpr = THREADS * VECTOR  # code words a column and step
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]  # [1, BN, 1]
    thread = tl.arange(0, THREADS)[:, None, None] * VECTOR  # [T, 1, 1]: a thread slot's first word
    lane = tl.arange(0, VECTOR)[None, None, :]  # [1, 1, 4]
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [1, BN]
    thread_words = tl.arange(0, THREADS)[:, None] * VECTOR  # [T, 1]
    n_words = K // VALUES
    col_rows = qw_ptr + offs_n * stride_qn
    xw = x_ptr.to(tl.pointer_type(tl.int32))
    wait_for_previous_grid(PDL)  # (codes requested before it lost every tile timed, session 19)
    words = _load(col_rows + thread + lane, thread < n_words, 0, EVEN)
    acc = tl.zeros((THREADS, BLOCK_N), tl.float32)
    for w0 in range(0, n_words, STEP):
        first = w0 + thread
        w = _unstack4(words, THREADS, BLOCK_N)
        words = tl.load(col_rows + first + STEP + lane, mask=first + STEP < n_words, other=0)  # the next step's
        pairs = _x_pairs(xw, first, lane, n_words, HV, THREADS, EVEN, EMULATE)
        slot = w0 + thread_words
        group = (slot * VALUES) // GROUP
        s = _load(s_ptr + group * stride_g + cols * stride_gn, slot < n_words, 0.0, EVEN).to(tl.float32)
        z = _load(z_ptr + group * stride_g + cols * stride_gn, slot < n_words, 0, EVEN).to(tl.int32)
        ce, co, ze, zo = pair_constants(z, magic, BITS, EMULATE)
        h = tl.zeros((THREADS, BLOCK_N), tl.int32)  # 4 words x 32/b products of at most (2^b - 1)/256 |x|
        for v in tl.static_range(VECTOR):
            for shift in tl.static_range(0, 16, 2 * BITS):
                even, odd = field_pairs(w[v], shift, ce, co, ze, zo, magic, BITS, EMULATE)
                h = fma_h2(even, tl.broadcast_to(pairs[v * HV + shift // BITS], (THREADS, BLOCK_N)), h, EMULATE)
                h = fma_h2(odd, tl.broadcast_to(pairs[v * HV + shift // BITS + 1], (THREADS, BLOCK_N)), h, EMULATE)
        lo, hi = unpack_h2(h)
        acc += s * (lo.to(tl.float32) + hi.to(tl.float32))
    release_next_grid(PDL)
    offs_y = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    y = add_bias(tl.sum(acc, axis=0) * 256.0, b_ptr, offs_y, offs_y < N, 0, HAS_BIAS)
    tl.store(y_ptr + offs_y, y.to(y_ptr.dtype.element_ty))


def gemv_kmajor_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        bias: torch.Tensor | None, bits: int, group: int, cfg: Config) -> torch.Tensor:
    """``x [1, K]`` fp16 -> ``[1, N]`` over K-major ``qweight`` (:func:`takes`); ``cfg.block_n``
    columns a program, ``cfg.num_warps`` warps, one thread slot along K a thread (a last step that K does
    not fill is masked)."""
    M, K = x.shape
    N = qweight.shape[1]
    if M != 1 or x.dtype != torch.float16 or not takes(qweight, bits, group) or N % cfg.block_n:
        raise ValueError(f"the K-major decode kernel takes one fp16 row and K-major {KMAJOR_BITS}-bit codes in "
                         f"groups and K of whole {VECTOR.value}-word vectors and N a multiple of BLOCK_N; not {M} "
                         f"{x.dtype} rows, codes of strides {tuple(qweight.stride())}, {bits}-bit, group {group}, N = {N}, "
                         f"BLOCK_N = {cfg.block_n}, K = {K}")
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    launcher(_dq_gemv_kmajor_kernel, (N // cfg.block_n,))(
        x, qweight, scales, zeros, bias if bias is not None else x, y, N, K, qweight.stride(1),
        *group_strides(scales, zeros), MAGIC,
        BITS=bits, GROUP=group, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, THREADS=32 * cfg.num_warps,
        EVEN=(K * bits // 32) % (VECTOR.value * 32 * cfg.num_warps) == 0, PDL=cfg.pdl, EMULATE=interpreting(),
        num_warps=cfg.num_warps, **launch_options(cfg))
    return y
