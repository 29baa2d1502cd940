"""Benchmark the Triton dequant-matmul kernels against cuBLAS and the dequantize-then-matmul path.

    python3 pipelines/bench_kernels.py [--out DIR] [--quick]

For every (N, K) layer shape, quantization setting and M it times (median of CUDA-event
timings after warm-up; inputs and weights rotated over enough copies to overflow L2):

* ``triton``: ``PackedLinear.forward`` on the kernel path;
* ``cublas``: ``x @ W.T`` with a dense fp16 (M < 2048) or bf16 (M >= 2048) weight;
* ``torch``: ``PackedLinear.forward`` with ``EFFICIENTQAT_KERNELS=0`` (dequantize, then matmul).

Small M is timed through CUDA graphs (launch overhead would otherwise dominate a 15 us kernel
for all three alike); M >= 2048 also times forward+backward with fp32 trainable scales (E2E-QP)
as back-to-back steps (what a training loop sees, host launch cost included) and as CUDA-graph
replays (device time alone), and records peak memory. Achieved bandwidth counts packed weights + scales + zeros + x + y
and is compared with a device-to-device copy measured in the same run. Raw rows go to
``<out>/bench_kernels.json``; the table is printed last, then, per quantization setting and M
timed on three or more shapes, the fit ``time = fixed cost + bytes / marginal rate``
(``cost_model``). ``--fit FILE...`` prints that fit from stored runs (no GPU; a later file's
row replaces an earlier one of the same shape, setting and M). ``--k-major`` times layers stored
as ``efficientqat.qlinear.store_codes_k_major`` leaves them (codes K-major, scales and zero points
column-major: the batch-1 decode layout), a setting of its own in the table and the fit;
``--fragments`` layers that also hold their codes in ``mma`` fragment order
(``efficientqat.qlinear.store_codes_fragments``: the kernel of ``kernels/fragments.py`` joins the
M <= 16 candidates), likewise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout_paths  # noqa: E402,F401 (efficientqat.kernels importable from a bare checkout)

import torch  # noqa: E402

from efficientqat.kernels import tuning  # noqa: E402
from efficientqat.qlinear import PackedLinear, store_codes_fragments, store_codes_k_major  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]
MS = [1, 4, 16, 64, 256, 2048, 8192]
TRAIN_M = 2048
L2_FLUSH_BYTES = 256 << 20


LAYOUTS = {"n-major": "", "k-major": " K-major", "fragments": " fragments"}
"""A layer's codes layout (:func:`make_layer`) -> its suffix in a setting's name (:func:`setting`)."""


def make_layer(n: int, k: int, spec: QuantSpec, dev: str, layout: str = "n-major") -> PackedLinear:
    """A random packed layer; ``layout`` ``k-major``: stored as :func:`store_codes_k_major` leaves it;
    ``fragments``: also holding its codes in fragment order (:func:`store_codes_fragments`)."""
    g = spec.n_groups(k)
    codes = torch.randint(0, 2**spec.bits, (n, k), device=dev, dtype=torch.int32)
    zero = torch.randint(0, 2**spec.bits, (n, g), device=dev, dtype=torch.int32)
    scale = torch.rand(n, g, device=dev) * 0.01 + 0.001
    layer = PackedLinear.from_codes(codes, scale, zero, None, spec)
    if layout == "k-major":
        return store_codes_k_major(layer, bits=(spec.bits,))
    return store_codes_fragments(layer, bits=(spec.bits,)) if layout == "fragments" else layer


def setting(row: dict) -> str:
    """A row's quantization setting as the table and the fit name it: ``w4g128``, or
    ``w4g128 K-major`` / ``w4g128 fragments`` for a layer timed with ``--k-major`` / ``--fragments``."""
    return row["quant"] + LAYOUTS[row.get("layout", "n-major")]


def event_median_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graph_median_ms(calls: list, iters: int = 20) -> float:
    """Capture one pass over ``calls`` (the rotated copies) as a graph; median replay / len."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return event_median_ms(graph.replay, iters) / len(calls)


def rotated(fn_of_copy, n_copies: int, graphs: bool, iters: int):
    calls = [lambda i=i: fn_of_copy(i) for i in range(n_copies)]
    if graphs:
        return graph_median_ms(calls)
    state = {"i": 0}

    def step():
        calls[state["i"] % n_copies]()
        state["i"] += 1

    return event_median_ms(step, iters)


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = event_median_ms(lambda: b.copy_(a), 20)
    return 2 * a.numel() / (ms * 1e-3)


