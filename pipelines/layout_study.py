"""Study: would 4-bit codes stored in K-major micro-tiles of four chunks lift the M = 2..16
tensor-core decode kernel?

    python3 pipelines/layout_study.py --sass             # any machine: sm_90 SASS of both layouts
    python3 pipelines/layout_study.py --time --m 16,4    # GPU: both layouts timed against cuBLAS fp16
    python3 pipelines/layout_study.py --time --production --split 8 --stages 1   # and the project's kernel
    python3 pipelines/layout_study.py --m1               # GPU: what the micro-tiles cost an M = 1 kernel

Session 7's profile put the M = 16 kernel on the L1/TEX pipe (65-70% busy, DRAM 16-19%). In the
project's N-major layout (``qweight[K / 8, N]``, columns contiguous) the paired codes reach
``mma.sync``'s B fragments through 4-byte ``cp.async`` copies into a K-major shared tile and
scalar / 8-byte shared loads, because a thread's fragment needs four chunks of one column.
Stored as ``[K / 32, N, 4]`` (each column's four consecutive chunks contiguous, 16 bytes), with
the dot's K order chosen so that a thread's fragment rows are exactly those four chunks, the
loaded tile already has the fragment's layout in Triton 3.6 (its ``convert_layout`` is the
identity): 16-byte copies, 16-byte shared loads, or with one stage no shared memory at all.

The prototype kernel here is the production kernel's codes path (``kernels/gemv.py``, paired
codes) with x loaded once a step and split into slot pairs in registers, split-K by atomics:
4-bit codes, groups of 128, fp16 x, both layouts in one kernel (``MICRO``). It answers whether the layout moves the
M = 16 time before the project's kernels and packed format take it on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout_paths  # noqa: E402,F401 (efficientqat.kernels importable from a bare checkout)
from efficientqat.kernels.gemv import PAIRED_CODES, PAIRED_XTILE, gemv_tc_forward  # noqa: E402
from efficientqat.kernels.tuning import Config  # noqa: E402

STEP = 128  # K values a step: 16 chunks of 8 codes, one group of 128


def repack_micro(qweight: torch.Tensor) -> torch.Tensor:
    """``[K / 8, N]`` N-major words -> ``[K / 32, N, 4]``: each column's four consecutive chunks
    side by side (one 16-byte vector)."""
    chunks, n = qweight.shape
    if chunks % 4:
        raise ValueError(f"micro-tiles take a multiple of 4 chunks (K a multiple of 32), not {chunks}")
    return qweight.view(chunks // 4, 4, n).transpose(1, 2).contiguous()


@triton.jit
def _paired_codes(words, J: tl.constexpr):
    """Codes ``J`` and ``J + 4`` of every 4-bit word as the fp16 pair ``1024 + q`` (last dim 2)."""
    pair = ((words >> (J * 4)) & 0x000F000F) | 0x64006400
    return tl.join((pair & 0xFFFF).to(tl.int16), (pair >> 16).to(tl.int16))


@triton.jit
def _step_loads(x_ptr, qw_ptr, s_ptr, z_ptr, rows, mask_m, offs_n, it, N, K, MICRO: tl.constexpr):
    """Everything step ``it`` reads: its codes (``[a, n, b]`` words, chunk ``4 a + b``, in micro-tile
    order, else ``[c, n]``), x (one coalesced ``[16, 128]`` load), scales and zero points."""
    if MICRO:
        a = tl.arange(0, 4)[:, None, None]
        b = tl.arange(0, 4)[None, None, :]
        words = tl.load(qw_ptr + it * 16 * N + a * (4 * N) + offs_n[None, :, None] * 4 + b)
    else:
        words = tl.load(qw_ptr + (it * 16 + tl.arange(0, 16))[:, None] * N + offs_n[None, :])
    xt = tl.load(x_ptr + rows[:, None] * K + it * 128 + tl.arange(0, 128)[None, :], mask=mask_m[:, None], other=0.0)
    s = tl.load(s_ptr + it * N + offs_n)
    z = tl.load(z_ptr + it * N + offs_n)
    return words, xt, s, z


@triton.jit
def _x_slots(xt):
    """A step's x tile as four ``[16, 16, 2]`` tiles, tile ``J`` holding slots ``J`` and ``J + 4``
    of every chunk (the pair order of the codes), and each row's sum over the step."""
    even, odd = tl.split(tl.reshape(xt, (16, 16, 2, 2, 2)))  # [m, c, h, j1, j0], slot 4 h + 2 j1 + j0
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return (x0, x1, x2, x3), tl.sum(xt.to(tl.float32), axis=1)


