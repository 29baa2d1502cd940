"""Bit packing of integer codes into int32 words, in the GPTQ(-v2) tensor layout.

One rule covers every bit width: along the packed axis, values are laid out as a little-endian
bit stream, value ``i`` occupying stream bits ``[b*i, b*i + b)``, and the stream is cut into
32-bit words. For b in {2, 4, 8} no value straddles a word and this is exactly GPTQ's
``32/b values per word, lowest bits first``; for b = 3 it is GPTQ's dense 3-bit layout (32
values in 3 words, values 10 and 21 split across word boundaries).

Layout of a packed linear layer with ``K = in_features``, ``N = out_features``, ``G`` groups:

    qweight  int32  [K * b / 32, N]   codes of W^T packed along K
    qzeros   int32  [G, N * b / 32]   integer zero points packed along N (v2: stored exactly)
    scales   fp16   [G, N]
    g_idx    int32  [K]               group of each input column (k // group_size)

The packed axis length must be a multiple of ``32 / gcd(32, b)`` values (16 for 2-bit, 32 for
3-bit, 8 for 4-bit, 4 for 8-bit).
"""

from __future__ import annotations

import math

import torch

from efficientqat.errors import ConfigError


def chunk_values(bits: int) -> int:
    """Number of values in the smallest whole-word chunk of the stream."""
    return 32 // math.gcd(32, bits)


def chunk_words(bits: int) -> int:
    """Number of int32 words in that chunk."""
    return bits // math.gcd(32, bits)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_last_dim(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` along the last dimension into int32 words."""
    n = values.shape[-1]
    per_chunk, words_per_chunk = chunk_values(bits), chunk_words(bits)
    if n % per_chunk:
        raise ConfigError(f"cannot pack {n} values of {bits} bits: the length must be a multiple of {per_chunk}")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 2**bits - 1):
        raise ConfigError(f"values out of the {bits}-bit range [0, {2**bits - 1}]: clamp before packing")
    v = v.reshape(*values.shape[:-1], n // per_chunk, per_chunk)
    words = torch.zeros(*v.shape[:-1], words_per_chunk, dtype=torch.int64, device=values.device)
    mask32 = 0xFFFFFFFF
    for i in range(per_chunk):
        word, shift = divmod(bits * i, 32)
        words[..., word] |= (v[..., i] << shift) & mask32
        if shift + bits > 32:
            words[..., word + 1] |= v[..., i] >> (32 - shift)
    return _to_int32(words.reshape(*values.shape[:-1], n // per_chunk * words_per_chunk))


def unpack_last_dim(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_last_dim`: int32 words to int32 codes along the last dimension."""
    per_chunk, words_per_chunk = chunk_values(bits), chunk_words(bits)
    n_words = words.shape[-1]
    if n_words % words_per_chunk:
        raise ConfigError(f"{n_words} words are not a whole number of {bits}-bit chunks")
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(*words.shape[:-1], n_words // words_per_chunk, words_per_chunk)
    mask = 2**bits - 1
    out = w.new_empty((*w.shape[:-1], per_chunk))
    for i in range(per_chunk):
        word, shift = divmod(bits * i, 32)
        value = w[..., word] >> shift
        if shift + bits > 32:
            value = value | (w[..., word + 1] << (32 - shift))
        out[..., i] = value & mask
    return out.reshape(*words.shape[:-1], n_words // words_per_chunk * per_chunk).to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``[N, K]`` (same orientation as ``nn.Linear.weight``) to qweight ``[K*b/32, N]``."""
    return pack_last_dim(codes, bits).t().contiguous()


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight ``[K*b/32, N]`` back to codes ``[N, K]``."""
    return unpack_last_dim(qweight.t(), bits)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer zero points ``[N, G]`` to qzeros ``[G, N*b/32]`` (exact, GPTQ v2)."""
    return pack_last_dim(zeros.t(), bits).contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """qzeros ``[G, N*b/32]`` back to zero points ``[N, G]``."""
    return unpack_last_dim(qzeros, bits).t()


def group_index(in_features: int, group_len: int) -> torch.Tensor:
    """GPTQ's g_idx for in-order groups (no act-order): column k belongs to group k // group_len."""
    return torch.arange(in_features, dtype=torch.int32) // group_len
