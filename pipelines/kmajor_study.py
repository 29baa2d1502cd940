"""Study: an M = 1 decode kernel over K-major codes, with no split-K, against the project's kernel
over N-major codes and cuBLAS fp16.

    python3 pipelines/kmajor_study.py --shape 8192,8192 --quants w4g128,w2g64 --out FILE

``read_floor.py`` measured what holds the paired-fp16 M = 1 kernel back on an H200: its split-K
write-back (float atomics, a GPU-scope fence, the arrival count, the last program's sum) cost a
probe that only reads the layer's bytes 1.2-1.4 µs of 10-12, and split-K is there because the
project's codes are N-major (``qweight [K b / 32, N]``): a program reading long contiguous rows
must take many columns, so K has to be split across programs to fill the GPU.

The kernel (``kernels/kmajor.py``) reads the project's codes stored K-major (the same words
transposed once, each column's codes contiguous): one program owns ``BLOCK_N`` whole columns, the K
sum ends inside it, one plain fp16 store, no atomics, no fence. Here it runs at every tile asked
for, and as the dispatch tunes it for a layer whose codes are stored K-major
(``qlinear.store_codes_k_major``, which also stores the scales and zero points column-major:
session 19 found them 0.7 µs slower read ``[G, N]`` at 8192^2 w4g128), next to the same layer
N-major.

Timed as the tuner times decode launches (CUDA-graph replays chained over rotated copies, PDL
where the GPU has it), each row checked against the float64 product. Rows go to ``--out``
(JSON); the table is printed last.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout_paths  # noqa: E402,F401 (efficientqat.kernels importable from a bare checkout)
from bench_kernels import make_layer  # noqa: E402
from prefetch_study import launch, tiles_of  # noqa: E402
from read_floor import ROTATION_BYTES, chained_us, references_first, run_study  # noqa: E402

from efficientqat.kernels import tuning  # noqa: E402
from efficientqat.kernels.kmajor import gemv_kmajor_forward  # noqa: E402
from efficientqat.qlinear import store_codes_k_major  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402


def kmajor_gemv(x: torch.Tensor, weights: tuple[torch.Tensor, ...], bits: int, group: int, block_n: int,
                warps: int) -> torch.Tensor:
    """One launch of the K-major kernel's tile ``(block_n, warps)``, under PDL where the GPU has it."""
    cfg = tuning.Config(1, block_n, 0, 1, warps, 1, tuning.KMAJOR, pdl=tuning.pdl_supported(x.device))
    return gemv_kmajor_forward(x, *weights, None, bits, group, cfg)


def study_quant(n: int, k: int, quant: str, tiles: list[tuple[int, int]], repeats: int) -> list[dict]:
    """cuBLAS, the K-major kernel at every tile ``(BLOCK_N, warps)``, then the tuned N-major layer
    and the same layer with K-major codes as the dispatch tunes it (tuning a new key takes a while)."""
    spec = QuantSpec.from_name(quant)
    layer = make_layer(n, k, spec, "cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ref = x.double() @ layer.dequantize_weight().double().t()
    weights = (layer.qweight, layer.scales, layer.kernel_zeros())
    nbytes = sum(w.numel() * w.element_size() for w in weights)

    def error(y: torch.Tensor) -> float:
        return ((y.double() - ref).norm() / ref.norm()).item()

    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(2)]
    rows = [{"quant": quant, "what": "cuBLAS fp16", "us": chained_us(lambda w: torch.matmul(x, w.t()), dense, repeats),
             "bytes": 2 * n * k}]
    k_major = store_codes_k_major(copy.deepcopy(layer), bits=(spec.bits,))
    own = (k_major.qweight, k_major.scales, k_major.kernel_zeros())
    copies = tuning.weight_copies(*own, total=ROTATION_BYTES)
    for block_n, warps in tiles:
        fn = functools.partial(kmajor_gemv, x, bits=spec.bits, group=spec.group_size, block_n=block_n, warps=warps)
        try:
            err = error(fn(weights=own))
        except (ValueError, RuntimeError) as exc:  # a tile this shape or GPU cannot take
            print(f"skip {block_n} cols {warps} warps: {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append({"quant": quant, "what": "K-major kernel", "us": chained_us(lambda w: fn(weights=w), copies, repeats),
                     "bytes": nbytes, "tile": [block_n, warps], "rel_error": err})
        print(f"{quant} K-major {block_n} cols {warps} warps: {rows[-1]['us']:.2f} us, error {err:.1e}", flush=True)
    n_major = tuning.weight_copies(*weights, total=ROTATION_BYTES)
    for what, module, rotated in (("tuned N-major layer", layer, n_major), ("tuned K-major layer", k_major, copies)):
        for cfg in tiles_of(x, module, spec.bits, spec.group_size, "best"):
            fn = functools.partial(launch, cfg, x, bits=spec.bits, group=spec.group_size)
            rows.append({"quant": quant, "what": what, "us": chained_us(lambda w: fn(weights=w), rotated, repeats),
                         "bytes": nbytes, "tile": [cfg.block_n, cfg.num_warps], "rel_error": error(fn(weights=rotated[0])),
                         "config": cfg.__dict__})
            print(f"{quant} {what}: {rows[-1]['us']:.2f} us", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Per quantisation: cuBLAS, the tuned N-major kernel, the fastest K-major tiles (at most 4)."""
    return references_first(rows, ("quant",), "K-major kernel", "cols, warps")


def main() -> None:
    run_study(__doc__, "w4g128,w2g64", {"block-n": "2,4,8,16", "warps": "1,2,4"}, study_quant, table)


if __name__ == "__main__":
    main()
