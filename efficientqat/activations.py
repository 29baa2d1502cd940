"""Storage for the per-sequence hidden states that flow between blocks during Block-AP.

Block-AP keeps two chains of activations for every calibration sequence (the full-precision
chain and the quantized chain). For a 7B model with 4096 x 2048-token windows each chain is
64 GB, so the store can live on the GPU (fastest), in pinned CPU memory with the next batch
copied on a side stream while the current one trains, or in a memory-mapped file on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from efficientqat.errors import ConfigError

LOCATIONS = ("gpu", "cpu", "disk")


def choose_location(
    requested: str, bytes_needed: int, device: torch.device, gpu_fraction: float = 0.25, cpu_fraction: float = 0.5
) -> str:
    """Pick where activations live: the requested place, or for ``auto`` the fastest that fits.

    ``auto`` keeps them on the GPU only while they take at most ``gpu_fraction`` of its memory
    (the block, its optimizer state and its autograd buffers need the rest), else in CPU memory
    up to ``cpu_fraction`` of what is available, else on disk.
    """
    if requested != "auto":
        if requested not in LOCATIONS:
            raise ConfigError(f"activations.location='{requested}' must be one of {LOCATIONS} or 'auto'")
        if requested == "gpu" and device.type != "cuda":
            raise ConfigError("activations.location='gpu' needs a CUDA device")
        return requested
    if device.type == "cuda" and bytes_needed <= gpu_fraction * torch.cuda.get_device_properties(device).total_memory:
        return "gpu"
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        import os

        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return "cpu" if bytes_needed <= cpu_fraction * available else "disk"


class ActivationStore:
    """``n`` sequences of ``[seqlen, hidden]`` activations at one location, read/written by batch."""

    def __init__(
        self,
        n: int,
        seqlen: int,
        hidden: int,
        dtype: torch.dtype,
        location: str,
        device: torch.device,
        file: Path | None = None,
    ) -> None:
        self.shape = (n, seqlen, hidden)
        self.location, self.device, self.dtype = location, device, dtype
        if location == "gpu":
            self.data = torch.empty(self.shape, dtype=dtype, device=device)
        elif location == "cpu":
            self.data = torch.empty(self.shape, dtype=dtype, pin_memory=device.type == "cuda")
        elif location == "disk":
            if file is None:
                raise ConfigError("a disk activation store needs a file path")
            file.parent.mkdir(parents=True, exist_ok=True)
            numel = n * seqlen * hidden
            self.data = torch.from_file(str(file), shared=True, size=numel, dtype=dtype).view(self.shape)
        else:
            raise ConfigError(f"unknown activation location '{location}'")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, start: int, values: torch.Tensor) -> None:
        """Store a batch of sequences at rows ``start .. start + len(values)``."""
        self.data[start : start + values.shape[0]].copy_(values.detach(), non_blocking=False)

    def read(self, rows: Sequence[int] | slice) -> torch.Tensor:
        """A batch of rows on the compute device."""
        if isinstance(rows, slice):
            return self.data[rows].to(self.device, non_blocking=True)
        index = torch.as_tensor(rows, dtype=torch.long, device=self.data.device)
        return self.data.index_select(0, index).to(self.device, non_blocking=True)

    def iter_batches(self, batches: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        """Yield each batch on the compute device, copying the next one while the current is used.

        Off-GPU stores gather rows into pinned staging buffers and upload them on a side
        stream, so host-to-device copies overlap the training step.
        """
        if self.location == "gpu" or self.device.type != "cuda":
            for rows in batches:
                yield self.read(rows)
            return
        stream = torch.cuda.Stream(self.device)
        staging = [None, None]

        def upload(i: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            rows = torch.as_tensor(batches[i], dtype=torch.long)
            slot = i % 2
            if staging[slot] is None or staging[slot].shape[0] != len(rows):
                staging[slot] = torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype, pin_memory=True)
            torch.index_select(self.data, 0, rows, out=staging[slot])
            with torch.cuda.stream(stream):
                out = staging[slot].to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            return out, event

        pending = upload(0) if batches else None
        for i in range(len(batches)):
            out, event = pending
            torch.cuda.current_stream(self.device).wait_event(event)
            out.record_stream(torch.cuda.current_stream(self.device))
            if i + 1 < len(batches):
                # the staging slot of batch i+1 was last read by the upload of batch i-1, which is done
                stream.synchronize()
                pending = upload(i + 1)
            yield out

    def state_tensor(self) -> torch.Tensor:
        """The whole store as one CPU-addressable tensor (for snapshots)."""
        return self.data if self.location != "gpu" else self.data.cpu()

    def load_tensor(self, values: torch.Tensor) -> None:
        if tuple(values.shape) != self.shape:
            raise ConfigError(f"activation snapshot has shape {tuple(values.shape)}, expected {self.shape}")
        self.data.copy_(values)
