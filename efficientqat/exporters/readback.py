"""What an independent reader returns, and the plain file access all readers share.

Readers re-read an export from disk with nothing but ``json``, ``safetensors`` and numpy bit
unpacking — none of the writers' packing code — so a layout mistake in a writer shows up as a
mismatch instead of being undone by its own inverse.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file


@dataclass
class ReadBack:
    """An export as a dense model: config (quantization removed), every tensor with quantized
    layers' weights dequantized to fp32 under ``<layer>.weight``, and those layers' names."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    quantized: list[str]


def read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the union of all ``*.safetensors`` files in the folder."""
    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return config, tensors


def bits_of(words: torch.Tensor) -> np.ndarray:
    """int32 words ``[..., W]`` to their bits ``[..., W, 32]``, least significant first."""
    a = np.ascontiguousarray(words.cpu().numpy().astype("<i4"))
    bits = np.unpackbits(a.view(np.uint8), axis=-1, bitorder="little")
    return bits.reshape(*a.shape, 32)


def values_of(bits: np.ndarray, width: int) -> torch.Tensor:
    """Bits ``[..., n * width]`` to unsigned values ``[..., n]`` (least significant bit first)."""
    grouped = bits.reshape(*bits.shape[:-1], -1, width).astype(np.int64)
    return torch.from_numpy((grouped << np.arange(width)).sum(-1))


def without_quantization(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "quantization_config"}
