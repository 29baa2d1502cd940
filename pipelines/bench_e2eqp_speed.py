"""E2E-QP training throughput: fused Triton kernels vs the dequantize-then-matmul layer, on the GPU.

A Llama-2-7B-shaped stack of a few decoder layers (random packed weights) trains its step sizes
exactly as ``efficientqat.e2eqp`` does (fp32 step sizes, bf16 autocast, next-token loss, AdamW
on the step sizes only), once with the packed layers' Triton kernels and once with
``EFFICIENTQAT_KERNELS=0`` (PyTorch dequantize, then matmul). Reports tokens/s and peak GPU
memory of each, and their ratio, measured in the same run.

    python3 pipelines/bench_e2eqp_speed.py [--layers 4] [--context 2048] [--batch 1] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkout_paths  # noqa: E402,F401 (efficientqat.kernels importable from a bare checkout)

import torch  # noqa: E402

from efficientqat.e2e_trainer import trainable_step_sizes_  # noqa: E402
from efficientqat.model_utils import decoder_layers, linear_modules, set_submodule  # noqa: E402
from efficientqat.qlinear import PackedLinear  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402


def packed_llama(layers: int, spec: QuantSpec, device: torch.device) -> torch.nn.Module:
    """Llama-2-7B-shaped model with random packed decoder weights (step sizes of a plausible size)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, num_hidden_layers=layers, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02 if p.dim() == 2 else torch.ones_like(p))
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for block in decoder_layers(model):
        for name, lin in linear_modules(block).items():
            n, k, g = lin.out_features, lin.in_features, spec.n_groups(lin.in_features)
            codes = torch.randint(0, 2**spec.bits, (n, k), device=device, dtype=torch.int32, generator=gen)
            zeros = torch.randint(0, 2**spec.bits, (n, g), device=device, dtype=torch.int32, generator=gen)
            scales = torch.rand(n, g, device=device, generator=gen) * 0.004 + 0.001
            set_submodule(block, name, PackedLinear.from_codes(codes, scales, zeros, None, spec, torch.bfloat16))
    return model


def measure(model: torch.nn.Module, ids: torch.Tensor, steps: int, warmup: int) -> dict[str, float]:
    step_sizes = trainable_step_sizes_(model)
    opt = torch.optim.AdamW(step_sizes.values(), lr=1e-5)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    median = sorted(times)[len(times) // 2]
    return {"s_per_step": median, "tokens_per_s": ids.numel() / median,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quants", default="w2g64,w4g128")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    ids = torch.randint(0, 32000, (args.batch, args.context), device=device)
    rows = []
    for name in args.quants.split(","):
        spec = QuantSpec.from_name(name)
        for backend in ("triton", "torch"):
            os.environ["EFFICIENTQAT_KERNELS"] = "1" if backend == "triton" else "0"
            model = packed_llama(args.layers, spec, device)
            rows.append({"quant": name, "backend": backend, **measure(model, ids, args.steps, warmup=3)})
            del model
            torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "layers": args.layers,
              "context": args.context, "batch": args.batch, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(f"\nE2E-QP training throughput, {report['device']}, {args.layers} Llama-2-7B layers, "
          f"{args.batch}x{args.context} tokens/step, bf16 autocast, fp32 step sizes")
    print("| quant | backend | tokens/s | ms/step | peak GPU GB | speed-up |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["quant"] == row["quant"] and r["backend"] == "torch")
        print(f"| {row['quant']} | {row['backend']} | {row['tokens_per_s']:.0f} | {1e3 * row['s_per_step']:.1f} "
              f"| {row['peak_memory_gb']:.2f} | {row['tokens_per_s'] / base['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
