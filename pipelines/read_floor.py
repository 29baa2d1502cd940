"""Study: how fast can one kernel launch read an M = 1 decode layer's bytes? The floor under the
paired-fp16 decode kernel, and what its split-K reduction costs.

    python3 pipelines/read_floor.py --shape 8192,8192 --quants w4g128,w3g128,w2g64 --out FILE

At M = 1 a decode matmul reads each packed code, scale and zero point once (35 MB for w4g128 at
8192^2) and the issue's targets are ratios to cuBLAS fp16, which reads four times as many bytes.
The probe kernel here reads exactly the decode kernel's bytes in its grid (``BLOCK_N`` columns,
``BLOCK_C`` chunks a step inside one group, ``SPLIT_K`` programs along K, chained under
programmatic dependent launch like it) and spends one xor a code word on them. Its column sums
leave either through the decode kernels' split-K write-back (``tiling.store_decode``: float
atomics into the workspace, the last program to arrive writes the sum) or as each K slice's plain
store, with no reduction at all. Every row is timed the same way, as CUDA-graph replays chained
over rotated copies of more than the L2 holds (:data:`ROTATION_BYTES`): the probe over a grid of
tiles, the project's tuned kernel for the shape (the config cache's, or tuned now) and cuBLAS
fp16 ``x @ W.T``. So

* tuned kernel - probe at the kernel's own tile = what the dequantisation and dot cost on top of
  the reads;
* probe with the write-back - probe with plain stores = the split-K reduction;
* the probe's best time over tiles = what any one launch reading these bytes takes here, and
  cuBLAS over it the largest ratio such a kernel could reach.

Rows go to ``--out`` (JSON); the table is printed last.
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

from efficientqat.kernels import tuning  # noqa: E402
from efficientqat.kernels.tiling import (release_next_grid, split_k_workspace, store_decode,  # noqa: E402
                                         wait_for_previous_grid)
from efficientqat.packing import chunk_values, chunk_words  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402

ROTATION_BYTES = 256 << 20
"""Bytes of layer copies a chained replay rotates over (``tuning.weight_copies``): four times an
H200's L2, so every call reads its bytes from DRAM as consecutive layers of a model do."""


