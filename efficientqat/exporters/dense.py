"""Dense export: the dequantized weights as a plain fp16/bf16 Hugging Face checkpoint that any
runtime loads with ``from_pretrained`` (no quantization_config; it serves the quality of the
quantized model at full-precision memory and speed — for runtimes without low-bit kernels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from efficientqat.exporters.common import non_quantized_tensors, packed_layers, write_model_folder
from efficientqat.quantizer import QuantSpec

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def write_dense(model: nn.Module, tokenizer: Any, spec: QuantSpec, folder: Path, dtype: torch.dtype) -> None:
    del spec  # the weights are dequantized; nothing of the grid remains
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in non_quantized_tensors(model).items()}
    for name, layer in packed_layers(model).items():
        state[f"{name}.weight"] = layer.dequantize_weight(dtype).detach().cpu().contiguous()
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach().cpu().to(dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    write_model_folder(folder, model, tokenizer, state,
                       {"quantization_config": None, "torch_dtype": None, "dtype": dtype_name})
