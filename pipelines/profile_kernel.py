"""One layer's packed matmul, tuned and warmed, then launched inside a profiler window: the program
that Nsight Compute (``ncu --profile-from-start off``) wraps to read a kernel's hardware counters.

    ncu --clock-control none --profile-from-start off --section WarpStateStats ... \
        python3 pipelines/profile_kernel.py --shape 8192,8192 --quant w4g128 --m 16 --layout fragments

Events and graph replays give a kernel's time; they do not say why it is slow. The M = 16
tensor-core kernel moves 34 MB in 36 µs with an instruction count that allows ~9 µs: the
stall reasons and achieved occupancy that ncu reads are what tell latency, shared memory and
issue apart. Tuning and the first launches (compilation, the zero-point unpack) run before the
window opens, so ncu sees only the ``--calls`` timed launches, on the config the tuner chose
(printed, with the cache file it came from).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import LAYOUTS, make_layer  # noqa: E402

import torch  # noqa: E402

from efficientqat.kernels import tuning  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402


def parse_shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--shape wants N,K (two integers), got '{text}'") from None
    return n, k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8192,8192", help="N,K of the layer (out, in features)")
    p.add_argument("--quant", default="w4g128", help="wBITSgGROUP, e.g. w4g128, w2g64")
    p.add_argument("--m", type=int, default=16, help="rows of x (batch x tokens)")
    p.add_argument("--layout", default="n-major", choices=sorted(LAYOUTS),
                   help="the layer's codes: as packed, K-major, or also in mma fragment order")
    p.add_argument("--calls", type=int, default=2, help="launches inside the profiler window")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernel.py needs a CUDA GPU (it wraps the kernels for ncu)")
    n, k = parse_shape(args.shape)
    layer = make_layer(n, k, QuantSpec.from_name(args.quant), "cuda", args.layout)
    x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        for _ in range(3):  # tuning, compilation, the one-off zero-point unpack
            layer(x)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for _ in range(args.calls):
            layer(x)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(json.dumps({"shape": [n, k], "quant": args.quant, "m": args.m, "layout": args.layout,
                      "cache": str(tuning.cache_path()), "chosen": tuning.chosen_configs()}), flush=True)


if __name__ == "__main__":
    main()
