"""Program-to-tile mapping, tile write-back, launching (or compiling only) and launch chaining shared by the kernels in this package."""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from .tuning import Config

try:  # programmatic dependent launch (Hopper and later; Triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    PDL_IN_TRITON = True
except ImportError:
    PDL_IN_TRITON = False


def aligned_code_rows(qweight: torch.Tensor) -> bool:
    """Whether ``qweight``'s rows are N-major and start on 16-byte boundaries: what a TMA
    descriptor of the codes (``gemv.PAIRED_TMA``) and the L2 prefetch of their rows (:mod:`.prefetch`) need."""
    row_bytes = qweight.stride(0) * qweight.element_size()
    return qweight.stride(1) == 1 and qweight.data_ptr() % 16 == 0 and row_bytes % 16 == 0


def group_strides(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[int, int]:
    """The (group, column) element strides of ``scales`` and ``zeros`` ``[G, N]``, which every
    kernel reads through one pair: ``(N, 1)`` as a layer holds them, ``(1, G)`` where they are stored
    column-major beside K-major codes (``efficientqat.qlinear.store_codes_k_major``: a program of the
    K-major kernel then reads its columns' groups contiguously). Triton specialises a stride of 1,
    so the N-major kernels compile as before. A dimension of size 1 (per-channel groups) may have
    any stride."""
    strides = scales.stride()
    if strides == zeros.stride() and scales.shape == zeros.shape:  # every call of a layer: the cheap test first
        return strides

    def layout(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(stride if size > 1 else 0 for size, stride in zip(t.shape, t.stride()))

    if scales.shape != zeros.shape or layout(scales) != layout(zeros):
        raise ValueError(f"scales and zero points must share shape and strides, got {tuple(scales.shape)} "
                         f"strides {scales.stride()} and {tuple(zeros.shape)} strides {zeros.stride()}")
    return scales.stride(0), scales.stride(1)


def k_major_codes(qweight: torch.Tensor) -> bool:
    """Whether ``qweight [K b / 32, N]`` is stored K-major (each column's words contiguous:
    ``efficientqat.qlinear.store_codes_k_major``). Every kernel reads both layouts; the tuned
    choices differ, so the dispatch keys them apart."""
    return qweight.stride(0) == 1 and qweight.stride(1) != 1


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order: ``GROUP_M`` consecutive programs
    walk down one column of tiles, so the weight tile they share is still hot in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def grouped_tile_ranges(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_N]`` output tile of program ``program_id(0)`` in :func:`grouped_tile`
    order: its row and column offsets and their masks (``< M``, ``< N``)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def add_in_first_slice(acc, ptrs, mask, pid_k, ON: tl.constexpr):
    """With ``ON``, ``acc`` plus the values at ``ptrs`` (broadcast to acc's shape), added by the
    first K slice only: split-K partial sums then include them once."""
    if ON:
        if pid_k == 0:
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def add_bias(acc, b_ptr, offs_n, mask_n, pid_k, HAS_BIAS: tl.constexpr):
    """``acc + bias[offs_n]`` (broadcast over leading rows), added by the first K slice only."""
    return add_in_first_slice(acc, b_ptr + offs_n, mask_n, pid_k, HAS_BIAS)


@triton.jit
def store_split(y_ptrs, acc, mask, SPLIT_K: tl.constexpr):
    """Store the tile, or with split-K add this K slice's partial sum atomically into the
    buffer the launcher zeroed."""
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def silu_mul_interleaved(v):
    """``[BM, BN]`` with columns alternating 16 gate and 16 up values (``efficientqat.fused_mlp``'s
    ``ACT_BLOCK``; BN a multiple of 32) -> ``silu(gate) * up``, ``[BM, BN / 2]`` in the order of
    the gate columns."""
    BM: tl.constexpr = v.shape[0]
    BN: tl.constexpr = v.shape[1]
    gate, up = tl.split(tl.permute(tl.reshape(v, (BM, BN // 32, 2, 16)), (0, 1, 3, 2)))
    return tl.reshape(gate / (1.0 + tl.exp(-gate)) * up, (BM, BN // 2))


@triton.jit
def finish_tile(y_ptrs, v, mask, ACT: tl.constexpr):
    """Store a summed tile, or with ``ACT`` :func:`silu_mul_interleaved` of it (``y_ptrs`` and
    ``mask`` then cover the half-width output tile)."""
    if ACT:
        v = silu_mul_interleaved(v)
    tl.store(y_ptrs, v.to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def store_decode(y_ptrs, y_mask, acc, mask, ws_ptrs, count_ptr, SPLIT_K: tl.constexpr, FIXUP: tl.constexpr,
                 ACT: tl.constexpr):
    """Decode kernels' write-back: :func:`store_split`, or with ``FIXUP`` (split-K only) the
    partials go to a persistent float32 workspace and the last program of the column tile to
    arrive writes their sum: the output needs no zeroing, so a launch is one kernel instead of
    memset + kernel, and bf16 needs no cast launch. That program also zeroes the workspace and
    its tile counter again, the invariant every launch relies on (``split_k_workspace``).
    ``acc``, ``mask`` and ``ws_ptrs`` span the tile; ``y_ptrs`` and ``y_mask`` the output tile,
    half as wide with ``ACT`` (:func:`finish_tile`), which needs the whole sum: ``FIXUP`` or no split."""
    tl.static_assert(not ACT or FIXUP or SPLIT_K == 1, "the SiLU epilogue needs the whole sum in one program")
    if FIXUP:
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds happen before the arrival that releases them
        arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # read and zero in one atomic (on the words: the interpreter exchanges no floats)
            words = ws_ptrs.to(tl.pointer_type(tl.int32))
            total = tl.atomic_xchg(words, tl.zeros(acc.shape, tl.int32), mask=mask, sem="relaxed")
            finish_tile(y_ptrs, total.to(tl.float32, bitcast=True), y_mask, ACT)
            tl.atomic_xchg(count_ptr, 0, sem="relaxed")
    elif ACT:
        finish_tile(y_ptrs, acc, y_mask, ACT)
    else:
        store_split(y_ptrs, acc, mask, SPLIT_K)


@triton.jit
def load_unless_even(ptrs, mask, other, EVEN: tl.constexpr):
    """``tl.load(ptrs)`` where the tile is known to be whole (``EVEN``: no mask, none of the
    instructions a masked load adds), else masked with ``other`` where ``mask`` is off."""
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def wait_for_previous_grid(PDL: tl.constexpr):
    """Under programmatic dependent launch: wait until the previous kernel has finished and its
    writes (our x, the shared workspace) are visible. Only the packed codes may be read before
    this call: frozen integers that no kernel just before a matmul writes (scales and zero points
    may be: an optimizer step, the zero-point unpack on first use)."""
    if PDL:
        gdc_wait()


@triton.jit
def release_next_grid(PDL: tl.constexpr):
    """Under programmatic dependent launch: let the next kernel in the stream launch, its programs
    loading their codes up to their own :func:`wait_for_previous_grid`. Called once a program's
    main loop is done, so the next kernel's programs take room on the SMs as this one's last wave
    drains, not while programs of it still wait for room. (Triggered first thing, before session
    13, every decode matmul under PDL took 144 us a step longer, session 7.)"""
    if PDL:
        gdc_launch_dependents()


@dataclass
class SplitKWorkspace:
    """A device's zeroed float32 partial sums and int32 tile counters for :func:`store_decode`,
    and the stream that used them last."""

    sums: torch.Tensor
    counts: torch.Tensor
    stream: object = None


_WORKSPACES: dict[str, SplitKWorkspace] = {}


def split_k_workspace(device: torch.device, numel: int, tiles: int) -> SplitKWorkspace | None:
    """The device's workspace with room for ``numel`` sums and ``tiles`` counters, or None while
    a CUDA graph is being captured and it is missing or too small (nothing is allocated inside
    a capture: the caller falls back to a zeroed output). One per device, so a captured graph
    uses the buffers its eager warm-up made; launches on another stream first wait for the
    stream that used them last (two streams never overlap on them)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    entry = _WORKSPACES.get(str(device))
    if entry is None or entry.sums.numel() < numel or entry.counts.numel() < tiles:
        if capturing:
            return None
        entry = SplitKWorkspace(torch.zeros(max(numel, 1 << 16), device=device, dtype=torch.float32),
                                torch.zeros(max(tiles, 1024), device=device, dtype=torch.int32))
        _WORKSPACES[str(device)] = entry
    if device.type == "cuda" and not capturing:  # (a capture starts on a synchronised device)
        stream = torch.cuda.current_stream(device)
        if entry.stream is not None and entry.stream != stream:
            stream.wait_stream(entry.stream)
        entry.stream = stream
    return entry


RESERVED_SUMS = 1 << 21
"""Partial sums :func:`reserve_split_k_workspace` allocates: 8 MB, M = 16 over N = 131072 (a 70B
model's fused gate/up is 57344 columns)."""
RESERVED_TILES = 1 << 14


def reserve_split_k_workspace(device: torch.device) -> None:
    """Allocate the device's workspace now, at its reserved size: a model's first decode step
    may run under ``torch.compile``'s CUDA-graph trees (Hugging Face ``generate()`` with a static
    cache compiles decode steps), whose first, eager run sends allocations to the graph's pool
    and fails if any stays alive outside the outputs, as a workspace made there would."""
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        split_k_workspace(device, RESERVED_SUMS, RESERVED_TILES)


def zero_workspaces() -> None:
    """Restore the workspace invariant after launches that may have broken it (the tuner calls
    this after trying configurations, one of which may compute something else)."""
    for entry in _WORKSPACES.values():
        entry.sums.zero_()
        entry.counts.zero_()


def decode_output(x: torch.Tensor, N: int, cfg: Config, cols: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``(y, sums, counts, fixup)`` of a decode launch with config ``cfg`` (``x [M, K]``, ``N``
    columns summed, ``cols`` written: N unless an epilogue narrows them): with ``cfg.fixup`` and
    split-K, an uninitialised output in x's dtype and the device workspace; otherwise (or with
    no workspace to be had) :func:`split_k_buffer`, and the kernel ignores the other two."""
    if cfg.fixup and cfg.split_k > 1:
        entry = split_k_workspace(x.device, x.shape[0] * N, triton.cdiv(N, cfg.block_n))
        if entry is not None:
            return torch.empty((x.shape[0], cols or N), device=x.device, dtype=x.dtype), entry.sums, entry.counts, True
    y = split_k_buffer(x, cols or N if cfg.split_k == 1 else N, cfg.split_k)
    return y, y, y, False


_COMPILE_ONLY = threading.local()


@contextlib.contextmanager
def compile_only() -> Iterator[None]:
    """Within this block (in this thread), :func:`launcher` compiles kernels for their arguments
    and launches nothing: how the tuner builds all its candidate tiles side by side before timing
    them one by one (Triton's compiler releases the GIL for most of its work)."""
    previous = getattr(_COMPILE_ONLY, "active", False)
    _COMPILE_ONLY.active = True
    try:
        yield
    finally:
        _COMPILE_ONLY.active = previous


def launcher(kernel, grid) -> Callable[..., object]:
    """``kernel[grid]``; inside :func:`compile_only`, ``kernel.warmup`` for that grid (compile and
    cache, no launch; under the CPU interpreter it does nothing)."""
    if getattr(_COMPILE_ONLY, "active", False):
        return functools.partial(kernel.warmup, grid=grid)
    return kernel[grid]


def launch_options(cfg: Config) -> dict:
    """Launch keywords of a config: programmatic dependent launch where it asks for it."""
    return {"launch_pdl": True} if cfg.pdl else {}


def split_k_buffer(x: torch.Tensor, N: int, split: int) -> torch.Tensor:
    """The ``[M, N]`` output a launch writes: empty without split-K, else zeroed for the atomic
    adds. fp16 partials are added straight into the fp16 output (one memset, no extra cast
    launch: at M = 1 a launch costs a tenth of the kernel); bf16 keeps 8 mantissa bits, too few
    to add partials in, so it sums in float32 and the launcher casts."""
    if split == 1:
        return torch.empty((x.shape[0], N), device=x.device, dtype=x.dtype)
    return torch.zeros((x.shape[0], N), device=x.device, dtype=torch.float16 if x.dtype == torch.float16 else torch.float32)
