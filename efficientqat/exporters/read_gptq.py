"""Independent GPTQ-v2 reader: qweight is, per output column, one little-endian bit stream
along K (so 2/4/8-bit words and GPTQ's dense 3-bit stream read the same way); qzeros the same
along N; ``W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]`` with exact (v2) zeros."""

from __future__ import annotations

from pathlib import Path

import torch

from efficientqat.exporters.readback import ReadBack, bits_of, read_folder, values_of, without_quantization


def read_gptq_v2(folder: Path) -> ReadBack:
    config, tensors = read_folder(folder)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq_v2", qc
    bits = int(qc["bits"])
    out: dict[str, torch.Tensor] = {}
    names = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    for name in names:
        qweight, qzeros = tensors.pop(f"{name}.qweight"), tensors.pop(f"{name}.qzeros")
        scales, g_idx = tensors.pop(f"{name}.scales"), tensors.pop(f"{name}.g_idx").long()
        n = qweight.shape[1]
        codes = values_of(bits_of(qweight.t()).reshape(n, -1), bits)  # [N, K]
        zeros = values_of(bits_of(qzeros).reshape(qzeros.shape[0], -1), bits)[:, :n]  # [G, N]
        z, s = zeros[g_idx].t(), scales.float()[g_idx].t()  # [N, K] each
        out[f"{name}.weight"] = (codes.float() - z.float()) * s
    out.update(tensors)
    return ReadBack(without_quantization(config), out, names)