@triton.jit
def _in_row_order(t, MICRO: tl.constexpr, K_WIDTH: tl.constexpr):
    """``[R, 16 chunks, 2, C]`` -> ``[R, 32, C]`` with the dot's K order of :func:`_study_kernel`."""
    if MICRO and K_WIDTH == 4:  # chunk 4 a + 2 b1 + b0 -> row 16 b1 + 4 a + 2 b0 + h
        t = tl.permute(tl.reshape(t, (t.shape[0], 4, 2, 2, 2, t.shape[3])), (0, 2, 1, 3, 4, 5))
    elif MICRO:  # chunk 4 a + b -> row 8 b + 2 a + h
        t = tl.permute(tl.reshape(t, (t.shape[0], 4, 4, 2, t.shape[3])), (0, 2, 1, 3, 4))
    return tl.reshape(t, (t.shape[0], 32, t.shape[-1]))


@triton.jit
def _study_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K,
                  BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, MICRO: tl.constexpr, K_WIDTH: tl.constexpr,
                  PREFETCH: tl.constexpr):
    """``y += x @ W^T`` for the ``BLOCK_N`` columns of program 0 and the K steps ``pid_k, pid_k +
    SPLIT, ...`` (fp32 ``y`` zeroed before). Each step's 16 x 16 chunks enter four dots of depth
    32 (code pairs ``J``, ``J + 4``); operand row ``d`` holds chunk ``d // 2`` in N-major order.
    In micro-tile order a thread of ``mma.sync`` is to hold one column's four consecutive chunks
    ``4 a + b``: with Triton's B operand of ``K_WIDTH`` 4 (Triton 3.6: rows ``4 t .. 4 t + 3`` and
    16 on a thread) row ``d = 16 b1 + 4 a + 2 b0 + h`` (``b = 2 b1 + b0``), with ``K_WIDTH`` 2
    (Triton 3.9: rows ``2 t, 2 t + 1`` and 8, 16 on) ``d = 8 b + 2 a + h``. x takes the same order.
    ``PREFETCH``: the loads of the program's next step are issued before this step's dots, into
    registers (no shared memory, unlike ``num_stages`` > 1), so a program's loads overlap its own
    arithmetic and not only the other programs' on the SM (the last step re-reads itself)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, 16)
    mask_m = rows < M
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    steps = K // 128
    if PREFETCH:
        ahead = _step_loads(x_ptr, qw_ptr, s_ptr, z_ptr, rows, mask_m, offs_n, pid_k, N, K, MICRO)
    for it in range(pid_k, steps, SPLIT):
        if PREFETCH:
            words, xt, s, z = ahead
            ahead = _step_loads(x_ptr, qw_ptr, s_ptr, z_ptr, rows, mask_m, offs_n, tl.minimum(it + SPLIT, steps - 1),
                                N, K, MICRO)
        else:
            words, xt, s, z = _step_loads(x_ptr, qw_ptr, s_ptr, z_ptr, rows, mask_m, offs_n, it, N, K, MICRO)
        x_slots, x_sum = _x_slots(xt)
        part = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for J in tl.static_range(4):
            codes = _paired_codes(words, J)
            if MICRO:  # [a, n, b, h] -> [1, a b, h, n]
                codes = tl.reshape(tl.permute(codes, (0, 2, 3, 1)), (1, 16, 2, BLOCK_N))
            else:  # [c, n, h] -> [1, c, h, n]
                codes = tl.reshape(tl.permute(codes, (0, 2, 1)), (1, 16, 2, BLOCK_N))
            codes = tl.reshape(_in_row_order(codes, MICRO, K_WIDTH), (32, BLOCK_N)).to(tl.float16, bitcast=True)
            xj = tl.reshape(_in_row_order(tl.reshape(x_slots[J], (16, 16, 2, 1)), MICRO, K_WIDTH), (16, 32))
            part = tl.dot(xj, codes, part)
        acc += (part - x_sum[:, None] * (z.to(tl.float32)[None, :] + 1024.0)) * s.to(tl.float32)[None, :]
    tl.atomic_add(y_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=mask_m[:, None], sem="relaxed")


def study_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, micro: bool,
                 block_n: int = 256, split: int = 8, warps: int = 4, stages: int = 2, k_width: int = 4,
                 prefetch: bool = False) -> torch.Tensor:
    """``x [M <= 16, K]`` fp16 against 4-bit g128 codes (``qweight`` N-major, or
    :func:`repack_micro` of it), ``scales`` / ``zeros`` ``[K / 128, N]``; float32 ``[M, N]``.
    ``k_width``: the B-operand layout the chunk order is made for (any order computes the layer);
    ``prefetch``: each step's loads issued a step ahead, into registers."""
    m, k = x.shape
    n = codes.shape[1]
    if m > 16 or k % STEP or n % block_n:
        raise ValueError(f"the study kernel takes M <= 16, K a multiple of {STEP} and N of {block_n}; got {m}, {k}, {n}")
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    _study_kernel[(n // block_n, split)](x, codes, scales, zeros, y, m, n, k, BLOCK_N=block_n, SPLIT=split,
                                         MICRO=micro, K_WIDTH=k_width, PREFETCH=prefetch, num_warps=warps,
                                         num_stages=stages)
    return y


@triton.jit
def _m1_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT: tl.constexpr, MICRO: tl.constexpr):
    """``y += x @ W^T`` at M = 1 on the CUDA cores (float32 FMAs), for the ``BLOCK_N`` columns of
    program 0 and the K steps ``pid_k, pid_k + SPLIT, ...`` of ``BLOCK_C`` chunks (a step inside a
    group of 128). The question it answers: one codes layout serves every M, and at M = 1 the
    project's kernels read a step as ``[BLOCK_C, BLOCK_N]`` words, neighbouring threads on
    neighbouring columns. In micro-tiles a column's four chunks are one 16-byte vector instead,
    so a thread would load a column's chunks, not a word row's columns (K-major codes, whose
    chunks lie K/8 words apart, made the M = 1 kernels 4x slower in session 9)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for it in range(pid_k, K // (8 * BLOCK_C), SPLIT):
        chunks = it * BLOCK_C + offs_c
        if MICRO:  # [K / 32, N, 4]
            words = tl.load(qw_ptr + ((chunks // 4) * (4 * N) + chunks % 4)[:, None] + offs_n[None, :] * 4)
        else:  # [K / 8, N]
            words = tl.load(qw_ptr + chunks[:, None] * N + offs_n[None, :])
        part = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_ptr + chunks * 8 + j).to(tl.float32)  # slot j of every chunk (x is cache-resident)
            part += xj[:, None] * ((words >> (4 * j)) & 15).to(tl.float32)
            x_sum += xj
        g = (it * 8 * BLOCK_C) // 128  # the group (STEP values)
        s = tl.load(s_ptr + g * N + offs_n).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n).to(tl.float32)
        acc += (tl.sum(part, axis=0) - tl.sum(x_sum) * z) * s
    tl.atomic_add(y_ptr + offs_n, acc, sem="relaxed")


def m1_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, micro: bool,
              block_n: int = 512, block_c: int = 4, split: int = 64, warps: int = 4) -> torch.Tensor:
    """``x [1, K]`` fp16 against the study's 4-bit g128 layer (``codes`` N-major or
    :func:`repack_micro` of it) by :func:`_m1_kernel`; float32 ``[1, N]``."""
    m, k = x.shape
    n = codes.shape[1]
    if m != 1 or block_c not in (4, 8, 16) or k % STEP or n % block_n:
        raise ValueError(f"the M = 1 study kernel takes one row, 4, 8 or 16 chunks a step, K a multiple of {STEP} "
                         f"and N of {block_n}; got M = {m}, {block_c} chunks, K = {k}, N = {n}")
    y = torch.zeros(1, n, device=x.device, dtype=torch.float32)
    _m1_kernel[(n // block_n, split)](x, codes, scales, zeros, y, n, k, BLOCK_N=block_n, BLOCK_C=block_c, SPLIT=split,
                                      MICRO=micro, num_warps=warps, num_stages=1)
    return y


LAYOUTS = ((False, 4, False), (False, 4, True), (True, 4, False), (True, 4, True), (True, 2, False))
"""(micro-tiles, the B-operand k width their chunk order is made for, loads a step ahead): N-major and micro for
Triton 3.6 with and without the register prefetch, micro for 3.9."""

PRODUCTION_LAUNCHES = (("in-kernel sum, PDL", dict(fixup=True, pdl=True)), ("in-kernel sum", dict(fixup=True)),
                       ("atomics", {}))
"""Write-backs of the project's kernel timed beside the prototype: the tuner's choice where decode launches chain
(split-K summed by the last program, under PDL), the same unchained, and split-K by atomics into a zeroed
output as the prototype does. Session 16: on the prototype's tile the project's kernel took 32.7 us, the prototype
25.4 (M = 16, 8192^2 w4g128); these rows say how much of that the write-back and PDL are."""


PRODUCTION_X = (("x words", PAIRED_CODES), ("x tile", PAIRED_XTILE))
"""The project's two ways of reading x in the paired kernel: 64-bit words split by shifts per slot, or
one tile a step split in registers as the prototype does (``gemv.PAIRED_XTILE``)."""


def production_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      block_n: int, split: int, stages: int, launch: dict, variant: int = PAIRED_CODES) -> torch.Tensor:
    """The project's tensor-core decode kernel (``kernels/gemv.py``, paired codes ``variant``, 4
    warps) on the study's 4-bit g128 layer: N-major ``qweight``, ``scales`` / ``zeros`` ``[K / 128, N]``."""
    cfg = Config(16, block_n, STEP // 8, split, 4, stages, variant, **launch)
    return gemv_tc_forward(x, qweight, scales, zeros, None, 4, STEP, cfg)


def layout_name(micro: bool, k_width: int, prefetch: bool) -> str:
    return (f"micro{k_width}" if micro else "N-major") + (", prefetch" if prefetch else "")


def sass_counts() -> list[dict]:
    """Registers and the K loop's memory instructions of both layouts, sm_90, 256 columns, 4 warps."""
    import sass_stats

    rows = []
    types = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "y_ptr": "*fp32",
             "M": "i32", "N": "i32", "K": "i32"}
    for (micro, k_width, prefetch), stages in itertools.product(LAYOUTS, (1, 2, 3)):
        usage, sass = sass_stats.compile_for_hopper(_study_kernel, types,
                                                    dict(BLOCK_N=256, SPLIT=8, MICRO=micro, K_WIDTH=k_width,
                                                         PREFETCH=prefetch), 4, stages)
        ops = sass_stats.opcodes(sass_stats.k_loop(sass))
        memory = {op: count for op, count in sorted(ops.items())
                  if op.startswith(("LDGSTS", "LDG", "LDS", "STS", "SHFL", "BAR"))}
        rows.append(dict(layout=layout_name(micro, k_width, prefetch), stages=stages,
                         registers=int(re.search(r"REG:(\d+)", usage).group(1)), loop=sum(ops.values()), **memory))
    return rows


