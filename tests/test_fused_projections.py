"""Fused q/k/v and gate/up projections: same outputs, unfused state dict, nothing left pending."""

from __future__ import annotations

import pytest
import torch
from conftest import random_packed_model

from efficientqat import load_quantized
from efficientqat.exporters.common import packed_layers
from efficientqat.fused_mlp import ACT_BLOCK, FusedGatedMLP, is_gated_silu_mlp
from efficientqat.fused_projections import FusedProjection, ProjectionSlice, fuse_projections_
from efficientqat.packed_model import save_packed_model
from efficientqat.qlinear import PackedLinear
from efficientqat.quantizer import QuantSpec
from efficientqat.run_folder import write_json

VOCAB = 256


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 64), (8, 128)])
def test_fused_model_gives_the_unfused_logits(bits, group):
    model = random_packed_model(VOCAB, QuantSpec(bits, group), seed=bits)
    with torch.no_grad():
        reference = model(ids()).logits
        assert fuse_projections_(model) == 4  # 2 layers x (q/k/v, gate/up)
        fused = model(ids()).logits
    assert len(packed_layers(model)) == 8  # fused_q_k_v, o_proj, fused_gate_up, down_proj per layer
    assert isinstance(model.model.layers[0].self_attn.k_proj, ProjectionSlice)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert all(m._pending is None for m in model.modules() if isinstance(m, FusedProjection))


def test_state_dict_of_a_fused_model_is_the_unfused_one(tmp_path):
    spec = QuantSpec(3, 64)
    model = random_packed_model(VOCAB, spec, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fuse_projections_(model)
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    # and it saves like an unfused model: a reload without fusion computes the same logits
    folder = tmp_path / "run"
    save_packed_model(model, None, folder / "model", spec)
    write_json(folder / "state.json", {"stage": "blockap", "done": True})
    reloaded = load_quantized(folder, device="cpu", fuse=False)
    assert isinstance(reloaded.model.layers[1].mlp.up_proj, PackedLinear)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids(1)).logits, model(ids(1)).logits, rtol=1e-5, atol=1e-5)


def test_a_slice_called_alone_computes_its_own_projection():
    """Held slices serve only the tensor they were computed for: siblings called with another
    input, or out of order, still get their own projection of it."""
    model = random_packed_model(VOCAB, QuantSpec(4, 128), seed=5)
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(2, 3, attn.q_proj.in_features)
    with torch.no_grad():
        expected = [attn.q_proj(x), attn.k_proj(y), attn.k_proj(x), attn.v_proj(x)]
        fuse_projections_(model)
        got = [attn.q_proj(x), attn.k_proj(y), attn.k_proj(x), attn.v_proj(x)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_only_groups_of_one_format_are_fused():
    model = random_packed_model(VOCAB, QuantSpec(4, 64), seed=7)
    mlp = model.model.layers[0].mlp
    other = PackedLinear.from_codes(mlp.up_proj.int_codes(), torch.rand(mlp.up_proj.out_features, 1) * 0.01 + 1e-3,
                                    torch.zeros(mlp.up_proj.out_features, 1, dtype=torch.int32), None,
                                    QuantSpec(4, -1), torch.float32)
    mlp.up_proj = other  # per-channel up_proj beside a g64 gate_proj
    with torch.no_grad():
        reference = model(ids()).logits
        assert fuse_projections_(model) == 3
        torch.testing.assert_close(model(ids()).logits, reference, rtol=1e-5, atol=1e-5)
    assert mlp.up_proj is other and not hasattr(mlp, "fused_gate_up")
    assert isinstance(model.model.layers[1].mlp, FusedGatedMLP)


def test_gated_mlp_interleaves_gate_and_up_and_computes_the_activation_in_the_matmul():
    """The fused MLP's gate/up layer alternates blocks of 16 gate and 16 up columns, and its
    ``silu_mul`` output equals silu(gate) * up of the original layers (PyTorch path here)."""
    model = random_packed_model(VOCAB, QuantSpec(4, 64), seed=11)
    mlp = model.model.layers[0].mlp
    gate, up = mlp.gate_proj, mlp.up_proj
    x = torch.randn(3, 5, gate.in_features)
    with torch.no_grad():
        expected = torch.nn.functional.silu(gate(x)) * up(x)
        fuse_projections_(model)
        fused = model.model.layers[0].mlp
        assert isinstance(fused, FusedGatedMLP) and fused.gate_up.out_features == 2 * gate.out_features
        codes = fused.gate_up.int_codes()
        assert torch.equal(codes[:ACT_BLOCK], gate.int_codes()[:ACT_BLOCK])
        assert torch.equal(codes[ACT_BLOCK:2 * ACT_BLOCK], up.int_codes()[:ACT_BLOCK])
        assert torch.equal(codes[2 * ACT_BLOCK:3 * ACT_BLOCK], gate.int_codes()[ACT_BLOCK:2 * ACT_BLOCK])
        torch.testing.assert_close(fused.gate_up(x, silu_mul=True), expected, rtol=1e-5, atol=1e-6)


def test_mlps_that_are_not_known_gated_silu_stay_as_they_are():
    model = random_packed_model(VOCAB, QuantSpec(4, 64), seed=12)
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    assert not is_gated_silu_mlp(model.model.layers[0].mlp) and is_gated_silu_mlp(model.model.layers[1].mlp)
    with torch.no_grad():
        reference = model(ids()).logits
        fuse_projections_(model)
        torch.testing.assert_close(model(ids()).logits, reference, rtol=1e-5, atol=1e-5)
    assert isinstance(model.model.layers[0].mlp.up_proj, ProjectionSlice)  # gate/up fused, activation outside
    assert isinstance(model.model.layers[1].mlp, FusedGatedMLP)
