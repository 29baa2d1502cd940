"""One decode step of attention in one launch: rotary embedding, KV-cache write and attention.

At batch 1 a Llama decode step spends ~10 us a layer on attention besides its matmuls (session
10, H200, Llama-2-7B shape): an elementwise kernel for the rotary embedding, the cache writes and
its position bookkeeping, then cuDNN's attention over the whole static cache (masked slots
included), ~7 us for one query row. All of it is latency, not bytes: the keys and values cached
for a few hundred tokens are ~100 KB a head. :func:`decode_attention` does the whole step in one
kernel, reading only the positions written so far:

* program ``(b, h, split)`` rotates its query head and the new key of that head's KV group
  (``rotate_half`` convention of Hugging Face's Llama, Mistral, Qwen2 and Qwen3), rounding both to the
  cache dtype as the unfused path does; the first program of each KV head writes the new key and
  value at the cache's write position;
* the positions cached so far are cut into ``SPLITS`` contiguous slices (one per program, so a
  long context fills the GPU; flash-decoding's split); each program keeps an online softmax
  (running max, sum, weighted values) over its slice, the new token (taken from registers, not
  from the cache it is being written to) in the last slice;
* the last program of a head to arrive (a counter, as :func:`.tiling.store_decode`) merges the
  slices' partials and writes the head's output; the last head to finish advances the cache's
  write position by one, the increment the cache's own ``update`` would have made.

The write position is read on the GPU (a 0-dim integer tensor), so one compiled and captured
step serves every position. An optional ``[B, L]`` mask row (bool: attend where true; float:
added to the scores) carries padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiling import split_k_workspace
from .tuning import sm_count

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2
MAX_SPLITS = 32


@triton.jit
def _rotate(x_ptr, c1, s1, c2, s2, HALF: tl.constexpr, ROUND_TO: tl.constexpr):
    """Halves ``(x1 cos - x2 sin, x2 cos + x1 sin)`` of the head at ``x_ptr``, rounded to the
    cache dtype and back to float32 (what Hugging Face's ``apply_rotary_pos_emb`` stores)."""
    offs = tl.arange(0, HALF)
    x1 = tl.load(x_ptr + offs).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + offs).to(tl.float32)
    r1 = (x1 * c1 - x2 * s1).to(ROUND_TO).to(tl.float32)
    r2 = (x2 * c2 + x1 * s2).to(ROUND_TO).to(tl.float32)
    return r1, r2


@triton.jit
def _masked_scores(scores, pos, valid, mask_row_ptr, stride_ms, MASK: tl.constexpr):
    """Scores with invalid positions, and those the mask row excludes, at -inf (plus an additive mask)."""
    if MASK == 1:
        keep = tl.load(mask_row_ptr + pos * stride_ms, mask=valid, other=0) != 0
        valid = valid & keep
    elif MASK == 2:
        scores += tl.load(mask_row_ptr + pos * stride_ms, mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, scores, float("-inf"))


@triton.jit
def _online_update(m, l, a1, a2, scores, v1, v2):
    """Fold a block of scores ``[S]`` and its values (halves ``[S, HALF]``) into the running max
    ``m``, sum ``l`` and weighted values ``a1, a2`` (nothing changes for an all -inf block)."""
    m_new = tl.maximum(m, tl.max(scores, axis=0))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - shift)
    p = tl.exp(scores - shift)
    l = l * alpha + tl.sum(p, axis=0)
    a1 = a1 * alpha + tl.sum(p[:, None] * v1, axis=0)
    a2 = a2 * alpha + tl.sum(p[:, None] * v2, axis=0)
    return m_new, l, a1, a2


@triton.jit
def _load_block(kc_head, vc_head, pos, valid, stride_kcs, stride_vcs, HALF: tl.constexpr):
    """Cached key and value halves ``[BLOCK, HALF]`` at positions ``pos`` (0 where not valid)."""
    offs_h = tl.arange(0, HALF)
    k_rows = kc_head + pos[:, None] * stride_kcs + offs_h[None, :]
    v_rows = vc_head + pos[:, None] * stride_vcs + offs_h[None, :]
    return (tl.load(k_rows, mask=valid[:, None], other=0.0), tl.load(k_rows + HALF, mask=valid[:, None], other=0.0),
            tl.load(v_rows, mask=valid[:, None], other=0.0), tl.load(v_rows + HALF, mask=valid[:, None], other=0.0))


