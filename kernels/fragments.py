"""M = 1..16 decode on the tensor cores' warp-level ``mma.sync``, over codes repacked into its fragment order.

The paired-fp16 decode kernels (``half2.py``, ``kmajor.py``) multiply each decoded pair by its x
pair with one ``fma.f16x2`` per pair and token, and build the x pairs with byte permutes: 2.2-2.6
sm_90 SASS instructions a weight at M = 1, as much issue time as DRAM time on an H200. The
``tl.dot`` decode tile for M = 2..16 (``gemv._dq_gemv_tc_kernel``) lets Triton choose the
operand layouts and pays ~4.8 instructions a weight in the conversions it inserts.

Here every warp runs ``mma.sync.m16n8k16`` itself (inline PTX) on registers it decoded in place:

* :func:`fragment_codes` repacks a layer's codes once, at load time, so that each lane's 16-byte
  vector holds exactly the codes of its A-fragment registers for four (4-bit) or eight (2-bit)
  MMAs over a 16-row tile: a warp reads 512 contiguous bytes a step and needs no shuffles.
* A lane decodes its words with the paired-fp16 kernels' and-or and one ``fma.f16x2`` a pair
  (:func:`half2.field_pairs`): each pair comes out as ``(q - z) / 256``, exactly, already an A
  register (row ``g`` or ``g + 8`` of the tile, two neighbouring K values).
* The K order inside a *quad* (four MMAs, 64 values of K in one group) is free as long as A and
  B agree: lane ``t`` of a quad (``t = lane % 4``) owns 16 contiguous values of K, so its B
  registers, the x pairs, are 8 contiguous int32 words of x (two vector loads, no permutes).
* One MMA does 16 multiply-adds a lane where ``fma.f16x2`` does 2, for any M up to 8 tokens
  (one 8-column B tile; M = 9..16 take a second MMA). The quad's float32 sums take the group's
  scale, 4 FMAs.
* Warps of a program split K (interleaved steps); at the end a tile's four sums cross them in one
  four-operand ``tl.reduce``, then a plain store, no atomics. A ``tl.sum`` a sum was a chain of
  shared-memory round trips (47 barriers at M = 16, 32 columns): a quarter of that kernel's warp
  samples under Nsight Compute, and 0.3-2.2 µs a call more on an H200 in five tiles of six
  (session 22; the sixth, w2g64 M = 4 on 32 columns of one vector, lost 2.1 µs).

A step is one or two 16-byte vectors a lane and tile (``Config.vectors``); the MMAs of the quads
of a step that share a group sum into the same registers before its scale, so a two-vector
w4g128 step takes one group's scales, zero-point constants and scale FMAs. The loop's sm_90 SASS
(``pipelines/sass_stats.py --fragments``; Triton 3.6 and 3.9 alike): 2.70 lane-instructions a
weight at M = 16 (w4g128, 32 columns on 8 warps, two vectors; 3.64 with one) against 4.8 for
the ``tl.dot`` tile, 2.59 at M = 1 (16 columns, two vectors). Decoding and the MMAs are ~1.3 of
it; the rest is scales and zero-point constants, zeroed sums, the next step's addresses and
register moves around the assembly. On an H200 (BENCHMARKS.md, session 21) tuned layers at
8192^2 w4g128 took 11.9 µs at M = 1, 12.2 at M = 4 and 16.8 at M = 16, against 13.1, 23.0 and
24.9 on the project's codes.

At 3 bits a quad's 32 codes a lane fill 3 words: fields of 3 bits at bits 0-14 of each half
(5 pairs a word: one ``lop3`` each, fields 3-4 after one shift, ``m`` = 1, 8 or 64 in the
and-or pairs ``1024 + m q``, :func:`_pair3`), the 16th pair spread over the three words' bit 15.
A unit of two quads (128 K, :func:`step_k`) is 6 words a lane, stored three blocks every two
units so that each load is a 16- or 8-byte vector (:func:`_blocks3`). sm_90 SASS (Triton 3.6):
2.86 instructions a weight at M = 1 (16 columns, one unit), 2.19 with no step ahead (two units),
3.02 at M = 16 (32 columns, 167 registers). On an H200 (session 26) tuned 8192^2 w3g128 layers
took 11.4 / 11.9 / 16.2 µs at M = 1 / 4 / 16 on tiles with no step ahead, against 12.0 / 23.9 /
41.5 on the project's codes.

2-, 3- and 4-bit codes, groups of a multiple of 64 (a quad must not straddle two), fp16 x. The
lanes' fragment registers follow the PTX ISA's layout for ``mma.m16n8k16`` with ``.f16`` A/B
(row ``g = lane / 4`` or ``g + 8``, K ``2 t`` / ``2 t + 8`` within the MMA, ``t = lane % 4``);
on the CPU interpreter, which cannot run assembly, :func:`mma_m16n8k16` emulates the warp with
that layout, so the CPU tests check the repack, the decoding and the sums against float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from efficientqat.packing import unpack_qweight

from .half2 import MAGIC, field_pairs, fma_h2, pair_constants, unpack_h2, zero_offset
from .tiling import (add_bias, group_strides, launch_options, launcher, load_unless_even, release_next_grid,
                     wait_for_previous_grid)
from .tuning import Config, interpreting

FRAGMENT_BITS = (2, 3, 4)
TILE_ROWS = 16
"""Output columns (weight rows) of one MMA tile."""
QUAD_K = 64
"""Values of K in a quad of four MMAs: a group must hold whole quads."""


def step_k(bits: int) -> int:
    """Values of K of one *unit*, what a warp covers with ``Config.vectors`` 1: one 16-byte vector
    a lane, 4 words of ``32 / bits`` codes for each of 32 lanes over 16 rows (64 at 4 bits, 128 at
    2); at 3 bits 6 words a lane, 128 (:func:`fragment_codes`)."""
    return 128 if bits == 3 else 256 // bits


def repack_k(bits: int) -> int:
    """Values of K in a whole number of the repack's ``[32, 4]`` blocks: one unit, or at 3 bits
    two (three blocks)."""
    return 256 if bits == 3 else step_k(bits)


def code_blocks(bits: int, k: int) -> int:
    """The repack's ``[32, 4]`` blocks a 16-row tile holds over ``k`` values of K."""
    return 3 * k // 256 if bits == 3 else k // step_k(bits)


