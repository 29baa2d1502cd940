"""Time the decode kernels with their next codes asked of L2 ahead of the loads (``Config.prefetch``,
``kernels/prefetch.py``) against the same tiles without, on one layer shape.

    python3 pipelines/prefetch_study.py --shape 8192,8192 --cases w4g128:16,w2g64:16 --prefetch 0,1,2 --out FILE

Only the tensor-core kernel (M = 2..16) takes the hint; a paired-fp16 tile times the same at every
distance. For each ``quant:M`` case the tiles are the tuner's decode candidates as a chained launch runs
them (``tuning.chained_twins``; ``--tiles best`` keeps the tuned one from the config cache, or
tunes it), each at every ``--prefetch`` distance. Each row records its output's relative difference
from the tile's without prefetch (the hint changes no arithmetic; split-K atomics add in any order,
so the last bits may differ), and its time as the tuner
times it: CUDA-graph replays of the layer chained behind itself over rotated copies
(``tuning.chained_time_ms``), next to cuBLAS fp16 ``x @ W.T`` on a rotation of its own. Rows go
to ``--out`` (JSON); the table of the fastest tiles is printed last.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout_paths  # noqa: E402,F401 (efficientqat.kernels importable from a bare checkout)
from bench_kernels import make_layer  # noqa: E402
from sweep_decode import launcher  # noqa: E402

import torch  # noqa: E402

from efficientqat.kernels import autograd, tuning  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402


def launch(cfg: tuning.Config, x: torch.Tensor, weights: tuple[torch.Tensor, ...], bits: int,
           group: int) -> torch.Tensor:
    """One decode launch of tile ``cfg`` on ``weights = (qweight, scales, zeros)``."""
    return launcher(cfg)(x, *weights, None, bits, group, cfg=cfg)


def parse_tile(text: str) -> tuning.Config:
    """``--tiles`` text for one tile, ``field=value`` pairs of :class:`tuning.Config` joined by commas
    (block_m 16, PDL and the in-kernel split-K reduction unless given), e.g.
    ``variant=4,block_n=128,block_k=16,split_k=8,num_stages=3``."""
    fields = {"block_m": 16, "pdl": True, "fixup": True}
    for pair in text.split(","):
        name, _, value = pair.partition("=")
        if name not in tuning.Config.__dataclass_fields__ or not value.lstrip("-").isdigit():
            raise SystemExit(f"--tiles takes Config field=integer pairs, not {pair!r}")
        fields[name] = int(value)
    if "block_n" not in fields or "block_k" not in fields:
        raise SystemExit(f"--tiles needs block_n and block_k in each tile: {text!r}")
    fields["pdl"], fields["fixup"] = bool(fields["pdl"]), bool(fields["fixup"])
    return tuning.Config(**fields)


def tiles_of(case_x: torch.Tensor, layer, bits: int, group: int, which: str) -> list[tuning.Config]:
    """``best``: the tile the tuner launches for this key (cache or tuned now); ``all``: every chained
    candidate; else ``;``-separated :func:`parse_tile` texts."""
    M, K = case_x.shape
    N = layer.qweight.shape[1]
    if which not in ("best", "all"):
        return [parse_tile(text) for text in which.split(";")]
    if which == "all":
        return tuning.chained_twins(autograd.decode_candidates(case_x, M, N, K, bits, group))
    before = set(tuning.chosen_configs())
    layer(case_x)
    return [tuning.Config(**cfg) for key, cfg in tuning.chosen_configs().items() if key not in before]


def time_case(n: int, k: int, quant: str, m: int, prefetches: list[int], which: str, repeats: int) -> list[dict]:
    """Rows of one ``quant:M`` case: each tile at each prefetch distance, then cuBLAS's time on every row."""
    spec = QuantSpec.from_name(quant)
    layer = make_layer(n, k, spec, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    weights = (layer.qweight, layer.scales, layer.kernel_zeros())
    copies = tuning.weight_copies(*weights)
    rows = []
    for tile in tiles_of(x, layer, spec.bits, spec.group_size, which):
        try:
            ref = launch(replace(tile, prefetch=0), x, weights, spec.bits, spec.group_size)
        except Exception as err:  # a tile that does not fit this shape or GPU
            print(f"skip {tile}: {type(err).__name__}", flush=True)
            continue
        for p in prefetches:
            cfg = replace(tile, prefetch=p)
            out = launch(cfg, x, weights, spec.bits, spec.group_size).float()
            differs = ((out - ref.float()).norm() / ref.float().norm()).item()
            calls = [functools.partial(launch, cfg, x, w, spec.bits, spec.group_size) for w in copies]
            us = statistics.median(tuning.chained_time_ms(calls) for _ in range(repeats)) * 1e3
            rows.append({"quant": quant, "m": m, "n": n, "k": k, "prefetch": p, "us": us, "rel_to_plain": differs,
                         "config": asdict(tile)})
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(2)]
    cublas = [functools.partial(torch.matmul, x, w.t()) for w in dense]
    cublas_us = statistics.median(tuning.chained_time_ms(cublas) for _ in range(repeats)) * 1e3
    for row in rows:
        row["cublas_us"] = cublas_us
    return rows


