"""Bit packing round trips and the exact GPTQ(-v2) word layout."""

import pytest
import torch

from efficientqat.errors import ConfigError
from efficientqat.packing import pack_last_dim, pack_qweight, pack_qzeros, unpack_last_dim, unpack_qweight, unpack_qzeros
from efficientqat.qlinear import FakeQuantLinear, PackedLinear, check_packable
from efficientqat.quantizer import QuantSpec


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_pack_unpack_round_trip(bits, group):
    torch.manual_seed(bits + group)
    n, k = 96, 256
    spec = QuantSpec(bits, group)
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.int32)
    codes[0, :] = 0
    codes[1, :] = 2**bits - 1  # extremes must survive (sign bit of the int32 word)
    zeros = torch.randint(0, 2**bits, (n, spec.n_groups(k)), dtype=torch.int32)
    zeros[0] = 0
    zeros[-1] = 2**bits - 1
    qweight, qzeros = pack_qweight(codes, bits), pack_qzeros(zeros, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (k * bits // 32, n)
    assert qzeros.shape == (spec.n_groups(k), n * bits // 32)
    assert torch.equal(unpack_qweight(qweight, bits), codes)
    assert torch.equal(unpack_qzeros(qzeros, bits), zeros)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layout_is_gptq_lowest_bits_first(bits):
    per = 32 // bits
    values = torch.randint(0, 2**bits, (3, per * 2))
    words = pack_last_dim(values, bits)
    for r in range(3):
        for w in range(2):
            expected = sum(int(values[r, w * per + i]) << (bits * i) for i in range(per))
            assert int(words[r, w]) & 0xFFFFFFFF == expected


def test_three_bit_layout_is_the_dense_gptq_stream():
    values = torch.randint(0, 8, (1, 32))
    words = [int(x) & 0xFFFFFFFF for x in pack_last_dim(values, 3)[0]]
    stream = words[0] | (words[1] << 32) | (words[2] << 64)
    for i in range(32):
        assert (stream >> (3 * i)) & 7 == int(values[0, i])
    # GPTQ's split values: value 10 has its low 2 bits at the top of word 0, its high bit at word 1 bit 0
    assert (words[0] >> 30) == int(values[0, 10]) & 3
    assert words[1] & 1 == int(values[0, 10]) >> 2


def test_out_of_range_and_bad_lengths_are_refused():
    with pytest.raises(ConfigError, match="out of the 2-bit range"):
        pack_last_dim(torch.tensor([[0, 1, 2, 4] * 4]), 2)
    with pytest.raises(ConfigError, match="multiple of 32"):
        pack_last_dim(torch.zeros(1, 16, dtype=torch.int32), 3)
    with pytest.raises(ConfigError, match="out_features=40"):
        check_packable(64, 40, QuantSpec(3, 32), "proj")
    assert unpack_last_dim(pack_last_dim(torch.full((1, 8), 15), 4), 4).tolist() == [[15] * 8]


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128), (8, -1)])
def test_packed_linear_reproduces_fake_quant_layer(bits, group):
    torch.manual_seed(bits)
    linear = torch.nn.Linear(128, 64, bias=True)
    fq = FakeQuantLinear(linear, QuantSpec(bits, group))
    with torch.no_grad():  # a trained-looking state: scales and zeros moved from their init
        fq.scale.mul_(1 + 0.1 * torch.rand_like(fq.scale))
        fq.weight.add_(0.01 * torch.randn_like(fq.weight))
    packed = fq.to_packed(torch.float32)
    assert isinstance(packed, PackedLinear)
    x = torch.randn(5, 128)
    ref = fq(x)
    out = packed(x)
    # only the fp16 storage of the step size differs: |q - z| * s * 2^-11 per weight
    assert torch.allclose(out, ref, atol=2e-3 * ref.abs().max().item())
    assert torch.equal(packed.int_codes().max() <= 2**bits - 1, torch.tensor(True))
