"""Block-AP training speed on Llama-2-7B-shaped blocks (random weights), on the GPU.

Trains two blocks (hidden 4096, MLP 11008, 32 heads) exactly as ``efficientqat.blockap`` does
— fake-quant block, AdamW on W/s/z/norms, bf16 autocast, activations in pinned CPU memory
prefetched to the GPU — on sequences of 2048 tokens, batch 2, and reports:

* milliseconds per optimizer step (second epoch, after compilation and warm-up),
* achieved fraction of the GPU's bf16 matmul rate, counting 6 x tokens x block parameters per
  step, against an 8192^3 bf16 matmul measured in the same run,
* peak GPU memory.

    python pipelines/bench_blockap_speed.py [--windows 32] [--location cpu] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from efficientqat.activations import ActivationStore
from efficientqat.block_trainer import BlockTrainConfig, make_fake_quant_block, train_block
from efficientqat.model_utils import capture_block_inputs, decoder_layers, kwargs_to, linear_modules
from efficientqat.quantizer import QuantSpec


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """bf16 matmul rate of this GPU (random operands, median of event timings)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


def build_model(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, num_hidden_layers=layers, vocab_size=1024,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).half().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32, help="training sequences per block")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--location", default="cpu", choices=["gpu", "cpu", "disk"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    peak_rate = matmul_tflops(device)
    model = build_model(2)
    layers = decoder_layers(model)
    windows = torch.randint(0, 1024, (args.windows, args.seqlen))
    stores = {}
    for name in ("in", "target", "val_in", "val_target"):
        n = args.windows if not name.startswith("val") else 2
        stores[name] = ActivationStore(n, args.seqlen, 4096, torch.float16, args.location, device,
                                       Path("/tmp/eqat_bench") / f"{name}.bin")
    kwargs = {}
    model.model.embed_tokens.to(device)
    model.model.rotary_emb.to(device)
    for row, (hidden, kw) in enumerate(capture_block_inputs(model, windows, device, 1)):
        stores["in"].write(row, hidden)
        stores["target"].write(row, hidden + 0.01 * torch.randn_like(hidden))
        if row < 2:
            stores["val_in"].write(row, hidden)
            stores["val_target"].write(row, hidden)
        kwargs = kw
    kwargs = kwargs_to(kwargs, device)
    cfg = BlockTrainConfig(epochs=2, batch_size=args.batch, weight_lr=2e-5, quant_lr=1e-4,
                           autocast_dtype=torch.float16 if args.precision == "fp16" else torch.bfloat16,
                           compile=not args.no_compile)
    spec = QuantSpec(args.bits, args.group)
    results = []
    for i, block in enumerate(layers):
        params = sum(m.weight.numel() for m in linear_modules(block).values())
        qblock = make_fake_quant_block(block.to(device), spec, cfg.compile).to(device)
        block.cpu()
        torch.cuda.synchronize()
        res = train_block(qblock, i, stores["in"], stores["target"], stores["val_in"], stores["val_target"],
                          kwargs, cfg)
        steps = -(-args.windows // args.batch)
        step_s = res.epoch_seconds[-1] / steps
        flops = 6 * args.batch * args.seqlen * params
        results.append({"block": i, "ms_per_step": step_s * 1e3, "tflops": flops / step_s / 1e12,
                        "fraction_of_matmul_rate": flops / step_s / 1e12 / peak_rate,
                        "peak_memory_gb": res.peak_memory_gb, "first_epoch_s": res.epoch_seconds[0],
                        "block_params": params})
        del qblock
        torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "matmul_bf16_tflops": peak_rate, "location": args.location, "compile": cfg.compile, "precision": args.precision,
              "seqlen": args.seqlen, "batch": args.batch, "windows": args.windows, "spec": spec.name,
              "blocks": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(f"\nBlock-AP speed, {report['device']}, {spec.name}, {args.batch}x{args.seqlen} tokens/step, "
          f"{args.precision} autocast, activations on {args.location}, compile={cfg.compile}; bf16 matmul {peak_rate:.0f} TFLOP/s")
    print("| block | ms/step | TFLOP/s | of matmul rate | peak GPU GB |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['block']} | {r['ms_per_step']:.1f} | {r['tflops']:.0f} | {100 * r['fraction_of_matmul_rate']:.0f}% "
              f"| {r['peak_memory_gb']:.2f} |")


if __name__ == "__main__":
    main()
