"""End-to-end generation speed and memory of packed models against FP16, on a Llama-2-7B shape.

    python3 pipelines/bench_generate.py --out DIR [--settings w2g64,w3g128,w4g128] [--batches 1,8]
    python3 pipelines/bench_generate.py --out DIR --device cpu --tiny      # CPU smoke test

Weights are random (speed does not depend on their values); quantized models get their packed
layers straight from random codes (``bench_kernels.make_layer``), not from quantizing. Per
model it measures

* decode tokens/s at each batch size: greedy steps over a static KV cache, one step captured
  as a CUDA graph and replayed (``generate()``'s eager Python overhead at batch 1 would hide
  the kernels' gain; falls back to the eager step, recorded as ``mode``, if capture fails);
  with ``--compile`` the step is first compiled by ``torch.compile`` (every model alike: the
  norms, rotary and residual work fuse into few kernels, our matmuls stay one operator each);
* prefill tokens/s: one forward over ``--prefill`` tokens at batch 1, replayed as a CUDA graph
  (eager with ``--eager`` or if capture fails; recorded as ``prefill_mode``);
* model memory: bytes of parameters and buffers (packed weights + scales + zeros + the rest).

With ``--profile`` the timed decode steps are profiled once more: device time per kernel family
(our packed matmuls, cuBLAS, attention, fused elementwise, ...) against the step's wall time
(``step_profile.py``), which says whether a missed speed-up is in our kernels or around them.

Raw rows go to ``<out>/bench_generate.json`` with the kernel configurations the run launched
(tiles, in-kernel split-K reduction, programmatic dependent launch, by layer shape and M); the
table with speed-ups over FP16 is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import make_layer  # noqa: E402  (also makes efficientqat.kernels importable)
from step_profile import format_profile, profile_steps  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from efficientqat.fused_attention import fuse_decode_attention_  # noqa: E402
from efficientqat.fused_decoder import fuse_decoder_layers_  # noqa: E402
from efficientqat.fused_projections import fuse_projections_  # noqa: E402
from efficientqat.kernels import tuning  # noqa: E402
from efficientqat.model_utils import decoder_layers, dtype_kwarg, linear_modules, set_submodule  # noqa: E402
from efficientqat.qlinear import prepare_kernel_zeros_, store_codes_fragments  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
SETTINGS = {"w2g64": QuantSpec(2, 64), "w3g128": QuantSpec(3, 128), "w4g128": QuantSpec(4, 128)}
FP16_FUSED_ATTENTION = "FP16+fused-attn"
SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION", "math": "MATH"}


def build_model(shape: dict, spec: QuantSpec | None, device: torch.device, fuse: bool, attention: bool,
                layers: bool = False, fragments: bool = False) -> nn.Module:
    """FP16 Llama with random weights; with ``spec``, decoder Linears become random packed layers,
    q/k/v and gate/up fused as ``load_quantized`` does unless ``fuse`` is off (the FP16 model
    keeps Hugging Face's separate layers: it is what users run unquantized). ``attention``: decode
    steps take the fused rotary + cache + attention kernel (``load_quantized``'s default);
    ``layers``: the norms and residual adds of those steps run inside the packed matmuls
    (``load_quantized``'s default; quantized and fused models only); ``fragments``: the packed
    layers also hold their codes in ``mma`` fragment order (``store_codes_fragments``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), **dtype_kwarg(dtype))
    if spec is not None:
        for block in decoder_layers(model):
            for name, linear in linear_modules(block).items():
                packed = make_layer(linear.out_features, linear.in_features, spec, str(device))
                set_submodule(block, name, packed.to(dtype) if dtype != torch.float16 else packed)
        if fuse:
            fuse_projections_(model)
        if fragments:
            store_codes_fragments(model)
    if attention:
        fuse_decode_attention_(model)
    if layers:
        fuse_decoder_layers_(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return prepare_kernel_zeros_(model).eval()


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def elapsed_s(fn: Callable[[], None], device: torch.device, iters: int) -> float:
    """Median seconds of ``fn`` (CUDA-synchronised wall time on the GPU)."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph | None:
    """``fn`` recorded as a CUDA graph after three warm-up calls on a side stream (they also run
    Triton autotuning), or None if capture fails (said, and the caller times ``fn`` eagerly)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # noqa: BLE001 - any capture failure means: measure eagerly
        print(f"  CUDA graph capture failed ({type(err).__name__}: {err}); timing eagerly")
        return None
    return graph


class DecodeStep:
    """One greedy decode step over a static cache, with fixed buffers so it can be graph-captured."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, device: torch.device, compiled: bool) -> None:
        from transformers import StaticCache

        self.forward = torch.compile(model.forward, dynamic=False) if compiled else model.forward
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def step(self) -> None:
        logits = self.forward(input_ids=self.ids, past_key_values=self.cache, cache_position=self.pos,
                            position_ids=self.pos.expand(self.ids.shape[0], 1), use_cache=True).logits
        self.ids.copy_(logits[:, -1:].argmax(-1))
        self.pos.add_(1)

    def capture(self) -> bool:
        """Record the step as a CUDA graph (after warm-up, which also runs Triton autotuning)."""
        self.graph = capture_graph(self.step)
        return self.graph is not None

    def run(self, steps: int) -> None:
        # transformers >= 5 keeps its own write position in the static cache: rewind it too
        self.pos.zero_()
        self.cache.reset()
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()


def bench_model(label: str, model: nn.Module, args: argparse.Namespace, device: torch.device) -> dict:
    """Decode and prefill speed of one model; ``setup_s`` is the wall time of warm-up, kernel
    tuning, compilation and capture per batch size (what a 10-minute device command must fit)."""
    row = {"model": label, "bytes": model_bytes(model), "decode": {}}
    for batch in args.batches:
        start = time.perf_counter()
        step = DecodeStep(model, batch, args.decode_tokens + 8, device, args.compile)
        graphed = device.type == "cuda" and not args.eager and step.capture()
        setup_s = time.perf_counter() - start
        seconds = elapsed_s(lambda: step.run(args.decode_tokens), device, args.iters)
        mode = ("compiled+" if args.compile else "") + ("cuda_graph" if graphed else "eager")
        row["decode"][batch] = {"tokens_per_s": batch * args.decode_tokens / seconds, "mode": mode,
                                "setup_s": setup_s}
        if args.profile:
            row["decode"][batch]["profile"] = profile_steps(step.run, args.decode_tokens, device)
            print(format_profile(f"{label} decode b{batch}", row["decode"][batch]["profile"]), flush=True)
        del step
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prefill), device=device)

    @torch.no_grad()
    def prefill() -> None:
        model(prompt, use_cache=False)

    # replayed as a CUDA graph like the decode step: an eager 128-token forward is bound by the
    # host's launches (FP16 timed 2284-4512 tok/s across runs of one session), not by the GPU
    graph = capture_graph(prefill) if device.type == "cuda" and not args.eager else None
    if graph is None:
        prefill()  # warm-up (kernel autotuning for this M)
    seconds = elapsed_s(graph.replay if graph is not None else prefill, device, args.iters)
    row["prefill_tokens_per_s"] = args.prefill / seconds
    row["prefill_mode"] = "cuda_graph" if graph is not None else "eager"
    return row


def table(rows: list[dict], batches: list[int]) -> str:
    base = rows[0]  # FP16 unless --no-fp16
    ref = base["model"]
    head = ("| model | memory GiB | " + " | ".join(f"decode b{b} tok/s (x {ref})" for b in batches)
            + f" | prefill tok/s (x {ref}) |")
    lines = [head, "|" + "---|" * (3 + len(batches))]
    for r in rows:
        cells = [f"{r['decode'][b]['tokens_per_s']:.1f} ({r['decode'][b]['tokens_per_s'] / base['decode'][b]['tokens_per_s']:.2f}x)"
                 for b in batches]
        prefill = f"{r['prefill_tokens_per_s']:.0f} ({r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x)"
        lines.append(f"| {r['model']} | {r['bytes'] / 2**30:.2f} | " + " | ".join(cells) + f" | {prefill} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, few tokens (CPU smoke test)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs (to see the Python overhead)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (all models)")
    p.add_argument("--no-fuse", action="store_true", help="keep q/k/v and gate/up as separate packed matmuls")
    p.add_argument("--fragments", action="store_true",
                   help="packed layers also hold their codes in mma fragment order (store_codes_fragments)")
    p.add_argument("--attention", default="fused", choices=["fused", "hf"],
                   help="quantized models' decode attention: the fused kernel (load_quantized's default) or Hugging Face's")
    p.add_argument("--layers", default="fused", choices=["fused", "hf"],
                   help="quantized models' decode steps: norms and residual adds inside the matmuls "
                        "(load_quantized's default) or Hugging Face's layer forward")
    p.add_argument("--fp16-fused-attention", action="store_true",
                   help="also time the FP16 model with the fused decode attention (row 'FP16+fused-attn')")
    p.add_argument("--no-fp16", action="store_true",
                   help="skip the FP16 model (no ratios: to time or debug the quantized settings alone)")
    p.add_argument("--no-pdl", action="store_true",
                   help="decode matmuls (M <= 16) without programmatic dependent launch (the default where supported)")
    p.add_argument("--sdpa", default="auto", choices=["auto", *SDPA_BACKENDS],
                   help="restrict torch's attention kernels, for every model alike (auto: torch chooses)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile the decode steps once: device time per kernel family")
    args = p.parse_args(argv)
    unknown = [label for label in args.settings.split(",") if label not in SETTINGS]
    if unknown:
        p.error(f"unknown --settings {','.join(unknown)}: choose from {','.join(SETTINGS)}")
    if args.tiny:
        args.decode_tokens, args.prefill, args.iters = min(args.decode_tokens, 4), min(args.prefill, 16), 1
    return args


def apply_launch_options(args: argparse.Namespace) -> None:
    """``--no-pdl``: decode launches without programmatic dependent launch, as the tuner timed them
    (``EFFICIENTQAT_PDL=0``, read at each layer's first launch)."""
    if args.no_pdl:
        os.environ["EFFICIENTQAT_PDL"] = "0"


def attention_kernels(name: str):
    """``--sdpa``: the attention kernels torch may pick for every model alike (``auto``: its own
    choice, cuDNN's on the H200 in session 8, 6.9 us a layer for one query over 136 cached keys:
    13% of a w4g128 decode step that FP16 pays as well)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return nullcontext() if name == "auto" else sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    apply_launch_options(args)
    shape = TINY if args.tiny else LLAMA2_7B
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    labels = [*([] if args.no_fp16 else ["FP16"]), *([FP16_FUSED_ATTENTION] if args.fp16_fused_attention else []),
              *args.settings.split(",")]
    for label in labels:
        spec = SETTINGS.get(label)
        attention = label == FP16_FUSED_ATTENTION or spec is not None and args.attention == "fused"
        torch.manual_seed(0)
        layers = spec is not None and attention and args.layers == "fused"
        model = build_model(shape, spec, device, not args.no_fuse, attention, layers, args.fragments)
        with attention_kernels(args.sdpa):  # held through compilation and capture, where the kernel is chosen
            rows.append(bench_model(label, model, args, device))
        print(f"{label}: {rows[-1]}", flush=True)
        del model
        (args.out / "bench_generate.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "shape": shape, "fused": not args.no_fuse, "attention": args.attention, "layers": args.layers,
             "fragments": args.fragments,
             "pdl": tuning.chains_decode_launches(device), "sdpa": args.sdpa,
             "decode_tokens": args.decode_tokens, "prefill": args.prefill,
             "rows": rows, "kernel_configs": tuning.chosen_configs()}, indent=2))
    print(table(rows, args.batches))
    return rows


if __name__ == "__main__":
    main()