def quads_per_run(bits: int, group: int, vectors: int) -> int:
    """Quads of a step of ``vectors`` units that share one group's scales and zero points (their
    MMAs sum into the same registers before the scale): a whole group where a step holds whole
    groups, the whole step where a group holds whole steps, else one."""
    step = vectors * step_k(bits)
    return group // QUAD_K if step % group == 0 else step // QUAD_K if group % step == 0 else 1


def takes(bits: int, group: int, n: int, k: int) -> bool:
    """Whether a layer of this shape and quantisation can be repacked for this kernel."""
    return bits in FRAGMENT_BITS and group % QUAD_K == 0 and n % TILE_ROWS == 0 and k % repack_k(bits) == 0


def _mma_position(lane: torch.Tensor, quad: torch.Tensor, mma: torch.Tensor, register: torch.Tensor,
                  half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, k)`` inside a 16-row tile of the code that half ``half`` of A register ``register``
    of MMA ``mma`` of quad ``quad`` holds in lane ``(g, t)``: row ``g`` or ``g + 8``, K ``64 q +
    16 t + 4 j + 2 (register // 2) + h``, the value B's lane ``t`` holds in that register."""
    return lane // 4 + 8 * (register % 2), QUAD_K * quad + 16 * (lane % 4) + 4 * mma + 2 * (register // 2) + half


def _fragment_positions(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2 and 4 bits: ``(row, k)`` inside a 16-row tile and a step (:func:`step_k`) of every code of
    a step's vectors, indexed ``[lane, word, half, field]``: field ``f`` of half ``h`` of word ``v`` of
    lane ``(g, t)`` feeds A register ``f % 4`` (:func:`half2.field_pairs` pairs fields ``f`` and
    ``f + 1`` of a shift as rows ``g`` and ``g + 8``) of MMA ``j`` of quad ``q``
    (:func:`_mma_position`)."""
    fields = 16 // bits  # per half word
    per_word = fields // 4  # MMAs a word serves
    lane = torch.arange(32).view(32, 1, 1, 1)
    word = torch.arange(4).view(1, 4, 1, 1)
    half = torch.arange(2).view(1, 1, 2, 1)
    field = torch.arange(fields).view(1, 1, 1, fields)
    quad, slot = word // (4 // per_word), word % (4 // per_word)
    row, k = _mma_position(lane, quad, slot * per_word + field // 4, field % 4, half)
    return row.expand(32, 4, 2, fields), k.expand(32, 4, 2, fields)


def _pair_positions3() -> tuple[torch.Tensor, torch.Tensor]:
    """3 bits: ``(row, k)`` inside a 16-row tile and a 128-K unit of the codes of every pair,
    indexed ``[lane, pair, half]``: pair ``p`` is register ``p % 4`` of MMA ``p % 16 // 4`` of quad
    ``p // 16`` (:func:`_mma_position`)."""
    lane = torch.arange(32).view(32, 1, 1)
    pair = torch.arange(32).view(1, 32, 1)
    row, k = _mma_position(lane, pair // 16, pair % 16 // 4, pair % 4, torch.arange(2).view(1, 1, 2))
    return row.expand(32, 32, 2), k.expand(32, 32, 2)


def _words3(codes: torch.Tensor) -> torch.Tensor:
    """3 bits: a lane's codes of a unit (int64 ``[..., 32 pairs, 2 halves]``, :func:`_pair_positions3`)
    -> its 6 words ``[..., 6]``, three a quad. Word ``i`` of a quad holds pairs ``5 i .. 5 i + 4`` in
    fields of 3 bits at bits ``3 f`` of each half (one shift serves fields 0-2, a second 3-4); the
    quad's 16th pair has bit ``i`` of each half's code in bit 15 of that half."""
    quads = codes.unflatten(-2, (2, 16))  # [..., quad, pair of the quad, half]
    fields = quads[..., :15, :].unflatten(-2, (3, 5))  # [..., quad, word, field, half]
    at = 3 * torch.arange(5, device=codes.device).view(5, 1) + 16 * torch.arange(2, device=codes.device)
    words = (fields << at).sum(dim=(-2, -1))  # [..., quad, word]
    bit = torch.arange(3, device=codes.device).view(3, 1)
    last = quads[..., 15, :].unsqueeze(-2)  # [..., quad, 1, half]
    words += ((last >> bit & 1) << (15 + 16 * torch.arange(2, device=codes.device))).sum(dim=-1)
    return words.flatten(-2)


def _blocks3(words: torch.Tensor) -> torch.Tensor:
    """3 bits: units' words ``[tiles, units, 32, 6]`` (an even number of units) -> the repack's
    blocks ``[tiles, 3 units / 2, 32, 4]``: of each two units, the first's words 0-3, the second's,
    then both units' words 4-5 (every load a 16- or 8-byte vector)."""
    pairs = words.unflatten(1, (words.shape[1] // 2, 2))  # [tiles, unit pairs, 2, 32, 6]
    rest = torch.cat((pairs[:, :, 0, :, 4:], pairs[:, :, 1, :, 4:]), dim=-1)
    return torch.stack((pairs[:, :, 0, :, :4], pairs[:, :, 1, :, :4], rest), dim=2).flatten(1, 2)


REPACK_ROWS = 1024
"""Output columns :func:`fragment_codes` repacks at a time: its int64 intermediates then stay near
8 KB a value of K (64 MB at K = 8192) whatever the layer's N."""


def fragment_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The layer's codes (``qweight [K b / 32, N]``, any storage order) as int32 ``[N / 16,``
    :func:`code_blocks` ``, 32, 4]``: per 16-row tile, each lane's vectors of 4 words in fragment
    order, one a unit at 2 and 4 bits (:func:`_fragment_positions`), three every two units at 3
    bits (:func:`_words3`, :func:`_blocks3`). A one-off repack at load time, :data:`REPACK_ROWS`
    columns at a time; the checkpoint keeps its format."""
    K, N = qweight.shape[0] * 32 // bits, qweight.shape[1]
    step = step_k(bits)
    if bits == 3:
        row, k = (p.to(qweight.device) for p in _pair_positions3())
    else:
        row, k = (p.to(qweight.device) for p in _fragment_positions(bits))
        shifts = (16 * torch.arange(2).view(2, 1) + bits * torch.arange(16 // bits).view(1, -1)).to(qweight.device)
    out = torch.empty(N // TILE_ROWS, code_blocks(bits, K), 32, 4, dtype=torch.int32, device=qweight.device)
    for n0 in range(0, N, REPACK_ROWS):
        codes = unpack_qweight(qweight[:, n0:n0 + REPACK_ROWS], bits)  # [rows, K]
        tiles = codes.view(-1, TILE_ROWS, K // step, step)
        if bits == 3:
            picked = tiles[:, row, :, k].permute(3, 4, 0, 1, 2).to(torch.int64)  # [rows / 16, units, 32, 32, 2]
            words = _blocks3(_words3(picked))
        else:
            picked = tiles[:, row, :, k]  # [32, 4, 2, F, rows / 16, K / step]
            words = (picked.permute(4, 5, 0, 1, 2, 3).to(torch.int64) << shifts).sum(dim=(-2, -1))
        out[n0 // TILE_ROWS:(n0 + codes.shape[0]) // TILE_ROWS] = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return out


@triton.jit
def _halves(r, W: tl.constexpr):
    """The fp16 pairs of a ``[32 W]`` register per lane as float32 ``[W, 8, 8]``: ``[warp, g,
    2 t + h]`` (group ``g``, lane ``t`` in it, half ``h``)."""
    lo, hi = unpack_h2(r)
    return tl.reshape(tl.join(tl.reshape(lo, (W, 8, 4)), tl.reshape(hi, (W, 8, 4))), (W, 8, 8)).to(tl.float32)


@triton.jit
def _side_by_side(a, b, W: tl.constexpr):
    """``[W, 8, 8]`` and ``[W, 8, 8]`` -> ``[W, 8, 16]``, b's columns after a's."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 1, 3, 2)), (W, 8, 16))


@triton.jit
def _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """``mma.sync.m16n8k16`` (f16 A and B, f32 C) of every warp, on lane-indexed ``[32 W]`` registers:
    A row ``g`` (``a0``, ``a2``) / ``g + 8`` (``a1``, ``a3``), K ``2 t + h`` (``a0``, ``a1``) / ``+ 8``;
    B K likewise, column ``g``; C row ``g`` (``c0``, ``c1``) / ``g + 8``, column ``2 t + h``."""
    W: tl.constexpr = a0.shape[0] // 32
    top = _side_by_side(_halves(a0, W), _halves(a2, W), W)  # [W, 8 rows, 16 k]
    bottom = _side_by_side(_halves(a1, W), _halves(a3, W), W)
    b = _side_by_side(_halves(b0, W), _halves(b1, W), W)  # [W, 8 columns, 16 k]
    d_top = tl.sum(top[:, :, None, :] * b[:, None, :, :], axis=3)  # [W, 8 rows, 8 columns]
    d_bottom = tl.sum(bottom[:, :, None, :] * b[:, None, :, :], axis=3)
    t0, t1 = tl.split(tl.reshape(d_top, (W, 8, 4, 2)))
    u0, u1 = tl.split(tl.reshape(d_bottom, (W, 8, 4, 2)))
    T: tl.constexpr = 32 * W
    return (c0 + tl.reshape(t0, (T,)), c1 + tl.reshape(t1, (T,)), c2 + tl.reshape(u0, (T,)),
            c3 + tl.reshape(u1, (T,)))


@triton.jit
def mma_m16n8k16(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, EMULATE: tl.constexpr):
    """``D = A B + C`` of one warp-wide ``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32``:
    A's four and B's two fp16-pair registers as int32, C and D four float32; every tensor is
    ``[32 W]``, element ``i`` held by thread ``i`` (lane ``i % 32`` of warp ``i / 32``)."""
    if EMULATE:
        return _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)
    else:
        d = tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
            "{$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        return d[0], d[1], d[2], d[3]


@triton.jit
def _words(vectors):
    """``[T, 4]`` int32 -> its four ``[T]`` columns, in order (register moves)."""
    even, odd = tl.split(tl.reshape(vectors, (vectors.shape[0], 2, 2)))  # columns 0, 2 and 1, 3
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    return w0, w1, w2, w3


@triton.jit
def _step_loads(qf_ptr, xw, s_ptr, z_ptr, step, steps, M, stride_xw, stride_g, stride_gn, tile0, i,
                BITS: tl.constexpr, GROUP: tl.constexpr, TILES: tl.constexpr, TOKEN_TILES: tl.constexpr,
                VECS: tl.constexpr, STEP_K: tl.constexpr, RUN: tl.constexpr, EVEN: tl.constexpr,
                CLAMP_ROWS: tl.constexpr = False, WEIGHTS: tl.constexpr = True, X: tl.constexpr = True):
    """What step ``step`` (``[T]``: each warp's own; ``VECS`` units of ``STEP_K`` values of K,
    :func:`step_k`) reads (its codes, scales and zero points with ``WEIGHTS``, its x with ``X``),
    requested and not yet used, as one flat tuple: each tile's code vectors (tile-major;
    :func:`_code_loads`); per quad, each token tile's two x vectors (lane ``t``'s 8 words from
    value ``k0 + 16 t``; rows past M zeros, or with ``EVEN`` and ``CLAMP_ROWS`` row M - 1's,
    unmasked); per run of ``RUN`` quads in one group
    (:func:`quads_per_run`), each tile's scale of row ``g``, of row ``g + 8``, zero point of row
    ``g``, of row ``g + 8``. ``EVEN``: the step exists for every warp and no load is masked (ptxas
    zeroes a masked load's registers first), else the warps past the last step read zeros."""
    STEP: tl.constexpr = VECS * STEP_K
    here = step < steps
    lane = i % 32
    g = lane // 4
    vec = tl.arange(0, 4)[None, :]
    loads = ()
    for r in tl.static_range(TILES if WEIGHTS else 0):
        loads = loads + _code_loads(qf_ptr, tile0 + r, step, steps, lane, here, BITS, VECS, EVEN)
    for q in tl.static_range(STEP // 64 if X else 0):
        base = g * stride_xw + (step * STEP + 64 * q) // 2 + 8 * (i % 4)
        for nt in tl.static_range(TOKEN_TILES):
            if EVEN and CLAMP_ROWS:  # rows past M read row M - 1: their products land in columns never stored
                x_row = xw + (base + (tl.minimum(g + 8 * nt, M - 1) - g) * stride_xw)[:, None] + vec
                loads = loads + (tl.load(x_row), tl.load(x_row + 4))
            else:
                valid = (here & (g + 8 * nt < M))[:, None]
                loads = loads + (tl.load(xw + base[:, None] + 8 * nt * stride_xw + vec, mask=valid, other=0),
                                 tl.load(xw + base[:, None] + 8 * nt * stride_xw + 4 + vec, mask=valid, other=0))
    for run in tl.static_range(STEP // 64 // RUN if WEIGHTS else 0):
        group = (step * STEP + 64 * RUN * run) // GROUP
        for r in tl.static_range(TILES):
            col = (tile0 + r) * 16 + g
            loads = loads + (load_unless_even(s_ptr + group * stride_g + col * stride_gn, here, 0, EVEN),
                             load_unless_even(s_ptr + group * stride_g + (col + 8) * stride_gn, here, 0, EVEN),
                             load_unless_even(z_ptr + group * stride_g + col * stride_gn, here, 0, EVEN),
                             load_unless_even(z_ptr + group * stride_g + (col + 8) * stride_gn, here, 0, EVEN))
    return loads


@triton.jit
def _code_loads(qf_ptr, tile, step, steps, lane, here, BITS: tl.constexpr, VECS: tl.constexpr, EVEN: tl.constexpr):
    """One tile's code vectors of step ``step`` (``[T]``) of ``steps``: ``VECS`` ``[T, 4]`` vectors
    (the repack's blocks ``[tile, K / step_k]``), or at 3 bits (:func:`_blocks3`) with ``VECS`` 2
    the three blocks of a unit pair, with ``VECS`` 1 the unit's first block and its half ``[T, 2]``
    of the pair's third."""
    vec = tl.arange(0, 4)[None, :]
    loads = ()
    if BITS == 3:
        pair = tile * (steps * VECS // 2) + step * VECS // 2  # the unit pair's first block / 3
        unit = step * VECS % 2  # 0 with VECS 2
        for u in tl.static_range(VECS):
            first = qf_ptr + ((3 * pair + unit + u) * 32 + lane)[:, None] * 4 + vec
            loads = loads + (load_unless_even(first, here[:, None], 0, EVEN),)
        rest = qf_ptr + ((3 * pair + 2) * 32 + lane)[:, None] * 4 + 2 * unit[:, None] + tl.arange(0, 2 * VECS)[None, :]
        loads = loads + (load_unless_even(rest, here[:, None], 0, EVEN),)
    else:
        for u in tl.static_range(VECS):
            block = (tile * steps + step) * VECS + u
            loads = loads + (load_unless_even(qf_ptr + (block * 32 + lane)[:, None] * 4 + vec, here[:, None], 0, EVEN),)
    return loads


@triton.jit
def _tile_words(now, first: tl.constexpr, BITS: tl.constexpr, VECS: tl.constexpr):
    """A tile's words of a step, from its :func:`_code_loads` at ``now[first]`` on: at 2 and 4 bits
    the ``VECS`` vectors' words in order; at 3 bits each unit's 6 words (:func:`_words3`)."""
    words = ()
    if BITS == 3:
        if VECS == 2:
            r0, r1, r2, r3 = _words(now[first + 2])
            words = _words(now[first]) + (r0, r1) + _words(now[first + 1]) + (r2, r3)
        else:
            r0, r1 = tl.split(now[first + 1])
            words = _words(now[first]) + (r0, r1)
    else:
        for u in tl.static_range(VECS):
            words = words + _words(now[first + u])
    return words


@triton.jit
def _zero_offsets3(z, magic, EMULATE: tl.constexpr):
    """3 bits: the offsets that make ``(q - z) / 256`` of the pairs ``1024 + m q`` (``m`` 1, 8,
    64) by an ``fma.f16x2`` with ``2^-8 / m`` (:func:`half2.zero_offset`), exact in fp16."""
    z_pair = z * 0x10001 | magic
    return (zero_offset(z_pair, 0, EMULATE), zero_offset(z_pair, 0x43004300, EMULATE),  # 4 - 4 / 8 = 3.5
            zero_offset(z_pair, 0x43E043E0, EMULATE))  # 4 - 4 / 64 = 3.9375


@triton.jit
def _pair3(words, W0: tl.constexpr, P: tl.constexpr, top, bottom, magic, EMULATE: tl.constexpr):
    """3 bits: pair ``P`` (0-15) of the quad whose words start at ``words[W0]`` (:func:`_words3`) as
    the fp16 pair ``(q - z) / 256``; ``top`` / ``bottom``: :func:`_zero_offsets3` of rows ``g`` (even
    ``P``) and ``g + 8`` (odd)."""
    FIELD: tl.constexpr = P % 5
    LEVEL: tl.constexpr = 0 if P == 15 else FIELD % 3  # fields 0-2 at bits 0, 3, 6; 3-4 at 9, 12 (shifted by 9)
    MASK: tl.constexpr = 0x00070007 << (3 * LEVEL)
    if P == 15:  # bit i of each half's code in bit 15 of that half of word i
        raw = ((words[W0] >> 15) & 0x00010001) | ((words[W0 + 1] >> 14) & 0x00020002) | \
            ((words[W0 + 2] >> 13) & 0x00040004) | magic
    else:
        if FIELD < 3:
            raw = (words[W0 + P // 5] & MASK) | magic
        else:
            raw = ((words[W0 + P // 5] >> 9) & MASK) | magic
    SCALE: tl.constexpr = 0x1C001C00 if LEVEL == 0 else 0x10001000 if LEVEL == 1 else 0x04000400  # 2^-8 / 8^LEVEL
    offsets = top if P % 2 == 0 else bottom
    return fma_h2(raw, tl.full(raw.shape, SCALE, tl.int32), offsets[LEVEL], EMULATE)


@triton.jit
def _mma_a3(words, W0: tl.constexpr, J: tl.constexpr, top, bottom, magic, EMULATE: tl.constexpr):
    """3 bits: the four A registers of MMA ``J`` of the quad at ``words[W0]``: its pairs ``4 J ..
    4 J + 3`` (:func:`_pair3`)."""
    return (_pair3(words, W0, 4 * J, top, bottom, magic, EMULATE),
            _pair3(words, W0, 4 * J + 1, top, bottom, magic, EMULATE),
            _pair3(words, W0, 4 * J + 2, top, bottom, magic, EMULATE),
            _pair3(words, W0, 4 * J + 3, top, bottom, magic, EMULATE))


@triton.jit
def _zero_sums(T: tl.constexpr, COUNT: tl.constexpr):
    """``COUNT`` float32 zeros ``[T]``, as a tuple."""
    sums = ()
    for _ in tl.static_range(COUNT):
        sums = sums + (tl.zeros((T,), tl.float32),)
    return sums


@triton.jit
def _step_products(now, acc, magic, BITS: tl.constexpr, TILES: tl.constexpr, TOKEN_TILES: tl.constexpr,
                   VECS: tl.constexpr, STEP_K: tl.constexpr, RUN: tl.constexpr, EMULATE: tl.constexpr, x_now,
                   X_APART: tl.constexpr):
    """``acc`` (the ``TILES * TOKEN_TILES * 4`` float32 sums: tile, token tile, MMA output register)
    plus the products of one step, from what :func:`_step_loads` read for it (``now``; with
    ``X_APART`` its x in ``x_now``, read apart from the codes, else ``x_now`` is not read: Triton 3.6
    compiles no tuple default)."""
    T: tl.constexpr = acc[0].shape[0]
    QUADS: tl.constexpr = VECS * STEP_K // 64
    WORDS_PER_QUAD: tl.constexpr = 3 if BITS == 3 else 4 // (256 // BITS // 64)
    MMAS_PER_WORD: tl.constexpr = 4 // WORDS_PER_QUAD  # 2 and 4 bits
    LOADS: tl.constexpr = VECS + 1 if BITS == 3 else VECS  # a tile's code loads (_code_loads)
    X0: tl.constexpr = TILES * LOADS  # _step_loads: the first x vector
    S0: tl.constexpr = X0 + (0 if X_APART else QUADS * 2 * TOKEN_TILES)  # the first scale
    words = ()  # tile r's word w at r * WORDS_PER_QUAD * QUADS + w
    for r in tl.static_range(TILES):
        words = words + _tile_words(now, r * LOADS, BITS, VECS)
    xs = ()  # quad q's token tile nt: words (q * TOKEN_TILES + nt) * 8 + 0..7
    for v in tl.static_range(QUADS * 2 * TOKEN_TILES):
        if X_APART:
            xs = xs + _words(x_now[v])
        else:
            xs = xs + _words(now[X0 + v])
    for run in tl.static_range(QUADS // RUN):
        new_acc = ()
        for r in tl.static_range(TILES):
            s_top = now[S0 + (run * TILES + r) * 4].to(tl.float32)
            s_bottom = now[S0 + (run * TILES + r) * 4 + 1].to(tl.float32)
            z_top = now[S0 + (run * TILES + r) * 4 + 2].to(tl.int32)
            z_bottom = now[S0 + (run * TILES + r) * 4 + 3].to(tl.int32)
            if BITS == 3:
                top = _zero_offsets3(z_top, magic, EMULATE)
                bottom = _zero_offsets3(z_bottom, magic, EMULATE)
            else:
                ce, _, ze, _ = pair_constants(z_top, magic, BITS, EMULATE)  # even fields: row g
                _, co, _, zo = pair_constants(z_bottom, magic, BITS, EMULATE)  # odd fields: row g + 8
            sums = _zero_sums(T, TOKEN_TILES * 4)
            for qr in tl.static_range(RUN):
                for j in tl.static_range(4):
                    # the quad's first word: (r * QUADS + run * RUN + qr) * WORDS_PER_QUAD (Triton 3.6 indexes a
                    # tuple by constant expressions only, not by names assigned in the loop)
                    if BITS == 3:
                        a0, a1, a2, a3 = _mma_a3(words, (r * QUADS + run * RUN + qr) * 3, j, top, bottom, magic,
                                                 EMULATE)
                    else:
                        word = words[(r * QUADS + run * RUN + qr) * WORDS_PER_QUAD + j // MMAS_PER_WORD]
                        a0, a1 = field_pairs(word, 4 * BITS * (j % MMAS_PER_WORD), ce, co, ze, zo, magic, BITS,
                                             EMULATE)
                        a2, a3 = field_pairs(word, 4 * BITS * (j % MMAS_PER_WORD) + 2 * BITS, ce, co, ze, zo,
                                             magic, BITS, EMULATE)
                    new_sums = ()
                    for nt in tl.static_range(TOKEN_TILES):
                        new_sums = new_sums + mma_m16n8k16(a0, a1, a2, a3,  # B: the quad's token tile nt, MMA j
                                                           xs[((run * RUN + qr) * TOKEN_TILES + nt) * 8 + 2 * j],
                                                           xs[((run * RUN + qr) * TOKEN_TILES + nt) * 8 + 2 * j + 1],
                                                           sums[4 * nt], sums[4 * nt + 1], sums[4 * nt + 2],
                                                           sums[4 * nt + 3], EMULATE)
                    sums = new_sums
            for nt in tl.static_range(TOKEN_TILES):  # c0, c1: row g; c2, c3: row g + 8
                for e in tl.static_range(4):
                    if e < 2:
                        new_acc = new_acc + (acc[(r * TOKEN_TILES + nt) * 4 + e] + s_top * sums[4 * nt + e],)
                    else:
                        new_acc = new_acc + (acc[(r * TOKEN_TILES + nt) * 4 + e] + s_bottom * sums[4 * nt + e],)
        acc = new_acc
    return acc


@triton.jit
def _dq_fragments_kernel(x_ptr, qf_ptr, s_ptr, z_ptr, b_ptr, res_ptr, y_ptr, M, N, K, stride_xw, stride_res, stride_ym,
                         stride_g, stride_gn, magic, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                         RESIDUAL: tl.constexpr, TILES: tl.constexpr,
                         WARPS: tl.constexpr, TOKEN_TILES: tl.constexpr, VECS: tl.constexpr, STEP_K: tl.constexpr,
                         RUN: tl.constexpr, AHEAD: tl.constexpr, X_AHEAD: tl.constexpr, EVEN: tl.constexpr,
                         PDL: tl.constexpr,
                         EMULATE: tl.constexpr):
    """``y[m, n] = sum_k x[m, k] W[n, k] (+ bias) (+ res[m, n] with ``RESIDUAL``, a decoder layer's
    residual stream, added before the one rounding)`` for ``m < M <= 8 TOKEN_TILES`` and program 0's
    ``TILES`` 16-row tiles over the whole of K: warp ``w`` takes steps ``w, w + WARPS, ...`` of
    ``VECS`` units of ``STEP_K`` values of K (:func:`step_k`; ``EVEN``: the steps fill every warp's turns,
    else the missing ones read zeros), everything a step reads requested ``AHEAD`` (1 or 2) steps
    before it is used, or with ``AHEAD`` 0 just before (the loads unmasked where ``EVEN``, fewer
    registers, the latency left to the other warps: on an H200 the faster form at w2g64 and the
    slower at w4g128, session 24; ``candidates.FRAGMENTS_TABLE`` offers both). Without ``X_AHEAD``
    only the codes, scales and zero points are requested ahead and x, which L1 and L2 serve, just
    before use: fewer registers (w2g64 M = 16, 32 columns: 128 against 134, two programs an SM where
    one fitted; 15.5 against 21.7 µs at 8192^2). The MMAs of a run of ``RUN`` quads in one group
    (:func:`quads_per_run`) sum into the same registers before the group's scale. Every tensor is
    ``[32 WARPS]``, one element a thread.

    The steps ahead are read by masked loads, whose registers ptxas zeroes first, and are copied into
    place at the back edge: 52 of the 346 instructions a step at M = 16. Unmasked loads and a body
    of ``AHEAD + 1`` steps drop both (273 a step), but on an H200 (session 23, ``0bf99b0``) that
    kernel was slower in 6 tiles of 10 and beat no tuned tile (w4g128 M = 16: 21.6 against 15.7 µs):
    ptxas issues the next step's loads at the end of the body, just before their use, and at
    M = 16 holds 138 registers, one program an SM."""
    T: tl.constexpr = 32 * WARPS
    steps = K // (VECS * STEP_K)
    i = tl.arange(0, T)
    warp = i // 32
    tile0 = tl.program_id(0) * TILES
    xw = x_ptr.to(tl.pointer_type(tl.int32))  # fp16 pairs; stride_xw: x's row stride in them
    wait_for_previous_grid(PDL)
    if AHEAD == 0:
        acc = _zero_sums(T, TILES * TOKEN_TILES * 4)
        for s0 in range(0, steps, WARPS):
            now = _step_loads(qf_ptr, xw, s_ptr, z_ptr, s0 + warp, steps, M, stride_xw, stride_g, stride_gn, tile0, i,
                              BITS, GROUP, TILES, TOKEN_TILES, VECS, STEP_K, RUN, EVEN, CLAMP_ROWS=True)
            acc = _step_products(now, acc, magic, BITS, TILES, TOKEN_TILES, VECS, STEP_K, RUN, EMULATE, now, False)
    else:
        ahead = _step_loads(qf_ptr, xw, s_ptr, z_ptr, warp, steps, M, stride_xw, stride_g, stride_gn, tile0, i,
                            BITS, GROUP, TILES, TOKEN_TILES, VECS, STEP_K, RUN, EVEN, X=X_AHEAD)
        if AHEAD == 2:
            further = _step_loads(qf_ptr, xw, s_ptr, z_ptr, warp + WARPS, steps, M, stride_xw, stride_g, stride_gn,
                                  tile0, i, BITS, GROUP, TILES, TOKEN_TILES, VECS, STEP_K, RUN, False, X=X_AHEAD)
        acc = _zero_sums(T, TILES * TOKEN_TILES * 4)
        for s0 in range(0, steps, WARPS):
            now = ahead
            if AHEAD == 2:
                ahead = further
                further = _step_loads(qf_ptr, xw, s_ptr, z_ptr, s0 + warp + 2 * WARPS, steps, M, stride_xw, stride_g,
                                      stride_gn, tile0, i, BITS, GROUP, TILES, TOKEN_TILES, VECS, STEP_K, RUN, False,
                                      X=X_AHEAD)
            else:
                ahead = _step_loads(qf_ptr, xw, s_ptr, z_ptr, s0 + warp + WARPS, steps, M, stride_xw, stride_g,
                                    stride_gn, tile0, i, BITS, GROUP, TILES, TOKEN_TILES, VECS, STEP_K, RUN, False,
                                    X=X_AHEAD)
            if X_AHEAD:
                acc = _step_products(now, acc, magic, BITS, TILES, TOKEN_TILES, VECS, STEP_K, RUN, EMULATE, now, False)
            else:  # x from L1 / L2 just before use; the codes, scales and zero points from DRAM ahead
                x_now = _step_loads(qf_ptr, xw, s_ptr, z_ptr, s0 + warp, steps, M, stride_xw, stride_g, stride_gn,
                                    tile0, i, BITS, GROUP, TILES, TOKEN_TILES, VECS, STEP_K, RUN, EVEN, CLAMP_ROWS=True,
                                    WEIGHTS=False)
                acc = _step_products(now, acc, magic, BITS, TILES, TOKEN_TILES, VECS, STEP_K, RUN, EMULATE, x_now, True)
    release_next_grid(PDL)
    lane = tl.arange(0, 32)
    for r in tl.static_range(TILES):
        for nt in tl.static_range(TOKEN_TILES):
            # c0..c3 (row g / g + 8, token 2 t / 2 t + 1) cross the warps in one four-operand reduction: one
            # shared-memory exchange for the four (joining them into one [T, 2, 2] tensor instead measured
            # 3-5 us slower)
            totals = _sums_across_warps(acc[(r * TOKEN_TILES + nt) * 4], acc[(r * TOKEN_TILES + nt) * 4 + 1],
                                        acc[(r * TOKEN_TILES + nt) * 4 + 2], acc[(r * TOKEN_TILES + nt) * 4 + 3], WARPS)
            for e in tl.static_range(4):
                total = totals[e] * 256.0
                col = (tile0 + r) * 16 + lane // 4 + 8 * (e // 2)
                token = 8 * nt + 2 * (lane % 4) + e % 2
                out = add_bias(total, b_ptr, col, col < N, 0, HAS_BIAS)
                if RESIDUAL:
                    out += tl.load(res_ptr + token * stride_res + col, mask=token < M, other=0.0).to(tl.float32)
                tl.store(y_ptr + token * stride_ym + col, out.to(y_ptr.dtype.element_ty), mask=token < M)


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    """The combine of a four-operand sum."""
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit
def _sums_across_warps(c0, c1, c2, c3, WARPS: tl.constexpr):
    """Four ``[32 WARPS]`` per-thread sums -> four ``[32]`` sums over the warps, in one reduction."""
    return tl.reduce((tl.reshape(c0, (WARPS, 32)), tl.reshape(c1, (WARPS, 32)), tl.reshape(c2, (WARPS, 32)),
                      tl.reshape(c3, (WARPS, 32))), 0, _add4)


def gemv_fragments_forward(x: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           bias: torch.Tensor | None, bits: int, group: int, cfg: Config,
                           residual: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 ``x [M, K]`` (M <= 16) -> ``[M, N]`` over codes in fragment order (:func:`fragment_codes`);
    ``cfg.block_n`` columns a program (a multiple of 16), ``cfg.num_warps`` warps splitting K in steps
    of ``cfg.vectors`` units (:func:`step_k`; 1 or 2 at 3 bits) a lane and tile (K a whole number of
    steps), ``cfg.block_k`` steps
    requested ahead (0, 1 or 2; ``cfg.x_ahead`` False: x not with them, read just before use).
    ``residual`` (``[M, N]``, unit column stride): added to the output (the epilogue of a decoder
    layer's o and down projections, :mod:`.prologue`)."""
    M, K = x.shape
    N = fragments.shape[0] * TILE_ROWS
    tiles = cfg.block_n // TILE_ROWS
    step = cfg.vectors * step_k(bits)
    if (not 1 <= M <= 16 or x.dtype != torch.float16 or not takes(bits, group, N, K) or cfg.block_n % TILE_ROWS
            or cfg.block_k not in (0, 1, 2) or (cfg.block_k == 0 and not cfg.x_ahead)
            or (bits == 3 and cfg.vectors not in (1, 2))
            or fragments.shape != (N // TILE_ROWS, code_blocks(bits, K), 32, 4) or (N // TILE_ROWS) % tiles
            or K % step or x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16):
        raise ValueError(f"the fragment-order decode kernel takes 1-16 fp16 rows of 16-byte aligned x and {FRAGMENT_BITS}-"
                         f"bit codes from fragment_codes, groups a multiple of {QUAD_K}, a whole number of 16-row tiles "
                         f"a program and of steps in K (at 3 bits K a multiple of {repack_k(3)}, steps of 1 or 2 units)"
                         f"; not {M} {x.dtype} rows of strides {tuple(x.stride())}, codes "
                         f"{tuple(fragments.shape)}, {bits}-bit, group {group}, N = {N}, K = {K}, BLOCK_N = "
                         f"{cfg.block_n}, steps of {step}, {cfg.block_k} steps ahead (0, 1 or 2), x "
                         f"{'ahead' if cfg.x_ahead else 'just before use (only with 1 or 2 steps ahead)'}")
    if residual is not None and (residual.shape != (M, N) or residual.stride(1) != 1):
        raise ValueError(f"the residual must be [M, N] = {(M, N)} with unit column stride, not "
                         f"{tuple(residual.shape)} of strides {tuple(residual.stride())}")
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    res = residual if residual is not None else y
    launcher(_dq_fragments_kernel, (N // cfg.block_n,))(
        x, fragments, scales, zeros, bias if bias is not None else x, res, y, M, N, K, x.stride(0) // 2, res.stride(0),
        y.stride(0), *group_strides(scales, zeros), MAGIC,
        BITS=bits, GROUP=group, HAS_BIAS=bias is not None, RESIDUAL=residual is not None, TILES=tiles,
        WARPS=cfg.num_warps,
        TOKEN_TILES=1 if M <= 8 else 2, VECS=cfg.vectors, STEP_K=step_k(bits),
        RUN=quads_per_run(bits, group, cfg.vectors),
        AHEAD=cfg.block_k, X_AHEAD=cfg.x_ahead, EVEN=(K // step) % cfg.num_warps == 0, PDL=cfg.pdl, EMULATE=interpreting(),
        num_warps=cfg.num_warps, **launch_options(cfg))
    return y