def study_layers(n: int, k: int) -> tuple[list[tuple], list[torch.Tensor]]:
    """Copies of a random 4-bit g128 layer (N-major codes, their micro-tiles, fp16 scales, byte zero points,
    as the project's layers hold them) and of a dense fp16 one, each set past 256 MiB: rotated through, every
    call reads its weights from DRAM."""
    g = k // STEP
    layers = []
    for _ in range(math.ceil((256 << 20) / (n * k // 2))):
        qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), device="cuda", dtype=torch.int32)
        layers.append((qweight, repack_micro(qweight), torch.rand(g, n, device="cuda", dtype=torch.float16) * 0.01,
                       torch.randint(0, 16, (g, n), device="cuda", dtype=torch.uint8)))
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(math.ceil((256 << 20) / (2 * n * k)))]
    return layers, dense


def layer_product(x: torch.Tensor, layer: tuple) -> torch.Tensor:
    """The float32 product of ``x`` and a :func:`study_layers` layer, dequantized by PyTorch."""
    qweight, _, scales, zeros = layer
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    q = ((qweight.unsqueeze(1) >> shifts[None, :, None]) & 15).reshape(-1, qweight.shape[1]).float()
    w = (q - zeros.float().repeat_interleave(STEP, 0)) * scales.float().repeat_interleave(STEP, 0)
    return x.float() @ w


