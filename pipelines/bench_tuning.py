"""First-start tuning time of one layer shape, with and without compiling the candidate tiles in parallel.

    python3 pipelines/bench_tuning.py --shape 4096,4096 --quant w3g128 --m 1 --threads 0,8 [--out DIR]

A model's first start on a GPU tunes every layer shape it meets (``kernels/tuning.py``): every
candidate tile is compiled and timed. For each ``--threads`` value (``EFFICIENTQAT_COMPILE_THREADS``)
this runs a fresh process with empty Triton and tile caches, so no mode reuses what another
compiled, and times the layer's first forward (tuning included) and a second one (tuned). The
table compares the modes of one run; raw rows go to ``<out>/bench_tuning.json``. Needs a GPU.
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


def run_mode(args: argparse.Namespace, threads: int) -> dict:
    """:func:`measure` in a fresh process with ``threads`` compile threads and empty caches."""
    with tempfile.TemporaryDirectory() as triton_cache, tempfile.TemporaryDirectory() as tile_cache:
        env = {**os.environ, "TRITON_CACHE_DIR": triton_cache, "EFFICIENTQAT_CACHE_DIR": tile_cache,
               "EFFICIENTQAT_COMPILE_THREADS": str(threads), "EFFICIENTQAT_AUTOTUNE": "1"}
        cmd = [sys.executable, __file__, "--child", "--shape", args.shape, "--quant", args.quant, "--m", str(args.m)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {threads}-thread run failed:\n{done.stderr[-2000:]}")
    return {"threads": threads, **json.loads(done.stdout.strip().splitlines()[-1])}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    base = rows[0]["first_s"]
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

    if not torch.cuda.is_available():
        raise SystemExit("bench_tuning.py times the GPU tuner: it needs a CUDA device")
    if args.child:
        print(json.dumps(measure(args)))
        return []
    rows = [run_mode(args, threads) for threads in args.thread_counts]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_tuning.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(table(rows, args))
    return rows


if __name__ == "__main__":
    main()
