"""``pipelines/read_floor.py``: its probe kernel (Triton interpreter) reads every code word, scale and
zero point of its K slice exactly once and writes the fold of them, by plain stores or through the
decode kernels' split-K write-back; a step that does not tile the groups is refused; the table shows
the probe at the tuned kernel's tile next to its best."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_pipeline


@pytest.fixture(scope="module")
def floor():
    return load_pipeline("read_floor")


def random_layer(k: int, n: int, bits: int, group: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-2**31, 2**31, (k * bits // 32, n), generator=gen, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(k // group, n, generator=gen) + 0.01).half()
    zeros = torch.randint(0, 2**bits, (k // group, n), generator=gen, dtype=torch.uint8)
    return qweight, scales, zeros


def expected_folds(weights, bits: int, group: int, block_c: int, split: int) -> np.ndarray:
    """Each K slice's fold as the probe computes it: per step, add the group's scale bits and zero
    point, then xor in the step's word rows (int32 wrap-around)."""
    qweight, scales, zeros = (w.numpy() for w in weights)
    rows = block_c * bits  # word rows of a step: BLOCK_C chunks of 32/gcd(32, bits) values
    rows //= np.gcd(32, bits)
    group_rows = group * bits // 32
    steps = qweight.shape[0] // rows
    out = np.zeros((split, qweight.shape[1]), dtype=np.int64)
    for part in range(split):
        acc = np.zeros(qweight.shape[1], dtype=np.int64)
        for step in range(part * steps // split, (part + 1) * steps // split):
            g = step * rows // group_rows
            acc = acc + scales[g].view(np.int16).astype(np.int64) + zeros[g].astype(np.int64)
            acc = (acc + 2**31) % 2**32 - 2**31
            for r in range(rows):
                acc ^= qweight[step * rows + r].astype(np.int64)
        out[part] = acc
    return out.astype(np.float32)


@pytest.mark.parametrize("bits,group,block_c,split", [(4, 32, 2, 2), (2, 64, 2, 3), (3, 32, 1, 4)])
def test_plain_stores_hold_each_k_slices_fold_of_its_words(floor, bits, group, block_c, split):
    weights = random_layer(128, 64, bits, group, seed=bits)
    part = floor.read_layer(weights, bits, group, block_n=32, block_c=block_c, split=split, fixup=False)
    np.testing.assert_array_equal(part.numpy(), expected_folds(weights, bits, group, block_c, split))


def test_the_split_k_write_back_sums_the_slices_and_leaves_the_workspace_zeroed(floor):
    from efficientqat.kernels.tiling import split_k_workspace

    weights = random_layer(256, 64, 4, 64, seed=5)
    y = floor.read_layer(weights, 4, 64, block_n=32, block_c=4, split=4, fixup=True)
    folds = expected_folds(weights, 4, 64, 4, 4).astype(np.float64)
    rounding = 4 * np.finfo(np.float32).eps * np.abs(folds).sum(axis=0)  # float32 adds in arrival order
    assert (np.abs(y[0].numpy() - folds.sum(axis=0)) <= rounding).all()
    ws = split_k_workspace(torch.device("cpu"), 64, 2)
    assert not ws.sums.any() and not ws.counts.any()


def test_a_step_that_does_not_tile_the_groups_or_the_columns_is_refused(floor):
    with pytest.raises(ValueError, match="groups of 64"):
        floor.probe_rows(2, 64, 8)  # 8 chunks of 16 values = 128 > 64
    with pytest.raises(ValueError, match="BLOCK_N"):
        floor.read_layer(random_layer(128, 48, 4, 32, seed=1), 4, 32, block_n=32, block_c=2, split=2, fixup=False)


def test_the_table_shows_the_probe_at_the_tuned_tile_and_its_best(floor):
    def probe(what, tile, us):
        return {"quant": "w4g128", "what": what, "tile": tile, "us": us, "bytes": 35e6}

    rows = [{"quant": "w4g128", "what": "cuBLAS fp16", "us": 36.0, "bytes": 134e6},
            {"quant": "w4g128", "what": "tuned kernel", "tile": [512, 4, 64], "us": 13.0, "bytes": 35e6},
            probe("probe, split-K write-back", [512, 4, 64], 11.5), probe("probe, split-K write-back", [1024, 8, 32], 11.0),
            probe("probe, split-K write-back", [256, 2, 16], 14.0), probe("probe, plain stores", [512, 4, 64], 10.0)]
    lines = floor.table(rows).splitlines()[2:]
    assert [line.split(" | ")[2] for line in lines] == ["-", "512, 4, 64", "512, 4, 64", "1024, 8, 32", "512, 4, 64"]
    assert lines[1].endswith("| 13.00 | 2.69 | 2.77x |") and lines[3].endswith("| 11.00 | 3.18 | 3.27x |")


def test_a_tile_list_that_is_not_positive_integers_exits_naming_the_option(floor):
    assert floor.int_list("--split", "16, 32,64") == [16, 32, 64]
    for text in ("16,x", "16,,32", "0,8", "-4"):
        with pytest.raises(SystemExit, match="--split takes positive integers"):
            floor.int_list("--split", text)
