"""Host time against device time of one quantized layer at training size (GPU).

    python3 pipelines/bench_host_overhead.py [--shape 4096,4096] [--m 2048]

A step is host-bound when enqueueing its launches takes longer than the GPU takes to run them;
the event-timed forward+backward of ``bench_kernels.py`` then measures the host. This script
separates the two for a w4g128 layer with bf16 activations:

* host µs per call of each piece (forward, dx, ds, their decode and cuBLAS parts), issued
  back-to-back, and "host + drain" (until the GPU is done: the device time when it is larger);
* one forward+backward through autograd, with backward on autograd's device thread (the
  default) and on the calling thread (``torch.autograd.set_multithreading_enabled(False)``,
  what E2E-QP's trainer does), and a dx launch issued from a side thread;
* device time alone of the decode, of cuBLAS ``x @ W.T`` (NT) and ``x @ W^T`` (NN, the
  workspace layout), and of the decode + cuBLAS forward, from CUDA-graph replays.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import graph_median_ms, make_layer  # noqa: E402

import torch  # noqa: E402

from efficientqat.kernels import autograd, dequant, tuning  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402


def host_us(name: str, fn: Callable[[], object], n: int = 50) -> None:
    """Print host µs per call over ``n`` back-to-back calls, and with the GPU drained."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    drained = (time.perf_counter() - start) / n * 1e6
    print(f"{name}: host {host:.0f} us/call, host + drain {drained:.0f} us/call", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4096,4096", help="N,K")
    ap.add_argument("--m", type=int, default=2048)
    args = ap.parse_args()
    n, k = map(int, args.shape.split(","))
    m, bits, group = args.m, 4, 128
    layer = make_layer(n, k, QuantSpec(bits, group), "cuda")
    qw, zeros, scales = layer.qweight, layer.kernel_zeros(), layer.scales.float()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    w_t = w.t().contiguous()
    print(f"{torch.cuda.get_device_name()}: {n}x{k} w4g128, M = {m}, bf16", flush=True)

    host_us("forward (tuned path)", lambda: autograd.forward_2d(x, qw, scales, zeros, None, bits, group))
    host_us("dx (tuned path)", lambda: autograd.backward_input_2d(dy, qw, scales, zeros, bits, group, k))
    host_us("ds (tuned path)", lambda: autograd.backward_scales_2d(x, dy, qw, zeros, bits, group))
    host_us("decode W^T", lambda: dequant.decode_weight_t(qw, scales, zeros, bits, group, torch.bfloat16))
    host_us("cuBLAS x^T dy, float32 out", lambda: torch.mm(x.t(), dy, out_dtype=torch.float32))

    xg = x.clone().requires_grad_(True)
    sg = scales.clone().requires_grad_(True)

    def step() -> None:
        xg.grad = None
        sg.grad = None
        autograd.dequant_linear(xg, qw, sg, zeros, None, bits, group).backward(dy)

    host_us("fwd+bwd, backward on autograd's device thread", step)
    with torch.autograd.set_multithreading_enabled(False):
        host_us("fwd+bwd, backward on the calling thread", step)
    side = threading.Thread(target=host_us, args=(
        "dx issued from a side thread", lambda: autograd.backward_input_2d(dy, qw, scales, zeros, bits, group, k)))
    side.start()
    side.join()

    for name, fn in (
        ("decode W^T", lambda: dequant.decode_weight_t(qw, scales, zeros, bits, group, torch.bfloat16)),
        ("cuBLAS x @ W.T (NT)", lambda: x @ w.t()),
        ("cuBLAS x @ W^T (NN)", lambda: torch.mm(x, w_t)),
        ("decode + cuBLAS forward", lambda: dequant.dense_forward(x, qw, scales, zeros, None, bits, group,
                                                                   tuning.DENSE_CONFIG)),
    ):
        print(f"{name}: device {graph_median_ms([fn]) * 1e3:.1f} us (CUDA-graph replay)", flush=True)


if __name__ == "__main__":
    main()
