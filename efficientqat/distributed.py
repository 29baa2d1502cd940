"""Process-group handling for torchrun jobs: one code path for 1 process and N processes.

torchrun sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; without them the job is a single process
and every collective here is a no-op, so the training code never branches on the world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from efficientqat.errors import EfficientQATError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place; it may live on the CPU even when NCCL (GPU-only) is the backend."""
        if self.world > 1:
            on_device = tensor.to(self.device)
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            tensor.copy_(on_device)
        return tensor

    def main_first(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 and share whether it failed, so other ranks raise instead of hanging."""
        result, message = None, None
        if self.is_main:
            try:
                result = fn()
            except EfficientQATError as err:
                message = err
        if self.world > 1:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message is not None:
            raise message
        return result


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group when there is one (NCCL on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def shutdown(ctx: DistContext) -> None:
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
