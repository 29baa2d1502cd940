"""E2E-QP training loop: only the per-group step sizes of a packed model learn, end to end.

Integer codes and zero points are buffers and stay bitwise fixed; every other parameter is
frozen. Step sizes train as fp32 master copies (fp16 would swallow updates of lr ~1e-5) and
go back to fp16 for saving. The data order is a pure function of (seed, step), so a checkpoint
needs only the step count besides optimizer/scheduler/step-size state, and a resumed run
replays exactly the batches an uninterrupted one would see, on any number of processes: each
global batch is split over ranks and micro-batches, and the loss is normalised by the scored
tokens of the whole global batch, so the summed gradient does not depend on the split.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from efficientqat.distributed import DistContext
from efficientqat.e2e_data import IGNORE_INDEX, Examples
from efficientqat.errors import ConfigError, DataError, ModelLoadError, TrainingDivergedError
from efficientqat.qlinear import PackedLinear
from efficientqat.run_folder import RunFolder, atomic_path


@dataclass(frozen=True)
class E2ETrainConfig:
    lr: float
    weight_decay: float
    warmup_ratio: float
    epochs: int
    max_steps: int | None
    global_batch: int
    micro_batch: int
    grad_clip: float | None
    gradient_checkpointing: bool
    autocast_dtype: torch.dtype | None
    eval_every: int
    save_every: int
    seed: int

    def total_steps(self, n_train: int) -> int:
        """Optimizer steps: whole global batches per epoch times epochs, capped by ``max_steps``."""
        per_epoch = n_train // self.global_batch
        if per_epoch == 0:
            raise DataError(f"E2E data has {n_train} training examples, fewer than one global batch of "
                            f"{self.global_batch}; use more data or a smaller e2e_train.global_batch")
        total = per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def micro_batches_per_rank(self, world: int) -> int:
        """Gradient accumulation steps: global batch = micro batch x accumulation x world size."""
        if self.global_batch % (self.micro_batch * world):
            raise ConfigError(f"e2e_train.global_batch={self.global_batch} is not a multiple of "
                              f"micro_batch={self.micro_batch} x {world} processes")
        return self.global_batch // (self.micro_batch * world)


def trainable_step_sizes_(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze everything, then make each PackedLinear's step sizes an fp32 trainable Parameter."""
    model.requires_grad_(False)
    step_sizes = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            module.scales = nn.Parameter(module.scales.detach().float(), requires_grad=True)
            step_sizes[f"{name}.scales"] = module.scales
    if not step_sizes:
        raise ModelLoadError("the model has no packed (quantized) layers: nothing for E2E-QP to train")
    return step_sizes


def freeze_step_sizes_(model: nn.Module) -> None:
    """Step sizes back to frozen fp16, the packed format's dtype."""
    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.scales = nn.Parameter(module.scales.detach().to(torch.float16), requires_grad=False)


