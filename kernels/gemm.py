"""Large-M forward kernel: ``y = x @ W^T (+ bias)`` with W decoded tile-wise from packed codes.

Used for prefill and training (M > 16). Each program owns a ``[BLOCK_M, BLOCK_N]`` output tile
and walks K; every step decodes a ``[BLOCK_K, BLOCK_N]`` tile of W^T into the activation dtype
in registers and feeds it to the tensor cores through ``tl.dot``. The dense weight never
exists in memory, so DRAM traffic for W is ``b/16`` of an fp16 GEMM's.

``BLOCK_K`` always divides the group length, so one K step lies inside one group and needs a
single row of scales and zero points. ``SPLIT_K > 1`` lets mid-sized M (17..256) fill the GPU
when there are few output tiles; partial sums are then added atomically into a float32 buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import add_bias, group_strides, grouped_tile_ranges, launcher, store_split
from .tuning import Config
from .unpack import dequant_tile, load_codes, load_group_row


@triton.jit
def _dq_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_qn, stride_g, stride_gn, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr, EXPAND: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_m, offs_n, mask_m, mask_n = grouped_tile_ranges(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(pid_k, K // BLOCK_K, SPLIT_K):
        k0 = it * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        if EXPAND:
            # Load each word once and expand in registers: [words, values/word, N] -> [K, N].
            PW: tl.constexpr = 32 // BITS
            offs_w = it * (BLOCK_K // PW) + tl.arange(0, BLOCK_K // PW)
            words = tl.load(qw_ptr + offs_w[:, None] * stride_qk + (offs_n * stride_qn)[None, :], mask=mask_n[None, :],
                            other=0)
            shifts = tl.arange(0, PW) * BITS
            q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))
        else:
            q = load_codes(qw_ptr, offs_k, offs_n * stride_qn, stride_qk, mask_n, BITS)
        s, z = load_group_row(s_ptr, z_ptr, k0 // GROUP, offs_n, stride_g, stride_gn, mask_n)
        w = dequant_tile(q, s, z, dtype)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)

    acc = add_bias(acc, b_ptr, offs_n, mask_n, pid_k, HAS_BIAS)
    mask = mask_m[:, None] & mask_n[None, :]
    store_split(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask, SPLIT_K)


@triton.jit
def _dq_gemm_wa_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_qk, stride_qn, stride_g, stride_gn, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Same product computed as ``y^T = W x^T``: the decoded weight tile is the *A* operand.

    On Hopper, wgmma reads A from registers but B only from shared memory. With W as B (the
    kernel above) every decoded tile is stored to shared memory and read back by the tensor
    cores; with W as A, Triton can decode straight into the register layout the instruction
    wants, and only x (loaded by the async copy engine) goes through shared memory."""
    pid_k = tl.program_id(1)
    offs_m, offs_n, mask_m, mask_n = grouped_tile_ranges(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dtype = x_ptr.dtype.element_ty
    PW: tl.constexpr = 32 // BITS

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(pid_k, K // BLOCK_K, SPLIT_K):
        k0 = it * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        s, z = load_group_row(s_ptr, z_ptr, k0 // GROUP, offs_n, stride_g, stride_gn, mask_n)
        if BITS == 3:
            q = tl.trans(load_codes(qw_ptr, offs_k, offs_n * stride_qn, stride_qk, mask_n, BITS))
        else:
            ptrs = qw_ptr + (offs_k // PW)[None, :] * stride_qk + (offs_n * stride_qn)[:, None]
            words = tl.load(ptrs, mask=mask_n[:, None], other=0)
            q = (words >> ((offs_k % PW) * BITS)[None, :]) & ((1 << BITS) - 1)
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
        w = ((qf - (z + 8388608.0)[:, None]) * s[:, None]).to(dtype)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PREC)

    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    mask = mask_m[None, :] & mask_n[:, None]
    store_split(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc, mask, SPLIT_K)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 activations get exact (IEEE) products: tf32 would drift ~3e-4 from the torch path."""
    return "ieee" if dtype == torch.float32 else "tf32"


def gemm_forward(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, bits: int, group: int, cfg: Config,
) -> torch.Tensor:
    """``x [M, K]`` contiguous -> ``y [M, N]`` in x's dtype, with the tile sizes of ``cfg``."""
    M, K = x.shape
    N = qweight.shape[1]
    split = cfg.split_k
    y = torch.empty((M, N), device=x.device, dtype=x.dtype) if split == 1 else \
        torch.zeros((M, N), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    # variant 2: W as the A operand; 1: words expanded once in registers (not for 3-bit); 0: codes per value
    kernel, variant_args = ((_dq_gemm_wa_kernel, {}) if cfg.variant == 2
                            else (_dq_gemm_kernel, dict(EXPAND=bool(cfg.variant) and bits != 3)))
    launcher(kernel, grid)(
        x, qweight, scales, zeros, bias if bias is not None else x, y,
        M, N, K,
        x.stride(0), qweight.stride(0), qweight.stride(1), *group_strides(scales, zeros), y.stride(0),
        BITS=bits, GROUP=group, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SPLIT_K=split, GROUP_M=8, DOT_PREC=dot_precision(x.dtype), **variant_args,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y if split == 1 else y.to(x.dtype)
