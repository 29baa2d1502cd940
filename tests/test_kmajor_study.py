"""``pipelines/kmajor_study.py``: its K-major M = 1 kernel (Triton interpreter) matches the float64
product of the codes it was given, read from the project's packed words transposed, over several
steps (the next step's codes in flight) and groups; what it cannot take is refused."""

from __future__ import annotations

import pytest
import torch

from conftest import load_pipeline

from efficientqat.packing import pack_qweight


@pytest.fixture(scope="module")
def study():
    return load_pipeline("kmajor_study")


def random_layer(n: int, k: int, bits: int, group: int, seed: int):
    """Integer codes ``[N, K]``, the project's packed codes of them, scales and uint8 zero points."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 2**bits, (k // group, n), generator=gen, dtype=torch.uint8)
    return codes, pack_qweight(codes, bits), scales, zeros


@pytest.mark.parametrize("bits,group,k", [(4, 128, 2048), (4, 32, 1024), (2, 64, 4096)])
def test_the_kmajor_kernel_matches_the_float64_product(study, bits, group, k):
    n = 8
    codes, qweight, scales, zeros = random_layer(n, k, bits, group, seed=bits + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).half()
    g = torch.arange(k) // group
    w = (codes.double() - zeros.double().t()[:, g]) * scales.double().t()[:, g]
    ref = x.double() @ w.t()
    y = study.kmajor_gemv(x, study.repack_kmajor(qweight, scales, zeros), bits, group, block_n=4, warps=1)
    assert y.dtype == torch.float16 and y.shape == (1, n)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-3


def test_what_the_kmajor_kernel_cannot_take_is_refused(study):
    _, qweight, scales, zeros = random_layer(8, 1024, 4, 128, seed=0)
    packed = study.repack_kmajor(qweight, scales, zeros)
    x = torch.zeros(1, 1024).half()
    with pytest.raises(ValueError, match="3-bit"):
        study.kmajor_gemv(x, packed, 3, 128, block_n=4, warps=1)
    with pytest.raises(ValueError, match="groups of 16"):
        study.kmajor_gemv(x, packed, 4, 16, block_n=4, warps=1)
    with pytest.raises(ValueError, match="BLOCK_N"):
        study.kmajor_gemv(x, packed, 4, 128, block_n=3, warps=1)
    with pytest.raises(ValueError, match="multiple of 512"):
        study.kmajor_gemv(x, packed, 4, 128, block_n=4, warps=4)
