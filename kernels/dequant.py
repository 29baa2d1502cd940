"""Decode packed codes into a dense weight, then let cuBLAS multiply: the large-M path.

At M >= ~1024 a matmul against W is bound by tensor-core arithmetic, not by reading W: the
packed weight is read once and reused M times. Decoding inside the GEMM's K loop
(``gemm.py``) costs Triton a shared-memory store of every decoded tile before wgmma can read
it, which held that kernel to ~0.45x of cuBLAS. Here one Triton pass decodes ``W^T [K, N]``
straight into a dense workspace (b/8 bytes read and 2 bytes written per weight; 49 us for
8192 x 8192 and 15 us for 4096 x 4096 on an H200, 4-15% of the GEMM at M = 2048..8192) and
cuBLAS runs the product at its full rate. The workspace lives only for the call, so peak memory is one
layer's dense weight in the activation dtype: below the PyTorch fallback, which builds the
weight through float32 intermediates.

The decode is ``(q - z) * s`` in float32 with one rounding to the activation dtype, the same
arithmetic as the fallback and the fused kernels, so every path sees bit-identical weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from efficientqat.packing import chunk_values

from .tiling import group_strides, launcher
from .tuning import Config
from .unpack import load_chunk_words, slot_code


@triton.jit
def _decode_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr,
    N, stride_qk, stride_qn, stride_g, stride_gn, stride_wk,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``W^T[k, n] = (q[k, n] - z[g, n]) * s[g, n]`` for ``BLOCK_C`` chunks x ``BLOCK_N`` columns;
    each packed word is loaded once, each value slot is stored as a strided set of rows."""
    VPC: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    chunks = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w0, w1, w2 = load_chunk_words(qw_ptr, chunks, offs_n * stride_qn, stride_qk, mask_n[None, :], BITS)
    # One chunk (VPC values) never straddles a group: the group is a multiple of 32 >= VPC.
    g = (chunks * VPC) // GROUP
    sz = g[:, None] * stride_g + offs_n[None, :] * stride_gn
    s = tl.load(s_ptr + sz, mask=mask_n[None, :], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sz, mask=mask_n[None, :], other=0).to(tl.float32) + 8388608.0
    rows = w_ptr + (chunks * VPC)[:, None] * stride_wk + offs_n[None, :]
    for j in tl.static_range(VPC):
        q = slot_code(w0, w1, w2, j, BITS)
        # int -> float through the exponent bits (exact, no I2F): see unpack.dequant_tile
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
        tl.store(rows + j * stride_wk, ((qf - z) * s).to(w_ptr.dtype.element_ty), mask=mask_n[None, :])


