"""The tiles the tuner (``tuning.choose``) times for each kernel: tables of measured winners,
fitted to a layer's shape, group and bit width. Each list is ordered best first, so the first
entry is a sound untimed default (CPU interpreter, ``EFFICIENTQAT_AUTOTUNE=0``)."""

from __future__ import annotations

from dataclasses import replace

import torch
import triton

from efficientqat.packing import chunk_values

from .fragments import step_k as fragments_step_k
from .gemv import PAIRED_CODES, PAIRED_TMA, PAIRED_WGMMA, PAIRED_XTILE, pairs_codes
from .tuning import DENSE_CONFIG, DENSE_FIRST_M, FRAGMENTS, HALF2, HALF2_BITS, HALF2_MAX_M, KMAJOR, Config, m_bucket


def _fits(group: int, block_k: int, K: int) -> bool:
    return block_k <= group and group % block_k == 0 and K % block_k == 0


def _fit_k(block_k: int, group: int, K: int) -> int:
    """Halve ``block_k`` until one K step lies inside one group (32 always does: checked upstream)."""
    while block_k > 32 and not _fits(group, block_k, K):
        block_k //= 2
    return block_k


def _fitted(rows: list[tuple[int, ...]], group: int, K: int, variant: int = 0) -> list[Config]:
    """Table rows ``(BLOCK_M, BLOCK_N, BLOCK_K, split-K, warps, stages)`` fitted to a layer:
    BLOCK_K halved until a step lies inside one group, split-K capped at the step count; rows
    that cannot fit are dropped."""
    out = []
    for bm, bn, bk, split, warps, stages in rows:
        bk = _fit_k(bk, group, K)
        if _fits(group, bk, K):
            out.append(Config(bm, bn, bk, max(1, min(split, K // bk)), warps, stages, variant))
    return out


def gemm_candidates(M: int, N: int, K: int, group: int) -> list[Config]:
    """M > 16 forward. Larger tiles for larger M; split-K for mid M with few output tiles."""
    table = [
        (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3), (64, 128, 64, 1, 4, 4), (128, 128, 32, 1, 4, 4),
        (256, 128, 64, 1, 8, 3), (128, 64, 64, 1, 4, 4), (64, 256, 64, 1, 8, 3), (128, 128, 128, 1, 8, 2),
    ]
    if M <= 256:
        table = [
            (32, 128, 128, 4, 4, 3), (64, 128, 64, 2, 4, 4), (32, 64, 128, 4, 4, 4), (64, 64, 128, 4, 4, 3),
            (16, 128, 128, 8, 4, 3), (64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3), (32, 256, 64, 4, 8, 3),
        ]
    out = _fitted(table, group, K)
    out += [replace(c, variant=1) for c in out[:4]]
    # W as the register (A) operand of wgmma (variant 2): above 256 rows the tiles that compiled
    # without spills on an H200; up to 256, narrow token tiles split along K to fill the GPU
    # (untimed guesses the tuner keeps only if they beat the rest)
    wa_table = [(128, 128, 64, 1, 8, 3), (128, 128, 64, 1, 8, 4), (128, 128, 32, 1, 8, 4)] if M > 256 else \
        [(64, 128, 64, 4, 4, 3), (32, 128, 128, 4, 4, 3), (64, 128, 64, 2, 4, 4)]
    out += _fitted(wa_table, group, K, variant=2)
    return _with_dense(list(dict.fromkeys(out)), M)


def _with_dense(fused: list[Config], M: int) -> list[Config]:
    """Add the decode + cuBLAS path: first (the untuned default) for large M, where only the
    three leading fused tiles stay as challengers (on an H200 the best fused GEMMs took 2.0-2.2x
    its time at M >= 2048, so timing all of them would only add minutes of compilation), else last."""
    return [DENSE_CONFIG] + fused[:3] if M >= DENSE_FIRST_M else fused + [DENSE_CONFIG]


def grad_input_candidates(M: int, N: int, K: int, group: int) -> list[Config]:
    table = [
        (128, 64, 128, 1, 8, 3), (128, 128, 64, 1, 8, 3), (64, 64, 128, 1, 4, 4), (128, 64, 64, 1, 4, 4),
        (256, 64, 128, 1, 8, 3), (128, 128, 128, 1, 8, 2), (64, 128, 64, 1, 4, 4),
    ]
    return _with_dense(list(dict.fromkeys(_fitted(table, group, K))), M)


def grad_scales_candidates(M: int, N: int, K: int, group: int) -> list[Config]:
    # (BLOCK_M: the step along M, the GEMM's reduction; BLOCK_N; BLOCK_K: rows of the x^T dy tile;
    # warps; stages)
    table = [
        (64, 128, 128, 8, 3), (32, 128, 128, 8, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4),
        (32, 256, 128, 8, 3), (128, 128, 128, 8, 2), (64, 64, 64, 4, 4),
    ]
    # a 64 x 256 accumulator over two warpgroups, the shape of Triton's fastest Hopper bf16 GEMM
    # tiles: first at large M, where only three fused tiles face the dense path (CPU tests keep
    # the small first tile)
    wide = [(64, 256, 64, 8, 3), (64, 256, 128, 8, 3)]
    table = wide + table if M >= DENSE_FIRST_M else table + wide
    out = []
    for bm, bn, bk, warps, stages in table:
        ok = K % bk == 0 and ((bk <= group and group % bk == 0) or (bk % group == 0 and (group & (group - 1)) == 0))
        if ok:
            out.append(Config(bm, bn, bk, 1, warps, stages))
        elif K % 32 == 0 and group % 32 == 0:
            out.append(Config(bm, bn, 32, 1, warps, stages))
    return _with_dense(list(dict.fromkeys(out)), M)


GEMV1_TABLE = [
    # (BLOCK_N, warps, BLOCK_C, programs per SM, variant (1: prefetch), pipeline stages), H200:
    # the best tiles of pipelines/sweep_decode.py at 8192^2 (w4g128, w3g128, w2g64) and
    # 28672x8192 (the only shape where a pipelined loop won, by 2%), and of the previous
    # candidate list at 4096^2.
    # BLOCK_N >= 128 * warps puts every thread on 4-column vectors of all BLOCK_C rows, so the
    # per-step row sums stay in-thread; BLOCK_C shrinks to fit the group (w2g64, w3g128: 4).
    (2048, 8, 16, 2, 0, 1), (1024, 2, 4, 4, 0, 1), (512, 2, 4, 4, 0, 1), (2048, 8, 8, 2, 0, 1),
    (1024, 4, 8, 2, 0, 1), (512, 4, 4, 4, 1, 1), (1024, 8, 4, 2, 1, 1), (512, 4, 8, 4, 1, 1),
    (512, 2, 8, 4, 0, 3),
]


def gemv1_candidates(N: int, K: int, bits: int, group: int, sms: int = 132) -> list[Config]:
    """M = 1 CUDA-core kernel; ``block_k`` holds BLOCK_C (packed chunks per step, one step inside
    one group), ``split_k`` is sized so the grid gives each of ``sms`` SMs the table's programs,
    ``variant`` 1 prefetches the next step's words, ``num_stages`` > 1 pipelines the step loop."""
    out = [gemv1_config(N, K, bits, group, sms, *row) for row in GEMV1_TABLE]
    return with_balanced_twins([c for c in out if c is not None], K, bits)


HALF2_TABLE = [
    # (BLOCK_N at M = 1, warps, BLOCK_C, programs per SM). H200, pipelines/sweep_decode.py at
    # 8192^2, M = 1: the best w4g128 tile (13.4 us against 16.0 for the float32 kernel), the best
    # w2g64 one (12.3 against 15.8), the runner-up; then the best at M = 4 (as 512 columns,
    # 28.5 us against 31.7 for the tensor-core kernel). BLOCK_N shrinks with the rows so that a
    # thread's fp16 sums (rows x columns registers) stay at 16. Last, untimed: 512 columns, so
    # that 4096-row layers (o_proj) get 4 programs per SM, where the float32 kernel's 512-column
    # tile with fp32 atomics and an output fill won (6.5 + 1.8 us a call in session 6's profile).
    # Then, untimed, the 8-columns-a-thread tiles between 2048 and 512 columns: each thread pays
    # ~250 instructions of set-up and reduction whatever its share, so the 4096^2 winner (512
    # columns, 4 weights rows x 4 columns a thread) issues 3.7 SASS lane-instructions per weight
    # against 3.1 / 2.6 for these (sm_90, ``pipelines/sass_stats.py --half2``, session 9).
    # Last, 256 columns on 2 warps (4 columns a thread as at 512 x 4, twice the programs): H200,
    # pipelines/prefetch_study.py at 8192^2, M = 1, session 19, against 512 x 4 warps at split 64:
    # w4g128 12.8 against 13.0 us (both with the codes early), w3g128 11.8 against 12.2, w2g64
    # 10.8 against 10.9; 15 programs an SM is split 64 there.
    (2048, 8, 16, 2), (2048, 4, 4, 4), (1024, 4, 16, 4), (2048, 4, 8, 2), (512, 4, 4, 4),
    (1024, 4, 4, 4), (1024, 4, 8, 2), (256, 2, 4, 15),
]


def with_launch_variants(cands: list[Config]) -> list[Config]:
    """Decode candidates, then each split-K one reducing in the kernel (``fixup``: one launch
    instead of memset + kernel; in session 6's decode profile the float32 kernel's 512-column
    tile won o_proj without a fixup twin to try, and its output fill cost 1.8 µs a call). The
    tuner keeps a twin only if it times faster."""
    fixed = [replace(c, fixup=True) for c in cands if c.split_k > 1]
    return list(dict.fromkeys(cands + fixed))


def half2_candidates(M: int, N: int, K: int, bits: int, group: int, sms: int = 132) -> list[Config]:
    """Paired-fp16 kernel (fp16 x, 2/3/4-bit codes, M <= ``HALF2_MAX_M``; empty otherwise), for the
    tuner to set after the measured kernels of the same M; ``block_m`` is M rounded up to a power of two."""
    if bits not in HALF2_BITS or M > HALF2_MAX_M:
        return []
    block_m = m_bucket(M)
    out = []
    for block_n, warps, block_c, per_sm in HALF2_TABLE:
        block_n = max(32 * warps, block_n // block_m)
        cfg = gemv1_config(N, K, bits, group, sms, block_n, warps, block_c, per_sm, HALF2, 1)
        if cfg is not None:
            out.append(replace(cfg, block_m=block_m))
    return with_balanced_twins(out, K, bits) + (lane_candidates(N, K, bits, group) if M == 1 else [])


LANE_TABLE = [
    # (BLOCK_N, warps, BLOCK_C, K lanes), untimed (session 9): K split inside the program, so
    # split-K across programs shrinks or goes. sm_90 SASS at 4096^2 (``sass_stats.py --half2``):
    # 2.25 lane-instructions a weight for the first tile (w4g128, 80 registers; w2g64 2.5) against
    # 3.7 for the w4g128 winner there (512 columns x split 128, every program also paying the fence
    # and atomics of the reduction).
    # With 4 warps two lanes share a thread, with 8 one each.
    (32, 4, 16, 32), (64, 4, 16, 16), (32, 8, 16, 32), (64, 8, 16, 16), (128, 8, 16, 8), (64, 4, 8, 8),
]


def lane_candidates(N: int, K: int, bits: int, group: int) -> list[Config]:
    """M = 1 paired-fp16 tiles with K lanes (``half2`` ``LANES``): BLOCK_C fitted to the group
    (:func:`fit_block_c`), lanes halved until they divide the step count, split-K the steps
    left over (one step a lane); none where a step fits no group or two lanes do not divide."""
    out = []
    for block_n, warps, block_c, lanes in LANE_TABLE:
        block_c = fit_block_c(block_c, bits, group)
        if block_c is None:
            continue
        steps = K // (block_c * chunk_values(bits))
        while lanes > 2 and steps % lanes:
            lanes //= 2
        if steps % lanes == 0:
            out.append(Config(1, block_n, block_c, steps // lanes, warps, 1, HALF2, lanes=lanes))
    return list(dict.fromkeys(out))


KMAJOR_TABLE = [
    # (BLOCK_N, warps) of the K-major M = 1 kernel. H200, pipelines/kmajor_study.py, session 19:
    # the best tiles at 8192^2 (8 x 2), 4096^2 (4 x 2 at w4g128), 12288 x 4096 and 22016 x 4096 at
    # w2g64 (8 x 1), then the runners-up there; session 20 (scales column-major) chose 4 x 2 at
    # w4g128, 8 x 2 at w2g64 and 4 x 1 at w3g128 on 8192^2.
    (8, 2), (4, 2), (8, 1), (4, 1), (4, 4), (16, 2), (8, 4),
]


def kmajor_candidates(N: int, K: int, bits: int, group: int) -> list[Config]:
    """Tiles of the K-major M = 1 kernel (``kmajor.py``) with BLOCK_N dividing N, for a layer that
    ``kmajor.takes`` (the caller's check: codes, bits, groups and K); at 3 bits each with slots of
    one 32-value chunk and, where groups and K hold them, of two (``block_k``)."""
    chunk_counts = [1, 2] if bits == 3 and group % 64 == 0 and K % 64 == 0 else [1]
    return [Config(1, block_n, chunks if bits == 3 else 0, 1, warps, 1, KMAJOR)
            for block_n, warps in KMAJOR_TABLE if N % block_n == 0 for chunks in chunk_counts]


FRAGMENTS_TABLE = [
    # (BLOCK_N, warps, steps loaded ahead, vectors a step) of the mma.sync kernel over codes in
    # fragment order. H200, pipelines/fragments_study.py, session 21, 8192^2 at w4g128 and w2g64,
    # M = 1 and 16: the eight fastest of 18 one-vector tiles summed over the four cases (64 columns
    # on 16 warps spilled: 370 us); then the best four with two vectors a step (a w4g128 step then
    # holds a whole group: sm_90 SASS 2.70 against 3.64 instructions a weight at M = 16, 32 columns).
    (16, 8, 1, 1), (32, 8, 1, 1), (16, 8, 2, 1), (16, 4, 2, 1), (64, 8, 1, 1), (16, 4, 1, 1), (32, 16, 1, 1),
    (64, 8, 2, 1), (16, 8, 1, 2), (32, 8, 1, 2), (16, 4, 1, 2), (32, 16, 1, 2),
    # No step ahead (fewer registers, the latency left to more resident warps). H200, pipelines/fragments_ab.py,
    # session 24, 8192^2: the best of the five such tiles timed at w2g64, M = 16 16.8 us (32 columns, one vector; the
    # tiles above: 18.1 at best, session 22) and M = 1 11.35 (16 columns, two vectors; above: 13.0); at
    # w4g128 each lost 1.5-2.5 us to the one-ahead tiles.
    (32, 8, 0, 1), (16, 8, 0, 2),
]
FRAGMENTS_X_LATE_TABLE = [
    # (BLOCK_N, warps, steps loaded ahead, vectors) with x read just before use, the codes ahead. H200,
    # fragments_ab, session 24, 8192^2, against the same tile with x ahead: w2g64 M = 16 15.6 against 21.7 us
    # (the best tile above: 16.8), M = 4 16.4 against 15.4; w4g128 M = 16 19.2 against 17.05 (two vectors:
    # 16.0 against 15.7).
    (32, 8, 1, 1),
]


def fragments_candidates(N: int, K: int, bits: int) -> list[Config]:
    """Tiles of the fragment-order kernel (``fragments.py``) with BLOCK_N dividing N and steps
    dividing K, for a layer holding codes in that order (the caller's check)."""
    tiles = [(tile, True) for tile in FRAGMENTS_TABLE] + [(tile, False) for tile in FRAGMENTS_X_LATE_TABLE]
    return [Config(1, block_n, ahead, 1, warps, 1, FRAGMENTS, vectors=vectors, x_ahead=x_ahead)
            for (block_n, warps, ahead, vectors), x_ahead in tiles
            if N % block_n == 0 and K % (vectors * fragments_step_k(bits)) == 0]


def balanced_split(cfg: Config, K: int, bits: int) -> Config:
    """``cfg`` with split-K raised to the next divisor of the K step count, so that every program
    streams the same number of steps: a one-wave decode kernel lasts as long as its busiest
    program. H200, 22016 x 4096 (gate/up of a 7B model) M = 1, session 8: w4g128's 2048-column,
    8-warp, 16-chunk tile took 21.1 us at split 24 of 32 steps and 16.6 us at split 32."""
    steps = K // (cfg.block_k * chunk_values(bits))
    return replace(cfg, split_k=next(d for d in range(cfg.split_k, steps + 1) if steps % d == 0))


def with_balanced_twins(cands: list[Config], K: int, bits: int) -> list[Config]:
    """M = 1 tiles, then the :func:`balanced_split` twins of those whose split-K does not divide
    the step count (the tables size split-K by programs per SM, the twins by steps per program)."""
    return list(dict.fromkeys(cands + [balanced_split(c, K, bits) for c in cands]))


def gemv1_config(N: int, K: int, bits: int, group: int, sms: int, block_n: int, warps: int, block_c: int,
                 per_sm: int, variant: int, stages: int) -> Config | None:
    """One M = 1 tile for this layer: BLOCK_C halved until a step fits inside a group (and to 4
    for 3 bits, whose chunks are three words), split-K sized for ``per_sm`` programs per SM,
    ``stages`` > 1 software-pipelines the step loop (cp.async ring in shared memory).
    None where no step fits a group."""
    block_c = fit_block_c(block_c, bits, group)
    if block_c is None:
        return None
    split = max(1, min(K // (block_c * chunk_values(bits)), round(per_sm * sms / -(-N // block_n))))
    return Config(1, block_n, block_c, split, warps, stages, variant)


def fit_block_c(block_c: int, bits: int, group: int) -> int | None:
    """M = 1 chunks per step: ``block_c`` halved until a step fits inside a group (and to 4 for
    3 bits, whose chunks are three words); None where not even one chunk does."""
    vpc = chunk_values(bits)
    while block_c > 1 and (group % (block_c * vpc) or bits == 3 and block_c > 4):
        block_c //= 2
    return None if group % (block_c * vpc) else block_c


GEMV_TC_TABLE = [
    # (BLOCK_N, BLOCK_C, split-K, warps, stages). H200, pipelines/sweep_decode.py at 8192^2, M = 4
    # and 16: the best w4g128 tiles (steps fold scales, 256 columns), then w2g64 / w3g128 (128).
    (256, 16, 8, 4, 3), (256, 16, 32, 4, 2), (256, 16, 8, 8, 3), (128, 16, 8, 4, 2),
    (128, 16, 4, 4, 2), (128, 16, 16, 4, 2), (64, 16, 8, 4, 2), (128, 32, 4, 4, 2),
]


def gemv_tc_candidates(N: int, K: int, bits: int, group: int, dtype: torch.dtype) -> list[Config]:
    """M = 2..16 tensor-core kernel loading each word once; ``block_k`` holds BLOCK_C (>= 16 for
    the dot depth). Any K: a last step short of BLOCK_C chunks is masked; split-K is capped at
    the step count. Then, where they apply, the three leading tiles with the codes in 16-bit pairs
    (``gemv.PAIRED_CODES`` / ``PAIRED_WGMMA``): sm_90 SASS 3.1
    instead of 4.8 instructions per weight and 179 instead of 255 registers at the best tile;
    untimed, so the tuner keeps them only if faster."""
    vpc = chunk_values(bits)
    out = []
    for bn, bc, split, warps, stages in GEMV_TC_TABLE:
        steps = -(-K // (bc * vpc))
        out.append(Config(16, bn, bc, max(1, min(split, steps)), warps, stages))
    out = list(dict.fromkeys(out))
    return out + paired_code_twins(out[:3], K, bits, group, dtype)


def paired_code_twins(tiles: list[Config], K: int, bits: int, group: int, dtype: torch.dtype) -> list[Config]:
    """The tensor-core ``tiles`` as paired-code tiles where that applies, with ``mma.sync`` and
    then with ``wgmma`` where this Triton compiles it (Hopper), BLOCK_C halved (down to
    4) until a step fits the group (w2g64: 4 chunks, two slot pairs per dot), split-K capped at
    the step count. They write back as ``tiles`` do; :func:`with_launch_variants` adds the twins
    that reduce split-K in the kernel (session 7, M = 8 decode: the tuner picked atomics over the
    in-kernel reduction for the unpaired tiles of the two largest layers, so both go to it).

    Each also comes unpipelined (one stage): the codes then arrive as 16-byte global loads into
    registers, where a pipelined tile copies them into shared memory 4 bytes at a time
    (``LDGSTS.E``, sm_90 SASS), the load that kept the L1/TEX pipe 65-70% busy in session 7's
    profile. The layout study's one-stage paired kernel (``pipelines/layout_study.py``, H200,
    session 16) took 25.4 us at M = 16 on 8192^2 w4g128, where the tuned kernel took 35.3. The
    one-stage tile then won that key at 32.7; it comes once more reading x as the prototype does
    (``gemv.PAIRED_XTILE``: one tile a step, split in registers; sm_90 SASS under Triton 3.6, 200
    instead of 208 registers and 762 instead of 778 loop instructions), which took that key to 26.9 us
    (H200, session 17). That tile then comes with its codes through the tensor-memory accelerator,
    two and three stages deep (``gemv.PAIRED_TMA``), and the step after those asked of L2
    (``prefetch`` 1, :mod:`.prefetch`): the next steps' codes in flight without registers. At that
    key, session 18: 24.4 us at three stages (29.5 without the L2 prefetch)."""
    vpc = chunk_values(bits)
    out = []
    for c in tiles:
        block_c = c.block_k
        while block_c > 4 and group % (block_c * vpc):
            block_c //= 2
        if pairs_codes(bits, group, dtype, block_c):
            split = max(1, min(c.split_k, -(-K // (block_c * vpc))))
            paired = replace(c, block_k=block_c, split_k=split, variant=PAIRED_CODES)
            out += [paired, replace(paired, num_stages=1), replace(paired, num_stages=1, variant=PAIRED_XTILE)]
            out += [replace(paired, num_stages=stages, variant=PAIRED_TMA, prefetch=1) for stages in (2, 3)]
    wgmma = [replace(c, variant=PAIRED_WGMMA) for c in out] if compiles_register_wgmma() else []
    return list(dict.fromkeys(out + wgmma))


def compiles_register_wgmma(version: str | None = None) -> bool:
    """Whether this Triton compiles the codes as ``wgmma``'s register operand: 3.6 (the GPU
    image's) aborts in ``TritonGPUOptimizeDotOperands`` on every such tile; 3.9 compiles them
    (``tests/test_sass.py``). Versions between are untried, so left out."""
    major, minor = (int(part) for part in (version or triton.__version__).split(".")[:2])
    return (major, minor) >= (3, 9)
