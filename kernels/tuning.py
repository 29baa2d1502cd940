"""Tile-configuration choice: candidate lists, on-GPU timing, and a json cache on disk.

Triton's ``@triton.autotune`` re-times every process start and (under ``TRITON_INTERPRET=1``)
cannot run more than one config, so the kernels here take their tile sizes as plain
constexprs and this module picks them:

* on the CPU interpreter, or when ``EFFICIENTQAT_AUTOTUNE=0``, the first valid candidate (a
  sound default) is used without timing;
* on a GPU every valid candidate is timed once per key (CUDA-graph replays with the L2
  flushed before each call, see ``_time_ms``) and the winner is stored in
  ``<dir>/kernel_configs.json``, where ``<dir>`` is ``$EFFICIENTQAT_CACHE_DIR`` or
  ``~/.cache/efficientqat``. The key holds the device name, the
  kernel, M's bucket, N, K, bits, group and dtype, so a later run starts tuned.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import triton

from efficientqat.packing import chunk_values

from .tiling import PDL_IN_TRITON, zero_workspaces

# Per Triton version: a new compiler changes which tiles are fastest (and which fit at all).
CACHE_FILE = f"kernel_configs-triton{triton.__version__}.json"


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch parameters of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    variant: int = 0  # kernel-specific alternative (gemm: 1 = load words once and expand; DENSE)
    fixup: bool = False  # decode split-K: the last program reduces through a workspace (no memset)
    pdl: bool = False  # decode: programmatic dependent launch (overlaps the previous kernel's tail)


DENSE = 9
"""``Config.variant`` of the decode-to-workspace + cuBLAS path (``dequant.py``) for M > 16."""
HALF2 = 8
"""``Config.variant`` of the paired-fp16 kernel for M <= 8 (``half2.py``)."""
HALF2_BITS = (2, 3, 4)
DENSE_CONFIG = Config(0, 0, 0, 1, 4, 1, DENSE)
DENSE_FIRST_M = 1024  # from this M on the dense path is the untuned default (compute-bound GEMMs)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    return os.environ.get("EFFICIENTQAT_AUTOTUNE", "1") != "0" and not interpreting()


def cache_path() -> Path:
    root = os.environ.get("EFFICIENTQAT_CACHE_DIR") or os.path.join(Path.home(), ".cache", "efficientqat")
    return Path(root) / CACHE_FILE


def m_bucket(m: int) -> int:
    """Round M up to a power of two (at least 1): tuned configs are shared within a bucket."""
    return 1 << max(0, (m - 1).bit_length())


class ConfigCache:
    """Process-wide view of the json cache; reads once, writes atomically after each new entry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, dict] | None = None
        self._path: Path | None = None

    def _load(self) -> dict[str, dict]:
        path = cache_path()
        if self._entries is None or path != self._path:
            self._path = path
            try:
                self._entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def get(self, key: str) -> Config | None:
        with self._lock:
            entry = self._load().get(key)
        try:
            return Config(**entry) if entry else None
        except TypeError:  # written by an older layout of Config
            return None

    def put(self, key: str, cfg: Config) -> None:
        """Merge into what the file holds now: other processes (ranks, a parallel sweep) may
        have written entries since this one read it."""
        with self._lock:
            entries = self._load()
            try:
                entries.update({k: v for k, v in json.loads(self._path.read_text()).items() if k not in entries})
            except (OSError, ValueError):
                pass
            entries[key] = asdict(cfg)
            path = self._path
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(entries, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only home still works, it only re-tunes next time


CACHE = ConfigCache()
_MEMO: dict[str, Config] = {}


def chosen_configs() -> dict[str, dict]:
    """The configuration every kernel key of this process launches with (what a benchmark
    records beside its timings, so a speed can be traced to the tiles and launch variants)."""
    return {key: asdict(cfg) for key, cfg in _MEMO.items()}


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """Cached: the key is built on every call of a quantized layer."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def make_key(kernel: str, device: torch.device, **fields: object) -> str:
    return "|".join([device_name(device), kernel] + [f"{k}={v}" for k, v in fields.items()])


FLUSH_BYTES = 64 << 20  # more than the L2 of an H100/H200 (50/60 MB)


def _graph_ms(body: Callable[[], object], calls: int = 20) -> float:
    """Median time of one ``body()`` replayed from a CUDA graph of ``calls`` copies."""
    import statistics

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # allocator and lazy initialisation outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            body()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _time_ms(fn: Callable[[], object], flush_ms: list[float]) -> float:
    """Device time of ``fn`` with a cold L2, as a layer runs inside a model.

    Timed from CUDA-graph replays of (L2 flush, fn) minus the flush alone (``flush_ms`` caches
    it per tuning). Events around single launches also time the host-side launch: on an H200
    with torch 2.11 / triton 3.6 one E2E-QP layer step with six Triton launches took 1.0 ms of
    host time, so a 16 us decode kernel timed that way is mostly launch, and the tuner picked
    a tile 20% slower than the best of a graph-timed sweep. Where capture fails (e.g. inside
    another capture), plain event timing.
    """
    import triton.testing

    try:
        flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
        if not flush_ms:
            flush_ms.append(_graph_ms(flush.zero_))
        return _graph_ms(lambda: (flush.zero_(), fn())) - flush_ms[0]
    except Exception:
        return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def _agrees(out: object, ref: object) -> bool:
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return True
    a, b = out.float(), ref.float()
    if not torch.isfinite(a).all():
        return False
    return bool((a - b).norm() <= 1e-2 * b.norm() + 1e-6)


def choose(key: str, candidates: Callable[[], Iterable[Config]], run: Callable[[Config], object]) -> Config:
    """The config to launch for ``key``: memoised, cached on disk, else timed (GPU) or the first.
    ``candidates`` is called only on a miss: building the lists costs 10-20 us of Python, which
    every layer call would otherwise pay."""
    cfg = _MEMO.get(key)
    if cfg is not None:
        return cfg
    cands = list(candidates())
    if not cands:
        raise ValueError(f"no valid kernel configuration for {key}")
    if not autotune_enabled():
        cfg = cands[0]
        if not interpreting():  # GPU, tuning off: the first candidate that compiles and fits
            for c in cands:
                try:
                    run(c)
                except Exception:  # e.g. triton OutOfResources (shared memory) for this tile
                    continue
                cfg = c
                break
        _MEMO[key] = cfg
        return cfg
    cfg = CACHE.get(key)
    if cfg is None:
        best, best_ms, ref, flush_ms = cands[0], float("inf"), None, []
        for c in cands:
            try:
                out = run(c)
                # A variant that compiles but computes something else (a compiler version the
                # tests never saw) must not win on speed: check it against the first that ran.
                if ref is None:
                    ref = out
                elif not _agrees(out, ref):
                    continue
                ms = _time_ms(lambda: run(c), flush_ms)
            except Exception:  # e.g. out of shared memory for this tile: skip it
                continue
            if ms < best_ms:
                best, best_ms = c, ms
        zero_workspaces()  # a rejected configuration may have left partial sums behind
        cfg = best
        CACHE.put(key, cfg)
    _MEMO[key] = cfg
    return cfg


def _fits(group: int, block_k: int, K: int) -> bool:
    return block_k <= group and group % block_k == 0 and K % block_k == 0


def _fit_k(block_k: int, group: int, K: int) -> int:
    """Halve ``block_k`` until one K step lies inside one group (32 always does: checked upstream)."""
    while block_k > 32 and not _fits(group, block_k, K):
        block_k //= 2
    return block_k


def gemm_candidates(M: int, N: int, K: int, group: int) -> list[Config]:
    """M > 16 forward. Larger tiles for larger M; split-K for mid M with few output tiles."""
    table = [
        (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3), (64, 128, 64, 1, 4, 4), (128, 128, 32, 1, 4, 4),
        (256, 128, 64, 1, 8, 3), (128, 64, 64, 1, 4, 4), (64, 256, 64, 1, 8, 3), (128, 128, 128, 1, 8, 2),
    ]
    if M <= 256:
        table = [
            (32, 128, 128, 4, 4, 3), (64, 128, 64, 2, 4, 4), (32, 64, 128, 4, 4, 4), (64, 64, 128, 4, 4, 3),
            (16, 128, 128, 8, 4, 3), (64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3), (32, 256, 64, 4, 8, 3),
        ]
    out = []
    for bm, bn, bk, split, warps, stages in table:
        bk = _fit_k(bk, group, K)
        split = max(1, min(split, K // bk))
        if _fits(group, bk, K):
            out.append(Config(bm, bn, bk, split, warps, stages))
    out += [Config(c.block_m, c.block_n, c.block_k, c.split_k, c.num_warps, c.num_stages, 1) for c in out[:4]]
    if M > 256:  # W as the register (A) operand of wgmma: tiles that compile without spills
        for bm, bn, bk, warps, stages in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4)]:
            bk = _fit_k(bk, group, K)
            if _fits(group, bk, K):
                out.append(Config(bm, bn, bk, 1, warps, stages, 2))
    return _with_dense(list(dict.fromkeys(out)), M)


def _with_dense(fused: list[Config], M: int) -> list[Config]:
    """Add the decode + cuBLAS path: first (the untuned default) for large M, where only the
    three leading fused tiles stay as challengers (on an H200 the best fused GEMMs took 2.0-2.2x
    its time at M >= 2048, so timing all of them would only add minutes of compilation), else last."""
    return [DENSE_CONFIG] + fused[:3] if M >= DENSE_FIRST_M else fused + [DENSE_CONFIG]


def grad_input_candidates(M: int, N: int, K: int, group: int) -> list[Config]:
    table = [
        (128, 64, 128, 8, 3), (128, 128, 64, 8, 3), (64, 64, 128, 4, 4), (128, 64, 64, 4, 4),
        (256, 64, 128, 8, 3), (128, 128, 128, 8, 2), (64, 128, 64, 4, 4),
    ]
    out = []
    for bm, bn, bk, warps, stages in table:
        bk = _fit_k(bk, group, K)
        if _fits(group, bk, K):
            out.append(Config(bm, bn, bk, 1, warps, stages))
    return _with_dense(list(dict.fromkeys(out)), M)


def grad_scales_candidates(M: int, N: int, K: int, group: int) -> list[Config]:
    table = [
        (64, 128, 128, 8, 3), (32, 128, 128, 8, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 4),
        (32, 256, 128, 8, 3), (128, 128, 128, 8, 2), (64, 64, 64, 4, 4),
    ]
    out = []
    for bm, bn, bk, warps, stages in table:
        ok = K % bk == 0 and ((bk <= group and group % bk == 0) or (bk % group == 0 and (group & (group - 1)) == 0))
        if ok:
            out.append(Config(bm, bn, bk, 1, warps, stages))
        elif K % 32 == 0 and group % 32 == 0:
            out.append(Config(bm, bn, 32, 1, warps, stages))
    return _with_dense(list(dict.fromkeys(out)), M)


GEMV1_TABLE = [
    # (BLOCK_N, warps, BLOCK_C, programs per SM, variant (1: prefetch), pipeline stages), H200:
    # the best tiles of pipelines/sweep_decode.py at 8192^2 (w4g128, w3g128, w2g64) and
    # 28672x8192 (the only shape where a pipelined loop won, by 2%), and of the previous
    # candidate list at 4096^2.
    # BLOCK_N >= 128 * warps puts every thread on 4-column vectors of all BLOCK_C rows, so the
    # per-step row sums stay in-thread; BLOCK_C shrinks to fit the group (w2g64, w3g128: 4).
    (2048, 8, 16, 2, 0, 1), (1024, 2, 4, 4, 0, 1), (512, 2, 4, 4, 0, 1), (2048, 8, 8, 2, 0, 1),
    (1024, 4, 8, 2, 0, 1), (512, 4, 4, 4, 1, 1), (1024, 8, 4, 2, 1, 1), (512, 4, 8, 4, 1, 1),
    (512, 2, 8, 4, 0, 3),
]


def gemv1_candidates(N: int, K: int, bits: int, group: int, sms: int = 132) -> list[Config]:
    """M = 1 CUDA-core kernel; ``block_k`` holds BLOCK_C (packed chunks per step, one step inside
    one group), ``split_k`` is sized so the grid gives each of ``sms`` SMs the table's programs,
    ``variant`` 1 prefetches the next step's words, ``num_stages`` > 1 pipelines the step loop."""
    out = [gemv1_config(N, K, bits, group, sms, *row) for row in GEMV1_TABLE]
    return list(dict.fromkeys(c for c in out if c is not None))


HALF2_TABLE = [
    # (BLOCK_N at M = 1, warps, BLOCK_C, programs per SM). H200, pipelines/sweep_decode.py at
    # 8192^2, M = 1: the best w4g128 tile (13.4 us against 16.0 for the float32 kernel), the best
    # w2g64 one (12.3 against 15.8), the runner-up; then the best at M = 4 (as 512 columns,
    # 28.5 us against 31.7 for the tensor-core kernel). BLOCK_N shrinks with the rows so that a
    # thread's fp16 sums (rows x columns registers) stay at 16.
    (2048, 8, 16, 2), (2048, 4, 4, 4), (1024, 4, 16, 4), (2048, 4, 8, 2),
]


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: compute capability 9.0 on, a Triton that launches with it,
    compiled kernels (not the CPU interpreter)."""
    return (PDL_IN_TRITON and not interpreting() and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))


def launch_twins(cfg: Config, pdl: bool) -> list[Config]:
    """``cfg`` reducing split-K in the kernel (``fixup``, where it splits K), and with ``pdl`` the
    same under programmatic dependent launch."""
    fixed = replace(cfg, fixup=cfg.split_k > 1)
    return [fixed] + ([replace(fixed, pdl=True)] if pdl else [])


def with_launch_variants(cands: list[Config], pdl: bool, lead: int = 2) -> list[Config]:
    """Decode candidates, then the :func:`launch_twins` of the ``lead`` first (the tables are
    ordered best first): the tuner keeps them only if they time faster."""
    twins = [t for c in cands[:lead] for t in launch_twins(c, pdl)]
    return list(dict.fromkeys(cands + [t for t in twins if t.fixup or t.pdl]))


def half2_candidates(M: int, N: int, K: int, bits: int, group: int, sms: int = 132) -> list[Config]:
    """Paired-fp16 kernel (fp16 x, 2/4-bit codes, M <= 8; empty otherwise), for the tuner to set
    after the measured kernels of the same M; ``block_m`` is M rounded up to a power of two."""
    if bits not in HALF2_BITS or M > 8:
        return []
    block_m = m_bucket(M)
    out = []
    for block_n, warps, block_c, per_sm in HALF2_TABLE:
        block_n = max(32 * warps, block_n // block_m)
        cfg = gemv1_config(N, K, bits, group, sms, block_n, warps, block_c, per_sm, HALF2, 1)
        if cfg is not None:
            out.append(replace(cfg, block_m=block_m))
    return list(dict.fromkeys(out))


def gemv1_config(N: int, K: int, bits: int, group: int, sms: int, block_n: int, warps: int, block_c: int,
                 per_sm: int, variant: int, stages: int) -> Config | None:
    """One M = 1 tile for this layer: BLOCK_C halved until a step fits inside a group (and to 4
    for 3 bits, whose chunks are three words), split-K sized for ``per_sm`` programs per SM,
    ``stages`` > 1 software-pipelines the step loop (cp.async ring in shared memory).
    None where no step fits a group."""
    vpc = chunk_values(bits)
    while block_c > 1 and (group % (block_c * vpc) or bits == 3 and block_c > 4):
        block_c //= 2
    if group % (block_c * vpc):
        return None
    split = max(1, min(K // (block_c * vpc), round(per_sm * sms / -(-N // block_n))))
    return Config(1, block_n, block_c, split, warps, stages, variant)


GEMV_TC_TABLE = [
    # (BLOCK_N, BLOCK_C, split-K, warps, stages). H200, pipelines/sweep_decode.py at 8192^2, M = 4
    # and 16: the best w4g128 tiles (steps fold scales, 256 columns), then w2g64 / w3g128 (128).
    (256, 16, 8, 4, 3), (256, 16, 32, 4, 2), (256, 16, 8, 8, 3), (128, 16, 8, 4, 2),
    (128, 16, 4, 4, 2), (128, 16, 16, 4, 2), (64, 16, 8, 4, 2), (128, 32, 4, 4, 2),
]


def gemv_tc_candidates(N: int, K: int, bits: int) -> list[Config]:
    """M = 2..16 tensor-core kernel loading each word once; ``block_k`` holds BLOCK_C (>= 16 for
    the dot depth). Any K: a last step short of BLOCK_C chunks is masked; split-K is capped at
    the step count."""
    vpc = chunk_values(bits)
    out = []
    for bn, bc, split, warps, stages in GEMV_TC_TABLE:
        steps = -(-K // (bc * vpc))
        out.append(Config(16, bn, bc, max(1, min(split, steps)), warps, stages))
    return list(dict.fromkeys(out))
