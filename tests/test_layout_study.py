"""``pipelines/layout_study.py``: the prototype M <= 16 kernel over N-major and micro-tile codes
computes the layer (interpreter, against float64), so that its GPU timings compare two right
kernels; compiled for sm_90, the micro-tile codes reach the tensor cores in 16-byte copies and loads
where the N-major ones take 4-byte copies (what the study claims and the GPU is to time)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import has_cuda_toolchain, load_pipeline, run_compiled

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def study():
    return load_pipeline("layout_study")


def test_micro_tiles_hold_each_columns_four_chunks_side_by_side(study):
    words = torch.arange(8 * 3, dtype=torch.int32).view(8, 3)  # 8 chunks, 3 columns
    micro = study.repack_micro(words)
    assert micro.shape == (2, 3, 4)
    assert micro[1, 2].tolist() == words[4:8, 2].tolist()
    with pytest.raises(ValueError, match="multiple of 4 chunks"):
        study.repack_micro(words[:6])


def four_bit_layer(m: int, n: int, k: int):
    """x, N-major 4-bit g128 codes, fp16 scales, byte zero points and the float64 product."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // 128, n), generator=gen)
    s = torch.rand(k // 128, n, generator=gen, dtype=torch.float64) * 0.05 + 0.005
    qweight = sum(q[j::8].to(torch.int64) << (4 * j) for j in range(8))
    qweight = torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    ref = x @ ((q.double() - z.double().repeat_interleave(128, 0)) * s.half().double().repeat_interleave(128, 0))
    return x.to(DEV, torch.float16), qweight.to(DEV), s.to(DEV, torch.float16), z.to(DEV, torch.uint8), ref


@pytest.mark.parametrize("micro,k_width,prefetch", [(False, 4, False), (True, 4, False), (True, 2, False),
                                                    (False, 4, True), (True, 4, True)])
def test_both_layouts_compute_the_layer(study, micro, k_width, prefetch):
    """K = 512 at split 2: two steps a program, so the prefetch carries one step's loads into the next."""
    x, qweight, s, z, ref = four_bit_layer(5, 64, 512)
    codes = study.repack_micro(qweight) if micro else qweight
    y = study.study_matmul(x, codes, s, z, micro, block_n=32, split=2, stages=1, k_width=k_width, prefetch=prefetch)
    assert y.shape == (5, 64)
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 2e-3
    with pytest.raises(ValueError, match="K a multiple of 128"):
        study.study_matmul(x[:, :192], codes, s, z, micro, block_n=32)


@pytest.mark.parametrize("micro", [False, True])
@pytest.mark.parametrize("block_c,split", [(4, 3), (8, 2), (16, 1)])
def test_the_m1_prototype_computes_the_layer_in_both_layouts(study, micro, block_c, split):
    """K = 512: 16, 8 or 4 steps over 3, 2 or 1 programs (uneven ranges, several steps each)."""
    x, qweight, s, z, ref = four_bit_layer(1, 64, 512)
    codes = study.repack_micro(qweight) if micro else qweight
    y = study.m1_matmul(x, codes, s, z, micro, block_n=32, block_c=block_c, split=split)
    assert y.shape == (1, 64)
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 2e-3
    with pytest.raises(ValueError, match="one row"):
        study.m1_matmul(x.expand(2, -1), codes, s, z, micro, block_n=32)


def test_the_layer_product_is_the_float64_one(study):
    x, qweight, s, z, ref = four_bit_layer(3, 64, 256)
    y = study.layer_product(x, (qweight, None, s, z))
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 2e-3


@pytest.mark.parametrize("launch", ["in-kernel sum", "atomics"])
@pytest.mark.parametrize("x_path", ["x words", "x tile"])
def test_the_projects_kernel_timed_beside_the_study_computes_the_same_layer(study, launch, x_path):
    """``--production`` times the project's kernel on the study's layer and tiles: it must read that
    layer as the study kernel does (the PDL launch is the GPU's; the interpreter runs the others)."""
    x, qweight, s, z, ref = four_bit_layer(5, 64, 256)
    y = study.production_matmul(x, qweight, s, z, 32, 2, 1, dict(study.PRODUCTION_LAUNCHES)[launch],
                                dict(study.PRODUCTION_X)[x_path])
    assert y.shape == (5, 64)
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 2e-3


def test_micro_tiles_reach_the_tensor_cores_in_16_byte_copies_and_loads():
    if not has_cuda_toolchain():
        pytest.skip("this Triton build has no CUDA toolchain")
    done = run_compiled("layout_study", "--sass", timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {(r["layout"], r["stages"]): r for r in map(json.loads, done.stdout.strip().splitlines())}
    for stages in (2, 3):
        n_major = rows["N-major", stages]
        # pipelined N-major codes: copied 4 bytes at a time into a K-major shared tile (x: 16 bytes)
        assert n_major.get("LDGSTS.E", 0) == 32
        # micro-tiles in the chunk order made for this Triton's B operand (k width 4 on 3.6, 2 on
        # 3.9): 8 more 16-byte copies instead, and each thread's fragments one 16-byte shared load
        # per chunk pair, no scalar loads beyond x's
        fit = [rows[name, stages] for name in ("micro4", "micro2")
               if rows[name, stages].get("LDS.128", 0) == n_major.get("LDS.128", 0) + 8
               and rows[name, stages].get("LDS", 0) <= n_major.get("LDS", 0)]
        assert fit
        for micro in fit:
            assert micro["LDGSTS.E.BYPASS.128"] == n_major.get("LDGSTS.E.BYPASS.128", 0) + 8
            assert micro.get("LDGSTS.E", 0) == 0 and micro["loop"] < n_major["loop"]


def test_the_printed_table_keeps_each_layouts_fastest_tile_at_each_m(study, capsys):
    rows = [dict(m=m, layout=layout, block_n=bn, split=8, us=us, cublas_us=35.0, x_cublas=35.0 / us)
            for m, layout, bn, us in ((16, "N-major", 128, 30.0), (16, "N-major", 256, 25.0), (16, "micro4", 128, 21.0),
                                      (4, "N-major", 128, 24.0), (4, "N-major", 256, 26.0))]
    study.print_best(rows, ("block_n", "split"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| M | layout | best tile (block_n, split) |")
    assert lines[2:] == ["| 4 | N-major | 128, 8 | 24.0 | 35.0 | 1.46 |", "| 16 | N-major | 256, 8 | 25.0 | 35.0 | 1.40 |",
                         "| 16 | micro4 | 128, 8 | 21.0 | 35.0 | 1.67 |"]
