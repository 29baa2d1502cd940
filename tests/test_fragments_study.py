"""``pipelines/fragments_study.py``: its tile launch runs the fragment-order kernel on a layer's
repacked codes, and its table lists, per quantisation and M, cuBLAS and the tuned layer first,
then the fastest fragment-order tiles."""

from __future__ import annotations

import pytest
import torch

from conftest import load_pipeline

from efficientqat.kernels.fragments import fragment_codes
from efficientqat.qlinear import PackedLinear
from efficientqat.quantizer import QuantSpec


@pytest.fixture(scope="module")
def study():
    return load_pipeline("fragments_study")


def test_a_tile_launch_matches_the_layers_product(study):
    gen = torch.Generator().manual_seed(3)
    layer = PackedLinear.from_codes(torch.randint(0, 4, (32, 512), generator=gen),
                                    torch.rand(32, 8, generator=gen) * 0.01 + 0.001,
                                    torch.randint(0, 4, (32, 8), generator=gen), None, QuantSpec.from_name("w2g64"))
    x = torch.randn(2, 512, generator=gen).half()
    weights = (fragment_codes(layer.qweight, 2), layer.scales.half(), layer.kernel_zeros())
    y = study.fragments_gemv(x, weights, 2, 64, block_n=32, warps=2, ahead=2, vectors=2)
    ref = x.double() @ layer.dequantize_weight().double().t()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-3


def test_the_table_lists_the_references_then_the_fastest_tiles_per_m(study):
    def row(m, what, us, tile=None):
        return {"quant": "w4g128", "m": m, "what": what, "us": us, "bytes": 35e6, **({"tile": tile} if tile else {})}

    rows = [row(16, "cuBLAS fp16", 34.0), row(16, "tuned layer", 24.8, [256, 4])]
    rows += [row(16, "fragment-order kernel", us, [n, 8, 1]) for n, us in ((16, 20.5), (32, 18.1), (64, 31.5))]
    rows += [row(1, "cuBLAS fp16", 38.0), row(1, "fragment-order kernel", 15.5, [32, 16, 1])]
    lines = study.table(rows).splitlines()[2:]
    assert [line.split(" | ")[1:3] for line in lines[:5]] == [
        ["16", "cuBLAS fp16"], ["16", "tuned layer"], ["16", "fragment-order kernel"], ["16", "fragment-order kernel"],
        ["16", "fragment-order kernel"]]
    assert [line.split(" | ")[3] for line in lines[2:5]] == ["32, 8, 1", "16, 8, 1", "64, 8, 1"]
    assert lines[2].endswith("| 18.10 | 1.93 | 1.88x | - |") and lines[6].split(" | ")[1] == "1"