def time_kernels(kernels: list[tuple[str, Callable]], tiles: list[tuple[int, ...]], fields: tuple[str, ...], m: int,
                 layers: list[tuple], dense: list[torch.Tensor]) -> list[dict]:
    """Each ``(name, kernel(x, layer, tile))`` on each tile at M = ``m``, as CUDA-graph replays over the
    rotated layer copies, with cuBLAS fp16 on the same rotation; each checked against :func:`layer_product`.
    A row names the tile by ``fields``."""
    from bench_kernels import graph_median_ms

    k = layers[0][0].shape[0] * 8
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in layers]
    t_cublas = graph_median_ms([lambda i=i: xs[i % len(xs)] @ dense[i].t() for i in range(len(dense))])
    ref = layer_product(xs[0], layers[0])
    out = []
    for (name, kernel), tile in itertools.product(kernels, tiles):
        err = ((kernel(xs[0], layers[0], tile).float() - ref).norm() / ref.norm()).item()
        t = graph_median_ms([lambda i=i: kernel(xs[i], layers[i], tile) for i in range(len(layers))])
        out.append(dict(m=m, layout=name, **dict(zip(fields, tile)), us=t * 1e3, cublas_us=t_cublas * 1e3,
                        x_cublas=t_cublas / t, rel_err=err))
        print(json.dumps(out[-1]), flush=True)
    return out