def batch_indices(step: int, n_train: int, global_batch: int, seed: int) -> list[int]:
    """Examples of global batch ``step``: a fresh seeded permutation per epoch, no example twice per epoch."""
    epoch, pos = divmod(step, n_train // global_batch)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + epoch))
    return order[pos * global_batch : (pos + 1) * global_batch].tolist()


def _summed_nll(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                autocast: torch.dtype | None) -> torch.Tensor:
    """Sum of next-token NLL over scored tokens (labels != -100)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else nullcontext()
    with ctx:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                       reduction="sum")


@torch.no_grad()
def validation_loss(model: nn.Module, val: Examples, cfg: E2ETrainConfig, ctx: DistContext, pad_id: int) -> dict[str, float]:
    """Mean next-token loss and perplexity on the validation examples, split over ranks."""
    was_training = model.training
    model.eval()
    mine = list(range(ctx.rank, len(val), ctx.world))
    totals = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(mine), cfg.micro_batch):
        idx = mine[start : start + cfg.micro_batch]
        totals[0] += _summed_nll(model, val.batch(idx, pad_id), ctx.device, cfg.autocast_dtype).item()
        totals[1] += val.scored_tokens(idx)
    ctx.all_reduce_sum(totals)
    model.train(was_training)
    loss = float(totals[0] / totals[1])
    return {"val/loss": loss, "val/ppl": math.exp(loss)}


def _checkpoint_path(run: RunFolder, step: int):
    return run.ckpt / f"e2e_step_{step:06d}.pt"


def _save_checkpoint(run: RunFolder, step: int, step_sizes: dict[str, nn.Parameter],
                     optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Write the checkpoint atomically, then commit it in state.json, then drop the previous one."""
    state = {
        "step": step,
        "step_sizes": {k: p.detach().cpu() for k, p in step_sizes.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    with atomic_path(_checkpoint_path(run, step)) as tmp:
        torch.save(state, tmp)
    previous = run.state.get("step")
    run.commit(step=step)
    if previous and previous != step:
        _checkpoint_path(run, previous).unlink(missing_ok=True)


def _load_checkpoint(run: RunFolder, step_sizes: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                     scheduler: Any) -> int:
    step = int(run.state.get("step", 0))
    if not step:
        return 0
    state = torch.load(_checkpoint_path(run, step), map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, p in step_sizes.items():
            p.copy_(state["step_sizes"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return step


def train_step_sizes_(
    model: nn.Module, step_sizes: dict[str, nn.Parameter], train: Examples, val: Examples, cfg: E2ETrainConfig,
    run: RunFolder, ctx: DistContext, pad_id: int, log: Callable[[dict[str, Any]], None],
) -> dict[str, float]:
    """Train the step sizes in place (resuming from ``run``'s checkpoint); returns the final validation metrics."""
    total = cfg.total_steps(len(train))
    accumulation = cfg.micro_batches_per_rank(ctx.world)
    params = list(step_sizes.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)
    start = _load_checkpoint(run, step_sizes, optimizer, scheduler)
    model.to(ctx.device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = DistributedDataParallel(model, broadcast_buffers=False) if ctx.world > 1 else model
    per_rank = cfg.global_batch // ctx.world
    metrics: dict[str, float] = {}
    bar = tqdm(total=total, initial=start, desc="E2E-QP", disable=not ctx.is_main)
    for step in range(start, total):
        indices = batch_indices(step, len(train), cfg.global_batch, cfg.seed)
        scored = train.scored_tokens(indices)
        mine = indices[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]
        nll_sum = torch.zeros((), dtype=torch.float64)
        for j in range(accumulation):
            micro = mine[j * cfg.micro_batch : (j + 1) * cfg.micro_batch]
            sync = ctx.world == 1 or j == accumulation - 1
            with nullcontext() if sync else wrapped.no_sync():
                nll = _summed_nll(wrapped, train.batch(micro, pad_id), ctx.device, cfg.autocast_dtype)
                # Backward on this thread: Triton launches from autograd's device thread cost twice
                # the host time, which bound a layer's step (H200, 4096^2 at 2048 tokens: 0.72 ms
                # per forward+backward from that thread, 0.33 ms from this one).
                with torch.autograd.set_multithreading_enabled(False):
                    (nll * (ctx.world / scored)).backward()  # DDP averages over ranks: undo it
            nll_sum += nll.item()
        loss = float(ctx.all_reduce_sum(nll_sum) / scored)
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"E2E-QP loss became {loss} at step {step + 1}; lower e2e_train.lr")
        grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        metrics = {"step": done, "train/loss": loss, "train/lr": scheduler.get_last_lr()[0],
                   "train/grad_norm": float(grad_norm)}
        if done % cfg.eval_every == 0 or done == total:
            metrics.update(validation_loss(model, val, cfg, ctx, pad_id))
        if ctx.is_main:
            log(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        if done % cfg.save_every == 0 or done == total:
            if ctx.is_main:
                _save_checkpoint(run, done, step_sizes, optimizer, scheduler)
            ctx.barrier()
    bar.close()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return metrics if "val/loss" in metrics else validation_loss(model, val, cfg, ctx, pad_id)
