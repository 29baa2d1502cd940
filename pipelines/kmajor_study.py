"""Study: an M = 1 decode kernel over K-major codes, with no split-K, against the project's kernel
over N-major codes and cuBLAS fp16.

    python3 pipelines/kmajor_study.py --shape 8192,8192 --quants w4g128,w2g64 --out FILE

``read_floor.py`` measured what holds the paired-fp16 M = 1 kernel back on an H200: its split-K
write-back (float atomics, a GPU-scope fence, the arrival count, the last program's sum) cost a
probe that only reads the layer's bytes 1.2-1.4 µs of 10-12, and split-K is there because the
project's codes are N-major (``qweight [K b / 32, N]``): a program reading long contiguous rows
must take many columns, so K has to be split across programs to fill the GPU.

The project's codes transposed once (K-major, ``[N, K b / 32]``: the same words, each column's
codes contiguous) let one program own ``BLOCK_N`` whole columns: ``BLOCK_N`` x ``K b / 8``
contiguous bytes, every thread a 16-byte vector of four code words a column and step, the K sum
finished inside the program (``tl.sum``), one plain fp16 store, no atomics, no fence. A thread's
x pairs are built once a step from vector loads of x and serve all its columns. The decoding is
the paired-fp16 kernel's (``half2.pair_constants`` / ``field_pairs``: one lop3 and one
``fma.f16x2`` a pair of weights, one ``fma.f16x2`` with the x pair). Scales and zero points are
transposed too (``[N, G]``). 2- and 4-bit codes, groups of at least 4 code words.

Timed as the tuner times decode launches (CUDA-graph replays chained over rotated copies, PDL
where the GPU has it), each row checked against the float64 product. Rows go to ``--out``
(JSON); the table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout_paths  # noqa: E402,F401 (efficientqat.kernels importable from a bare checkout)
from bench_kernels import make_layer  # noqa: E402
from prefetch_study import launch, tiles_of  # noqa: E402
from read_floor import rotation  # noqa: E402

from efficientqat.kernels import tuning  # noqa: E402
from efficientqat.kernels.half2 import MAGIC, _unpack, field_pairs, fma_h2, pair_constants, prmt  # noqa: E402
from efficientqat.kernels.tiling import release_next_grid, wait_for_previous_grid  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402

VECTOR = 4
"""Code words a thread loads per column and step: one 16-byte vector."""


def repack_kmajor(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The project's packed layer (``qweight [K b / 32, N]``, scales and uint8 zero points
    ``[G, N]``) transposed once: K-major codes ``[N, K b / 32]`` (the same words), scales and zero
    points ``[N, G]``."""
    return qweight.t().contiguous(), scales.t().contiguous(), zeros.t().contiguous()


