"""Decoder layers whose decode steps run the norms and residual adds inside the packed matmuls.

On the CPU the fused attention kernel runs in Triton's interpreter and the packed matmuls take
the PyTorch path with the same row operations (``RowOps.before`` / ``after``); on a GPU an fp16
model runs every step through the decode kernels' prologue and epilogue.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from efficientqat import fused_decoder  # noqa: E402
from efficientqat.fused_attention import fuse_decode_attention_  # noqa: E402
from efficientqat.fused_decoder import fuse_decoder_layers_, is_supported_layer  # noqa: E402
from efficientqat.fused_projections import fuse_projections_  # noqa: E402
from efficientqat.model_utils import decoder_layers, linear_modules, set_submodule  # noqa: E402
from efficientqat.qlinear import PackedLinear  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402
from test_fused_attention import DEVICE, assert_same_generation, tiny_model  # noqa: E402

GPU = DEVICE == "cuda"


def packed_model(arch: str, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny model of ``arch`` whose decoder Linears are packed 4-bit layers over random codes
    (Qwen2's q/k/v keep their biases)."""
    model = tiny_model(arch, **overrides)
    gen = torch.Generator().manual_seed(3)
    spec = QuantSpec(4, 32)
    for block in decoder_layers(model):
        for name, linear in linear_modules(block).items():
            n, k = linear.weight.shape
            codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
            zero = torch.randint(0, 16, (n, k // 32), generator=gen, dtype=torch.int32)
            scale = torch.rand(n, k // 32, generator=gen) * 0.02 + 0.01
            bias = None if linear.bias is None else linear.bias.detach().cpu()
            layer = PackedLinear.from_codes(codes, scale, zero, bias, spec, dtype)
            set_submodule(block, name, layer.to(DEVICE))
    return model.to(dtype)


def fused_copy(model):
    fused = copy.deepcopy(model)
    fuse_projections_(fused)
    fuse_decode_attention_(fused)
    assert fuse_decoder_layers_(fused) == 2 and fuse_decoder_layers_(fused) == 0
    assert type(fused.model.layers[0]).__name__.startswith("Fused")
    return fused


def count_fused_steps(monkeypatch) -> list[int]:
    calls = [0]
    step = fused_decoder.DecodeLayer._fused_step

    def counted(self, *args):
        calls[0] += 1
        return step(self, *args)

    monkeypatch.setattr(fused_decoder.DecodeLayer, "_fused_step", counted)
    return calls


def greedy(model, ids, attention_mask):
    return model.generate(ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False,
                          cache_implementation="static", output_scores=True, return_dict_in_generate=True,
                          pad_token_id=0)


def left_padded_batch():
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :2] = 0
    return ids, attention_mask


def assert_fused_steps_follow(reference, fused, monkeypatch, fp16: bool) -> None:
    """Greedy generation of a left-padded batch by both models: the reference never takes the fused
    layer step, the fused model takes it on every decode step of every layer (not on the
    prefill), and the scores agree (``fp16``: to fp16 rounding)."""
    ids, attention_mask = left_padded_batch()
    calls = count_fused_steps(monkeypatch)
    want = greedy(reference, ids, attention_mask)
    assert calls[0] == 0
    got = greedy(fused, ids, attention_mask)
    assert calls[0] == 3 * 2  # decode steps after the prefill x layers
    assert_same_generation(want, got, fp16=fp16)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_generation_matches_the_unfused_packed_model(arch, monkeypatch):
    """Left-padded batch, greedy: same tokens and scores at every step as the packed model with
    Hugging Face's layers, every decode step of every layer through the fused layer step (Qwen2:
    q/k/v biases; Qwen3: per-head q/k norms), the state dict unchanged."""
    model = packed_model(arch, **({"sliding_window": None} if arch == "mistral" else {}))
    fused = fused_copy(model)
    assert fused.state_dict().keys() == copy.deepcopy(model).state_dict().keys()
    assert_fused_steps_follow(model, fused, monkeypatch, fp16=False)


@pytest.mark.skipif(not GPU, reason="fp16 packed layers take the decode kernels on a GPU only")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gpu_fp16_generation_through_the_kernel_prologue(arch, monkeypatch):
    """fp16 on the GPU: q/k/v and gate/up normalise their input in the kernel, o_proj and down add
    the residual in it; the logits follow the unfused model's to fp16 rounding."""
    model = packed_model(arch, torch.float16)
    fused = fused_copy(model)
    assert_fused_steps_follow(model, fused, monkeypatch, fp16=True)


def test_dynamic_cache_and_training_keep_the_original_forward(monkeypatch):
    fused = fused_copy(packed_model("llama"))
    calls = count_fused_steps(monkeypatch)
    ids = torch.randint(3, 96, (1, 5), device=DEVICE)
    fused.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # DynamicCache
    fused.train()
    fused(ids).logits.sum().backward()
    assert calls[0] == 0


def test_layers_without_the_fused_parts_are_left_alone():
    """Unfused projections, or Hugging Face's attention: the layer keeps its class."""
    model = packed_model("llama")
    assert fuse_decoder_layers_(copy.deepcopy(model)) == 0
    projections_only = copy.deepcopy(model)
    fuse_projections_(projections_only)
    assert fuse_decoder_layers_(projections_only) == 0
    attention_only = copy.deepcopy(model)
    fuse_decode_attention_(attention_only)
    assert not any(is_supported_layer(m) for m in attention_only.modules())
    dense = tiny_model("llama")
    fuse_decode_attention_(dense)
    assert fuse_decoder_layers_(dense) == 0


def test_load_quantized_fuses_the_decoder_layers(tmp_path, monkeypatch):
    """``load_quantized`` serves a run folder with the fused layer step by default (state dict in
    the usual layout); its greedy steps follow the model loaded with no fusion at all (to fp16
    rounding on a GPU, where the kernels' prologue and epilogue run)."""
    from conftest import random_packed_model

    from efficientqat import load_quantized
    from efficientqat.packed_model import save_packed_model
    from efficientqat.run_folder import write_json

    spec = QuantSpec(4, 64)
    save_packed_model(random_packed_model(96, spec, seed=5), None, tmp_path / "model", spec)
    write_json(tmp_path / "state.json", {"stage": "blockap", "done": True})
    served = load_quantized(tmp_path, device=DEVICE)
    plain = load_quantized(tmp_path, device=DEVICE, fuse=False, fused_attention=False, fused_layers=False)
    assert type(served.model.layers[0]).__name__ == "FusedLlamaDecoderLayer"
    assert type(plain.model.layers[0]).__name__ == "LlamaDecoderLayer"
    assert served.state_dict().keys() == plain.state_dict().keys()
    assert_fused_steps_follow(plain, served, monkeypatch, fp16=GPU)
