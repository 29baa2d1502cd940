"""Whole-model operations on packed models: round-to-nearest, save and load in Hugging Face layout.

A packed model is a normal Hugging Face folder (config.json, safetensors shards, tokenizer)
whose decoder-layer Linear layers are stored as ``qweight/qzeros/scales/g_idx`` (see
:mod:`efficientqat.packing`) and whose config.json carries::

    "quantization_config": {"quant_method": "efficientqat", "format": "gptq_v2",
                            "bits": b, "group_size": g, "sym": false, "desc_act": false, ...}

``quant_method`` is our own so that plain ``from_pretrained`` does not mistake the folder for
an AutoGPTQ checkpoint; ``efficientqat.export`` writes the runtime formats.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from efficientqat.errors import ModelLoadError
from efficientqat.model_utils import decoder_layers, dtype_kwarg, linear_modules, set_submodule
from efficientqat.qlinear import FakeQuantLinear, PackedLinear
from efficientqat.quantizer import QuantSpec
from efficientqat.run_folder import atomic_path

QUANT_METHOD = "efficientqat"
TENSOR_FORMAT = "gptq_v2"
SHARD_BYTES = 4 * 2**30


def quantization_config(spec: QuantSpec, **extra: Any) -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "format": TENSOR_FORMAT,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": False,
        "desc_act": False,
        "zero_point": "exact",
        **extra,
    }


def spec_from_config(config: Any) -> QuantSpec:
    """The QuantSpec recorded in a model config; ModelLoadError if it is not one of ours."""
    qc = getattr(config, "quantization_config", None)
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else None
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise ModelLoadError("config.json has no efficientqat quantization_config: not a packed model of ours")
    return QuantSpec(int(qc["bits"]), int(qc["group_size"]))


def pack_rtn_(model: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> nn.Module:
    """Round-to-nearest baseline: min/max step sizes and zero points, packed, in place."""
    for block in decoder_layers(model):
        for name, linear in linear_modules(block).items():
            set_submodule(block, name, FakeQuantLinear(linear, spec).to_packed(dtype))
    return model


def convert_block_to_packed_(block: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> nn.Module:
    """Swap each Linear of one block for an empty PackedLinear of the same shape (before loading its state)."""
    for name, linear in linear_modules(block).items():
        packed = PackedLinear(linear.in_features, linear.out_features, spec, linear.bias is not None, dtype)
        set_submodule(block, name, packed)
    return block


def convert_to_packed_(model: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> nn.Module:
    """Every decoder block of ``model`` through :func:`convert_block_to_packed_`."""
    for block in decoder_layers(model):
        convert_block_to_packed_(block, spec, dtype)
    return model


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        out[name] = tensor.detach().cpu().contiguous()
    return out


def save_state_shards(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Write safetensors shards (+ index when more than one), each file atomically."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file(shards[0], str(tmp), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(folder / fname) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_path(folder / "model.safetensors.index.json") as tmp:
        tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def load_state_shards(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for fname in files:
        if not (folder / fname).is_file():
            raise ModelLoadError(f"{folder} is missing {fname}")
        state.update(load_file(str(folder / fname)))
    return state


def save_packed_model(
    model: nn.Module, tokenizer: Any, folder: Path, spec: QuantSpec, **quant_extra: Any
) -> None:
    """Save a model whose decoder Linears are PackedLinear, in Hugging Face layout."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.quantization_config = quantization_config(spec, **quant_extra)
    save_state_shards(_unique_state_dict(model), folder)
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(config.to_json_string(use_diff=False))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_packed_model(path: str | Path, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu") -> nn.Module:
    """Load a packed model of ours into PackedLinear layers (no dense weights are materialised)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"'{path}' is not a packed model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    spec = spec_from_config(config)
    qc = config.quantization_config
    del config.quantization_config  # keep transformers from dispatching to a quantizer of its own
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(dtype))
        convert_to_packed_(model, spec, dtype)
    state = load_state_shards(folder)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise ModelLoadError(f"'{path}' does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    _rebuild_meta_modules(model)
    model.config.quantization_config = qc
    return model.to(device).eval()


def _rebuild_meta_modules(model: nn.Module) -> None:
    """Re-create modules left on the meta device (those whose buffers are not saved, e.g. rotary tables).

    Hugging Face builds such modules from the model config alone, so constructing the same
    class again on the CPU gives exactly the tables ``from_pretrained`` would compute.
    """
    for name, module in list(model.named_modules()):
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not any(t.is_meta for t in own):
            continue
        try:
            fresh = type(module)(config=model.config)
        except TypeError as err:
            raise ModelLoadError(f"cannot restore {name} ({type(module).__name__}): {err}") from err
        if any(t.is_meta for t in fresh.parameters()):
            raise ModelLoadError(f"{name} has parameters missing from the checkpoint")
        set_submodule(model, name, fresh)


def _is_tied(model: nn.Module, key: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and key.endswith("lm_head.weight")
