"""Turning the Hydra config into typed settings: devices, dtypes, specs, data sources."""

from __future__ import annotations

import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from efficientqat.block_ap import ActivationConfig
from efficientqat.block_trainer import BlockTrainConfig
from efficientqat.data import TextSource
from efficientqat.errors import ConfigError
from efficientqat.quantizer import QuantSpec

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


def register_resolvers() -> None:
    """``${eqat.basename:path}``: a readable run name from a model path or hub id."""
    if not OmegaConf.has_resolver("eqat.basename"):
        OmegaConf.register_new_resolver("eqat.basename", lambda p: os.path.basename(str(p).rstrip("/")) or "model")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device='{name}' but CUDA is not available; use device=cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA (the usual checkpoint dtype) and float32 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype '{name}' must be auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def quant_spec(cfg: DictConfig) -> QuantSpec:
    return QuantSpec(int(cfg.quant.wbits), int(cfg.quant.group_size))


def text_source(node: Any) -> TextSource:
    return TextSource(source=str(node.source), field=str(node.field), docs=node.get("docs"),
                      separator=str(node.get("separator", "\n\n")))


def block_train_config(cfg: DictConfig, device: torch.device) -> BlockTrainConfig:
    t = cfg.train
    precision = str(t.precision)
    if precision == "auto":  # the original recipe: fp16 autocast with loss scaling on the GPU
        autocast = torch.float16 if device.type == "cuda" else None
    elif precision == "fp32":
        autocast = None
    elif precision in ("bf16", "fp16"):
        autocast = DTYPES[precision]
    else:
        raise ConfigError(f"train.precision='{precision}' must be auto, bf16, fp16 or fp32")
    compile_block = None if str(t.compile) == "auto" else bool(t.compile)
    for key in ("epochs", "batch_size"):
        if int(t[key]) < 1:
            raise ConfigError(f"train.{key}={t[key]} must be at least 1")
    return BlockTrainConfig(
        epochs=int(t.epochs), batch_size=int(t.batch_size), weight_lr=float(cfg.quant.weight_lr),
        quant_lr=float(cfg.quant.quant_lr), weight_decay=float(t.weight_decay),
        min_lr_factor=float(t.min_lr_factor), early_stop=int(t.early_stop), shuffle=bool(t.shuffle),
        train_norms=bool(t.train_norms), grad_clip=None if t.grad_clip is None else float(t.grad_clip),
        autocast_dtype=autocast, compile=compile_block, seed=int(cfg.seed),
    )


def activation_config(cfg: DictConfig) -> ActivationConfig:
    a = cfg.activations
    return ActivationConfig(location=str(a.location), snapshot=str(a.snapshot),
                            max_snapshot_gb=float(a.max_snapshot_gb),
                            propagate_batch_size=int(a.propagate_batch_size))


def result_settings(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """The parts of the config that determine the quantized model (the run's fingerprint)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    keep = {k: container[k] for k in ("model", "data", "quant", "train", "seed")}
    keep["device_type"] = device.type
    return keep