def set_kernels(on: bool) -> None:
    os.environ["EFFICIENTQAT_KERNELS"] = "1" if on else "0"


def configs_since(before: set[str]) -> dict[str, dict]:
    """The kernel configurations chosen since ``before`` (keys of :func:`tuning.chosen_configs`):
    stored with a row, so that its time can be traced to the tiles and launch variants that ran."""
    return {key: cfg for key, cfg in tuning.chosen_configs().items() if key not in before}


def bench_shape(n: int, k: int, spec: QuantSpec, ms: list[int], rows: list, copy_bw: float, train: bool,
                out_file: Path | None = None, row_ops: bool = False, layout: str = "n-major") -> None:
    """Time the layer (N, K) at each M against cuBLAS and the PyTorch path; ``row_ops``: at decode
    sizes also with an RMSNorm of its input in the kernel's prologue (``efficientqat.row_ops``),
    what a decoder layer's q/k/v and gate/up calls pay; ``layout``: the layer's codes (:func:`make_layer`)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    dev = "cuda"
    layer = make_layer(n, k, spec, dev, layout)
    packed_bytes = layer.qweight.numel() * 4 + layer.scales.numel() * 2 + layer.scales.numel()
    n_copies = max(2, math.ceil(L2_FLUSH_BYTES / packed_bytes))
    layers = [layer] + [make_layer(n, k, spec, dev, layout) for _ in range(min(n_copies, 64) - 1)]
    dense_copies = max(2, math.ceil(L2_FLUSH_BYTES / (n * k * 2)))
    for m in ms:
        dt = torch.float16 if m < TRAIN_M else torch.bfloat16
        dense = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(dense_copies)]
        xs = [torch.randn(m, k, device=dev, dtype=dt) for _ in range(len(layers))]
        graphs = m <= 256
        iters = 50 if m < TRAIN_M else 10
        before = set(tuning.chosen_configs())
        with torch.no_grad():
            set_kernels(True)
            # correctness on this shape before timing: kernel vs torch path
            y_k = layers[0](xs[0])
            set_kernels(False)
            y_t = layers[0](xs[0])
            rel = ((y_k.float() - y_t.float()).norm() / y_t.float().norm()).item()
            set_kernels(True)
            for layer_copy, x_copy in zip(layers, xs):  # each copy's one-off zero-point unpack, untimed
                layer_copy(x_copy)
            t_tri = rotated(lambda i: layers[i](xs[i]), len(layers), graphs, iters)
            t_cub = rotated(lambda i: xs[i % len(xs)] @ dense[i].t(), len(dense), graphs, iters)
            t_norm = float("nan")
            if row_ops and m <= 16:
                norm = LlamaRMSNorm(k).to(dev, dt)
                t_norm = rotated(lambda i: layers[i](xs[i], norm=norm), len(layers), graphs, iters)
            set_kernels(False)
            t_torch = rotated(lambda i: layers[i % 2](xs[i % 2]), 2, graphs, max(5, iters // 5)) \
                if m < TRAIN_M or n * k <= 8192 * 8192 else float("nan")
            set_kernels(True)
        moved = packed_bytes + m * k * 2 + m * n * 2
        row = dict(n=n, k=k, quant=spec.name, layout=layout, m=m,
                   dtype=str(dt).replace("torch.", ""), rel_err=rel,
                   triton_ms=t_tri, cublas_ms=t_cub, torch_ms=t_torch, norm_ms=t_norm, bytes=moved,
                   bw_frac=moved / (t_tri * 1e-3) / copy_bw,
                   speedup_cublas=t_cub / t_tri, speedup_torch=t_torch / t_tri, configs=configs_since(before))
        if train and m >= TRAIN_M:
            row.update(bench_train(layers[0], xs[0], dense[0]))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out_file is not None:  # keep what is done if the run is cut short
            out_file.write_text(json.dumps({"rows": rows}, indent=1))
        del dense, xs


def gpu_only_ms(fn) -> float:
    """Device time of one step replayed from a CUDA graph: no host launch cost, so set against
    the event-timed step it shows how much of that step the host takes (nan if capture fails)."""
    try:
        return graph_median_ms([fn], iters=10)
    except RuntimeError as err:
        print(f"graph capture of a training step failed: {err}", flush=True)
        return float("nan")


def bench_train(layer: PackedLinear, x: torch.Tensor, w: torch.Tensor) -> dict:
    """forward+backward, scales trainable in fp32 (E2E-QP), x needs grad too (inner layer)."""
    layer.scales.data = layer.scales.data.float()
    layer.scales.requires_grad_(True)
    xg = x.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(True)
    dy = torch.randn(x.shape[0], layer.out_features, device=x.device, dtype=x.dtype)

    # backward on the calling thread, as E2E-QP runs it: Triton launches from autograd's device
    # thread cost twice the host time (H200: 4096^2 M = 2048 step 0.72 -> 0.33 ms)
    def step_layer():
        xg.grad = None
        layer.scales.grad = None
        with torch.autograd.set_multithreading_enabled(False):
            layer(xg).backward(dy)

    def step_dense():
        xg.grad = None
        wg.grad = None
        with torch.autograd.set_multithreading_enabled(False):
            (xg @ wg.t()).backward(dy)

    out = {}
    for name, on, fn in (("triton", True, step_layer), ("torch", False, step_layer), ("cublas", True, step_dense)):
        set_kernels(on)
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out[f"{name}_fb_ms"] = event_median_ms(fn, 5, warmup=1)
        out[f"{name}_fb_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        if name != "torch":
            out[f"{name}_fb_gpu_ms"] = gpu_only_ms(fn)
    set_kernels(True)
    layer.scales.requires_grad_(False)
    layer.scales.data = layer.scales.data.half()
    return out


def table(rows: list, copy_bw: float, device: str) -> str:
    lines = [f"device: {device}; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write)",
             "| N x K | quant | M | dtype | triton us | cuBLAS us | torch us | x cuBLAS | x torch | BW/copy | "
             "fwd+bwd triton ms | cuBLAS ms | torch ms | x cuBLAS | x torch | peak MiB tri/torch | "
             "GPU-only fwd+bwd triton / cuBLAS ms (x) | with RMSNorm prologue us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fb = ""
        if "triton_fb_ms" in r:
            fb = (f"{r['triton_fb_ms']:.3f} | {r['cublas_fb_ms']:.3f} | {r['torch_fb_ms']:.3f} | "
                  f"{r['cublas_fb_ms'] / r['triton_fb_ms']:.2f} | {r['torch_fb_ms'] / r['triton_fb_ms']:.2f} | "
                  f"{r['triton_fb_peak_mib']:.0f}/{r['torch_fb_peak_mib']:.0f} | "
                  f"{r['triton_fb_gpu_ms']:.3f} / {r['cublas_fb_gpu_ms']:.3f} ({r['cublas_fb_gpu_ms'] / r['triton_fb_gpu_ms']:.2f}) |")
        else:
            fb = " | | | | | | |"
        lines.append(f"| {r['n']}x{r['k']} | {setting(r)} | {r['m']} | {r['dtype']} | {r['triton_ms'] * 1e3:.1f} | "
                     f"{r['cublas_ms'] * 1e3:.1f} | {r['torch_ms'] * 1e3:.1f} | {r['speedup_cublas']:.2f} | "
                     f"{r['speedup_torch']:.2f} | {r['bw_frac']:.2f} |{fb} {r.get('norm_ms', float('nan')) * 1e3:.1f} |")
    return "\n".join(lines)


def line_fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: ``(a, b, largest |residual|)``."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    a = my - b * mx
    return a, b, max(abs(y - a - b * x) for x, y in points)


def moved_bytes(row: dict) -> float:
    """Bytes our kernel moves for a row (packed W, scales, zeros, x, y); rows written before the
    field existed carry it as ``bw_frac`` x time x ``copy_bw``."""
    return row["bytes"] if "bytes" in row else row["bw_frac"] * row["triton_ms"] * 1e-3 * row["copy_bw"]


def stored_rows(paths: list[Path]) -> tuple[list[dict], float]:
    """Rows of stored ``bench_kernels.json`` runs (later files win per shape, setting, M and
    dtype) and the last run's copy rate."""
    rows: dict[tuple, dict] = {}
    copy_bw = float("nan")
    for path in paths:
        run = json.loads(path.read_text())
        copy_bw = run["copy_bw"]
        for r in run["rows"]:
            rows[(r["n"], r["k"], setting(r), r["m"], r["dtype"])] = dict(r, copy_bw=run["copy_bw"])
    return list(rows.values()), copy_bw


