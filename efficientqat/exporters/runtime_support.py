"""Which runtimes serve which export at which bit width (asymmetric zero points included).

Sources (checked while writing this): vLLM's ``CompressedTensorsWNA16`` serves 4- and 8-bit
weights only (Marlin/Machete types uint4/uint8; zero points since vllm-project/vllm#14211);
vLLM's ``gptq_marlin`` is symmetric-only, so asymmetric GPTQ runs on ``gptq_gemm``, which reads
``checkpoint_format: gptq_v2`` zero points correctly only since vllm-project/vllm#26092
(merged 2025-10; earlier versions treat v2 as v1 and produce garbage, vllm#26343).
GPTQModel reads gptq_v2 natively at 2/3/4/8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Runtime:
    name: str
    versions: str
    bits: tuple[int, ...]
    note: str = ""


SUPPORT: dict[str, tuple[Runtime, ...]] = {
    "gptq_v2": (
        Runtime("efficientqat.load_quantized", "this package", (2, 3, 4, 8), "Triton kernels on CUDA"),
        Runtime("GPTQModel (also via transformers from_pretrained)", "GPTQModel >= 1.0 (gptq_v2 checkpoint_format)",
                (2, 3, 4, 8), "torch kernel for all widths; Triton 2/4/8"),
        Runtime("vLLM quantization=gptq (gptq_gemm)", "releases with vllm-project/vllm#26092 (merged 2025-10)",
                (2, 3, 4, 8), "asymmetric -> no Marlin; older vLLM misreads v2 zeros"),
    ),
    "compressed_tensors": (
        Runtime("vLLM compressed-tensors WNA16 (Marlin/Machete)", "releases with vllm-project/vllm#14211 (2025) for zero points",
                (4, 8), "2/3-bit not served"),
        Runtime("transformers + compressed-tensors, CompressedTensorsConfig(run_compressed=False)",
                "compressed-tensors >= 0.9 for 2/4/8-bit, releases with vllm-project/compressed-tensors#732 "
                "(dense packing) for 3-bit; loaded and checked with 0.20.1 + transformers 5.24",
                (2, 3, 4, 8), "decompresses to dense on load: quality check, not speed"),
    ),
    "dense": (
        Runtime("any Hugging Face runtime (transformers, vLLM, TGI, llama.cpp convert)", "any", (2, 3, 4, 8),
                "dequantized fp16/bf16: quantized quality at full-precision memory"),
    ),
}


def support_report(fmt: str, bits: int) -> str:
    """Lines saying, per runtime, whether it serves this export at this bit width."""
    lines = [f"runtimes for {fmt} at {bits}-bit (asymmetric, group-wise):"]
    for rt in SUPPORT[fmt]:
        verdict = "serves" if bits in rt.bits else "does NOT serve"
        lines.append(f"  - {rt.name}: {verdict} {bits}-bit [{rt.versions}]" + (f" — {rt.note}" if rt.note else ""))
    return "\n".join(lines)
