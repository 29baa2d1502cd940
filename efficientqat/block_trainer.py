"""Block-AP for one transformer block: train W, s, z and norm gains to match the FP block's output.

The quantized block sees the *quantized chain's* input and is trained to reproduce the FP
block's output on the *FP chain's* input (MSE). AdamW with two parameter groups (step sizes
and zero points at ``quant_lr``; weights, biases and norm gains at ``weight_lr``), cosine
decay of both to ``lr / min_lr_factor``, a validation loss after every epoch and optional
early stopping. Afterwards the weights are snapped onto the grid and packed.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from efficientqat.activations import ActivationStore
from efficientqat.errors import TrainingDivergedError
from efficientqat.model_utils import linear_modules, run_block, set_submodule
from efficientqat.qlinear import FakeQuantLinear
from efficientqat.quantizer import QuantSpec


@dataclass(frozen=True)
class BlockTrainConfig:
    """Hyper-parameters of one block's training (the Hydra ``train`` group plus the quant lrs)."""

    epochs: int = 2
    batch_size: int = 2
    weight_lr: float = 1e-5
    quant_lr: float = 1e-4
    weight_decay: float = 0.0
    min_lr_factor: float = 20.0
    early_stop: int = 0
    shuffle: bool = True
    train_norms: bool = True
    grad_clip: float | None = 0.3
    autocast_dtype: torch.dtype | None = None  # bf16/fp16 autocast on CUDA; None = full fp32
    compile: bool | None = False  # fuse the fake quantizer with torch.compile; None = when it pays off
    seed: int = 0


@dataclass
class BlockTrainResult:
    """What happened while training one block (logged and written to metrics.json)."""

    block: int
    steps: int
    train_loss: list[float] = field(default_factory=list)  # mean per epoch
    val_loss: list[float] = field(default_factory=list)  # after each epoch
    epoch_seconds: list[float] = field(default_factory=list)  # optimizer steps only, no validation
    init_val_loss: float = float("nan")
    seconds: float = 0.0
    peak_memory_gb: float = 0.0


COMPILE_MIN_PARAMS = 20_000_000


def should_compile(block: nn.Module, setting: bool | None, device: torch.device) -> bool:
    """``None`` (auto): compile on CUDA for blocks big enough that fusing the quantizer beats its ~20 s compile."""
    if setting is not None:
        return setting
    n_params = sum(m.weight.numel() for m in linear_modules(block).values())
    return device.type == "cuda" and n_params >= COMPILE_MIN_PARAMS


def make_fake_quant_block(block: nn.Module, spec: QuantSpec, compiled: bool = False) -> nn.Module:
    """A float32 copy of ``block`` whose Linear layers are FakeQuantLinear (optionally torch.compiled)."""
    qblock = copy.deepcopy(block).float()
    for name, linear in linear_modules(qblock).items():
        try:
            set_submodule(qblock, name, FakeQuantLinear(linear, spec, compiled=compiled))
        except Exception as err:
            raise type(err)(f"{name}: {err}") from None
    return qblock


def param_groups(qblock: nn.Module, cfg: BlockTrainConfig) -> list[dict[str, Any]]:
    """Two AdamW groups: quantizer parameters (scale, zero) and everything else that trains."""
    quant, weights = [], []
    for name, p in qblock.named_parameters():
        leaf = name.rpartition(".")[2]
        if leaf in ("scale", "zero"):
            quant.append(p)
        elif isinstance(qblock.get_submodule(name.rpartition(".")[0]), FakeQuantLinear) or cfg.train_norms:
            weights.append(p)
        else:
            p.requires_grad_(False)
    groups = []
    if cfg.quant_lr > 0:
        groups.append({"params": quant, "lr": cfg.quant_lr, "name": "quant"})
    else:
        for p in quant:
            p.requires_grad_(False)
    if cfg.weight_lr > 0:
        groups.append({"params": weights, "lr": cfg.weight_lr, "name": "weight"})
    else:
        for p in weights:
            p.requires_grad_(False)
    return groups