def decode_weight_t(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Dense ``W^T [K, N]`` in ``dtype`` from the packed layer (one Triton launch)."""
    words, N = qweight.shape
    K = words * 32 // bits
    chunks = K // chunk_values(bits)
    block_c = 8 if chunks % 8 == 0 else 1
    block_n = 128
    w_t = torch.empty((K, N), device=qweight.device, dtype=dtype)
    grid = (chunks // block_c, triton.cdiv(N, block_n))
    launcher(_decode_kernel, grid)(
        qweight, scales, zeros, w_t,
        N, qweight.stride(0), qweight.stride(1), *group_strides(scales, zeros), w_t.stride(0),
        BITS=bits, GROUP=group, BLOCK_N=block_n, BLOCK_C=block_c,
        num_warps=4,
    )
    return w_t


def dense_forward(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bias: torch.Tensor | None, bits: int, group: int, cfg: Config,
) -> torch.Tensor:
    """``x [M, K]`` -> ``x @ W^T + bias`` through a decoded workspace and cuBLAS (``cfg`` unused:
    the signature of the other launchers, so the tuner can time this path against them)."""
    w_t = decode_weight_t(qweight, scales, zeros, bits, group, x.dtype)
    if bias is None:
        return torch.mm(x, w_t)
    return torch.addmm(bias.to(x.dtype), x, w_t)


def dense_grad_input(
    dy: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bits: int, group: int, K: int, cfg: Config,
) -> torch.Tensor:
    """``dx = dy @ W`` through a decoded workspace and cuBLAS."""
    return torch.mm(dy, decode_weight_t(qweight, scales, zeros, bits, group, dy.dtype).t())


@triton.jit
def _fold_scale_grad_kernel(
    p_ptr, qw_ptr, z_ptr, ds_ptr,
    N, n0, stride_pk, stride_qk, stride_qn, stride_g, stride_gn,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``ds[g, n0 + n] = sum_{k in g} (q[k, n0 + n] - z[g, n0 + n]) * P[k, n]`` for one group and
    ``BLOCK_N`` columns of a slab ``P = x^T dy[:, n0:n0+NS]`` (``[K, NS]``, float32 or bf16: :func:`_slab`)."""
    VPC: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    g = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cols = n0 + offs_n
    z = tl.load(z_ptr + g * stride_g + cols * stride_gn, mask=mask_n, other=0).to(tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, GROUP // VPC, BLOCK_C):
        chunks = g * (GROUP // VPC) + c0 + tl.arange(0, BLOCK_C)
        w0, w1, w2 = load_chunk_words(qw_ptr, chunks, cols * stride_qn, stride_qk, mask_n[None, :], BITS)
        rows = p_ptr + (chunks * VPC)[:, None] * stride_pk + offs_n[None, :]
        for j in tl.static_range(VPC):
            p = tl.load(rows + j * stride_pk, mask=mask_n[None, :], other=0.0).to(tl.float32)
            acc += (slot_code(w0, w1, w2, j, BITS).to(tl.float32) - z[None, :]) * p
    tl.store(ds_ptr + g * stride_g + cols * stride_gn, tl.sum(acc, axis=0), mask=mask_n)


def _slab(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``, the ``x^T dy`` slab the fold reads. cuBLAS accumulates 16-bit inputs in float32;
    fp16 inputs keep that float32 sum (``out_dtype``, torch >= 2.8 on CUDA: an fp16 weight
    gradient can overflow), bf16 inputs round it to bf16, the precision of the weight gradient
    PyTorch forms for a bf16 layer, at half the slab's bytes written and read again by the fold
    (256 MB each way for an 8192 x 8192 layer, ~60 us on an H200)."""
    if a.dtype == torch.float32 or (a.is_cuda and a.dtype == torch.bfloat16):
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


SLAB_BYTES = 256 << 20
"""Bound on the float32 ``x^T dy`` slab. Each slab costs a cuBLAS call and a Triton launch of
host time (an 8192 x 8192 layer at M = 2048 spent 1.0 ms of host time per forward+backward with
four 64 MB slabs, against 1.2 ms of GPU time), so slabs are large: one for K x N <= 64M."""


def dense_grad_scales(
    x: torch.Tensor, dy: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor,
    bits: int, group: int, cfg: Config,
) -> torch.Tensor:
    """float32 ``[G, N]`` scale gradient: cuBLAS forms ``x^T dy`` for a slab of columns at a time
    (:func:`_slab`, at most ``SLAB_BYTES`` as float32), a Triton pass folds it with ``q - z`` per group.
    The full ``[N, K]`` weight gradient never exists; the slab is the only workspace."""
    K = x.shape[1]
    N = dy.shape[1]
    ds = torch.empty_strided((K // group, N), zeros.stride(), device=x.device, dtype=torch.float32)  # zeros' layout
    slab = max(128, SLAB_BYTES // (4 * K) // 128 * 128)
    block_c = next(c for c in (8, 4, 2, 1) if (group // chunk_values(bits)) % c == 0)
    x_t = x.t()
    for n0 in range(0, N, slab):
        ns = min(slab, N - n0)
        p = _slab(x_t, dy[:, n0:n0 + ns])
        grid = (K // group, triton.cdiv(ns, 128))
        launcher(_fold_scale_grad_kernel, grid)(
            p, qweight, zeros, ds,
            ns, n0, p.stride(0), qweight.stride(0), qweight.stride(1), *zeros.stride(),
            BITS=bits, GROUP=group, BLOCK_N=128, BLOCK_C=block_c, num_warps=4,
        )
    return ds
