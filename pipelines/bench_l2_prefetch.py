"""Does a decode matmul run faster when the matmul before it prefetched its weights into L2?

A batch-1 decode step is a chain: packed matmul A, then work that leaves DRAM idle (attention,
norms, launch gaps), then packed matmul B. This times that pattern on the GPU, M = 1, fp16, each
layer on its tuned tile, as CUDA-graph replays over enough layer copies that nothing stays in L2
from one pair to the next:

    A (requesting B's weights into L2, or not) -> idle gap (a sleep kernel) -> B

for B of each of a 7B model's four fused layer shapes (A is a 4096 x 4096 layer), a short and a
long gap, and the prefetch modes of ``kernels.l2_prefetch`` (``lines``: ``prefetch.global.L2``,
``bulk``: ``cp.async.bulk.prefetch.L2``), against none and against ``warm`` (B run once right
before the gap, so its weights are in L2 as far as they fit: what a prefetch could reach at best).
B's time is the pair's time minus that of the same chain without B.

    python3 pipelines/bench_l2_prefetch.py --out runs/l2 --quant w4g128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import make_layer  # noqa: E402

from efficientqat.kernels import tuning  # noqa: E402
from efficientqat.kernels.autograd import forward_2d  # noqa: E402
from efficientqat.kernels.half2 import gemv_half2_forward  # noqa: E402
from efficientqat.kernels.l2_prefetch import BULK, LINES  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402

SHAPES = ((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008))
MODES = {"none": 0, "lines": LINES, "bulk": BULK, "warm": -1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quant", default="w4g128", help="wBgG, e.g. w4g128 or w2g64")
    p.add_argument("--gaps-us", default="3,12", help="idle time between A and B, µs")
    p.add_argument("--copies", type=int, default=6, help="layer pairs rotated through (> L2 in all)")
    p.add_argument("--replays", type=int, default=30)
    return p.parse_args(argv)


def spec_of(quant: str) -> QuantSpec:
    bits, group = quant.removeprefix("w").split("g")
    return QuantSpec(int(bits), int(group))


class Layer:
    """A packed layer's kernel tensors and its tuned M = 1 launch."""

    def __init__(self, n: int, k: int, spec: QuantSpec) -> None:
        layer = make_layer(n, k, spec, "cuda").half()
        self.bits, self.group = spec.bits, spec.group_len(k)
        self.qweight, self.scales, self.zeros = layer.qweight, layer.scales.data, layer.kernel_zeros()
        self.x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        forward_2d(self.x, self.qweight, self.scales, self.zeros, None, self.bits, self.group)  # tunes
        chosen = tuning.chosen_configs()
        want = f"|m=1|n={n}|k={k}|bits={self.bits}|group={self.group}|"
        self.cfg = tuning.Config(**next(cfg for key, cfg in chosen.items() if want in key))

    def tensors(self) -> list[torch.Tensor]:
        return [self.scales, self.zeros, self.qweight]

    def run(self, prefetch: "Layer | None" = None, mode: int = 0) -> torch.Tensor:
        if self.cfg.variant != tuning.HALF2:
            raise SystemExit(f"the tuner chose a {self.cfg} tile: the prefetch is in the paired-fp16 kernel only")
        return gemv_half2_forward(self.x, self.qweight, self.scales, self.zeros, None, self.bits, self.group, self.cfg,
                                  prefetch.tensors() if prefetch is not None and mode > 0 else None,
                                  mode if mode > 0 else LINES)


def chain_us(pairs: list[tuple[Layer, Layer]], mode: int, gap_cycles: int, with_b: bool, replays: int) -> float:
    """Median µs per pair of CUDA-graph replays of ``A -> gap -> B`` over ``pairs``."""
    def chain() -> None:
        for a, b in pairs:
            a.run(b, mode)
            if mode == -1:
                b.run()
            torch.cuda._sleep(gap_cycles)
            if with_b:
                b.run()

    chain()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    times = []
    for _ in range(replays + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(pairs))
    return statistics.median(times[3:])


def sleep_cycles_per_us() -> float:
    """Clock rate of ``torch.cuda._sleep``, measured (the SM clock varies with the GPU's state)."""
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(2_000_000)
    end.record()
    end.synchronize()
    return 2_000_000 / (start.elapsed_time(end) * 1000)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    spec = spec_of(args.quant)
    per_us = sleep_cycles_per_us()
    gaps = [float(g) for g in args.gaps_us.split(",")]
    rows = []
    for n, k in SHAPES:
        pairs = [(Layer(4096, 4096, spec), Layer(n, k, spec)) for _ in range(args.copies)]
        for gap in gaps:
            cycles = int(gap * per_us)
            row = {"quant": args.quant, "b_shape": [n, k], "gap_us": gap}
            for name, mode in MODES.items():
                full = chain_us(pairs, mode, cycles, True, args.replays)
                without_b = chain_us(pairs, mode, cycles, False, args.replays)
                row[name] = {"pair_us": full, "b_us": full - without_b}
            rows.append(row)
            print(f"B {n}x{k} gap {gap:g} us: " + ", ".join(
                f"{name} B {row[name]['b_us']:.1f} (pair {row[name]['pair_us']:.1f})" for name in MODES), flush=True)
        del pairs
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_l2_prefetch.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "sleep_cycles_per_us": per_us, "rows": rows,
         "configs": tuning.chosen_configs()}, indent=2))
    print("| B (N x K) | gap µs | B µs none | lines | bulk | warm L2 | pair µs none | lines | bulk |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['b_shape'][0]} x {r['b_shape'][1]} | {r['gap_us']:g} | " + " | ".join(
            f"{r[m]['b_us']:.1f}" for m in MODES) + " | " + " | ".join(f"{r[m]['pair_us']:.1f}" for m in ("none", "lines", "bulk")) + " |")
    return rows


if __name__ == "__main__":
    main()
