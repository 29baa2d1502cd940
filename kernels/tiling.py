"""Program-to-tile mapping and tile write-back shared by the kernels in this package."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order: ``GROUP_M`` consecutive programs
    walk down one column of tiles, so the weight tile they share is still hot in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def add_bias(acc, b_ptr, offs_n, mask_n, pid_k, HAS_BIAS: tl.constexpr):
    """``acc + bias[offs_n]`` (broadcast over leading rows), added by the first K slice only."""
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return acc


@triton.jit
def store_split(y_ptrs, acc, mask, SPLIT_K: tl.constexpr):
    """Store the tile, or with split-K add this K slice's partial sum atomically into the
    buffer the launcher zeroed."""
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)


def split_k_buffer(x: torch.Tensor, N: int, split: int) -> torch.Tensor:
    """The ``[M, N]`` output a launch writes: empty without split-K, else zeroed for the atomic
    adds. fp16 partials are added straight into the fp16 output (one memset, no extra cast
    launch: at M = 1 a launch costs a tenth of the kernel); bf16 keeps 8 mantissa bits, too few
    to add partials in, so it sums in float32 and the launcher casts."""
    if split == 1:
        return torch.empty((x.shape[0], N), device=x.device, dtype=x.dtype)
    return torch.zeros((x.shape[0], N), device=x.device, dtype=torch.float16 if x.dtype == torch.float16 else torch.float32)
