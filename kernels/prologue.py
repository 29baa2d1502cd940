"""A decoder layer's RMSNorm and residual add inside the decode kernels: no launches of their own.

Around its four matmuls and attention, a Llama-family decoder layer at decode time runs two
elementwise kernels: residual add + RMSNorm before q/k/v and again before gate/up (the
compiler fuses each pair). On an H200 they and their launch gaps were ~190 of the 2035 us of a
w4g128 7B step at batch 1 (session 12 profile). Here the matmul that reads a normalised row
normalises it, and the matmul whose output joins the residual stream adds it:

* prologue (``NORM``): every program sums the squares of its input rows (the whole row: 8 KB
  at 4096 features, from L2; at M = 1 requested together with the norm weight), then writes
  the normalised values of the K range it reads, rounded as Hugging Face's ``RMSNorm`` rounds
  them, ``dtype(gamma * dtype(h rsqrt(mean h^2 + eps)))``, into a scratch row, and reads x
  from there. Programs of other column tiles write
  the same values to the same places; after a barrier each program's threads read what they
  themselves wrote, so the hot loops are unchanged (they get another x pointer).
* epilogue (residual): the first K slice adds the residual rows to its partial sum, as the bias
  (``tiling.add_in_first_slice``).

:class:`efficientqat.row_ops.RowOps` carries both to a launcher (:func:`launch_rows`); where
no decode kernel runs, its ``before`` and ``after`` do the same in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from efficientqat.row_ops import NO_ROW_OPS, RowOps

__all__ = ["NO_ROW_OPS", "RowOps", "launch_rows", "normalize_steps", "row_block"]


@triton.jit
def row_rsqrt(h_ptr, M, K, stride_h, eps, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    """``rsqrt(mean(h^2) + eps)`` of each of the ``BLOCK_M`` rows (float32 ``[BLOCK_M, 1]``;
    rows past M read zeros), ``BLOCK`` columns a load (:func:`row_block`)."""
    offs_m = tl.arange(0, BLOCK_M)[:, None]
    offs = tl.arange(0, BLOCK)[None, :]
    squares = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        h = tl.load(h_ptr + offs_m * stride_h + k0 + offs, mask=(offs_m < M) & (k0 + offs < K), other=0.0)
        h = h.to(tl.float32)
        squares += h * h
    return tl.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]


@triton.jit
def normalize_range(h_ptr, g_ptr, out_ptr, r, M, K, k0, stride_h, stride_out,
                    BLOCK_M: tl.constexpr, BK: tl.constexpr, PAIR_HV: tl.constexpr):
    """Write :func:`rms_value` of columns ``k0 .. k0 + BK`` (those below K) of the rows into
    ``out`` at their :func:`pair_position`."""
    offs_m = tl.arange(0, BLOCK_M)[:, None]
    k = k0 + tl.arange(0, BK)[None, :]
    mask = (offs_m < M) & (k < K)
    h = tl.load(h_ptr + offs_m * stride_h + k, mask=mask, other=0.0).to(tl.float32)
    gamma = tl.load(g_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs_m * stride_out + pair_position(k, PAIR_HV), rms_value(h, gamma, r, dtype), mask=mask)


@triton.jit
def normalize_row(h_ptr, g_ptr, out_ptr, M, K, stride_h, eps, first, stop, stride,
                  BLOCK_M: tl.constexpr, BK: tl.constexpr, PAIR_HV: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """:func:`normalize_steps` where the rows fit one load (``K <= ROW_BLOCK``): the rows and the
    weight are requested together, and the steps ``first, first + stride, ...`` (below ``stop``)
    are written from the same registers: one dependent L2 round trip fewer than
    :func:`row_rsqrt` then :func:`normalize_range`, which request the weight once r is known."""
    offs_m = tl.arange(0, BLOCK_M)[:, None]
    k = tl.arange(0, ROW_BLOCK)[None, :]
    mask = (offs_m < M) & (k < K)
    h = tl.load(h_ptr + offs_m * stride_h + k, mask=mask, other=0.0).to(tl.float32)
    gamma = tl.load(g_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(h * h, axis=1) / K + eps)[:, None]
    step = k // BK
    mine = (step >= first) & (step < stop) & ((step - first) % stride == 0)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs_m * K + pair_position(k, PAIR_HV), rms_value(h, gamma, r, dtype), mask=mask & mine)


@triton.jit
def rms_value(h, gamma, r, dtype: tl.constexpr):
    """Hugging Face's RMSNorm rounding of float32 ``h`` scaled by ``r``: ``dtype(gamma * dtype(h r))``."""
    return (gamma * (h * r).to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def pair_position(k, PAIR_HV: tl.constexpr):
    """Where value ``k`` of a row goes: ``k`` itself, or with ``PAIR_HV`` its place in
    ``half2.pair_x``'s pair order (value ``2 HV t + j`` at element ``2 HV t + 2 (j mod HV) + j // HV``)."""
    if PAIR_HV:
        j = k % (2 * PAIR_HV)
        k = k - j + 2 * (j % PAIR_HV) + j // PAIR_HV
    return k


@triton.jit
def normalize_steps(h_ptr, g_ptr, x_ptr, M, K, stride_h, eps, first, stop, stride,
                    BLOCK_M: tl.constexpr, BK: tl.constexpr, PAIR_HV: tl.constexpr, NORM: tl.constexpr,
                    ROW_BLOCK: tl.constexpr):
    """With ``NORM``, the prologue of a program that reads K steps ``first, first + stride, ...``
    (below ``stop``) of ``BK`` values: RMSNorm of those steps of the rows at ``h_ptr`` (weight
    ``g_ptr``) written into ``x_ptr`` (row stride K; ``PAIR_HV``: in pair order), then a barrier,
    after which the program's threads read x from there."""
    if NORM:
        if K <= ROW_BLOCK:
            normalize_row(h_ptr, g_ptr, x_ptr, M, K, stride_h, eps, first, stop, stride, BLOCK_M, BK, PAIR_HV,
                          ROW_BLOCK)
        else:
            r = row_rsqrt(h_ptr, M, K, stride_h, eps, BLOCK_M, ROW_BLOCK)
            for step in range(first, stop, stride):
                normalize_range(h_ptr, g_ptr, x_ptr, r, M, K, step * BK, stride_h, K, BLOCK_M, BK, PAIR_HV)
        tl.debug_barrier()


def row_block(k: int, rows: int) -> int:
    """Columns :func:`row_rsqrt` loads at once for ``rows`` rows of ``k``: the whole row where the
    tile (rows and weight) stays at most 4096 values a row block (32 registers a thread each at 4
    warps), and then :func:`normalize_row` normalises it from registers; else slices of at least
    512 columns. Measured on an H200, 7B decode step, packed matmuls: whole rows then the range
    pass took as long as eight 512-column rounds (w4g128: 1556 against 1557 us, session 13);
    :func:`normalize_row` without PDL, in a tree that also held the first step's codes through
    it, 1385-1391 against session 13's 1334 us (w2g64, session 14). Where the ~2 us a normalising call
    go is still open."""
    return max(512, min(triton.next_power_of_2(k), 4096 // rows))


def launch_rows(ops: RowOps, x: torch.Tensor, xs: torch.Tensor, rows: int) -> tuple[torch.Tensor, tuple, dict]:
    """``(the buffer the kernel reads as x, extra arguments, extra constants)`` of a decode
    launch on ``x [M, K]`` by a kernel of ``rows`` rows: ``xs`` (x or its pair-ordered copy)
    without a norm; with one, an uninitialised contiguous buffer of x's shape and dtype that the
    prologue fills (its row stride is K) and ``xs`` is not used."""
    if ops.norm_weight is not None:
        xs = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    gamma = ops.norm_weight if ops.norm_weight is not None else x
    res = ops.residual if ops.residual is not None else x
    args = (x, gamma, res, x.stride(0), res.stride(0), float(ops.eps))
    return xs, args, {"NORM": ops.norm_weight is not None, "RESIDUAL": ops.residual is not None,
                      "ROW_BLOCK": row_block(x.shape[1], rows)}
