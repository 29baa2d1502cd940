"""Study: the ``mma.sync`` decode kernel over codes in fragment order (``kernels/fragments.py``)
at M = 1..16, against the tuned decode layer over the project's codes and cuBLAS fp16.

    python3 pipelines/fragments_study.py --shape 8192,8192 --quants w4g128,w2g64 --tokens 1,16 --out FILE

The layer is repacked once (``fragments.fragment_codes``); the kernel runs at every tile asked
for (``--block-n`` columns a program, ``--warps`` splitting K, ``--ahead`` steps requested ahead,
``--vectors`` code vectors a lane and step) and every M in ``--tokens``.
Timed as the tuner times decode launches (CUDA-graph replays chained over rotated copies, PDL
where the GPU has it), every row checked against the float64 product: on the GPU that check is
what confirms the lanes' fragment registers follow the hardware's ``mma.m16n8k16`` layout.
Rows go to ``--out`` (JSON); the table is printed last.
"""

from __future__ import annotations

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
from efficientqat.kernels.fragments import fragment_codes, gemv_fragments_forward  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402


def fragments_gemv(x: torch.Tensor, weights: tuple[torch.Tensor, ...], bits: int, group: int, block_n: int,
                   warps: int, ahead: int, vectors: int = 1) -> torch.Tensor:
    """One launch of the fragment-order kernel's tile ``(block_n, warps, ahead, vectors)``, under PDL
    where the GPU has it."""
    cfg = tuning.Config(1, block_n, ahead, 1, warps, 1, tuning.FRAGMENTS, pdl=tuning.pdl_supported(x.device),
                        vectors=vectors)
    return gemv_fragments_forward(x, *weights, None, bits, group, cfg)


def study_quant(n: int, k: int, quant: str, tiles: list[tuple[int, ...]], repeats: int) -> list[dict]:
    """Per M of the tiles: cuBLAS, the tuned decode layer (tuning a new key takes a while), then the
    fragment-order kernel at every ``(BLOCK_N, warps, M, steps loaded ahead, vectors a step)``."""
    spec = QuantSpec.from_name(quant)
    layer = make_layer(n, k, spec, "cuda")
    weights = (layer.qweight, layer.scales, layer.kernel_zeros())
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    w64 = layer.dequantize_weight().double()
    own = (fragment_codes(layer.qweight, spec.bits), layer.scales, layer.kernel_zeros())
    copies = tuning.weight_copies(*own, total=ROTATION_BYTES)
    n_major = tuning.weight_copies(*weights, total=ROTATION_BYTES)
    dense = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(2)]
    rows = []
    for m in sorted({tile[2] for tile in tiles}):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.double() @ w64.t()

        def error(y: torch.Tensor) -> float:
            return ((y.double() - ref).norm() / ref.norm()).item()

        base = {"quant": quant, "m": m}
        rows.append({**base, "what": "cuBLAS fp16", "us": chained_us(lambda w: torch.matmul(x, w.t()), dense, repeats),
                     "bytes": 2 * n * k})
        for cfg in tiles_of(x, layer, spec.bits, spec.group_size, "best"):
            fn = functools.partial(launch, cfg, x, bits=spec.bits, group=spec.group_size)
            rows.append({**base, "what": "tuned layer", "us": chained_us(lambda w: fn(weights=w), n_major, repeats),
                         "bytes": nbytes, "tile": [cfg.block_n, cfg.num_warps], "rel_error": error(fn(weights=weights)),
                         "config": cfg.__dict__})
            print(f"{quant} M={m} tuned layer: {rows[-1]['us']:.2f} us", flush=True)
        for block_n, warps, _, ahead, vectors in (tile for tile in tiles if tile[2] == m):
            fn = functools.partial(fragments_gemv, x, bits=spec.bits, group=spec.group_size, block_n=block_n,
                                   warps=warps, ahead=ahead, vectors=vectors)
            try:
                err = error(fn(weights=own))
            except (ValueError, RuntimeError) as exc:  # a tile this shape or GPU cannot take
                print(f"skip {block_n} cols {warps} warps {ahead} ahead {vectors} vectors: {type(exc).__name__}: {exc}",
                      flush=True)
                continue
            rows.append({**base, "what": "fragment-order kernel", "us": chained_us(lambda w: fn(weights=w), copies, repeats),
                         "bytes": nbytes, "tile": [block_n, warps, ahead, vectors], "rel_error": err})
            print(f"{quant} M={m} fragments {block_n} cols {warps} warps {ahead} ahead {vectors} vectors: "
                  f"{rows[-1]['us']:.2f} us, error {err:.1e}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Per quantisation and M: cuBLAS, the tuned layer, the fastest fragment-order tiles (at most 4)."""
    return references_first(rows, ("quant", "m"), "fragment-order kernel", "cols, warps, ahead, vectors")


def main() -> None:
    run_study(__doc__, "w4g128,w2g64", {"block-n": "16,32,64", "warps": "4,8,16", "tokens": "1,16", "ahead": "1,2",
                                         "vectors": "1,2"}, study_quant, table)


if __name__ == "__main__":
    main()
