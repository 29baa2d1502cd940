"""Large M, piece by piece: fused Triton GEMMs against decode + cuBLAS (``kernels/dequant.py``).

    python3 pipelines/bench_large_m.py --out DIR [--ms 2048,8192]

For each layer and M (bf16) it times, as the median of CUDA events: the forward (best fused tile
of ``candidates.gemm_candidates``, the dense path, the decode alone, cuBLAS ``x @ W.T``), the input
gradient (fused vs dense vs cuBLAS ``dy @ W``) and the scale gradient (fused vs dense vs the
cuBLAS weight gradient ``dy.T @ x`` it replaces), and checks that both paths agree. These are
the numbers behind the tuner's default for M >= ``tuning.DENSE_FIRST_M``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import event_median_ms, make_layer  # noqa: E402

import torch  # noqa: E402

from efficientqat.kernels import candidates, dequant, tuning  # noqa: E402
from efficientqat.kernels.backward import grad_input, grad_scales  # noqa: E402
from efficientqat.kernels.gemm import gemm_forward  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402

LAYERS = [((8192, 8192), "w4g128"), ((11008, 4096), "w2g64")]


def best_fused(cands: list[tuning.Config], run) -> tuple[float, tuning.Config]:
    """Fastest fused tile (ms, config); tiles that do not compile or fit are skipped."""
    best = (float("inf"), cands[0])
    for c in cands:
        if c.variant == tuning.DENSE:
            continue
        try:
            run(c)
            best = min(best, (event_median_ms(lambda: run(c), 10, warmup=2), c), key=lambda t: t[0])
        except Exception:
            continue
    return best


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(n: int, k: int, quant: str, m: int) -> dict:
    spec = QuantSpec.from_name(quant)
    bits, group = spec.bits, spec.group_size
    layer = make_layer(n, k, spec, "cuda")
    qw, s, z = layer.qweight, layer.scales, layer.kernel_zeros()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    us = lambda fn: event_median_ms(fn, 10) * 1e3  # noqa: E731
    fwd_ms, fwd_cfg = best_fused(candidates.gemm_candidates(m, n, k, group), lambda c: gemm_forward(x, qw, s, z, None, bits, group, c))
    dx_ms, _ = best_fused(candidates.grad_input_candidates(m, n, k, group), lambda c: grad_input(dy, qw, s, z, bits, group, k, c))
    ds_ms, ds_cfg = best_fused(candidates.grad_scales_candidates(m, n, k, group), lambda c: grad_scales(x, dy, qw, z, bits, group, c))
    dense = tuning.DENSE_CONFIG
    return dict(
        n=n, k=k, quant=quant, m=m,
        fwd_cublas_us=us(lambda: x @ w.t()), fwd_fused_us=fwd_ms * 1e3,
        fwd_dense_us=us(lambda: dequant.dense_forward(x, qw, s, z, None, bits, group, dense)),
        decode_us=us(lambda: dequant.decode_weight_t(qw, s, z, bits, group, torch.bfloat16)),
        dx_cublas_us=us(lambda: dy @ w), dx_fused_us=dx_ms * 1e3,
        dx_dense_us=us(lambda: dequant.dense_grad_input(dy, qw, s, z, bits, group, k, dense)),
        dw_cublas_us=us(lambda: dy.t() @ x), ds_fused_us=ds_ms * 1e3,
        ds_dense_us=us(lambda: dequant.dense_grad_scales(x, dy, qw, z, bits, group, dense)),
        rel_fwd=rel(gemm_forward(x, qw, s, z, None, bits, group, fwd_cfg),
                    dequant.dense_forward(x, qw, s, z, None, bits, group, dense)),
        rel_ds=rel(grad_scales(x, dy, qw, z, bits, group, ds_cfg), dequant.dense_grad_scales(x, dy, qw, z, bits, group, dense)),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--ms", default="2048,8192")
    args = ap.parse_args()
    rows = []
    for (n, k), quant in LAYERS:
        for m in map(int, args.ms.split(",")):
            rows.append(bench(n, k, quant, m))
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_large_m.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print("| N x K | quant | M | fwd cuBLAS / fused / dense us | dx cuBLAS / fused / dense us | dW cuBLAS / ds fused / dense us |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']}x{r['k']} | {r['quant']} | {r['m']} | {r['fwd_cublas_us']:.0f} / {r['fwd_fused_us']:.0f} / "
              f"{r['fwd_dense_us']:.0f} | {r['dx_cublas_us']:.0f} / {r['dx_fused_us']:.0f} / {r['dx_dense_us']:.0f} | "
              f"{r['dw_cublas_us']:.0f} / {r['ds_fused_us']:.0f} / {r['ds_dense_us']:.0f} |")


if __name__ == "__main__":
    main()
