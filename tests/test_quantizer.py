"""The quantizer's forward values and its straight-through gradients."""

import pytest
import torch

from efficientqat.errors import ConfigError
from efficientqat.quantizer import QuantSpec, fake_quantize, init_scale_zero, quantize_to_int


def _reference_grads(w, s, z, spec, upstream):
    """Closed-form STE gradients (module docstring of efficientqat.quantizer), in float64."""
    g = spec.group_len(w.shape[1])
    wg, up = w.reshape(w.shape[0], -1, g), upstream.reshape(w.shape[0], -1, g)
    zi = z.round().clamp(0, spec.qmax).unsqueeze(-1)
    sv = s.unsqueeze(-1)
    raw = torch.round(wg / sv) + zi
    inside = (raw >= 0) & (raw <= spec.qmax)
    q = raw.clamp(0, spec.qmax)
    dw = (up * inside).reshape(w.shape)
    ds = (up * torch.where(inside, q - zi - wg / sv, q - zi)).sum(-1)
    dz = (up * torch.where(inside, torch.zeros_like(wg), -sv)).sum(-1)
    return dw, ds, dz


@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 64), (8, -1)])
def test_ste_gradients_match_closed_form(bits, group):
    torch.manual_seed(bits * 100 + group)
    spec = QuantSpec(bits, group)
    w = torch.randn(8, 64, dtype=torch.float64)
    s, z = init_scale_zero(w, spec)
    s = (s.double() * (0.6 + 0.8 * torch.rand_like(s.double())))  # move off the init so some codes clamp
    z = z.double() + torch.randint(-1, 2, z.shape).double()
    z = z.clamp(0, spec.qmax)
    w.requires_grad_(True)
    s.requires_grad_(True)
    z.requires_grad_(True)
    upstream = torch.randn(8, 64, dtype=torch.float64)
    (fake_quantize(w, s, z, spec) * upstream).sum().backward()
    dw, ds, dz = _reference_grads(w.detach(), s.detach(), z.detach(), spec, upstream)
    assert torch.allclose(w.grad, dw)
    assert torch.allclose(s.grad, ds)
    assert torch.allclose(z.grad, dz)
    # some weights must have been clamped, or the test would not exercise both branches
    assert (dw == 0).any() and (dw != 0).any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_init_puts_group_min_and_max_on_the_grid(bits):
    torch.manual_seed(bits)
    spec = QuantSpec(bits, 32)
    w = torch.randn(4, 128) * 0.1
    s, z = init_scale_zero(w, spec)
    codes, s2, z2 = quantize_to_int(w, s, z, spec)
    assert codes.min() >= 0 and codes.max() <= spec.qmax
    deq = ((codes.reshape(4, 4, 32) - z2.unsqueeze(-1)) * s2.unsqueeze(-1)).reshape(4, 128)
    # round-to-nearest error is at most half a step (plus the zero-point rounding), never more
    err = (deq - w).abs().reshape(4, 4, 32).amax(-1)
    assert (err <= s * 1.0 + 1e-6).all()
    assert torch.allclose(deq, fake_quantize(w, s, z, spec), atol=1e-6)


def test_bad_bits_and_group_sizes_name_the_problem():
    with pytest.raises(ConfigError, match="wbits=5"):
        QuantSpec(5, 128)
    with pytest.raises(ConfigError, match="group_size=0"):
        QuantSpec(4, 0)
    with pytest.raises(ConfigError, match="does not divide"):
        QuantSpec(4, 48).group_len(64)


@pytest.mark.parametrize("spec", [QuantSpec(2, 64), QuantSpec(3, 128), QuantSpec(4, 32), QuantSpec(8, -1)])
def test_setting_names_parse_back_to_their_spec(spec):
    assert QuantSpec.from_name(spec.name) == spec


@pytest.mark.parametrize("name", ["w4", "4g128", "w4g", "w4g12x", "w4g128 extra"])
def test_malformed_setting_names_say_the_expected_form(name):
    with pytest.raises(ConfigError, match="wBITSgGROUP"):
        QuantSpec.from_name(name)
    with pytest.raises(ConfigError, match="wbits=5"):
        QuantSpec.from_name("w5g128")
