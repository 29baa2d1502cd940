"""Where a decode step's time goes: device time per kernel family, from the PyTorch profiler.

A speed-up target on whole-model decode (``bench_generate.py``) is missed either in the packed
matmuls or in everything around them (norms, rotary, attention, residuals, launch gaps), which
FP16 pays too and which therefore caps the ratio. Kernel timings alone (``bench_kernels.py``)
cannot tell the two apart; this profile of the very steps that were timed can.

Kernels launched from CUDA graph replays are recorded like eager ones (CUPTI). On the CPU (the
smoke test) the profiler sees operators instead of kernels; the families then mostly read "other".
"""

from __future__ import annotations

import time
from typing import Callable

import torch

# Name fragments (lower case) -> family, first match wins; ours are the _dq_* Triton kernels.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("packed matmul (ours)", ("_dq_", "_decode_kernel", "_fold_scale_grad")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("cuBLAS / CUTLASS matmul", ("gemm", "cutlass", "xmma", "sm90_", "cublas", "gemv")),
    ("fused elementwise (inductor)", ("triton_",)),
    ("torch elementwise (memset, copies, casts)", ("elementwise", "fill", "memset", "memcpy", "copy", "reduce_kernel")),
)


def family(kernel_name: str) -> str:
    name = kernel_name.lower()
    for label, fragments in FAMILIES:
        if any(f in name for f in fragments):
            return label
    return "other"


def _self_time_us(event) -> float:
    """Self device time of a profiler average (the attribute was renamed in torch 2.4)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def profile_steps(run: Callable[[int], None], steps: int, device: torch.device, top: int = 40) -> dict:
    """Profile ``run(steps)`` once (after the caller's warm-up) and return, per step, the device
    microseconds of each kernel family, their sum, the wall time (the difference is launch gaps
    and idle device), the number of kernels launched (what those gaps scale with), and the
    ``top`` kernels by time with their launches per step (a 7B step has ~30 distinct kernels:
    which launches a fusion would remove is read from this list)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activity = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        if on_gpu:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run(steps)
        if on_gpu:
            torch.cuda.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    kernels: dict[str, float] = {}
    counts: dict[str, int] = {}
    for avg in prof.key_averages():
        if on_gpu and str(getattr(avg, "device_type", "")).endswith("CPU"):
            continue
        us = (_self_time_us(avg) if on_gpu else float(avg.self_cpu_time_total)) / steps
        if us > 0:
            kernels[avg.key] = kernels.get(avg.key, 0.0) + us
            counts[avg.key] = counts.get(avg.key, 0) + avg.count
    families: dict[str, float] = {}
    for name, us in kernels.items():
        families[family(name)] = families.get(family(name), 0.0) + us
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"us_per_step": dict(sorted(families.items(), key=lambda kv: -kv[1])),
            "kernel_us_per_step": sum(kernels.values()), "wall_us_per_step": wall_us / steps,
            "launches_per_step": sum(counts.values()) / steps,
            "top_kernels": [{"name": n[:120], "family": family(n), "us": us, "launches": counts[n] / steps}
                            for n, us in ranked]}


def format_profile(label: str, prof: dict) -> str:
    """A few lines for the log: families with their share of the step's wall time."""
    wall = prof["wall_us_per_step"]
    lines = [f"{label}: {wall:.0f} us per step, kernels {prof['kernel_us_per_step']:.0f} us "
             f"in {prof['launches_per_step']:.0f} launches"]
    lines += [f"  {name}: {us:.0f} us ({us / wall:.0%})" for name, us in prof["us_per_step"].items()]
    lines += ["  kernels (us per step, launches per step):"]
    lines += [f"    {k['us']:7.1f} {k['launches']:5.0f}  {k['name'][:90]}" for k in prof["top_kernels"]]
    return "\n".join(lines)