def cost_model(rows: list) -> list[dict]:
    """Per (quant, M, dtype) timed on at least three shapes: time = fixed + bytes / marginal rate,
    fitted for our kernels (packed bytes) and for cuBLAS (fp16/bf16 weights). A speed-up lost on
    small layers is then told apart: a fixed cost per call (launch, one wave's latency, the split-K
    reduction) or a streaming rate below the copy rate (instructions or latency per byte)."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((setting(r), r["m"], r["dtype"]), []).append(r)
    fits = []
    for (quant, m, dtype), rs in groups.items():
        if len({(r["n"], r["k"]) for r in rs}) < 3:
            continue
        fixed, slope, resid = line_fit([(moved_bytes(r), r["triton_ms"] * 1e3) for r in rs])
        dense_bytes = [(r["n"] * r["k"] + r["m"] * (r["n"] + r["k"])) * 2 for r in rs]  # W, x and y in 16 bits
        c_fixed, c_slope, c_resid = line_fit([(b, r["cublas_ms"] * 1e3) for b, r in zip(dense_bytes, rs)])
        fits.append(dict(quant=quant, m=m, dtype=dtype, shapes=len(rs), fixed_us=fixed, rate=1e6 / slope,
                         residual_us=resid, cublas_fixed_us=c_fixed, cublas_rate=1e6 / c_slope,
                         cublas_residual_us=c_resid))
    return fits


def cost_table(fits: list[dict], copy_bw: float) -> str:
    lines = ["| quant | M | dtype | shapes | fixed µs a call | marginal TB/s (x copy) | max residual µs | "
             "cuBLAS fixed µs | cuBLAS marginal TB/s |", "|---|---|---|---|---|---|---|---|---|"]
    for f in fits:
        lines.append(f"| {f['quant']} | {f['m']} | {f['dtype']} | {f['shapes']} | {f['fixed_us']:.2f} | "
                     f"{f['rate'] / 1e12:.2f} ({f['rate'] / copy_bw:.2f}) | {f['residual_us']:.2f} | "
                     f"{f['cublas_fixed_us']:.2f} | {f['cublas_rate'] / 1e12:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quants", default="w4g128,w3g128,w2g64")
    ap.add_argument("--shapes", default=";".join(f"{n},{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--small-quants-ms", default="1,4,16",
                    help="M values for quant settings other than the first (the first gets all --ms)")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--row-ops", action="store_true",
                    help="at M <= 16 also time each layer with the RMSNorm prologue of a fused decoder layer")
    layouts = ap.add_mutually_exclusive_group()
    layouts.add_argument("--k-major", action="store_true",
                         help="time layers stored K-major (store_codes_k_major), the batch-1 decode layout")
    layouts.add_argument("--fragments", action="store_true",
                         help="time layers also holding their codes in fragment order (store_codes_fragments)")
    ap.add_argument("--fit", nargs="+", type=Path, metavar="FILE", help="print the cost model of stored runs and stop")
    args = ap.parse_args()
    if args.fit:
        rows, copy_bw = stored_rows(args.fit)
        print(cost_table(cost_model(rows), copy_bw))
        return
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    shapes = [tuple(map(int, s.split(","))) for s in args.shapes.split(";")]
    ms = [int(m) for m in args.ms.split(",")]
    small = [int(m) for m in args.small_quants_ms.split(",") if m]
    rows: list = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for qi, q in enumerate(args.quants.split(",")):
        spec = QuantSpec.from_name(q)
        for n, k in shapes:
            bench_shape(n, k, spec, ms if qi == 0 else small, rows, copy_bw, not args.no_train,
                        out / "bench_kernels.partial.json", args.row_ops,
                        "k-major" if args.k_major else "fragments" if args.fragments else "n-major")
    fits = cost_model(rows)
    (out / "bench_kernels.json").write_text(json.dumps(
        {"device": device, "copy_bw": copy_bw, "rows": rows, "cost_model": fits}, indent=1))
    print(table(rows, copy_bw, device))
    if fits:
        print(cost_table(fits, copy_bw))


if __name__ == "__main__":
    main()
