"""``pipelines/fragments_ab.py``: it imports the fragment kernel of a git revision beside the working
tree's, refuses revisions and tiles it cannot take with a message naming them, and tables each
revision's two timings against cuBLAS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import load_pipeline

from efficientqat.kernels import fragments
from efficientqat.qlinear import PackedLinear
from efficientqat.quantizer import QuantSpec


@pytest.fixture(scope="module")
def ab():
    return load_pipeline("fragments_ab")


def test_a_revisions_kernel_is_its_own_module_and_matches_float64(ab):
    head = ab.load_revision("HEAD")
    assert head is not fragments and head.__name__ == "efficientqat.kernels._fragments_HEAD"
    assert ab.load_revision("tree") is fragments
    gen = torch.Generator().manual_seed(5)
    spec = QuantSpec.from_name("w2g64")
    layer = PackedLinear.from_codes(torch.randint(0, 4, (32, 512), generator=gen),
                                    torch.rand(32, 8, generator=gen) * 0.01 + 0.001,
                                    torch.randint(0, 4, (32, 8), generator=gen), None, spec)
    x = torch.randn(3, 512, generator=gen).half()
    own = (fragments.fragment_codes(layer.qweight, 2), layer.scales.half(), layer.kernel_zeros())
    ref = x.double() @ layer.dequantize_weight().double().t()
    for module, tile in ((head, (16, 2, 1, 1, 1)), (fragments, (16, 2, 1, 1, 0))):  # x ahead; x just before use
        y = ab.launch(module, x, own, spec, tile)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 3e-3


def test_a_copy_of_the_kernel_file_loads_as_its_own_module(ab, tmp_path):
    copy = tmp_path / "fragments_copy.py"
    copy.write_text(Path(fragments.__file__).read_text())
    module = ab.load_revision(str(copy))
    assert module is not fragments and module.fragment_codes is not fragments.fragment_codes
    assert module.__name__.startswith("efficientqat.kernels._fragments_") and module.__name__.endswith("fragments_copy_py")


def test_unknown_revisions_and_malformed_tiles_are_refused_by_name(ab, tmp_path):
    with pytest.raises(SystemExit, match="no-such-rev"):
        ab.load_revision("no-such-rev")
    with pytest.raises(SystemExit, match="missing.py"):
        ab.load_revision(str(tmp_path / "missing.py"))
    assert ab.parse_tiles("32:8:1:2,16:4:2:1,16:8:0:2,32:8:1:1:0") == [
        (32, 8, 1, 2, 1), (16, 4, 2, 1, 1), (16, 8, 0, 2, 1), (32, 8, 1, 1, 0)]
    for bad in ("32:8:1", "32:0:1:2", "32:8:3:2", "32:8:a:2", "0:8:1:2", "32:8:1:0", "32:8:1:1:2", "32:8:0:1:0",
                "32:8:1:1:0:1"):
        with pytest.raises(SystemExit, match=bad):
            ab.parse_tiles(f"16:8:1:1,{bad}")


def test_the_table_gives_each_revisions_two_timings_and_best_ratio(ab):
    rows = [{"quant": "w4g128", "m": 16, "tile": [32, 8, 1, 2], "cublas_us": 34.0,
             "us": {"0dd7fc4": [15.8, 15.6], "tree": [21.6, 21.5]}}]
    lines = ab.table(rows).splitlines()
    assert lines[0].endswith("| 0dd7fc4 | tree |")
    assert lines[2] == "| w4g128 | 16 | 32, 8, 1, 2 | 34.00 | 15.80 / 15.60 (2.18x) | 21.60 / 21.50 (1.58x) |"