@triton.jit
def _read_kernel(qw_ptr, s_ptr, z_ptr, part_ptr, ws_ptr, count_ptr, y_ptr, N, code_rows, stride_qk, stride_g,
                 ROWS: tl.constexpr, GROUP_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                 FIXUP: tl.constexpr, PDL: tl.constexpr):
    """Program ``(n, k)`` reads word rows ``[k, k + 1) * code_rows / SPLIT_K`` of ``BLOCK_N`` code
    columns in steps of ``ROWS`` (all of a step's loads issued before the first use, as in the
    decode kernel), plus the step's group row of scales and zero points, and folds them into one
    int32 a column (xor and add: nothing the compiler can drop). ``FIXUP``: the column sums go
    through :func:`store_decode`'s split-K write-back into ``y``; otherwise each K slice stores
    its own row of ``part``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    n_steps = code_rows // ROWS
    s_lo = pid_k * n_steps // SPLIT_K
    s_hi = (pid_k + 1) * n_steps // SPLIT_K
    wait_for_previous_grid(PDL)
    acc = tl.zeros((1, BLOCK_N), tl.int32)
    for step in range(s_lo, s_hi):
        words = ()
        for r in tl.static_range(ROWS):
            words = words + (tl.load(qw_ptr + (step * ROWS + r) * stride_qk + offs_n),)
        g = step * ROWS // GROUP_ROWS
        scale = tl.load(s_ptr + g * stride_g + offs_n).to(tl.int16, bitcast=True).to(tl.int32)
        acc += scale + tl.load(z_ptr + g * stride_g + offs_n).to(tl.int32)
        for r in tl.static_range(ROWS):
            acc ^= words[r]
    release_next_grid(PDL)
    total = acc.to(tl.float32)
    everywhere = offs_n < N
    if FIXUP:
        store_decode(y_ptr + offs_n, everywhere, total, everywhere, ws_ptr + offs_n, count_ptr + pid_n, SPLIT_K,
                     True, False)
    else:
        tl.store(part_ptr + pid_k * N + offs_n, total)


def probe_rows(bits: int, group: int, block_c: int) -> tuple[int, int]:
    """``(word rows a step, word rows a group)`` of a ``block_c``-chunk step; the step must lie in one group."""
    if block_c * chunk_values(bits) > group or group % (block_c * chunk_values(bits)):
        raise ValueError(f"a step of {block_c} chunks ({block_c * chunk_values(bits)} values) does not tile "
                         f"groups of {group}")
    per_value = chunk_words(bits) / chunk_values(bits)
    return int(block_c * chunk_words(bits)), int(group * per_value)


def read_layer(weights: tuple[torch.Tensor, ...], bits: int, group: int, block_n: int, block_c: int, split: int,
               fixup: bool, warps: int = 4) -> torch.Tensor:
    """One probe launch over ``weights = (qweight, scales, zeros)`` (zeros as the decode kernels
    take them: uint8 ``[G, N]``); returns what it wrote, float32: the column sums ``[1, N]`` with
    ``fixup`` (float32, not fp16, holds the int32 folds), else the K slices' ``[split, N]``."""
    qweight, scales, zeros = weights
    code_rows, N = qweight.shape
    rows, group_rows = probe_rows(bits, group, block_c)
    if N % block_n or (code_rows // rows) < split:
        raise ValueError(f"the probe needs N ({N}) a multiple of BLOCK_N ({block_n}) and at least one step "
                         f"a K slice ({code_rows // rows} steps, split {split})")
    dev = qweight.device
    y = torch.empty(1, N, device=dev, dtype=torch.float32)
    part = torch.empty(split, N, device=dev, dtype=torch.float32) if not fixup else y
    ws = split_k_workspace(dev, N, N // block_n) if fixup else None
    pdl = tuning.pdl_supported(dev)
    _read_kernel[(N // block_n, split)](
        qweight, scales, zeros, part, ws.sums if ws else y, ws.counts if ws else y, y, N, code_rows,
        qweight.stride(0), scales.stride(0),
        ROWS=rows, GROUP_ROWS=group_rows, BLOCK_N=block_n, SPLIT_K=split, FIXUP=fixup, PDL=pdl,
        num_warps=warps, **({"launch_pdl": True} if pdl else {}))
    return y if fixup else part


def chained_us(fn, copies: list, repeats: int) -> float:
    calls = [functools.partial(fn, w) for w in copies]
    return statistics.median(tuning.chained_time_ms(calls) for _ in range(repeats)) * 1e3


def study_quant(n: int, k: int, quant: str, tiles: list[tuple[int, int, int]], repeats: int) -> list[dict]:
    """Rows of one quantisation: cuBLAS, the tuned decode kernel, then the probe at every tile
    (``(BLOCK_N, BLOCK_C, SPLIT_K)``) that fits, with and without the split-K write-back."""
    spec = QuantSpec.from_name(quant)
    layer = make_layer(n, k, spec, "cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    weights = (layer.qweight, layer.scales, layer.kernel_zeros())
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    copies = tuning.weight_copies(*weights, total=ROTATION_BYTES)
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(2)]
    rows = [{"quant": quant, "what": "cuBLAS fp16", "us": chained_us(lambda w: torch.matmul(x, w.t()), dense, repeats),
             "bytes": 2 * n * k}]
    for cfg in tiles_of(x, layer, spec.bits, spec.group_size, "best"):
        fn = functools.partial(launch, cfg, x, bits=spec.bits, group=spec.group_size)
        rows.append({"quant": quant, "what": "tuned kernel", "us": chained_us(lambda w: fn(weights=w), copies, repeats),
                     "bytes": nbytes, "tile": [cfg.block_n, cfg.block_k, cfg.split_k], "config": cfg.__dict__})
    for (block_n, block_c, split), fixup in itertools.product(tiles, (True, False)):
        probe = functools.partial(read_layer, bits=spec.bits, group=spec.group_size, block_n=block_n,
                                  block_c=block_c, split=split, fixup=fixup)
        try:
            probe(weights)
        except ValueError:
            continue
        rows.append({"quant": quant, "what": "probe, split-K write-back" if fixup else "probe, plain stores",
                     "us": chained_us(probe, copies, repeats), "bytes": nbytes, "tile": [block_n, block_c, split]})
        print(f"{quant} {rows[-1]['what']} {block_n} cols {block_c} chunks split {split}: {rows[-1]['us']:.2f} us",
              flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Per quantisation: cuBLAS, the tuned kernel, the probe at the tuned kernel's tile and its best
    tile with each write-back; TB/s of the layer's bytes and the ratio to cuBLAS."""
    lines = ["| quant | what | tile (cols, chunks, split) | us | TB/s | x cuBLAS |", "|---|---|---|---|---|---|"]
    for quant in dict.fromkeys(r["quant"] for r in rows):
        mine = [r for r in rows if r["quant"] == quant]
        cublas = next(r["us"] for r in mine if r["what"] == "cuBLAS fp16")
        tuned = [r for r in mine if r["what"] == "tuned kernel"]
        shown = [mine[0]] + tuned
        for what in ("probe, split-K write-back", "probe, plain stores"):
            probes = [r for r in mine if r["what"] == what]
            shown += [r for r in probes if tuned and r["tile"] == tuned[0]["tile"]]
            best = min(probes, key=lambda r: r["us"], default=None)
            shown += [best] if best is not None and best not in shown else []
        lines += [f"| {quant} | {row['what']} | {rate_cells(row, cublas)} |" for row in shown]
    return "\n".join(lines)


def rate_cells(row: dict, cublas_us: float) -> str:
    """A row's tile, µs, TB/s of its ``bytes`` and ratio to cuBLAS, as table cells."""
    tile = ", ".join(map(str, row.get("tile", []))) or "-"
    return f"{tile} | {row['us']:.2f} | {row['bytes'] / row['us'] / 1e6:.2f} | {cublas_us / row['us']:.2f}x"


def references_first(rows: list[dict], cases: tuple[str, ...], studied: str, tile: str, top: int = 4) -> str:
    """A study's table: per case (rows alike in the fields ``cases``, e.g. ``("quant", "m")``) its
    reference rows (cuBLAS, tuned layers) first, then the ``top`` fastest rows of the kernel named
    ``studied``; ``tile`` names the tile's fields in the header."""
    names = {"quant": "quant", "m": "M"}
    head = " | ".join(names[f] for f in cases)
    lines = [f"| {head} | kernel | tile ({tile}) | us | TB/s | x cuBLAS | rel. error |",
             "|---" * (len(cases) + 6) + "|"]
    for case in dict.fromkeys(tuple(r[f] for f in cases) for r in rows):
        mine = [r for r in rows if tuple(r[f] for f in cases) == case]
        cublas = next(r["us"] for r in mine if r["what"] == "cuBLAS fp16")
        fastest = sorted((r for r in mine if r["what"] == studied), key=lambda r: r["us"])[:top]
        for r in [r for r in mine if r["what"] != studied] + fastest:
            err = f"{r['rel_error']:.1e}" if "rel_error" in r else "-"
            lines.append(f"| {' | '.join(map(str, case))} | {r['what']} | {rate_cells(r, cublas)} | {err} |")
    return "\n".join(lines)


def int_list(option: str, text: str) -> list[int]:
    """A comma-separated list of positive integers given to ``option``; anything else exits naming it."""
    values = [v.strip() for v in text.split(",")]
    if not all(v.isdigit() and int(v) > 0 for v in values):
        raise SystemExit(f"{option} takes positive integers separated by commas, not {text!r}")
    return [int(v) for v in values]


def run_study(doc: str, quants: str, tile_options: dict[str, str], study_quant, table_of) -> None:
    """The command line of the M = 1 studies: ``--shape N,K``, ``--quants``, one comma-separated
    list a tile field (``tile_options``: option name -> default), ``--repeats``, ``--out``. Runs
    ``study_quant(n, k, quant, tiles, repeats)`` for every quantisation over every combination of
    the tile fields, writes the rows to ``--out`` (JSON) after each, prints ``table_of(rows)``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--shape", default="8192,8192", help="N,K")
    p.add_argument("--quants", default=quants)
    for name, default in tile_options.items():
        p.add_argument(f"--{name}", default=default)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{p.prog} times kernels: it needs a CUDA GPU")
    n, k = (int(v) for v in args.shape.split(","))
    tiles = list(itertools.product(*(int_list(f"--{name}", getattr(args, name.replace("-", "_")))
                                     for name in tile_options)))
    rows = []
    for quant in args.quants.split(","):
        rows += study_quant(n, k, quant, tiles, args.repeats)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "shape": [n, k], "rows": rows},
                                           indent=1))
    print(f"device {torch.cuda.get_device_name()}, {n}x{k}")
    print(table_of(rows))


def main() -> None:
    run_study(__doc__, "w4g128,w3g128,w2g64", {"block-n": "256,512,1024,2048", "block-c": "2,4,8",
                                                 "split": "16,32,64,128"}, study_quant, table)


if __name__ == "__main__":
    main()
