"""The self-check every export runs: dequantized weights bit for bit, then logits.

The written folder is re-read by the format's independent reader; each quantized layer's
weight must equal ``PackedLinear.dequantize_weight`` of the source exactly, and a dense fp32
model built from the read-back tensors must give the source model's logits on a few
sequences (to fp32 rounding, or to the export dtype's rounding for dense exports).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from efficientqat.errors import EfficientQATError
from efficientqat.exporters.common import packed_layers
from efficientqat.exporters.readback import ReadBack


class ExportCheckError(EfficientQATError, RuntimeError):
    """The written export does not reproduce the source model (a writer bug: nothing is kept)."""


def check_weights(source: nn.Module, read: ReadBack, dtype: torch.dtype | None) -> int:
    """Compare every quantized layer bit for bit; returns how many were compared."""
    layers = packed_layers(source)
    if sorted(layers) != sorted(read.quantized):
        raise ExportCheckError(f"export holds quantized layers {sorted(read.quantized)[:3]}..., source {sorted(layers)[:3]}...")
    for name, layer in layers.items():
        expected = layer.dequantize_weight(dtype).detach().cpu()
        got = read.tensors[f"{name}.weight"]
        if got.dtype != expected.dtype or got.shape != expected.shape or not torch.equal(got, expected):
            diff = (got.float() - expected.float()).abs().max().item() if got.shape == expected.shape else "shape"
            raise ExportCheckError(f"{name}: exported weight differs from the source (max |diff| {diff})")
    return len(layers)


def dense_model(read: ReadBack) -> nn.Module:
    """An fp32 Hugging Face model holding the read-back tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in read.config.items() if k not in ("torch_dtype", "dtype")}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = AutoModelForCausalLM.from_config(config).float()
    state = {k: v.float() if v.is_floating_point() else v for k, v in read.tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ExportCheckError(f"read-back tensors do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def check_logits(source: nn.Module, read: ReadBack, sequences: torch.Tensor, rel_tol: float) -> float:
    """Max |logit difference| relative to the largest logit; raises above ``rel_tol``."""
    reference = copy.deepcopy(source).float().cpu().eval()
    expected = reference(sequences).logits
    got = dense_model(read)(sequences).logits
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    if not rel <= rel_tol:
        raise ExportCheckError(f"logits of the export differ from the source by {rel:.2e} (relative), above {rel_tol:.0e}")
    return rel


def probe_sequences(vocab_size: int, n: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    """A few fixed random token sequences (the check is about arithmetic, not language)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=gen)