@triton.jit
def _unstack4(t, A: tl.constexpr, B: tl.constexpr):
    """``t [A, B, 4]`` -> its four ``[A, B]`` slices along the last axis, in order (register moves)."""
    a, b = tl.split(tl.reshape(t, (A, B, 2, 2)))
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def _kmajor_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_qn, stride_sn, magic,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, THREADS: tl.constexpr,
                        EARLY: tl.constexpr, PDL: tl.constexpr, EMULATE: tl.constexpr):
    """``y[0, n] = sum_k x[0, k] W[n, k]`` for the ``BLOCK_N`` columns of program 0's axis 0, whole K:
    steps of ``THREADS`` x :data:`VECTOR` code words a column, ``THREADS`` thread slots along K,
    each step's codes requested while the step before is summed. ``EARLY`` (with ``PDL``): the
    first step's codes are requested before the wait for the previous grid (frozen codes: their
    DRAM time overlaps that grid's tail)."""
    HV: tl.constexpr = 16 // BITS  # x words (fp16 pairs) a code word
    VALUES: tl.constexpr = 32 // BITS
    STEP: tl.constexpr = THREADS * 4  # code words a column and step (VECTOR = 4)
    pid = tl.program_id(0)
    # thread slots are axis 0 of every tile: where the compiler sees no contiguity it spreads the
    # threads over the first axis, and the slots must be the axis the threads span (the columns
    # first put 4 threads of a warp across 4 columns and converted every x pair through shared memory)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]  # [1, BN, 1]
    thread = tl.arange(0, THREADS)[:, None, None] * 4  # [T, 1, 1]: a thread slot's first word
    lane = tl.arange(0, 4)[None, None, :]  # [1, 1, 4]
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [1, BN]
    thread_words = tl.arange(0, THREADS)[:, None] * 4  # [T, 1]
    n_words = K // VALUES
    col_rows = qw_ptr + offs_n * stride_qn
    xw = x_ptr.to(tl.pointer_type(tl.int32))
    if not EARLY:
        wait_for_previous_grid(PDL)
    words = tl.load(col_rows + thread + lane)
    if EARLY:
        wait_for_previous_grid(PDL)
    acc = tl.zeros((THREADS, BLOCK_N), tl.float32)
    for w0 in range(0, n_words, STEP):
        first = w0 + thread  # [T, 1, 1]
        w = _unstack4(words, THREADS, BLOCK_N)
        words = tl.load(col_rows + first + STEP + lane, mask=first + STEP < n_words, other=0)  # the next step's
        pairs = ()  # per code word v, its HV x pairs (x[k + i], x[k + i + HV]), k its first value
        for v in tl.static_range(4):
            xv = ()
            for q in tl.static_range(0, HV, 4):
                xv = xv + _unstack4(tl.load(xw + (first + v) * HV + q + lane), THREADS, 1)
            for i in tl.static_range(HV):  # int32 x word j holds (x[2j], x[2j + 1])
                pairs = pairs + (prmt(xv[i // 2], xv[HV // 2 + i // 2], 0x5410 if i % 2 == 0 else 0x7632, EMULATE),)
        group = ((w0 + thread_words) * VALUES) // GROUP
        s = tl.load(s_ptr + cols * stride_sn + group).to(tl.float32)
        z = tl.load(z_ptr + cols * stride_sn + group).to(tl.int32)
        ce, co, ze, zo = pair_constants(z, magic, BITS, EMULATE)
        h = tl.zeros((THREADS, BLOCK_N), tl.int32)  # 4 words x 32/b products of at most 2^b/256 |x|
        for v in tl.static_range(4):
            for shift in tl.static_range(0, 16, 2 * BITS):
                even, odd = field_pairs(w[v], shift, ce, co, ze, zo, magic, BITS, EMULATE)
                h = fma_h2(even, tl.broadcast_to(pairs[v * HV + shift // BITS], (THREADS, BLOCK_N)), h, EMULATE)
                h = fma_h2(odd, tl.broadcast_to(pairs[v * HV + shift // BITS + 1], (THREADS, BLOCK_N)), h, EMULATE)
        lo, hi = _unpack(h)
        acc += s * (lo.to(tl.float32) + hi.to(tl.float32))
    release_next_grid(PDL)
    y = tl.sum(acc, axis=0) * 256.0
    offs_y = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + offs_y, y.to(y_ptr.dtype.element_ty), mask=offs_y < N)


def kmajor_gemv(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bits: int, group: int,
                block_n: int, warps: int, early: bool = False) -> torch.Tensor:
    """``x [1, K]`` fp16 times the :func:`repack_kmajor` layer ``packed`` -> ``[1, N]`` fp16; one
    thread slot along K a thread (``32 warps``)."""
    codes, scales, zeros = packed
    N = codes.shape[0]
    K = x.shape[1]
    threads = 32 * warps
    if bits not in (2, 4) or group % (4 * 32 // bits):
        raise ValueError(f"the K-major study kernel takes 2- or 4-bit codes in groups of at least one thread's "
                         f"4 code words, not {bits}-bit in groups of {group}")
    if x.shape[0] != 1 or x.dtype != torch.float16 or N % block_n or (K * bits // 32) % (4 * threads):
        raise ValueError(f"the K-major study kernel takes one fp16 row, N ({N}) a multiple of BLOCK_N ({block_n}) "
                         f"and K's {K * bits // 32} code words a multiple of {4 * threads}, not {tuple(x.shape)} "
                         f"{x.dtype}")
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    pdl = tuning.pdl_supported(x.device)
    _kmajor_gemv_kernel[(N // block_n,)](
        x, codes, scales, zeros, y, N, K, codes.stride(0), scales.stride(0), MAGIC,
        BITS=bits, GROUP=group, BLOCK_N=block_n, THREADS=threads, EARLY=early and pdl, PDL=pdl,
        EMULATE=tuning.interpreting(), num_warps=warps, **({"launch_pdl": True} if pdl else {}))
    return y


def chained_us(fn, copies: list, repeats: int) -> float:
    calls = [functools.partial(fn, w) for w in copies]
    return statistics.median(tuning.chained_time_ms(calls) for _ in range(repeats)) * 1e3


def study_quant(n: int, k: int, quant: str, tiles: list[tuple[int, int, bool]], repeats: int) -> list[dict]:
    """cuBLAS, the tuned N-major kernel and the K-major kernel at every tile ``(BLOCK_N, warps, early)``."""
    spec = QuantSpec.from_name(quant)
    layer = make_layer(n, k, spec, "cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ layer.dequantize_weight().double().t()
    weights = (layer.qweight, layer.scales, layer.kernel_zeros())
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    packed = repack_kmajor(*weights)

    def error(y: torch.Tensor) -> float:
        return ((y.double() - ref).norm() / ref.norm()).item()

    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(2)]
    rows = [{"quant": quant, "what": "cuBLAS fp16", "us": chained_us(lambda w: torch.matmul(x, w.t()), dense, repeats),
             "bytes": 2 * n * k}]
    for cfg in tiles_of(x, layer, spec.bits, spec.group_size, "best"):
        fn = functools.partial(launch, cfg, x, bits=spec.bits, group=spec.group_size)
        rows.append({"quant": quant, "what": "tuned N-major kernel", "us": chained_us(lambda w: fn(weights=w),
                                                                                      rotation(weights), repeats),
                     "bytes": nbytes, "tile": [cfg.block_n, cfg.num_warps, int(cfg.early)],
                     "rel_error": error(fn(weights=weights)), "config": cfg.__dict__})
    copies = rotation(packed)
    for block_n, warps, early in tiles:
        fn = functools.partial(kmajor_gemv, x, bits=spec.bits, group=spec.group_size, block_n=block_n, warps=warps,
                               early=early)
        try:
            err = error(fn(packed=packed))
        except (ValueError, RuntimeError) as exc:  # a tile this shape or GPU cannot take
            print(f"skip {block_n} cols {warps} warps: {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append({"quant": quant, "what": "K-major kernel", "us": chained_us(lambda w: fn(packed=w), copies, repeats),
                     "bytes": nbytes, "tile": [block_n, warps, int(early)], "rel_error": err})
        print(f"{quant} K-major {block_n} cols {warps} warps early {early}: {rows[-1]['us']:.2f} us, "
              f"error {err:.1e}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Per quantisation: cuBLAS, the tuned N-major kernel, the fastest K-major tiles (at most 4)."""
    lines = ["| quant | kernel | tile (cols, warps, early) | us | TB/s | x cuBLAS | rel. error |",
             "|---|---|---|---|---|---|---|"]
    for quant in dict.fromkeys(r["quant"] for r in rows):
        mine = [r for r in rows if r["quant"] == quant]
        cublas = next(r["us"] for r in mine if r["what"] == "cuBLAS fp16")
        kmajor = sorted((r for r in mine if r["what"] == "K-major kernel"), key=lambda r: r["us"])[:4]
        for r in [r for r in mine if r["what"] != "K-major kernel"] + kmajor:
            tile = ", ".join(map(str, r.get("tile", []))) or "-"
            err = f"{r['rel_error']:.1e}" if "rel_error" in r else "-"
            lines.append(f"| {quant} | {r['what']} | {tile} | {r['us']:.2f} | {r['bytes'] / r['us'] / 1e6:.2f} | "
                         f"{cublas / r['us']:.2f}x | {err} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192,8192", help="N,K")
    p.add_argument("--quants", default="w4g128,w2g64")
    p.add_argument("--block-n", default="2,4,8,16")
    p.add_argument("--warps", default="1,2,4")
    p.add_argument("--early", default="0,1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kmajor_study.py times kernels: it needs a CUDA GPU")
    n, k = (int(v) for v in args.shape.split(","))
    tiles = list(itertools.product(*([int(v) for v in text.split(",")] for text in (args.block_n, args.warps,
                                                                                        args.early))))
    rows = []
    for quant in args.quants.split(","):
        rows += study_quant(n, k, quant, [(b, w, bool(e)) for b, w, e in tiles], args.repeats)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "shape": [n, k], "rows": rows},
                                           indent=1))
    print(f"device {torch.cuda.get_device_name()}, {n}x{k}, M = 1")
    print(table(rows))


if __name__ == "__main__":
    main()