def cosine_factor(step: int, total: int, min_lr_factor: float) -> float:
    """Multiplier of the base lr: cosine from 1 at step 0 to 1/min_lr_factor at ``total``."""
    floor = 1.0 / min_lr_factor
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _epoch_batches(n: int, batch_size: int, shuffle: bool, gen: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def block_loss(
    qblock: nn.Module,
    inputs: ActivationStore,
    targets: ActivationStore,
    kwargs: dict[str, Any],
    batch_size: int,
    autocast_dtype: torch.dtype | None,
) -> float:
    """Mean MSE of the quantized block over all rows of ``inputs`` (no gradients)."""
    batches = _epoch_batches(len(inputs), batch_size, False, torch.Generator())
    total, count = 0.0, 0
    with torch.no_grad():
        for rows, x, y in zip(batches, inputs.iter_batches(batches), targets.iter_batches(batches)):
            with _autocast(x.device, autocast_dtype):
                out = run_block(qblock, x, kwargs)
            total += nn.functional.mse_loss(out.float(), y.float(), reduction="sum").item()
            count += y.numel()
    return total / max(count, 1)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def train_block(
    qblock: nn.Module,
    block_index: int,
    train_in: ActivationStore,
    train_target: ActivationStore,
    val_in: ActivationStore,
    val_target: ActivationStore,
    kwargs: dict[str, Any],
    cfg: BlockTrainConfig,
    log: Callable[[dict[str, float]], None] = lambda metrics: None,
) -> BlockTrainResult:
    """Train ``qblock`` in place (see module docstring) and return its loss history."""
    device = train_in.device
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    groups = param_groups(qblock, cfg)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, **fused) if groups else None
    # fp16 autocast needs loss scaling (as in the original recipe); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.autocast_dtype == torch.float16)
    base_lrs = [g["lr"] for g in groups]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + block_index)
    steps_per_epoch = math.ceil(len(train_in) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    result = BlockTrainResult(block=block_index, steps=total_steps)
    result.init_val_loss = block_loss(qblock, val_in, val_target, kwargs, cfg.batch_size, cfg.autocast_dtype)
    best_val, bad_epochs, step = result.init_val_loss, 0, 0
    for epoch in range(cfg.epochs if optimizer else 0):
        qblock.train()
        batches = _epoch_batches(len(train_in), cfg.batch_size, cfg.shuffle, gen)
        epoch_loss = torch.zeros((), device=device)
        epoch_start = time.perf_counter()
        for x, y in zip(train_in.iter_batches(batches), train_target.iter_batches(batches)):
            factor = cosine_factor(step, total_steps, cfg.min_lr_factor)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            with _autocast(device, cfg.autocast_dtype):
                out = run_block(qblock, x, kwargs)
            loss = nn.functional.mse_loss(out.float(), y.float())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            epoch_loss += loss.detach()
            step += 1
        mean_loss = epoch_loss.item() / len(batches)  # .item() waits for the GPU: the epoch is timed whole
        result.epoch_seconds.append(time.perf_counter() - epoch_start)
        if not math.isfinite(mean_loss):
            raise TrainingDivergedError(
                f"block {block_index}: training loss is {mean_loss} in epoch {epoch}; lower quant.weight_lr "
                f"({cfg.weight_lr}) or quant.quant_lr ({cfg.quant_lr}), or train in float32"
            )
        qblock.eval()
        val = block_loss(qblock, val_in, val_target, kwargs, cfg.batch_size, cfg.autocast_dtype)
        result.train_loss.append(mean_loss)
        result.val_loss.append(val)
        metrics = {"block": block_index, "epoch": epoch, "train_loss": mean_loss, "val_loss": val,
                   "seconds": time.perf_counter() - start}
        metrics.update({f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
        if device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        log(metrics)
        if val < best_val:
            best_val, bad_epochs = val, 0
        else:
            bad_epochs += 1
            if cfg.early_stop and bad_epochs >= cfg.early_stop:
                break
    result.seconds = time.perf_counter() - start
    if device.type == "cuda":
        result.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def pack_block(qblock: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace each FakeQuantLinear by its PackedLinear and cast the rest (norms) to ``dtype``."""
    for name, module in list(qblock.named_modules()):
        if isinstance(module, FakeQuantLinear):
            set_submodule(qblock, name, module.to_packed(dtype))
    for module in qblock.modules():
        for pname, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and pname != "scales":
                param.data = param.data.to(dtype)
            param.requires_grad_(False)
    return qblock.eval()