def tile_name(cfg: dict) -> str:
    kind = "half2" if cfg["variant"] == tuning.HALF2 else f"v{cfg['variant']}"
    extra = (f" x{cfg['lanes']} lanes" if cfg["lanes"] > 1 else "") + (" early" if cfg["early"] else "")
    return (f"{kind} {cfg['block_n']} cols, {cfg['block_k']} chunks, split {cfg['split_k']}, {cfg['num_warps']} warps, "
            f"{cfg['num_stages']} st{extra}")


def table(rows: list[dict], prefetches: list[int], top: int) -> str:
    """Per case, the ``top`` tiles by their best time: one column a prefetch distance."""
    lines = ["| case | tile | " + " | ".join(f"prefetch {p} us" for p in prefetches) + " | best x cuBLAS |",
             "|---|---|" + "---|" * (len(prefetches) + 1)]
    cases = dict.fromkeys((r["quant"], r["m"]) for r in rows)
    for quant, m in cases:
        by_tile: dict[str, dict[int, float]] = {}
        for r in rows:
            if (r["quant"], r["m"]) == (quant, m):
                by_tile.setdefault(tile_name(r["config"]), {})[r["prefetch"]] = r["us"]
        cublas = next(r["cublas_us"] for r in rows if (r["quant"], r["m"]) == (quant, m))
        for name, times in sorted(by_tile.items(), key=lambda kv: min(kv[1].values()))[:top]:
            cells = " | ".join(f"{times[p]:.1f}" if p in times else "-" for p in prefetches)
            lines.append(f"| {quant} M={m} | {name} | {cells} | {cublas / min(times.values()):.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192,8192", help="N,K")
    p.add_argument("--cases", default="w4g128:16,w2g64:16", help="quant:M, comma-separated")
    p.add_argument("--prefetch", default="0,1,2,4", help="steps ahead, comma-separated (0: off)")
    p.add_argument("--tiles", default="best",
                   help="best (the tuned tile), all (every chained candidate) or ';'-separated lists of "
                        "Config field=value pairs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=6, help="tiles a case in the printed table")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefetch_study.py times kernels: it needs a CUDA GPU")
    n, k = (int(v) for v in args.shape.split(","))
    prefetches = [int(v) for v in args.prefetch.split(",")]
    rows = []
    for case in args.cases.split(","):
        quant, m = case.split(":")
        rows += time_case(n, k, quant, int(m), prefetches, args.tiles, args.repeats)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print(f"device {torch.cuda.get_device_name()}, {n}x{k}")
    print(table(rows, prefetches, args.top))


if __name__ == "__main__":
    main()
