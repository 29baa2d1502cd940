"""Tile-configuration choice: on-GPU timing of the candidates (``candidates.py``) and a json cache on disk.

Triton's ``@triton.autotune`` re-times every process start and (under ``TRITON_INTERPRET=1``)
cannot run more than one config, so the kernels here take their tile sizes as plain
constexprs and this module picks them:

* on the CPU interpreter, or when ``EFFICIENTQAT_AUTOTUNE=0``, the first valid candidate (a
  sound default) is used without timing;
* on a GPU every valid candidate is compiled first, several at once in worker threads
  (``_precompile``, ``$EFFICIENTQAT_COMPILE_THREADS``), then timed once per key (CUDA-graph replays with the L2
  flushed before each call, see ``cold_time_ms``), the leaders twice more (``_fastest``), and the
  winner is stored in
  ``<dir>/kernel_configs-triton<version>-<source hash>.json`` (:data:`CACHE_FILE`), where ``<dir>`` is ``$EFFICIENTQAT_CACHE_DIR`` or
  ``~/.cache/efficientqat``. The key holds the device name, the
  kernel, M's bucket, N, K, bits, group and dtype, so a later run starts tuned.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import triton
from triton.runtime.errors import OutOfResources

from .tiling import PDL_IN_TRITON, compile_only, zero_workspaces

log = logging.getLogger(__name__)


def sources_digest(folder: Path) -> str:
    """A short hash of the ``*.py`` sources in ``folder``: the tuned choice is only as good as
    the kernels and candidate tables it was made among."""
    digest = hashlib.sha1()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:10]


# Per Triton version (a new compiler changes which tiles are fastest, and which fit at all) and
# per kernel source: new kernels or candidate tiles must get their chance against an old choice.
CACHE_FILE = f"kernel_configs-triton{triton.__version__}-{sources_digest(Path(__file__).parent)}.json"


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
    lanes: int = 1  # paired-fp16 decode at M = 1: K steps summed side by side in one program
    early: bool = False  # paired-fp16 decode under pdl: the first step's codes requested before the wait
    prefetch: int = 0  # decode: steps of codes asked of L2 ahead of their loads (prefetch.py)
    vectors: int = 1  # fragment-order decode: units of K (fragments.step_k) a lane, tile and step (fragments.py)
    x_ahead: bool = True  # fragment-order decode: x requested ahead with the codes (False: just before use)


DENSE = 9
"""``Config.variant`` of the decode-to-workspace + cuBLAS path (``dequant.py``) for M > 16."""
HALF2 = 8
"""``Config.variant`` of the paired-fp16 kernel (``half2.py``, M <= 8; offered up to :data:`HALF2_MAX_M`)."""
HALF2_BITS = (2, 3, 4)
HALF2_MAX_M = 4
"""Largest M the tuner offers the paired-fp16 kernel at. Its x fma repeats per row (sm_90 SASS:
1.5 instructions per weight and row at 4 rows, 1.65 at 8) while the tensor-core kernel's cost
per weight does not grow with M (4.8): on the H200 it won M = 4 (28.5 against 32.5 us at 8192^2
w4g128, session 4) and lost every M = 8 key the tuner timed (w4g128 session 7, w3g128 session
11: 68 us a gate/up call with the SiLU epilogue, where the tensor-core kernel averaged 30 us over
the other three layers), and its tiles were 14-26 of an M = 8 key's 44-56 candidates."""
UNFUSED = 10
"""``Config.variant`` of an epilogue's challenger: the plain tuned matmul, then the epilogue in
PyTorch (the SiLU epilogue runs in the paired-fp16 and tensor-core decode kernels, only in tiles
that sum in one program; those can be slower than the best tile plus two elementwise launches)."""
KMAJOR = 11
"""``Config.variant`` of the M = 1 kernel over K-major codes (``kmajor.py``: whole columns a
program, no split-K), offered only for layers whose codes are stored K-major."""
FRAGMENTS = 12
"""``Config.variant`` of the ``mma.sync`` decode kernel over codes in fragment order
(``fragments.py``, M <= 16, ``block_k`` = steps loaded ahead), offered only for layers that hold
such codes."""
DENSE_CONFIG = Config(0, 0, 0, 1, 4, 1, DENSE)
UNFUSED_CONFIG = Config(0, 0, 0, 1, 4, 1, UNFUSED)
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


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: compute capability 9.0 on, a Triton that launches with it,
    compiled kernels (not the CPU interpreter)."""
    return (PDL_IN_TRITON and not interpreting() and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))


def chains_decode_launches(device: torch.device) -> bool:
    """Whether decode launches (M <= 16) go out under programmatic dependent launch: wherever
    :func:`pdl_supported`, unless ``EFFICIENTQAT_PDL=0``. H200, 7B w2g64 fused decode step at
    batch 1: 1632 against 1792 us a step (session 14)."""
    return pdl_supported(device) and os.environ.get("EFFICIENTQAT_PDL", "1") != "0"


def chained_twins(cands: list[Config]) -> list[Config]:
    """The decode candidates as a chained launch runs them: one kernel a call (split-K reduced in
    the kernel, or no split), under PDL, and each paired-fp16 tile also with its first codes
    requested before the wait (``early``).

    The tuner times the code that will run. On an H200 (session 15) the PDL build of a tile ran
    1-5 us slower than the plain one for every w4g128 / w3g128 paired-fp16 tile at 8192^2 (loads
    forced ahead of the wait: more registers, fewer programs per SM), so a tile chosen unchained
    and then chained lost up to 2.4 us a call. A split-K tile that zeroes its output first puts a
    memset (no PDL launch) in front of every call, which ends the chain: tuned with it, a 7B w2g64
    decode step spent 27 us on 32 fills and its kernels no longer overlapped (1758 us a step
    against 1632). How much of a tile's time hides behind the kernel before it is what the chained
    timing (:func:`chained_time_ms`) measures."""
    tiles = [c for c in cands if c.variant not in (DENSE, UNFUSED) and (c.fixup or c.split_k == 1)]
    return list(dict.fromkeys([replace(c, pdl=True) for c in tiles]
                              + [replace(c, pdl=True, early=True) for c in tiles if c.variant == HALF2]
                              + [c for c in cands if c.variant in (DENSE, UNFUSED)]))


def make_key(kernel: str, device: torch.device, **fields: object) -> str:
    return "|".join([device_name(device), kernel] + [f"{k}={v}" for k, v in fields.items()])


FLUSH_BYTES = 64 << 20  # more than the L2 of an H100/H200 (50/60 MB)


def _graph_ms(body: Callable[[], object], calls: int = 20) -> float:
    """Median time of one ``body()`` replayed from a CUDA graph of ``calls`` copies."""
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


def cold_time_ms(fn: Callable[[], object], flush_ms: list[float]) -> float:
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


def weight_copies(*weights: torch.Tensor, total: int = FLUSH_BYTES) -> list[tuple[torch.Tensor, ...]]:
    """``weights`` and clones of them, enough that together they hold ``total`` bytes (default
    :data:`FLUSH_BYTES`, more than the L2): a chain of calls rotating over them streams every
    call's weights from DRAM, as consecutive layers of a model do."""
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    count = min(64, max(2, -(-total // max(1, nbytes))))
    return [weights] + [tuple(w.clone() for w in weights) for _ in range(count - 1)]


def chained_time_ms(calls: list[Callable[[], object]]) -> float:
    """Device time per call of ``calls`` (one layer's launch on each of its
    :func:`weight_copies`) replayed back to back from a CUDA graph, each chained behind the one
    before as a decode step chains its layers.

    Under programmatic dependent launch the time of a call depends on the kernel before it: its
    programs take the SMs as that kernel's last wave drains, and an ``early`` tile requests its
    codes before the wait. Behind an L2 flush (:func:`cold_time_ms`) there is little tail to fill.
    On an H200 (session 16) tiles chosen that way took 1534 us a 7B w2g64 decode step where
    session 14's tiles with their codes requested early took 1504 (588 against 609 tokens/s)."""
    import triton.testing

    try:
        return _graph_ms(lambda: [call() for call in calls], calls=max(1, 64 // len(calls))) / len(calls)
    except Exception:
        return float(triton.testing.do_bench(calls[0], warmup=5, rep=25, return_mode="median"))


def _agrees(out: object, ref: object) -> bool:
    if not isinstance(out, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return True
    a, b = out.float(), ref.float()
    if not torch.isfinite(a).all():
        return False
    return bool((a - b).norm() <= 1e-2 * b.norm() + 1e-6)


def choose(key: str, candidates: Callable[[], Iterable[Config]], run: Callable[[Config], object],
           chain: bool = False, copies: Callable[[], list[Callable[[Config], object]]] | None = None) -> Config:
    """The config to launch for ``key``: memoised, cached on disk, else timed (GPU) or the first.
    With ``chain`` (:func:`chains_decode_launches`) the candidates are their
    :func:`chained_twins`, tuned and cached under their own key (``key|pdl``), and where the
    caller gives ``copies`` (``run`` on each of the layer's :func:`weight_copies`, built on a miss)
    timed in a chain of the layer behind itself (:func:`chained_time_ms`). ``candidates`` is
    called only on a miss: building the lists costs 10-20 us of Python, which every layer call
    would otherwise pay."""
    if chain:
        key += "|pdl"
    cfg = _MEMO.get(key)
    if cfg is not None:
        return cfg
    cands = list(candidates())
    if chain:
        cands = chained_twins(cands)
    if not cands:
        raise ValueError(f"no valid kernel configuration for {key}")
    if not autotune_enabled():
        cfg = cands[0]
        if not interpreting():  # GPU, tuning off: the first candidate that compiles and fits
            for c in cands:
                try:
                    run(c)
                except Exception as err:  # e.g. triton OutOfResources (shared memory) for this tile
                    _log_skipped(c, err)
                    continue
                cfg = c
                break
    else:
        cfg = CACHE.get(key)
        if cfg is None:
            # a first start on a GPU tunes every layer shape for a minute or more: say why it waits
            log.info("tuning %s: timing %d tiles (once per GPU, kernel version and shape; kept in %s)",
                     key, len(cands), cache_path())
            start = time.perf_counter()
            cfg = _fastest(cands, run, copies if chain else None)
            zero_workspaces()  # a rejected configuration may have left partial sums behind
            CACHE.put(key, cfg)
            log.info("tuned %s in %.1f s: %s", key, time.perf_counter() - start, cfg)
    _MEMO[key] = cfg
    return cfg


FINALISTS = 3
"""Candidates timed again before the choice: one timing of a 10-15 us decode kernel varies by
~5% between calls (on an H200 the tuner once kept a tile 0.8 us slower than the best of a
sweep), so the leaders of the first pass are timed twice more and ranked by their median."""


def compile_threads() -> int:
    """Threads that compile candidate tiles before the tuner times them:
    ``$EFFICIENTQAT_COMPILE_THREADS``, else one per CPU core up to 8 (0 or 1: compile each tile
    when it is first timed)."""
    raw = os.environ.get("EFFICIENTQAT_COMPILE_THREADS", "").strip()
    if not raw:
        return min(8, os.cpu_count() or 1)
    if not raw.isdigit():
        raise ValueError(f"EFFICIENTQAT_COMPILE_THREADS must be a whole number of threads (0: off), not {raw!r}")
    return int(raw)


def _precompile(cands: list[Config], run: Callable[[Config], object]) -> None:
    """Compile every candidate's kernels side by side (``run`` under :func:`tiling.compile_only`,
    which launches nothing), so the timing loop finds them built. A first start tunes each
    layer shape of a model, and compiling dozens of tiles one after the other was most of it
    (session 10: a 3-bit key took over two minutes on an H200 host). Errors are left to the
    timing loop, which meets them again and skips the tile; nothing runs during a CUDA-graph
    capture, which another thread's allocations would break."""
    workers = min(compile_threads(), len(cands))
    cuda = torch.cuda.is_available()
    if workers < 2 or (cuda and torch.cuda.is_current_stream_capturing()):
        return
    device = torch.cuda.current_device() if cuda else None

    def build(cfg: Config) -> None:
        if device is not None:
            torch.cuda.set_device(device)  # a new thread starts on device 0
        with compile_only():
            try:
                run(cfg)
            except Exception:  # e.g. out of shared memory for this tile: the timing loop skips it
                pass

    with ThreadPoolExecutor(workers, thread_name_prefix="efficientqat-compile") as pool:
        list(pool.map(build, cands))


def _log_skipped(cfg: Config, err: Exception) -> None:
    """Say why the tuner skips a tile that failed to run. Out of resources (shared memory, registers)
    is a tile too large for this GPU: expected, at DEBUG. Anything else (a compile error under this
    Triton, a launch error) is a bug the other tiles would hide, as a Triton 3.6 compile failure of
    the fragment kernel was hidden on an H200 (session 24): a WARNING naming the tile and the error."""
    if isinstance(err, OutOfResources):
        log.debug("tile %s skipped: %s", cfg, err)
    else:
        lines = str(err).strip().splitlines()  # a CompilationError ends with its cause, after the source
        log.warning("tile %s failed and is skipped: %s%s", cfg, type(err).__name__, f": {lines[-1]}" if lines else "")


def _fastest(cands: list[Config], run: Callable[[Config], object],
             copies: Callable[[], list[Callable[[Config], object]]] | None = None) -> Config:
    """The candidate with the least device time among those that run and agree with the first
    that ran (a variant that compiles but computes something else, under a compiler version the
    tests never saw, must not win on speed); the first candidate if none runs. All candidates
    are compiled first, in parallel (:func:`_precompile`). Timed cold (:func:`cold_time_ms`), or
    with ``copies`` chained behind themselves (:func:`chained_time_ms`)."""
    _precompile(cands, run)
    times: dict[Config, list[float]] = {}
    ref, flush_ms = None, []
    try:
        runs = copies() if copies is not None else None
    except torch.cuda.OutOfMemoryError:  # no room for the copies: cold timings still choose soundly
        log.info("no memory for the weight copies of a chained timing: timing the tiles cold")
        runs = None

    def time_ms(c: Config) -> float:
        if runs is not None:
            return chained_time_ms([functools.partial(r, c) for r in runs])
        return cold_time_ms(lambda: run(c), flush_ms)
    for c in cands:
        try:
            out = run(c)
            if ref is None:
                ref = out
            elif not _agrees(out, ref):
                continue
            times[c] = [time_ms(c)]
        except Exception as err:  # e.g. out of shared memory for this tile: skip it
            _log_skipped(c, err)
            continue
    if not times:
        return cands[0]
    finalists = sorted(times, key=lambda c: times[c][0])[:FINALISTS]
    if len(finalists) > 1:
        for _ in range(2):
            for c in finalists:
                times[c].append(time_ms(c))
    return min(finalists, key=lambda c: statistics.median(times[c]))
