"""Backward kernels for E2E-QP, where the per-group scales are the only trainable tensor.

* ``grad_input``: ``dx = dy @ W`` (W is ``[N, K]``). Each program owns a ``[BLOCK_M, BLOCK_K]``
  tile of dx and walks N, decoding the same ``[BLOCK_K, BLOCK_N]`` tile of W^T as the forward
  pass and multiplying by its transpose. Since ``BLOCK_K`` divides the group length, one program
  needs a single row of scales per N step.
* ``grad_scales``: ``dL/ds[g, n] = sum_{k in g} (q[k,n] - z[g,n]) * sum_m x[m,k] dy[m,n]``.
  Each program computes one ``[BLOCK_K, BLOCK_N]`` tile of ``x^T dy`` in registers (a GEMM
  over M), weights it by the decoded ``q - z`` and folds it to per-group sums. The dense
  ``[N, K]`` weight gradient therefore never reaches memory: the only output is ``[G, N]``.
  When ``BLOCK_K`` exceeds the group the tile is folded per group; when a group spans several
  tiles (per-channel or ``BLOCK_K < group``) the partial sums are added atomically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm import dot_precision
from .tiling import group_strides, grouped_tile, launcher
from .tuning import Config
from .unpack import dequant_tile, load_codes, load_group_row


@triton.jit
def _dq_grad_input_kernel(
    dy_ptr, qw_ptr, s_ptr, z_ptr, dx_ptr,
    M, N, K,
    stride_dym, stride_qk, stride_qn, stride_g, stride_gn, stride_dxm,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_k = grouped_tile(pid, tl.cdiv(M, BLOCK_M), K // BLOCK_K, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    g = (pid_k * BLOCK_K) // GROUP
    dtype = dy_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        q = load_codes(qw_ptr, offs_k, offs_n * stride_qn, stride_qk, mask_n, BITS)
        s, z = load_group_row(s_ptr, z_ptr, g, offs_n, stride_g, stride_gn, mask_n)
        w_t = dequant_tile(q, s, z, dtype)  # [BLOCK_K, BLOCK_N] = W^T tile
        acc = tl.dot(dy, tl.trans(w_t), acc, input_precision=DOT_PREC)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def _dq_grad_scales_kernel(
    x_ptr, dy_ptr, qw_ptr, z_ptr, ds_ptr,
    M, N, K,
    stride_xm, stride_dym, stride_qk, stride_qn, stride_g, stride_gn,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N

    # P = x[:, kblock]^T @ dy[:, nblock], reduced over all M rows, kept in registers.
    p = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        x_t = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=mask_m[None, :], other=0.0)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        p = tl.dot(x_t, dy, p, input_precision=DOT_PREC)

    q = load_codes(qw_ptr, offs_k, offs_n * stride_qn, stride_qk, mask_n, BITS).to(tl.float32)
    if BLOCK_K <= GROUP:
        g = (pid_k * BLOCK_K) // GROUP
        z = tl.load(z_ptr + g * stride_g + offs_n * stride_gn, mask=mask_n, other=0).to(tl.float32)
        part = tl.sum((q - z[None, :]) * p, axis=0)
        if ATOMIC:
            tl.atomic_add(ds_ptr + g * stride_g + offs_n * stride_gn, part, mask=mask_n)
        else:
            tl.store(ds_ptr + g * stride_g + offs_n * stride_gn, part, mask=mask_n)
    else:
        # Several whole groups in this tile: fold rows group by group.
        NG: tl.constexpr = BLOCK_K // GROUP
        offs_g = (pid_k * BLOCK_K) // GROUP + tl.arange(0, NG)
        z = tl.load(z_ptr + offs_g[:, None] * stride_g + offs_n[None, :] * stride_gn, mask=mask_n[None, :], other=0)
        qz = tl.reshape(q, (NG, GROUP, BLOCK_N)) - z.to(tl.float32)[:, None, :]
        part = tl.sum(qz * tl.reshape(p, (NG, GROUP, BLOCK_N)), axis=1)
        tl.store(ds_ptr + offs_g[:, None] * stride_g + offs_n[None, :] * stride_gn, part, mask=mask_n[None, :])


def grad_input(
    dy: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bits: int, group: int, K: int, cfg: Config,
) -> torch.Tensor:
    """``dy [M, N]`` contiguous -> ``dx [M, K]`` in dy's dtype."""
    M, N = dy.shape
    dx = torch.empty((M, K), device=dy.device, dtype=dy.dtype)
    grid = (triton.cdiv(M, cfg.block_m) * (K // cfg.block_k),)
    launcher(_dq_grad_input_kernel, grid)(
        dy, qweight, scales, zeros, dx,
        M, N, K,
        dy.stride(0), qweight.stride(0), qweight.stride(1), *group_strides(scales, zeros), dx.stride(0),
        BITS=bits, GROUP=group,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8,
        DOT_PREC=dot_precision(dy.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dx


def grad_scales(
    x: torch.Tensor, dy: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
    bits: int, group: int, cfg: Config,
) -> torch.Tensor:
    """``x [M, K]``, ``dy [M, N]`` -> float32 ``[G, N]`` gradient of the scales."""
    M, K = x.shape
    N = dy.shape[1]
    G = K // group
    atomic = cfg.block_k < group
    ds = torch.empty_strided((G, N), zeros.stride(), device=x.device, dtype=torch.float32)  # zeros' layout
    if atomic:
        ds.zero_()
    grid = (triton.cdiv(N, cfg.block_n), K // cfg.block_k)
    launcher(_dq_grad_scales_kernel, grid)(
        x, dy, qweight, zeros, ds,
        M, N, K,
        x.stride(0), dy.stride(0), qweight.stride(0), qweight.stride(1), *zeros.stride(),
        BITS=bits, GROUP=group,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        ATOMIC=atomic, DOT_PREC=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return ds
