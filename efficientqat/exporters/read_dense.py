"""Dense reader: a plain checkpoint; the layers that were quantized are those whose weights
the check compares (their names come from the source model)."""

from __future__ import annotations

from pathlib import Path

from efficientqat.exporters.readback import ReadBack, read_folder


def read_dense(folder: Path, quantized: list[str]) -> ReadBack:
    config, tensors = read_folder(folder)
    assert "quantization_config" not in config, "a dense export must not carry a quantization_config"
    return ReadBack(config, tensors, quantized)