@triton.jit
def _fold_block(m, l, a1, a2, q1, q2, kb1, kb2, vb1, vb2, pos, valid, mask_row, stride_ms, MASK: tl.constexpr):
    """:func:`_online_update` with one block of cached keys and values."""
    scores = tl.sum(kb1.to(tl.float32) * q1[None, :] + kb2.to(tl.float32) * q2[None, :], axis=1)
    scores = _masked_scores(scores, pos, valid, mask_row, stride_ms, MASK)
    return _online_update(m, l, a1, a2, scores, vb1.to(tl.float32), vb2.to(tl.float32))


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, len_ptr, mask_ptr, part_ptr, count_ptr, out_ptr,
    stride_qb, stride_kb, stride_vb, stride_cb, stride_sb,
    stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
    stride_mb, stride_ms, stride_ob, scaling, H, GROUP, n_heads_total, L,
    HALF: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, MASK: tl.constexpr,
):
    """Program ``(b * H + h, split)``. Slices are cut from the positions cached so far, not from
    the cache length: no block is read for nothing. (Cutting them from the length lets the first
    block's loads start before the write position arrives; on the H200 that saved nothing,
    ``bench_decode_attention.py``, session 12.)"""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    D: tl.constexpr = 2 * HALF
    cache_ty = kc_ptr.dtype.element_ty
    offs_h = tl.arange(0, HALF)
    kc_head = kc_ptr + b * stride_kcb + kvh * stride_kch
    vc_head = vc_ptr + b * stride_vcb + kvh * stride_vch
    slot = tl.load(len_ptr).to(tl.int32)  # positions cached before this step; the new token goes here

    c1 = tl.load(cos_ptr + b * stride_cb + offs_h).to(tl.float32)
    c2 = tl.load(cos_ptr + b * stride_cb + HALF + offs_h).to(tl.float32)
    s1 = tl.load(sin_ptr + b * stride_sb + offs_h).to(tl.float32)
    s2 = tl.load(sin_ptr + b * stride_sb + HALF + offs_h).to(tl.float32)
    q1, q2 = _rotate(q_ptr + b * stride_qb + h * D, c1, s1, c2, s2, HALF, q_ptr.dtype.element_ty)
    q1 *= scaling
    q2 *= scaling
    k1, k2 = _rotate(k_ptr + b * stride_kb + kvh * D, c1, s1, c2, s2, HALF, cache_ty)
    v_row = v_ptr + b * stride_vb + kvh * D
    v1 = tl.load(v_row + offs_h).to(tl.float32)
    v2 = tl.load(v_row + HALF + offs_h).to(tl.float32)
    if (h % GROUP == 0) & (pid_s == 0) & (slot < L):  # a step past a full cache stores nothing
        tl.store(kc_head + slot * stride_kcs + offs_h, k1.to(cache_ty))
        tl.store(kc_head + slot * stride_kcs + HALF + offs_h, k2.to(cache_ty))
        tl.store(vc_head + slot * stride_vcs + offs_h, v1.to(cache_ty))
        tl.store(vc_head + slot * stride_vcs + HALF + offs_h, v2.to(cache_ty))

    # this program's slice [lo, hi) of positions 0..slot (slot itself: the new token, from registers)
    chunk = tl.cdiv(slot + 1, SPLITS)
    lo = pid_s * chunk
    hi = tl.minimum(lo + chunk, slot + 1)
    mask_row = mask_ptr + b * stride_mb
    m = tl.max(tl.full((2,), float("-inf"), tl.float32), axis=0)
    l = tl.sum(tl.zeros((2,), tl.float32), axis=0)
    a1 = tl.zeros((HALF,), tl.float32)
    a2 = tl.zeros((HALF,), tl.float32)
    cached_hi = tl.minimum(tl.minimum(hi, slot), L)
    for start in range(lo, cached_hi, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        valid = pos < cached_hi
        kb1, kb2, vb1, vb2 = _load_block(kc_head, vc_head, pos, valid, stride_kcs, stride_vcs, HALF)
        m, l, a1, a2 = _fold_block(m, l, a1, a2, q1, q2, kb1, kb2, vb1, vb2, pos, valid, mask_row, stride_ms, MASK)
    if (lo <= slot) & (slot < hi):
        # the new token as a block of two, the second masked off; past a full cache its mask is the last slot's
        pos = tl.minimum(slot, L - 1) + tl.arange(0, 2)
        one = tl.arange(0, 2) == 0
        new_score = tl.sum(k1 * q1, axis=0) + tl.sum(k2 * q2, axis=0)
        scores = _masked_scores(tl.full((2,), 0.0, tl.float32) + new_score, pos, one, mask_row, stride_ms, MASK)
        m, l, a1, a2 = _online_update(m, l, a1, a2, scores, tl.where(one[:, None], v1[None, :], 0.0),
                                      tl.where(one[:, None], v2[None, :], 0.0))

    out_row = out_ptr + b * stride_ob + h * D
    head_done = SPLITS == 1
    if SPLITS == 1:
        inv = 1.0 / l
        tl.store(out_row + offs_h, (a1 * inv).to(out_ptr.dtype.element_ty))
        tl.store(out_row + HALF + offs_h, (a2 * inv).to(out_ptr.dtype.element_ty))
    else:
        part = part_ptr + (pid_bh * SPLITS + pid_s) * (D + 2)
        tl.store(part + offs_h, a1)
        tl.store(part + HALF + offs_h, a2)
        tl.store(part + D + tl.arange(0, 2), tl.where(tl.arange(0, 2) == 0, m, l))
        tl.debug_barrier()  # every thread's partials are written before the arrival that releases them
        arrived = tl.atomic_add(count_ptr + pid_bh, 1, sem="acq_rel")
        head_done = arrived == SPLITS - 1
        if head_done:
            tl.atomic_xchg(count_ptr + pid_bh, 0, sem="relaxed")
            splits = tl.arange(0, SPLITS)
            parts = part_ptr + (pid_bh * SPLITS + splits) * (D + 2)
            ms = tl.load(parts + D, cache_modifier=".cg")
            ls = tl.load(parts + D + 1, cache_modifier=".cg")
            top = tl.max(ms, axis=0)  # finite: the last slice always holds the new token
            w = tl.exp(ms - top)  # 0 for empty slices (-inf)
            inv = 1.0 / tl.sum(w * ls, axis=0)
            p1 = tl.load(parts[:, None] + offs_h[None, :], cache_modifier=".cg")
            p2 = tl.load(parts[:, None] + HALF + offs_h[None, :], cache_modifier=".cg")
            tl.store(out_row + offs_h, (tl.sum(w[:, None] * p1, axis=0) * inv).to(out_ptr.dtype.element_ty))
            tl.store(out_row + HALF + offs_h, (tl.sum(w[:, None] * p2, axis=0) * inv).to(out_ptr.dtype.element_ty))

    # the last head to finish moves the write position on: every program of every head has read it
    # by then (each read it before its head's arrival), and no data is handed over, so no fence
    if head_done:
        done = tl.atomic_add(count_ptr + n_heads_total, 1, sem="relaxed")
        if done == n_heads_total - 1:
            tl.atomic_xchg(count_ptr + n_heads_total, 0, sem="relaxed")
            tl.store(len_ptr, slot + 1)


def launch_shape(heads: int, max_len: int, device: torch.device) -> tuple[int, int]:
    """``(splits, block)`` for ``heads`` (batch x query heads) over a cache of ``max_len``: as many
    slices per head (a power of two) as bring the launch to ~4 programs an SM, but no more than one
    per two blocks of 64 positions of the longest context; where that cap leaves the GPU short of
    programs (a short cache, few heads), blocks of 32 and one slice per block. On the H200
    (``bench_decode_attention.py``, session 12) this took the fastest of 8-12 shapes at 32 and 256
    heads over 136 and 4096 slots."""
    sms = sm_count(device) if device.type == "cuda" else 132  # the interpreter: an H100/H200's shape
    by_occupancy = max(1, 4 * sms // heads)
    block = 64
    by_length = max(1, triton.cdiv(max_len, 2 * block))
    if by_occupancy > by_length:
        block = 32
        by_length = triton.cdiv(max_len, block)
    splits = min(MAX_SPLITS, by_occupancy, by_length)
    return 1 << (splits.bit_length() - 1), block


def check_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, length: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Raise ValueError naming the first argument the kernel cannot take."""
    B, HKV, L, D = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"value cache {tuple(v_cache.shape)} {v_cache.dtype} does not match the key cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim {D}: the fused decode attention needs a power of two >= 16")
    if k.shape != (B, HKV * D) or v.shape != k.shape or q.shape[0] != B or q.shape[1] % (HKV * D):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match a cache of "
                         f"{B} rows x {HKV} KV heads x {D}")
    if any(t.stride(-1) != 1 for t in (q, k, v, k_cache, v_cache)):
        raise ValueError("q, k, v and the caches need a contiguous last dimension")
    if length.numel() != 1 or length.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"the write position must be one integer, not {tuple(length.shape)} {length.dtype}")
    if mask is not None and (mask.dim() != 2 or mask.shape != (B, L)):
        raise ValueError(f"mask {tuple(mask.shape)}: expected one row per batch row over the cache, ({B}, {L})")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     mask: torch.Tensor | None, scaling: float, splits: int | None = None,
                     block: int | None = None) -> torch.Tensor:
    """Attention of one new token per batch row; writes its key and value into the caches and
    advances ``length``.

    ``q [B, H*D]``, ``k, v [B, HKV*D]``: the projections before the rotary embedding;
    ``cos, sin [B, D]``; ``k_cache, v_cache [B, HKV, L, D]``; ``length``: a one-element integer
    tensor, positions already cached (the write position); ``mask``: ``[B, L]`` bool (attend
    where true) or float (added to the scores), or None. Returns ``[B, H*D]`` in q's dtype.
    A step with ``length >= L`` (the cache is full: the cache's own update would fail there)
    writes and reads nothing outside the caches: the new token attends to the L cached ones and
    itself and is not stored. The kernel reads ``length`` on the GPU and cannot raise without a sync.
    ``splits`` (a power of two) and ``block`` (positions per loop step) override
    :func:`launch_shape`, for benchmarks.
    """
    check_decode_attention(q, k, v, k_cache, v_cache, length, mask)
    B, HKV, L, D = k_cache.shape
    H = q.shape[1] // D
    default_splits, default_block = launch_shape(B * H, L, q.device)
    splits, block = splits or default_splits, block or default_block
    out = torch.empty((B, H * D), device=q.device, dtype=q.dtype)
    part = torch.empty((B * H * splits * (D + 2),) if splits > 1 else (1,), device=q.device, dtype=torch.float32)
    entry = split_k_workspace(q.device, 0, B * H + 1)
    counts = entry.counts if entry is not None else torch.zeros(B * H + 1, device=q.device, dtype=torch.int32)
    if mask is None:
        mask_arg, kind, stride_mb, stride_ms = out, MASK_NONE, 0, 0
    else:
        kind = MASK_BOOL if mask.dtype == torch.bool else MASK_ADD
        mask_arg = mask.view(torch.uint8) if kind == MASK_BOOL else mask
        stride_mb, stride_ms = mask.stride()
    _decode_attention_kernel[(B * H, splits)](
        q, k, v, cos, sin, k_cache, v_cache, length, mask_arg, part, counts, out,
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        stride_mb, stride_ms, out.stride(0), float(scaling), H, H // HKV, B * H, L,
        HALF=D // 2, BLOCK=block, SPLITS=splits, MASK=kind, num_warps=4,
    )
    return out
