"""Sweep the decode kernels' tiles (M = 1..16) on one layer shape: the data behind
``candidates.GEMV1_TABLE`` and ``candidates.GEMV_TC_TABLE``.

    python3 pipelines/sweep_decode.py --shape 8192,8192 --quants w4g128,w3g128,w2g64 --m 1,16 --out DIR

For M = 1 the grid holds the CUDA-core kernels' tiles (BLOCK_N x warps, BLOCK_C, programs per
SM; float32 with register prefetch or pipeline stages, or paired fp16) and the tensor-core
kernel's; for M > 1 the tensor-core kernel's (BLOCK_N, split-K, warps, stages) and the tuner's
paired-fp16 tiles. Every tile is checked against the
float32 dequantized product and timed as CUDA-graph replays of a pass over rotated layer copies
(> 256 MB, so weights come from DRAM as inside a model), next to cuBLAS fp16 ``x @ W.T`` on the
same rotation; and, as the tuner times it (``tuning.cold_time_ms``: one call after an L2 flush,
so nothing overlaps it), "cold". A launch under programmatic dependent launch gains only in
the rotation, where it overlaps the call before. Rows go to ``<out>/sweep_decode.json``; the
best tiles are printed last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import copy_bandwidth, graph_median_ms, make_layer  # noqa: E402

import torch  # noqa: E402

from efficientqat.kernels import candidates, tuning  # noqa: E402
from efficientqat.kernels.gemv import PAIRED_VARIANTS, gemv1_forward, gemv_tc_forward  # noqa: E402
from efficientqat.kernels.half2 import gemv_half2_forward  # noqa: E402
from efficientqat.kernels.kmajor import gemv_kmajor_forward  # noqa: E402
from efficientqat.packing import chunk_values, chunk_words  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402

GEMV1_TILES = [(256, 2), (512, 2), (512, 4), (1024, 2), (1024, 4), (2048, 8)]  # (BLOCK_N, warps)
TC_TILES = list(itertools.product([64, 128, 256], [4, 8, 16, 32], [4, 8], [1, 2, 3]))  # BLOCK_N, split, warps, stages
ROTATION_BYTES = 256 << 20


def pipelines(cfg: tuning.Config, k: int, bits: int) -> bool:
    """Whether a pipelined CUDA-core tile is worth timing: at least one step per stage in every
    program and a ring that fits the 227 KB of shared memory an H100/H200 block may use."""
    if cfg.num_stages == 1:
        return True
    steps = k // (cfg.block_k * chunk_values(bits)) // cfg.split_k
    ring = cfg.num_stages * cfg.block_k * chunk_words(bits) * cfg.block_n * 4
    return steps >= cfg.num_stages and ring <= 200 << 10


def gemv1_grid(n: int, k: int, bits: int, group: int, sms: int) -> tuple[list[tuning.Config], list[tuning.Config]]:
    """The tuner's tiles (the reference; fp16 x, so with the paired-fp16 ones where they apply),
    then every paired-fp16 and every pipelined tile."""
    table = candidates.gemv1_candidates(n, k, bits, group, sms) + candidates.half2_candidates(1, n, k, bits, group, sms)
    paired = itertools.product(GEMV1_TILES + [(2048, 4), (4096, 8)], [4, 8, 16], [1, 2, 4]) \
        if bits in tuning.HALF2_BITS else []
    piped = itertools.product(GEMV1_TILES, [4, 8, 16], [1, 2, 4], [2, 3, 4])
    rest = [candidates.gemv1_config(n, k, bits, group, sms, bn, warps, bc, per_sm, tuning.HALF2, 1)
            for (bn, warps), bc, per_sm in paired]
    rest += [candidates.gemv1_config(n, k, bits, group, sms, bn, warps, bc, per_sm, 0, st)
             for (bn, warps), bc, per_sm, st in piped]
    rest = [c for c in rest if c is not None and c not in table and pipelines(c, k, bits)]
    return table, list(dict.fromkeys(rest))


def tc_grid(m: int, n: int, k: int, bits: int, group: int, sms: int) -> list[tuning.Config]:
    """Tensor-core tiles of depth 16 chunks (the tuner's table first; split-K capped at the
    steps, a ragged last one included) and each as paired-code tile where that applies, then for
    M > 1 the tuner's paired-fp16 tiles."""
    steps = -(-k // (16 * chunk_values(bits)))
    swept = [tuning.Config(16, bn, 16, min(split, steps), warps, stages)
             for bn, split, warps, stages in TC_TILES if bn >= 32 * warps // 4]
    swept += candidates.paired_code_twins(swept, k, bits, group, torch.float16)
    paired = candidates.half2_candidates(m, n, k, bits, group, sms) if m > 1 else []
    return list(dict.fromkeys(candidates.gemv_tc_candidates(n, k, bits, group, torch.float16) + swept + paired))


def launcher(cfg: tuning.Config):
    if cfg.variant == tuning.HALF2:
        return gemv_half2_forward
    if cfg.variant == tuning.KMAJOR:
        return gemv_kmajor_forward
    return gemv_tc_forward if cfg.block_m == 16 else gemv1_forward


def kernel_name(cfg: tuning.Config) -> str:
    """The family a tile belongs to, as the table and ``--kernels`` name it."""
    if cfg.block_m == 16:
        return "tcp" if cfg.variant in PAIRED_VARIANTS else "tc"
    return "half2" if cfg.variant == tuning.HALF2 else "gemv1"


def launch_variants(cfg: tuning.Config, wanted: list[str], pdl: bool) -> list[tuning.Config]:
    """``cfg`` as each wanted write-back / launch: ``plain`` (memset + atomics), ``fixup`` (split-K
    reduced in the kernel), ``pdl`` (fixup where split-K, and programmatic dependent launch),
    ``early`` (pdl with a paired-fp16 tile's first codes requested before the wait): the PDL
    twins are the tuner's own (:func:`tuning.chained_twins`)."""
    fixed = replace(cfg, fixup=cfg.split_k > 1)
    chained = tuning.chained_twins([fixed]) if pdl else [fixed]
    out = {"plain": cfg, "fixup": fixed, "pdl": chained[0], "early": chained[-1]}
    return list(dict.fromkeys(out[w] for w in wanted))


def sweep(n: int, k: int, quant: str, m: int, copy_bw: float, budget_s: float, kernels: set[str],
          variants: list[str], k_major: bool = False, first_tiles: int | None = None) -> list[dict]:
    spec = QuantSpec.from_name(quant)
    first = make_layer(n, k, spec, "cuda")
    packed = first.qweight.numel() * 4 + first.scales.numel() * 3
    layers = [first] + [make_layer(n, k, spec, "cuda") for _ in range(min(48, math.ceil(ROTATION_BYTES / packed)) - 1)]
    zeros = [layer.kernel_zeros() for layer in layers]
    # --k-major: the same codes stored column by column (each column's words contiguous along K)
    codes = [layer.qweight.t().contiguous().t() if k_major else layer.qweight for layer in layers]
    xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in layers]
    ref = xs[0].float() @ layers[0].dequantize_weight(torch.float32).t()
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(max(2, math.ceil(ROTATION_BYTES / (2 * n * k))))]
    t_cublas = graph_median_ms([lambda i=i: xs[i % len(xs)] @ dense[i].t() for i in range(len(dense))])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table, rest = gemv1_grid(n, k, spec.bits, spec.group_size, sms) if m == 1 else ([], [])
    grid = list(dict.fromkeys(table + tc_grid(m, n, k, spec.bits, spec.group_size, sms) + rest))  # budget cuts the end
    pdl = tuning.pdl_supported(torch.device("cuda"))
    grid = [cfg for cfg in grid if kernel_name(cfg) in kernels][:first_tiles]
    grid = [v for cfg in grid for v in launch_variants(cfg, variants, pdl)]
    rows, deadline, flush_ms = [], time.monotonic() + budget_s, []
    for cfg in grid:
        if time.monotonic() > deadline:
            print(f"{quant} M={m}: time budget spent, rest of the grid skipped", flush=True)
            break

        def call(i: int, cfg: tuning.Config = cfg) -> torch.Tensor:
            layer = layers[i]
            return launcher(cfg)(xs[i], codes[i], layer.scales, zeros[i], None, spec.bits, spec.group_size, cfg)

        try:
            err = ((call(0).float() - ref).norm() / ref.norm()).item()
        except Exception as exc:  # too much shared memory, or this Triton cannot compile the tile
            print(f"{quant} {cfg}: skipped ({type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''})", flush=True)
            continue
        t = graph_median_ms([lambda i=i: call(i) for i in range(len(layers))])
        cold = tuning.cold_time_ms(lambda: call(0), flush_ms)
        rows.append(dict(n=n, k=k, quant=quant, m=m, kernel=kernel_name(cfg) + ("/K-major" if k_major else ""),
                         block_n=cfg.block_n, block_c=cfg.block_k, split_k=cfg.split_k, warps=cfg.num_warps,
                         variant=cfg.variant, stages=cfg.num_stages, fixup=cfg.fixup, pdl=cfg.pdl, early=cfg.early,
                         lanes=cfg.lanes,
                         us=t * 1e3, cold_us=cold * 1e3, cublas_us=t_cublas * 1e3,
                         x_cublas=t_cublas / t, bw_frac=(packed + 2 * m * (n + k)) / (t * 1e-3) / copy_bw, rel_err=err))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="8192,8192", help="N,K")
    ap.add_argument("--quants", default="w4g128,w3g128,w2g64")
    ap.add_argument("--m", default="1", help="comma-separated row counts, each 1..16")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop sweeping a (quant, M) after this many seconds")
    ap.add_argument("--kernels", default="gemv1,half2,tc,tcp", help="which kernel families to sweep")
    ap.add_argument("--variants", default="plain,fixup,pdl",
                    help="write-back / launch of each tile: plain (memset + atomics), fixup (in-kernel split-K "
                         "reduction), pdl (fixup + programmatic dependent launch), early (pdl, a paired-fp16 "
                         "tile's first codes loaded before the wait)")
    ap.add_argument("--first", type=int, default=None,
                    help="sweep only the first N tiles of the kernels asked for (the tuner's own candidates come first)")
    ap.add_argument("--k-major", action="store_true",
                    help="codes stored K-major (each column's words contiguous) instead of N-major")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if not set(variants) <= {"plain", "fixup", "pdl", "early"}:
        raise SystemExit(f"--variants takes plain, fixup, pdl and early, not {args.variants}")
    if args.first is not None and args.first < 1:
        raise SystemExit(f"--first takes a positive number of tiles, not {args.first}")
    kernels = set(args.kernels.split(","))
    if not kernels <= {"gemv1", "half2", "tc", "tcp"}:
        raise SystemExit(f"--kernels takes gemv1, half2, tc and tcp (tensor cores, paired codes), not {args.kernels}")
    n, k = map(int, args.shape.split(","))
    ms = [int(m) for m in args.m.split(",")]
    if not all(1 <= m <= 16 for m in ms):
        raise SystemExit(f"--m takes row counts from 1 to 16, not {args.m}")
    copy_bw = copy_bandwidth()
    cases = list(itertools.product(args.quants.split(","), ms))
    rows = [r for q, m in cases for r in sweep(n, k, q, m, copy_bw, args.budget_s, kernels, variants, args.k_major,
                                                               args.first)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep_decode.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print("| quant | M | kernel | BLOCK_N | warps | BLOCK_C | split | lanes | variant | stages | fixup | pdl | early | us | cold us | x cuBLAS | BW/copy |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for q, m in cases:
        for r in sorted((r for r in rows if r["quant"] == q and r["m"] == m), key=lambda r: r["us"])[:8]:
            print(f"| {q} | {m} | {r['kernel']} | {r['block_n']} | {r['warps']} | {r['block_c']} | {r['split_k']} | "
                  f"{r['lanes']} | {r['variant']} | {r['stages']} | {r['fixup']} | {r['pdl']} | {r['early']} | {r['us']:.1f} | {r['cold_us']:.1f} | {r['x_cublas']:.2f} | {r['bw_frac']:.2f} |")


if __name__ == "__main__":
    main()
