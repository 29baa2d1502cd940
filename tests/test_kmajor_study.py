"""``pipelines/kmajor_study.py``: its tile launch runs the K-major kernel on a layer's codes stored
K-major, and its table puts cuBLAS and the tuned layers first, then the fastest K-major tiles."""

from __future__ import annotations

import pytest
import torch

from conftest import load_pipeline

from efficientqat.qlinear import PackedLinear, store_codes_k_major
from efficientqat.quantizer import QuantSpec


@pytest.fixture(scope="module")
def study():
    return load_pipeline("kmajor_study")


def test_a_tile_launch_matches_the_layers_product(study):
    gen = torch.Generator().manual_seed(2)
    layer = PackedLinear.from_codes(torch.randint(0, 16, (16, 1024), generator=gen),
                                    torch.rand(16, 8, generator=gen) * 0.01 + 0.001,
                                    torch.randint(0, 16, (16, 8), generator=gen), None, QuantSpec.from_name("w4g128"))
    layer = store_codes_k_major(layer.half())
    x = torch.randn(1, 1024, generator=gen).half()
    y = study.kmajor_gemv(x, (layer.qweight, layer.scales, layer.kernel_zeros()), 4, 128, block_n=8, warps=1)
    ref = x.double() @ layer.dequantize_weight().double().t()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-3


def test_the_table_lists_the_references_then_the_fastest_kmajor_tiles(study):
    def row(what, us, tile=None):
        return {"quant": "w4g128", "what": what, "us": us, "bytes": 35e6, **({"tile": tile} if tile else {})}

    rows = [row("cuBLAS fp16", 38.0), row("tuned N-major layer", 13.0, [256, 2]), row("tuned K-major layer", 11.5, [8, 2])]
    rows += [row("K-major kernel", us, [n, 2]) for n, us in ((2, 20.0), (4, 11.9), (8, 11.5), (16, 12.5), (32, 14.0))]
    lines = study.table(rows).splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines[:3]] == ["cuBLAS fp16", "tuned N-major layer", "tuned K-major layer"]
    assert [line.split(" | ")[2] for line in lines[3:]] == ["8, 2", "4, 2", "16, 2", "32, 2"]
    assert lines[2].endswith("| 11.50 | 3.04 | 3.30x | - |")