def time_layouts(n: int, k: int, ms: list[int], tiles: list[tuple[int, int, int]], production: bool) -> list[dict]:
    """Each ``(BLOCK_N, split, stages)`` of ``tiles`` in both layouts at each M (and with
    ``production`` in the project's kernel, each of :data:`PRODUCTION_X` and
    :data:`PRODUCTION_LAUNCHES`): :func:`time_kernels`."""
    layers, dense = study_layers(n, k)
    kernels = [(layout_name(*layout), lambda xi, layer, tile, layout=layout:
                study_matmul(xi, layer[1] if layout[0] else layer[0], layer[2], layer[3], layout[0], tile[0], tile[1],
                             4, tile[2], *layout[1:])) for layout in LAYOUTS]
    if production:
        kernels += [(f"production, {x_name}, {name}", lambda xi, layer, tile, launch=launch, variant=variant:
                     production_matmul(xi, layer[0], layer[2], layer[3], *tile, launch, variant))
                    for (x_name, variant), (name, launch) in itertools.product(PRODUCTION_X, PRODUCTION_LAUNCHES)]
    return [row for m in ms for row in time_kernels(kernels, tiles, ("block_n", "split", "stages"), m, layers, dense)]


def time_m1(n: int, k: int, tiles: list[tuple[int, int, int]]) -> list[dict]:
    """Each ``(BLOCK_N, BLOCK_C, split)`` of ``tiles`` in :func:`_m1_kernel` over both layouts at M = 1."""
    layers, dense = study_layers(n, k)
    kernels = [(f"M = 1 prototype, {layout_name(micro, 4, False)}", lambda xi, layer, tile, micro=micro:
                m1_matmul(xi, layer[1] if micro else layer[0], layer[2], layer[3], micro, *tile))
               for micro in (False, True)]
    return time_kernels(kernels, tiles, ("block_n", "block_c", "split"), 1, layers, dense)


def print_best(timed: list[dict], fields: tuple[str, ...]) -> None:
    """A markdown table of each (M, layout)'s fastest tile among the :func:`time_kernels` rows."""
    print(f"| M | layout | best tile ({', '.join(fields)}) | µs | cuBLAS µs | x cuBLAS |\n|---|---|---|---|---|---|")
    for m, layout in sorted(dict.fromkeys((r["m"], r["layout"]) for r in timed), key=lambda key: key[0]):
        best = min((r for r in timed if r["m"] == m and r["layout"] == layout), key=lambda r: r["us"])
        print(f"| {m} | {layout} | {', '.join(str(best[f]) for f in fields)} | {best['us']:.1f} | "
              f"{best['cublas_us']:.1f} | {best['x_cublas']:.2f} |")


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sass", action="store_true", help="print the sm_90 SASS counts of both layouts (no GPU needed)")
    ap.add_argument("--time", action="store_true", help="time both layouts on the GPU")
    ap.add_argument("--production", action="store_true",
                    help="with --time: also the project's kernel on the same tiles (N-major; PRODUCTION_X, PRODUCTION_LAUNCHES)")
    ap.add_argument("--shape", default="8192,8192", help="N,K")
    ap.add_argument("--m", default="16,4", type=int_list)
    ap.add_argument("--block-n", default="128,256", type=int_list)
    ap.add_argument("--split", default="4,8,16", type=int_list)
    ap.add_argument("--stages", default="1,2,3", type=int_list)
    ap.add_argument("--m1", action="store_true",
                    help="time the M = 1 prototype over both layouts (--m1-block-n x --m1-block-c x --m1-split)")
    ap.add_argument("--m1-block-n", default="256,512,1024", type=int_list)
    ap.add_argument("--m1-block-c", default="4,8,16", type=int_list)
    ap.add_argument("--m1-split", default="16,32,64", type=int_list)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as json here")
    args = ap.parse_args()
    rows = []
    if args.sass:
        rows += sass_counts()
        for row in rows:
            print(json.dumps(row))
    if args.time:
        n, k = map(int, args.shape.split(","))
        timed = time_layouts(n, k, args.m, list(itertools.product(args.block_n, args.split, args.stages)),
                             args.production)
        print_best(timed, ("block_n", "split", "stages"))
        rows += timed
    if args.m1:
        n, k = map(int, args.shape.split(","))
        timed = time_m1(n, k, list(itertools.product(args.m1_block_n, args.m1_block_c, args.m1_split)))
        print_best(timed, ("block_n", "block_c", "split"))
        rows += timed
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
