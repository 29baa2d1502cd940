"""What every writer needs: the packed layers of a model, its other tensors, and the folder
layout around the tensors (config.json, generation config, tokenizer)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efficientqat.packed_model import _unique_state_dict, save_state_shards
from efficientqat.qlinear import PackedLinear
from efficientqat.run_folder import atomic_path


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    """Every PackedLinear by its module name (``model.layers.0.self_attn.q_proj``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def non_quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict entries that do not belong to a packed layer (embeddings, norms, lm_head), untied."""
    prefixes = tuple(f"{name}." for name in packed_layers(model))
    return {k: v for k, v in _unique_state_dict(model).items() if not k.startswith(prefixes)}


def write_model_folder(
    folder: Path, model: nn.Module, tokenizer: Any, state: dict[str, torch.Tensor], config_updates: dict[str, Any]
) -> None:
    """Tensors + a config.json that is the model's config with ``config_updates`` applied
    (a value of None removes the key) + generation config + tokenizer."""
    save_state_shards(state, folder)
    config = copy.deepcopy(model.config).to_dict()
    for key, value in config_updates.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
