"""Independent compressed-tensors ``pack-quantized`` reader, in that format's own terms: a row
of int32 words is one little-endian bit stream of b-bit values (value i at bits
``[i*b, i*b + b)``, crossing words where b does not divide 32), codes and zero points are signed
after subtracting ``2^(b-1)``, and ``W = (q - z) * s`` per group of ``group_size`` input columns."""

from __future__ import annotations

from pathlib import Path

import torch

from efficientqat.exporters.readback import ReadBack, bits_of, read_folder, values_of, without_quantization


def _unpack_rows(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """int32 ``[R, W]`` to signed values ``[R, length]``."""
    stream = bits_of(words).reshape(words.shape[0], -1)[:, : length * bits]
    return values_of(stream, bits) - 2 ** (bits - 1)


def read_compressed_tensors(folder: Path) -> ReadBack:
    config, tensors = read_folder(folder)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized", qc
    weights = qc["config_groups"]["group_0"]["weights"]
    bits = int(weights["num_bits"])
    out: dict[str, torch.Tensor] = {}
    names = sorted(k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed"))
    for name in names:
        n, k = (int(v) for v in tensors.pop(f"{name}.weight_shape"))
        q = _unpack_rows(tensors.pop(f"{name}.weight_packed"), bits, k)  # [N, K]
        scale = tensors.pop(f"{name}.weight_scale").float()  # [N, G]
        z = _unpack_rows(tensors.pop(f"{name}.weight_zero_point").t(), bits, n).t()  # [N, G]
        group = k if weights["strategy"] == "channel" else int(weights["group_size"])
        cols = torch.arange(k) // group
        out[f"{name}.weight"] = (q.float() - z[:, cols].float()) * scale[:, cols]
    out.update(tensors)
    return ReadBack(without_quantization(config), out, names)
