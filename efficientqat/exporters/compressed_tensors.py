"""compressed-tensors ``pack-quantized`` export (the format llm-compressor writes and vLLM's
``CompressedTensorsWNA16`` scheme reads).

Per quantized Linear ``<name>`` (``N = out_features``, ``K = in_features``, ``G`` groups), values
packed densely as a little-endian bit stream, ``ceil(C * b / 32)`` int32 words for ``C`` values
(3-bit values straddle words: compressed-tensors since vllm-project/compressed-tensors#732;
for 2/4/8 bits this is also the older ``32 // b`` values per word):

    <name>.weight_packed      int32  [N, ceil(K * b / 32)]   codes packed along the input dim
    <name>.weight_scale       fp16   [N, G]
    <name>.weight_zero_point  int32  [ceil(N * b / 32), G]   zero points packed along the output dim
    <name>.weight_shape       int64  [2]                     (N, K)

compressed-tensors keeps codes and zero points signed (``q - 2^(b-1)``) and packs them with
that offset added back, so the stored bits are exactly our unsigned codes and zero points;
dequantization ``(q_s - z_s) * s`` equals ours ``(q - z) * s``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efficientqat.exporters.common import non_quantized_tensors, packed_layers, write_model_folder
from efficientqat.packing import pack_last_dim
from efficientqat.quantizer import QuantSpec

FORMAT = "pack-quantized"


def ct_config(spec: QuantSpec) -> dict[str, Any]:
    """quantization_config for asymmetric group-wise int weights, fp activations (WnA16)."""
    weights = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": False,
        "strategy": "channel" if spec.group_size == -1 else "group",
        "group_size": None if spec.group_size == -1 else spec.group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
        "block_structure": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def pack_words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[R, C]`` to int32 ``[R, ceil(C * bits / 32)]``: the dense bit stream of
    :func:`efficientqat.packing.pack_last_dim` over ``C`` zero-padded to whole 32-value chunks,
    cut to the words that hold values (what compressed-tensors' ``pack_to_int32`` writes)."""
    rows, cols = values.shape
    padded = torch.zeros(rows, math.ceil(cols / 32) * 32, dtype=torch.int64)
    padded[:, :cols] = values.to(torch.int64)
    return pack_last_dim(padded, bits)[:, : math.ceil(cols * bits / 32)].contiguous()


def write_compressed_tensors(model: nn.Module, tokenizer: Any, spec: QuantSpec, folder: Path) -> None:
    state = non_quantized_tensors(model)
    for name, layer in packed_layers(model).items():
        state[f"{name}.weight_packed"] = pack_words(layer.int_codes(), spec.bits)
        state[f"{name}.weight_scale"] = layer.scales.detach().t().contiguous().to(torch.float16)
        state[f"{name}.weight_zero_point"] = pack_words(layer.int_zeros().t(), spec.bits).t().contiguous()
        state[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach().cpu()
    write_model_folder(folder, model, tokenizer, state, {"quantization_config": ct_config(spec)})
