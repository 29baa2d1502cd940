"""``pipelines/prefetch_study.py``: the tiles it is told to time are the ones it builds, a bad tile
text fails with the field it cannot take, and its table ranks each case's tiles by their best time."""

from __future__ import annotations

import pytest

from conftest import load_pipeline


@pytest.fixture(scope="module")
def study():
    return load_pipeline("prefetch_study")


def test_a_tile_text_becomes_that_config_with_the_chained_launch_by_default(study):
    cfg = study.parse_tile("variant=4,block_n=128,block_k=16,split_k=8,num_stages=3,prefetch=2")
    assert (cfg.variant, cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_stages, cfg.prefetch) == (4, 128, 16, 8, 3, 2)
    assert cfg.block_m == 16 and cfg.pdl is True and cfg.fixup is True
    assert study.parse_tile("block_n=64,block_k=4,pdl=0,fixup=0").pdl is False


@pytest.mark.parametrize("text,named", [("block_n=64,block_k=4,stages=2", "stages=2"),
                                        ("block_n=64,block_k=x", "block_k=x"), ("block_n=64", "block_k")])
def test_a_bad_tile_text_names_what_it_cannot_take(study, text, named):
    with pytest.raises(SystemExit, match=named):
        study.parse_tile(text)


def test_the_table_puts_each_cases_fastest_tile_first(study):
    def row(quant, variant, prefetch, us):
        cfg = dict(variant=variant, block_n=256, block_k=16, split_k=8, num_warps=4, num_stages=3, lanes=1, early=False)
        return dict(quant=quant, m=16, prefetch=prefetch, us=us, cublas_us=30.0, config=cfg)

    rows = [row("w4g128", 3, 0, 26.0), row("w4g128", 3, 1, 25.0), row("w4g128", 4, 0, 29.0), row("w4g128", 4, 1, 24.0),
            row("w2g64", 0, 0, 36.0), row("w2g64", 0, 1, 37.0)]
    lines = study.table(rows, [0, 1], top=5).splitlines()[2:]
    assert [line.split(" | ")[1].split()[0] for line in lines] == ["v4", "v3", "v0"]
    assert lines[0].endswith("| 29.0 | 24.0 | 1.25x |") and lines[2].endswith("| 36.0 | 37.0 | 0.83x |")
