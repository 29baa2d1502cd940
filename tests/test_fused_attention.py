"""Fused decode attention (rotary + cache write + attention in one kernel): against a float64
reference, against Hugging Face's forward in generation, and its fallbacks.

On a machine without CUDA the kernel runs in Triton's interpreter (``conftest`` sets it)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from efficientqat import fused_attention  # noqa: E402
from efficientqat.fused_attention import fuse_decode_attention_  # noqa: E402
from efficientqat.kernels.decode_attention import decode_attention  # noqa: E402
from efficientqat.kernels.tiling import split_k_workspace  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotate-half rotary embedding, ``x [B, heads, D]``, ``cos/sin [B, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def reference(q, k, v, cos, sin, k_cache, v_cache, slot, mask, scaling):
    """Float64 attention of the new token over cache positions 0..slot, with its k/v at slot."""
    B, HKV, L, D = k_cache.shape
    H = q.shape[1] // D
    f = torch.float64
    qr = rotate(q.view(B, H, D).to(f), cos.to(f), sin.to(f)).to(q.dtype).to(f)
    kr = rotate(k.view(B, HKV, D).to(f), cos.to(f), sin.to(f)).to(k_cache.dtype).to(f)
    keys, values = k_cache.to(f).clone(), v_cache.to(f).clone()
    keys[:, :, slot], values[:, :, slot] = kr, v.view(B, HKV, D).to(k_cache.dtype).to(f)
    keys = keys[:, :, : slot + 1].repeat_interleave(H // HKV, dim=1)
    values = values[:, :, : slot + 1].repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", qr, keys) * scaling
    if mask is not None:
        cut = mask[:, None, : slot + 1]
        scores = scores.masked_fill(~cut, float("-inf")) if mask.dtype == torch.bool else scores + cut.to(f)
    out = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), values)
    return out.reshape(B, H * D), kr, values


CASES = [  # batch, heads, KV heads, head dim, cache length, write position, mask, dtype (launch_shape's slices)
    (1, 4, 4, 32, 40, 17, None, torch.float32),  # 2 slices
    (2, 4, 2, 16, 200, 130, "bool", torch.float32),  # grouped queries, 4 slices
    (2, 6, 2, 64, 600, 0, "add", torch.float32),  # only the new token: 15 of 16 slices empty
    (3, 2, 1, 32, 2100, 2099, "bool", torch.float32),  # the last slot, 32 slices
    (2, 4, 2, 64, 300, 211, "add", torch.float16),
]


@pytest.mark.parametrize("B,H,HKV,D,L,slot,mask_kind,dtype", CASES)
def test_decode_attention_matches_float64_and_writes_only_its_slot(B, H, HKV, D, L, slot, mask_kind, dtype):
    gen = torch.Generator().manual_seed(slot + D)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    k_cache, v_cache = rand(B, HKV, L, D), rand(B, HKV, L, D)
    keys_before, values_before = k_cache.clone(), v_cache.clone()
    angles = torch.rand(B, D // 2, generator=gen) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(B, L, generator=gen) > 0.3).to(DEVICE)
        mask[:, slot] = True  # the new token itself is always visible
    elif mask_kind == "add":
        mask = (-2 * torch.rand(B, L, generator=gen)).to(DEVICE, dtype)
        mask[:, ::7] = torch.finfo(dtype).min
        mask[:, slot] = 0
    length = torch.tensor(slot, device=DEVICE)
    scaling = D**-0.5
    # q, k and v as slices of one fused projection's output, as the model hands them over
    qkv = rand(B, (H + 2 * HKV) * D)
    q, k, v = qkv.split([H * D, HKV * D, HKV * D], dim=1)

    out = decode_attention(q, k, v, cos, sin, k_cache, v_cache, length, mask, scaling)

    want, kr, values = reference(q, k, v, cos, sin, keys_before, values_before, slot, mask, scaling)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(k_cache[:, :, slot].double(), kr, rtol=tol, atol=tol)
    assert torch.equal(v_cache[:, :, slot], v.view(B, HKV, D))
    others = torch.arange(L, device=DEVICE) != slot
    assert torch.equal(k_cache[:, :, others], keys_before[:, :, others])
    assert torch.equal(v_cache[:, :, others], values_before[:, :, others])
    assert length.item() == slot + 1
    assert not split_k_workspace(torch.device(DEVICE), 0, B * H + 1).counts.any()  # counters left at zero


def test_consecutive_steps_continue_from_the_advanced_position():
    """Two launches in a row: the second writes at the position the first advanced to and
    attends over both new tokens (the counters the first left must be back at zero)."""
    B, H, HKV, D, L = 1, 2, 1, 16, 130
    gen = torch.Generator().manual_seed(5)
    k_cache = torch.randn(B, HKV, L, D, generator=gen).to(DEVICE)
    v_cache = torch.randn(B, HKV, L, D, generator=gen).to(DEVICE)
    start = k_cache.clone(), v_cache.clone()
    cos, sin = torch.ones(B, D, device=DEVICE), torch.zeros(B, D, device=DEVICE)
    length = torch.tensor(100, device=DEVICE)
    steps = [torch.randn(B, (H + 2 * HKV) * D, generator=gen).to(DEVICE).split([H * D, HKV * D, HKV * D], 1)
             for _ in range(2)]
    for q, k, v in steps:  # 2 slices, blocks of 64 positions (not the default shape here)
        out = decode_attention(q, k, v, cos, sin, k_cache, v_cache, length, None, 0.25, splits=2, block=64)
    keys, values = start[0].clone(), start[1].clone()
    keys[:, :, 100] = steps[0][1].view(B, HKV, D)
    values[:, :, 100] = steps[0][2].view(B, HKV, D)
    q, k, v = steps[1]
    want, _, _ = reference(q, k, v, cos, sin, keys, values, 101, None, 0.25)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert length.item() == 102


def test_a_step_past_a_full_cache_touches_nothing_outside_it():
    """length == L: the new token attends to the L cached positions and itself, is not stored,
    and nothing outside the caches is read or written (the caches sit inside larger buffers
    whose guard rows must stay as they were)."""
    B, H, HKV, D, L = 1, 2, 1, 16, 40
    gen = torch.Generator().manual_seed(9)
    buffers = [torch.randn(B, HKV, L + 8, D, generator=gen).to(DEVICE) for _ in range(2)]
    guards = [b[:, :, L:].clone() for b in buffers]
    k_cache, v_cache = (b[:, :, :L] for b in buffers)
    start = k_cache.clone(), v_cache.clone()
    q, k, v = torch.randn(B, (H + 2 * HKV) * D, generator=gen).to(DEVICE).split([H * D, HKV * D, HKV * D], 1)
    cos, sin = torch.ones(B, D, device=DEVICE), torch.zeros(B, D, device=DEVICE)
    length = torch.tensor(L, device=DEVICE)
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    out = decode_attention(q, k, v, cos, sin, k_cache, v_cache, length, mask, 0.25)
    keys = torch.cat([start[0], k.view(B, HKV, 1, D)], 2).double().repeat_interleave(H // HKV, 1)
    values = torch.cat([start[1], v.view(B, HKV, 1, D)], 2).double().repeat_interleave(H // HKV, 1)
    scores = torch.einsum("bhd,bhsd->bhs", q.view(B, H, D).double(), keys) * 0.25
    want = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), values).reshape(B, H * D)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache, start[0]) and torch.equal(v_cache, start[1])
    assert all(torch.equal(b[:, :, L:], g) for b, g in zip(buffers, guards))
    assert length.item() == L + 1


def test_bad_arguments_are_named():
    cache = torch.zeros(1, 2, 8, 16)
    q, kv = torch.zeros(1, 64), torch.zeros(1, 32)
    cos = torch.zeros(1, 16)
    length = torch.tensor(0)
    with pytest.raises(ValueError, match="value cache"):
        decode_attention(q, kv, kv, cos, cos, cache, torch.zeros(1, 2, 9, 16), length, None, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        odd = torch.zeros(1, 2, 8, 24)
        decode_attention(torch.zeros(1, 96), torch.zeros(1, 48), torch.zeros(1, 48), cos, cos, odd, odd, length, None, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        decode_attention(q, torch.zeros(1, 16), kv, cos, cos, cache, cache.clone(), length, None, 1.0)
    with pytest.raises(ValueError, match="mask"):
        decode_attention(q, kv, kv, cos, cos, cache, cache.clone(), length, torch.ones(1, 7, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="write position"):
        decode_attention(q, kv, kv, cos, cos, cache, cache.clone(), torch.tensor([0.0]), None, 1.0)


def tiny_model(arch: str, **overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **overrides)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch](**common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(DEVICE).eval()


def count_fused_calls(monkeypatch) -> list[int]:
    calls = [0]
    op = fused_attention.decode_attention_op

    def counted(*args):
        calls[0] += 1
        return op(*args)

    monkeypatch.setattr(fused_attention, "decode_attention_op", counted)
    return calls


def generate_both(reference_model, monkeypatch) -> tuple[object, object, int]:
    """Greedy generation over a static cache from a left-padded batch by the model and by a
    fused copy: (theirs, ours, fused kernel calls in ours)."""
    model = copy.deepcopy(reference_model)
    assert fuse_decode_attention_(model) == 2 and fuse_decode_attention_(model) == 0
    assert type(model.model.layers[0].self_attn).__name__.startswith("Fused")
    assert model.state_dict().keys() == reference_model.state_dict().keys()
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :2] = 0  # left padding
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=4, do_sample=False, cache_implementation="static",
                  output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    calls = count_fused_calls(monkeypatch)
    want = reference_model.generate(ids, **kwargs)
    assert calls[0] == 0
    got = model.generate(ids, **kwargs)
    return want, got, calls[0]


def assert_same_generation(want, got, fp16: bool = False) -> None:
    """Same tokens and scores to 1e-4; ``fp16``: scores to fp16 rounding (fused and separate
    launches round differently: 1 ulp, 4.9e-4, on an H200 in session 13), tokens unchecked."""
    if not fp16:
        assert torch.equal(got.sequences, want.sequences)
    tol = 2e-2 if fp16 else 1e-4
    for step_got, step_want in zip(got.scores, want.scores):
        torch.testing.assert_close(step_got.float(), step_want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_generation_over_a_static_cache_matches_hugging_face(arch, monkeypatch):
    """Left-padded batch, greedy: same scores at every step as the unfused model, through the
    fused kernel on every decode step of every layer (not on the prefill). Qwen2 has q/k/v
    biases, Qwen3 per-head q/k norms."""
    want, got, calls = generate_both(tiny_model(arch, sliding_window=None) if arch == "mistral" else tiny_model(arch),
                                     monkeypatch)
    assert calls == 3 * 2  # decode steps after the prefill x layers
    assert_same_generation(want, got)


def test_a_sliding_window_cache_keeps_the_original_forward(monkeypatch):
    want, got, calls = generate_both(tiny_model("mistral", sliding_window=4), monkeypatch)
    assert calls == 0
    assert_same_generation(want, got)


def test_a_window_shorter_than_a_full_cache_keeps_the_original_forward(monkeypatch):
    """A module that attends over a 4-token window while the static cache keeps full layers:
    the fused kernel, which attends to everything cached, must stand aside."""
    model = tiny_model("qwen2")
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 4
    want, got, calls = generate_both(model, monkeypatch)
    assert calls == 0
    assert_same_generation(want, got)


def test_dynamic_cache_keeps_the_original_forward(monkeypatch):
    model = tiny_model("llama")
    fuse_decode_attention_(model)
    calls = count_fused_calls(monkeypatch)
    ids = torch.randint(3, 96, (1, 5), device=DEVICE)
    model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # DynamicCache
    assert calls[0] == 0


def test_load_quantized_fuses_attention_over_fused_projections(tmp_path, monkeypatch):
    """A packed run folder loaded for serving: q/k/v come as slices of one fused packed matmul
    (strided views) and feed the kernel; greedy generation matches the model loaded without
    any fusion. ``fused_attention=False`` leaves Hugging Face's forward."""
    from conftest import random_packed_model

    from efficientqat import load_quantized
    from efficientqat.packed_model import save_packed_model
    from efficientqat.quantizer import QuantSpec
    from efficientqat.run_folder import write_json

    spec = QuantSpec(4, 64)
    save_packed_model(random_packed_model(96, spec, seed=4), None, tmp_path / "model", spec)
    write_json(tmp_path / "state.json", {"stage": "blockap", "done": True})
    served = load_quantized(tmp_path, device=DEVICE, fused_layers=False)  # see test_fused_decoder for those
    plain = load_quantized(tmp_path, device=DEVICE, fuse=False, fused_attention=False)
    assert type(served.model.layers[0].self_attn).__name__ == "FusedLlamaAttention"
    assert type(plain.model.layers[0].self_attn).__name__ == "LlamaAttention"
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation="static", output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
    calls = count_fused_calls(monkeypatch)
    want = plain.generate(ids, **kwargs)
    got = served.generate(ids, **kwargs)
    assert calls[0] == 3 * 2
    assert_same_generation(want, got, fp16=DEVICE == "cuda")  # load_quantized serves fp16 on a GPU
