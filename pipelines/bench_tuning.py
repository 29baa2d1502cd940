"""First-start tuning time of one layer shape, with and without compiling the candidate tiles in parallel.

    python3 pipelines/bench_tuning.py --shape 4096,4096 --quant w3g128 --m 1 --threads 0,8 [--out DIR]

A model's first start on a GPU tunes every layer shape it meets (``kernels/tuning.py``): every
candidate tile is compiled and timed. For each ``--threads`` value (``EFFICIENTQAT_COMPILE_THREADS``)
this runs a fresh process with empty Triton and tile caches, so no mode reuses what another
compiled, and times the layer's first forward (tuning included) and a second one (tuned). The
table compares the modes of one run; raw rows go to ``<out>/bench_tuning.json``. Needs a GPU.

    python3 pipelines/bench_tuning.py --sm90 --shape 4096,4096 --quant w3g128 --threads 0,2

``--sm90`` times only what the threads are for, on any machine, GPU or not: compiling the layer's
M = 1 paired-fp16 tiles for Hopper (``sass_stats.compile_half2``), one by one or by that many
threads, each mode again in a fresh process with an empty Triton cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="4096,4096", help="N,K of the layer")
    p.add_argument("--quant", default="w3g128", help="wBITSgGROUP, e.g. w4g128")
    p.add_argument("--m", type=int, default=1, help="rows of x (1: batch-1 decode)")
    p.add_argument("--threads", default="0,8", help="compile threads to compare, comma-separated")
    p.add_argument("--out", default=None, help="folder for bench_tuning.json")
    p.add_argument("--sm90", action="store_true", help="time compiling the M = 1 tiles for sm_90 only (no GPU needed)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.n, args.k = (int(v) for v in args.shape.split(","))
        args.thread_counts = [int(v) for v in args.threads.split(",")]
    except ValueError:
        p.error(f"--shape takes N,K and --threads whole numbers, not {args.shape!r} / {args.threads!r}")
    return args


def measure(args: argparse.Namespace) -> dict:
    """In this process: the first and second forward of a random packed layer, in seconds, and
    the tiles the tuner chose."""
    import torch
    from bench_kernels import make_layer  # (it maps efficientqat.kernels onto ./kernels if not installed)

    from efficientqat.kernels import tuning
    from efficientqat.quantizer import QuantSpec

    layer = make_layer(args.n, args.k, QuantSpec.from_name(args.quant), "cuda")
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.float16)
    seconds = []
    with torch.no_grad():
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            layer(x)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return {"first_s": seconds[0], "tuned_s": seconds[1], "configs": tuning.chosen_configs()}


def measure_sm90(args: argparse.Namespace) -> dict:
    """In this process: the wall time of compiling the layer's M = 1 paired-fp16 tiles for sm_90,
    in ``$EFFICIENTQAT_COMPILE_THREADS`` threads (0 or 1: one after the other)."""
    from concurrent.futures import ThreadPoolExecutor

    from sass_stats import compile_half2

    from efficientqat.kernels import candidates, tuning
    from efficientqat.quantizer import QuantSpec

    spec = QuantSpec.from_name(args.quant)
    tiles = candidates.half2_candidates(1, args.n, args.k, spec.bits, spec.group_len(args.k))

    def build(cfg: tuning.Config) -> None:
        compile_half2(spec.bits, spec.group_len(args.k), cfg.block_n, cfg.block_k, cfg.num_warps, cfg.split_k,
                      args.k, cfg.lanes)

    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, tuning.compile_threads())) as pool:
        list(pool.map(build, tiles))
    return {"first_s": time.perf_counter() - start, "tuned_s": 0.0, "configs": {}, "tiles": len(tiles)}


def run_mode(args: argparse.Namespace, threads: int) -> dict:
    """:func:`measure` in a fresh process with ``threads`` compile threads and empty caches."""
    with tempfile.TemporaryDirectory() as triton_cache, tempfile.TemporaryDirectory() as tile_cache:
        env = {**os.environ, "TRITON_CACHE_DIR": triton_cache, "EFFICIENTQAT_CACHE_DIR": tile_cache,
               "EFFICIENTQAT_COMPILE_THREADS": str(threads), "EFFICIENTQAT_AUTOTUNE": "1"}
        cmd = [sys.executable, __file__, "--child", "--shape", args.shape, "--quant", args.quant, "--m", str(args.m)]
        cmd += ["--sm90"] if args.sm90 else []
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {threads}-thread run failed:\n{done.stderr[-2000:]}")
    return {"threads": threads, **json.loads(done.stdout.strip().splitlines()[-1])}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    base = rows[0]["first_s"]
    if args.sm90:
        lines = [f"{args.n} x {args.k}, {args.quant}: compiling its {rows[0]['tiles']} M = 1 paired-fp16 tiles for sm_90",
                 "| compile threads | wall s (x first mode) |", "|---|---|"]
        return "\n".join(lines + [f"| {r['threads']} | {r['first_s']:.1f} ({base / r['first_s']:.2f}x) |" for r in rows])
    lines = [f"{args.n} x {args.k}, {args.quant}, M = {args.m}",
             "| compile threads | first call s (x first mode) | tuned call ms | chosen tile |", "|---|---|---|---|"]
    for r in rows:
        chosen = "; ".join(f"{key.split('|')[1]}: {cfg}" for key, cfg in r["configs"].items())
        lines.append(f"| {r['threads']} | {r['first_s']:.1f} ({base / r['first_s']:.2f}x) | "
                     f"{1e3 * r['tuned_s']:.2f} | {chosen} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch

    if not args.sm90 and not torch.cuda.is_available():
        raise SystemExit("bench_tuning.py times the GPU tuner: it needs a CUDA device (--sm90 does not)")
    if args.child:
        print(json.dumps(measure_sm90(args) if args.sm90 else measure(args)))
        return []
    rows = [run_mode(args, threads) for threads in args.thread_counts]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_tuning.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(table(rows, args))
    return rows


if __name__ == "__main__":
    main()
