"""Triton dequant-matmul kernels against a float64 reference.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
by conftest.py before anything imports triton), with fp32/fp16 activations and one config per
kernel (the interpreter mishandles bf16 ``tl.dot``; tuning is off there by design). With CUDA
the same tests run compiled on the GPU, plus the bf16 and autotuning tests at the end.
Every launch writes into NaN-poisoned buffers, so any output element the kernel skips fails.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from efficientqat.kernels import DequantMatmulFn, check_supported, dequant_linear, unpack_zeros  # noqa: E402
from efficientqat.kernels import candidates, tuning  # noqa: E402
from efficientqat.packing import chunk_values, pack_qweight, pack_qzeros  # noqa: E402
from efficientqat.qlinear import PackedLinear  # noqa: E402
from efficientqat.quantizer import QuantSpec  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEV == "cuda"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every float buffer the launchers allocate with torch.empty starts as NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield


def rand_layer(n: int, k: int, bits: int, group: int, gen: torch.Generator, scale_dtype=torch.float32):
    gl = k if group == -1 else group
    g = k // gl
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    z = torch.randint(0, 2**bits, (n, g), generator=gen)
    s = torch.rand(n, g, generator=gen, dtype=torch.float64) * 0.05 + 0.005
    qw = pack_qweight(q, bits).to(DEV)
    zeros = unpack_zeros(pack_qzeros(z, bits).to(DEV), bits, n)
    scales = s.t().contiguous().to(DEV, scale_dtype)
    return q, z, s, qw, zeros, scales, gl


def reference(x, q, z, scales, gl, bias=None):
    """float64 y, and a closure giving (dx, ds) for an upstream gradient dy."""
    zf = z.double().repeat_interleave(gl, 1)
    sd = scales.detach().double().cpu().t().clone().requires_grad_(True)
    xd = x.detach().double().cpu().requires_grad_(True)
    w = (q.double() - zf) * sd.repeat_interleave(gl, 1)
    y = xd @ w.t()
    if bias is not None:
        y = y + bias.double().cpu()

    def grads(dy):
        dx, ds = torch.autograd.grad(y, (xd, sd), dy.double().cpu())
        return dx, ds.t()

    return y.detach(), grads


def rel(a, b) -> float:
    a = a.detach().double().cpu()
    assert torch.isfinite(a).all(), "unwritten (NaN) or non-finite output"
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("m", [1, 5, 37])
def test_fp32_forward_and_grads(bits, group, m):
    gen = torch.Generator().manual_seed(1000 * bits + 10 * m + group)
    n, k = 96, 256
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen)
    scales.requires_grad_(True)
    x = torch.randn(m, k, generator=gen).to(DEV).requires_grad_(True)
    y = dequant_linear(x, qw, scales, zeros, None, bits, gl)
    ref, grads = reference(x, q, z, scales, gl)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert rel(y, ref) < 1e-5
    dy = torch.randn(m, n, generator=gen).to(DEV)
    y.backward(dy)
    dx_ref, ds_ref = grads(dy)
    assert rel(x.grad, dx_ref) < 1e-5
    assert scales.grad.dtype == torch.float32
    assert rel(scales.grad, ds_ref) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group,m", [(64, 1), (64, 16), (128, 33), (-1, 3), (32, 20)])
def test_fp16_forward_and_grads(bits, group, m):
    gen = torch.Generator().manual_seed(7 * bits + m)
    n, k = 128, 256
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen)
    scales.requires_grad_(True)
    bias = torch.randn(n, generator=gen).to(DEV, torch.float16)
    x = torch.randn(2, m, k, generator=gen).to(DEV, torch.float16).requires_grad_(True)
    y = dequant_linear(x, qw, scales, zeros, bias, bits, gl)
    assert y.shape == (2, m, n) and y.dtype == torch.float16
    ref, grads = reference(x.reshape(-1, k), q, z, scales, gl, bias)
    assert rel(y.reshape(-1, n), ref) < 3e-3
    dy = torch.randn(2, m, n, generator=gen).to(DEV, torch.float16)
    y.backward(dy)
    dx_ref, ds_ref = grads(dy.reshape(-1, n))
    assert x.grad.dtype == torch.float16
    assert rel(x.grad.reshape(-1, k), dx_ref) < 3e-3
    assert rel(scales.grad, ds_ref) < 3e-3


def test_only_scales_and_input_get_gradients():
    gen = torch.Generator().manual_seed(3)
    q, z, s, qw, zeros, scales, gl = rand_layer(64, 128, 4, 64, gen)
    scales.requires_grad_(True)
    x = torch.randn(4, 128, generator=gen).to(DEV)  # input needs no grad: only ds is computed
    y = DequantMatmulFn.apply(x, scales, qw, zeros, None, 4, gl)
    (ds,) = torch.autograd.grad(y.sum(), (scales,))
    assert ds.shape == scales.shape and torch.isfinite(ds).all()
    assert not qw.requires_grad and not zeros.requires_grad


def test_matches_packed_linear_torch_path():
    """The kernel gives what PackedLinear's dequantize-then-matmul path gives (with bias)."""
    gen = torch.Generator().manual_seed(5)
    spec = QuantSpec(3, 32)
    n, k = 64, 128
    codes = torch.randint(0, 8, (n, k), generator=gen, dtype=torch.int32)
    zero = torch.randint(0, 8, (n, 4), generator=gen, dtype=torch.int32)
    scale = torch.rand(n, 4, generator=gen) * 0.1 + 0.01
    bias = torch.randn(n, generator=gen)
    layer = PackedLinear.from_codes(codes, scale, zero, bias, spec, compute_dtype=torch.float32)
    x = torch.randn(9, k, generator=gen)
    expect = layer(x)  # CPU: the torch path
    assert not layer._use_kernel(x)
    layer = layer.to(DEV)
    got = dequant_linear(x.to(DEV), layer.qweight, layer.scales, layer.kernel_zeros(), layer.bias, 3, 32)
    assert rel(got, expect.double()) < 1e-5
    assert layer.kernel_zeros() is layer.kernel_zeros()  # cached, built once


def test_kernel_zeros_are_rebuilt_when_the_zero_points_change_and_prepared_on_a_gpu():
    """The cached kernel zero points follow an in-place change of ``qzeros`` (as an optimizer
    or a user edit makes), and ``prepare_kernel_zeros_`` builds them ahead of any compiled step
    for layers on a GPU only (elsewhere the PyTorch path runs and nothing is built)."""
    from efficientqat.qlinear import prepare_kernel_zeros_

    gen = torch.Generator().manual_seed(12)
    spec = QuantSpec(4, 64)
    codes = torch.randint(0, 16, (32, 128), generator=gen, dtype=torch.int32)
    zero = torch.randint(0, 15, (32, 2), generator=gen, dtype=torch.int32)
    layer = PackedLinear.from_codes(codes, torch.rand(32, 2, generator=gen) + 0.1, zero, None, spec).to(DEV)
    model = torch.nn.Sequential(layer)
    assert prepare_kernel_zeros_(model) is model
    assert (getattr(layer, "_kernel_zeros_cache", None) is not None) == (DEV == "cuda")
    before = layer.kernel_zeros().clone()
    assert torch.equal(before.cpu().t().long(), zero.long())
    layer.qzeros.copy_(pack_qzeros(zero + 1, 4).to(DEV))
    assert torch.equal(layer.kernel_zeros().cpu().t().long(), zero.long() + 1)


def test_compiled_graph_keeps_the_kernel_as_one_operator():
    """Under torch.compile (fullgraph: no break allowed) the no-grad call is the registered
    ``efficientqat::dequant_matmul`` operator, and the compiled function computes what eager does,
    with the elementwise work around it traced."""
    gen = torch.Generator().manual_seed(6)
    q, z, s, qw, zeros, scales, gl = rand_layer(64, 256, 4, 128, gen, scale_dtype=torch.float16)
    bias = torch.randn(64, generator=gen).to(DEV, torch.float16)
    x = torch.randn(2, 3, 256, generator=gen).to(DEV, torch.float16)

    def block(inp: torch.Tensor) -> torch.Tensor:
        return torch.relu(dequant_linear(inp * 0.5, qw, scales, zeros, bias, 4, gl)) + 1

    graphs = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    try:
        with torch.no_grad():
            got = torch.compile(block, fullgraph=True, backend=record)(x)
            expect = block(x)
    finally:
        torch._dynamo.reset()
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert "efficientqat.dequant_matmul.default" in targets
    assert got.shape == (2, 3, 64) and torch.equal(got, expect)


def test_rejects_unsupported_shapes():
    with pytest.raises(ValueError, match="multiples of 32"):
        check_supported(48, 64, 4, 48)
    with pytest.raises(ValueError, match="multiples of 32"):
        check_supported(64, 80, 4, 64)
    with pytest.raises(ValueError, match="group length"):
        check_supported(64, 64, 4, 16)
    x = torch.randn(2, 48)
    with pytest.raises(ValueError):
        dequant_linear(x, torch.zeros(6, 64, dtype=torch.int32), torch.ones(1, 64), torch.zeros(1, 64, dtype=torch.uint8), None, 4, 48)


def test_config_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTQAT_CACHE_DIR", str(tmp_path))
    cache = tuning.ConfigCache()
    cfg = tuning.Config(16, 128, 64, 4, 4, 3)
    cache.put("dev|gemv|m=1", cfg)
    assert tuning.ConfigCache().get("dev|gemv|m=1") == cfg
    assert (tmp_path / tuning.CACHE_FILE).exists() and triton.__version__ in tuning.CACHE_FILE
    assert tuning.m_bucket(1) == 1 and tuning.m_bucket(5) == 8 and tuning.m_bucket(2048) == 2048


def test_cache_file_names_the_kernel_sources_it_was_tuned_for(tmp_path):
    """A change to a kernel or a candidate table moves the cache to a new file, so new tiles are
    timed instead of an old choice being read back; other files and unchanged sources do not."""
    import efficientqat.kernels as package

    src = Path(package.__file__).parent
    for path in src.glob("*.py"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    assert tuning.sources_digest(tmp_path) == tuning.sources_digest(src)
    assert tuning.sources_digest(src) in tuning.CACHE_FILE
    (tmp_path / "notes.txt").write_text("not a source")
    assert tuning.sources_digest(tmp_path) == tuning.sources_digest(src)
    table = tmp_path / "candidates.py"
    table.write_text(table.read_text() + "\n# one more tile\n")
    assert tuning.sources_digest(tmp_path) != tuning.sources_digest(src)


def test_config_cache_keeps_entries_another_process_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTQAT_CACHE_DIR", str(tmp_path))
    ours, theirs = tuning.ConfigCache(), tuning.ConfigCache()
    assert ours.get("dev|a") is None and theirs.get("dev|b") is None  # both read the empty file
    a, b = tuning.Config(16, 128, 64, 4, 4, 3), tuning.Config(1, 256, 32, 8, 4, 1)
    theirs.put("dev|b", b)
    ours.put("dev|a", a)
    fresh = tuning.ConfigCache()
    assert fresh.get("dev|a") == a and fresh.get("dev|b") == b


def test_choose_builds_candidates_only_on_a_miss(monkeypatch):
    """The candidate lists are built once per key, not on every layer call (hot-path cost)."""
    monkeypatch.setattr(tuning, "_MEMO", {})
    monkeypatch.setattr(tuning, "autotune_enabled", lambda: False)  # untimed: the first candidate
    built = []

    def candidates():
        built.append(1)
        return [tuning.Config(1, 32, 1, 1, 4, 1), tuning.Config(1, 64, 1, 1, 4, 1)]

    first = tuning.choose("cpu|test|m=1", candidates, lambda c: None)
    again = tuning.choose("cpu|test|m=1", candidates, lambda c: None)
    assert first == again == tuning.Config(1, 32, 1, 1, 4, 1) and len(built) == 1


def test_tuner_times_the_leaders_again_before_choosing(tmp_path, monkeypatch, caplog):
    """One noisy first timing must not decide: A (truly 10) first reads 12 and B (truly 11) 11;
    the three leaders are re-timed and ranked by their median, the rest timed once. A tile that
    fails or computes something else never wins, however fast. A tile too large for the GPU is
    skipped quietly; one that fails otherwise (a compile error) is skipped with a warning that
    names it and the error's cause."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setenv("EFFICIENTQAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_MEMO", {})
    monkeypatch.setattr(tuning, "CACHE", tuning.ConfigCache())
    monkeypatch.setattr(tuning, "autotune_enabled", lambda: True)
    a, b, c, d, big, wrong, broken = (tuning.Config(1, n, 1, 1, 4, 1) for n in (32, 64, 128, 256, 512, 1024, 2048))
    samples = {a: [12.0, 10.0, 10.0], b: [11.0, 11.0, 11.0], c: [20.0, 20.0, 20.0], d: [30.0, 30.0, 30.0],
               wrong: [1.0, 1.0, 1.0]}
    current = []

    def run(cfg):
        if cfg == big:
            raise OutOfResources(300000, 232448, "shared memory")
        if cfg == broken:
            raise RuntimeError("at 58:22:\n    acc = _step_products(now, acc)\nAttributeError(\"no attribute 'type'\")")
        current[:] = [cfg]
        return torch.ones(4) * (2.0 if cfg == wrong else 1.0)

    def fake_time(fn, flush_ms):
        fn()
        return samples[current[0]].pop(0)

    monkeypatch.setattr(tuning, "cold_time_ms", fake_time)
    with caplog.at_level(logging.INFO, logger=tuning.__name__):
        assert tuning.choose("cpu|test|m=1", lambda: [b, big, d, broken, c, wrong, a], run) == a
    assert [len(samples[x]) for x in (a, b, c, d, wrong)] == [0, 0, 0, 2, 3]
    # the wait is announced with what is timed and where it is kept, the broken tile named, the choice reported
    started, skipped, done = caplog.records
    assert "cpu|test|m=1" in started.getMessage() and "7 tiles" in started.getMessage()
    assert str(tmp_path) in started.getMessage()
    assert skipped.levelno == logging.WARNING and "block_n=2048" in skipped.getMessage()
    assert skipped.getMessage().endswith("RuntimeError: AttributeError(\"no attribute 'type'\")")
    assert done.getMessage().startswith("tuned cpu|test|m=1 in ") and "block_n=32" in done.getMessage()
    caplog.clear()
    tuning._MEMO.clear()
    assert tuning.choose("cpu|test|m=1", lambda: [b, a], run) == a and not caplog.records  # from the cache: silent


def test_tuner_compiles_every_tile_in_worker_threads_before_timing_any(monkeypatch):
    """Each candidate is first run under ``compile_only`` in a compile thread (one that fails is
    left to the timing loop, which skips it), and only then timed, launching for real; with
    ``EFFICIENTQAT_COMPILE_THREADS=0`` nothing is built ahead; a bad value is named."""
    import threading

    from efficientqat.kernels import tiling

    tiles = [tuning.Config(1, n, 1, 1, 4, 1) for n in (32, 64, 128, 256)]
    events = []

    def run(cfg):
        ahead = getattr(tiling._COMPILE_ONLY, "active", False)
        events.append((cfg, ahead, threading.current_thread().name))
        if cfg == tiles[1]:
            raise RuntimeError("out of shared memory")
        return torch.ones(2)

    def fake_time(fn, flush_ms):
        fn()
        return float(events[-1][0].block_n)

    monkeypatch.setattr(tuning, "cold_time_ms", fake_time)
    monkeypatch.setenv("EFFICIENTQAT_COMPILE_THREADS", "3")
    assert tuning._fastest(tiles, run) == tiles[0]
    built = [e for e in events if e[1]]
    assert sorted(e[0].block_n for e in built) == [32, 64, 128, 256]
    assert all(name.startswith("efficientqat-compile") for _, _, name in built)
    first_timed = next(i for i, e in enumerate(events) if not e[1])
    assert first_timed == len(built) and not any(e[1] for e in events[first_timed:])
    assert threading.current_thread().name not in {name for _, _, name in built}

    events.clear()
    monkeypatch.setenv("EFFICIENTQAT_COMPILE_THREADS", "0")
    assert tuning._fastest(tiles, run) == tiles[0] and not any(e[1] for e in events)
    for bad in ("many", "-3"):
        monkeypatch.setenv("EFFICIENTQAT_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="EFFICIENTQAT_COMPILE_THREADS"):
            tuning._fastest(tiles, run)


def test_compile_only_launches_nothing():
    """Under ``compile_only`` a launcher builds its kernel (here the interpreter's no-op warm-up)
    but runs none: the zeroed split-K output stays zero, while the same call outside computes."""
    from efficientqat.kernels import tiling
    from efficientqat.kernels.half2 import gemv_half2_forward

    gen = torch.Generator().manual_seed(5)
    q, z, s, qw, zeros, scales, gl = rand_layer(64, 256, 4, 64, gen)
    x = torch.randn(1, 256, generator=gen).half()
    cfg = tuning.Config(1, 64, 1, 2, 4, 1, tuning.HALF2)  # split-K by atomics into a zeroed output
    with tiling.compile_only():
        assert getattr(tiling._COMPILE_ONLY, "active", False)
        idle = gemv_half2_forward(x, qw, scales.half(), zeros, None, 4, 64, cfg)
    assert not getattr(tiling._COMPILE_ONLY, "active", False)
    assert idle.abs().max() == 0
    assert gemv_half2_forward(x, qw, scales.half(), zeros, None, 4, 64, cfg).abs().max() > 0


def test_candidates_respect_groups():
    for group in (32, 64, 128, 4096):
        for cands in (candidates.gemm_candidates(64, 4096, 4096, group),
                      candidates.gemm_candidates(4096, 4096, 4096, group),
                      candidates.grad_input_candidates(4096, 4096, 4096, group)):
            fused = [c for c in cands if c.variant != tuning.DENSE]
            assert fused and all(group % c.block_k == 0 and 4096 % c.block_k == 0 for c in fused)
        for bits in (2, 3, 4, 8):  # M = 1: one step (BLOCK_C chunks) never leaves its group
            vpc = chunk_values(bits)
            cands = candidates.gemv1_candidates(8192, 4096, bits, group)
            assert cands and all(group % (c.block_k * vpc) == 0 for c in cands)
            assert all(1 <= c.split_k <= 4096 // (c.block_k * vpc) for c in cands)


def test_m1_tiles_come_with_split_k_balanced_per_step():
    """Every M = 1 tile whose split-K leaves some programs more K steps than others also comes
    with split-K raised to the next divisor of the step count, so that all programs stream the
    same number of steps (the 7B gate/up layer: 32 steps at split 24 timed 21% slower than at 32)."""
    for N, K, bits, group in ((22016, 4096, 4, 128), (22016, 4096, 2, 64), (4096, 11008, 3, 128), (4096, 4096, 4, 128)):
        for cands in (candidates.gemv1_candidates(N, K, bits, group), candidates.half2_candidates(1, N, K, bits, group)):
            assert any(K // (c.block_k * chunk_values(bits)) % c.split_k for c in cands)  # the case arises
            for c in cands:
                steps = K // (c.block_k * chunk_values(bits))
                twin = candidates.balanced_split(c, K, bits)
                assert twin in cands and replace(twin, split_k=c.split_k) == c
                assert steps % twin.split_k == 0 and c.split_k <= twin.split_k <= steps
                assert not any(steps % d == 0 for d in range(c.split_k, twin.split_k))  # the next one
    twin = candidates.balanced_split(tuning.Config(1, 2048, 16, 24, 8, 1, tuning.HALF2), 4096, 4)
    assert twin.split_k == 32


def test_m1_paired_tiles_include_eight_columns_a_thread_on_every_7b_layer():
    """Each thread of the paired-fp16 kernel pays its set-up and split-K reduction whatever its
    share of the tile, so every 7B layer shape (w4g128, w2g64) must be offered a tile between the
    4-column one (3.9 SASS instructions a weight at 4096^2) and the 16-column ones that leave
    4096-row layers under one program per SM."""
    for bits, group in ((4, 128), (2, 64)):
        for N, K in ((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008)):
            eight = [c for c in candidates.half2_candidates(1, N, K, bits, group) if c.block_n == 8 * 32 * c.num_warps]
            assert any(-(-N // c.block_n) * c.split_k >= 132 for c in eight), (N, K, bits)


def test_m1_lane_tiles_divide_the_steps_and_drop_split_k_where_they_can():
    for bits, group in ((4, 128), (2, 64), (3, 128)):
        for N, K in ((4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008), (8192, 8192)):
            lanes = [c for c in candidates.half2_candidates(1, N, K, bits, group) if c.lanes > 1]
            assert lanes and all(c not in candidates.half2_candidates(2, N, K, bits, group) for c in lanes)
            for c in lanes:
                steps = K // (c.block_k * chunk_values(bits))
                assert steps % (c.split_k * c.lanes) == 0 and c.lanes & (c.lanes - 1) == 0 and c.block_m == 1
                assert group % (c.block_k * chunk_values(bits)) == 0
    # a 7B o_proj at w4g128 and w3g128: whole K in one program, no split-K reduction at all
    assert any(c.split_k == 1 for c in candidates.lane_candidates(4096, 4096, 4, 128))
    assert any(c.split_k == 1 for c in candidates.lane_candidates(4096, 4096, 3, 128))


def test_m1_lane_tiles_run(monkeypatch):
    """Every lane tile offered for a small layer launches and matches float64 (interpreter)."""
    from efficientqat.kernels.half2 import gemv_half2_forward

    gen = torch.Generator().manual_seed(9)
    q, z, s, qw, zeros, scales, gl = rand_layer(128, 512, 4, 128, gen, scale_dtype=torch.float16)
    x = torch.randn(1, 512, generator=gen).to(DEV, torch.float16)
    ref = reference(x, q, z, scales, gl)[0]
    tiles = candidates.lane_candidates(128, 512, 4, 128)
    assert tiles
    for cfg in tiles[:3]:  # interpreter time: the three leading tiles
        assert rel(gemv_half2_forward(x, qw, scales, zeros, None, 4, gl, replace(cfg, fixup=cfg.split_k > 1)), ref) < 3e-3


def test_register_wgmma_tiles_only_where_triton_compiles_them(monkeypatch):
    """Triton 3.6 aborts compiling the codes as wgmma's register operand: its tuner must not be
    offered those tiles (the sweep and the GPU test stopped on them), while 3.9 gets both kinds."""
    from efficientqat.kernels.gemv import PAIRED_CODES, PAIRED_TMA, PAIRED_WGMMA, PAIRED_XTILE

    assert not candidates.compiles_register_wgmma("3.6.0") and candidates.compiles_register_wgmma("3.9.0")
    assert candidates.compiles_register_wgmma("4.0.1")
    for version, wanted in (("3.6.0", {PAIRED_CODES, PAIRED_XTILE, PAIRED_TMA}),
                            ("3.9.0", {PAIRED_CODES, PAIRED_WGMMA, PAIRED_XTILE, PAIRED_TMA})):
        monkeypatch.setattr(candidates.triton, "__version__", version)
        tiles = candidates.gemv_tc_candidates(8192, 8192, 4, 128, torch.float16)
        assert {c.variant for c in tiles} - {0} == wanted


def test_paired_tiles_are_offered_pipelined_and_in_one_stage():
    """Each paired-code tile also comes with one stage (its codes loaded straight into registers:
    the layout study's M = 16 kernel ran 25.4 against the tuned kernel's 35.3 us, session 16), and
    that one once more with x read as one tile a step (the study kernel's way), then with its codes
    through TMA at two and three stages (the step after asked of L2), nothing else."""
    from efficientqat.kernels.gemv import PAIRED_CODES, PAIRED_TMA, PAIRED_XTILE

    tiles = candidates.gemv_tc_candidates(8192, 8192, 4, 128, torch.float16)
    paired = [c for c in tiles if c.variant == PAIRED_CODES]
    x_tile = [c for c in tiles if c.variant == PAIRED_XTILE]
    tma = [c for c in tiles if c.variant == PAIRED_TMA]
    assert any(c.num_stages > 1 for c in paired)
    assert all(replace(c, num_stages=1) in paired for c in paired)
    assert x_tile == [replace(c, variant=PAIRED_XTILE) for c in paired if c.num_stages == 1]
    assert tma == [replace(c, variant=PAIRED_TMA, num_stages=s, prefetch=1) for c in x_tile for s in (2, 3)]


def test_paired_tiles_reach_the_tuner_with_both_write_backs():
    """At M = 8 the tuner chose split-K by atomics over the in-kernel reduction for the largest
    decode layers (session 7): each split-K paired-code tile must be offered both ways too."""
    from efficientqat.kernels.autograd import decode_candidates
    from efficientqat.kernels.gemv import PAIRED_CODES

    x = torch.zeros(8, 4096, dtype=torch.float16)
    paired = [c for c in decode_candidates(x, 8, 12288, 4096, 4, 128) if c.variant == PAIRED_CODES and not c.pdl]
    split = {replace(c, fixup=False) for c in paired if c.split_k > 1}
    assert split and all(replace(c, fixup=f) in paired for c in split for f in (False, True))


def test_fp16_m1_tuning_keeps_one_float32_tile_before_the_paired_ones():
    """fp16 at M = 1: the float32 kernel's tiles never won there, so one stays (reference and
    fallback, first); bf16, which the paired kernel cannot take, keeps them all."""
    from efficientqat.kernels.autograd import decode_candidates

    fp16 = decode_candidates(torch.zeros(1, 4096, dtype=torch.float16), 1, 4096, 4096, 2, 64)
    bf16 = decode_candidates(torch.zeros(1, 4096, dtype=torch.bfloat16), 1, 4096, 4096, 2, 64)
    float32_tiles = [c for c in fp16 if c.variant != tuning.HALF2]
    assert float32_tiles == [fp16[0]] == [bf16[0]]
    assert len(bf16) > 1 and all(c.variant != tuning.HALF2 for c in bf16)
    assert {c.variant for c in fp16[1:]} == {tuning.HALF2}


@pytest.mark.skipif(not GPU, reason="bf16 tl.dot and autotuning need a GPU")
@pytest.mark.parametrize("bits,group", [(4, 128), (3, 128), (2, 64)])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_gpu_bf16_autotuned(bits, group, m, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTQAT_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(bits * 100 + m)
    n, k = 1024, 2048
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen)
    scales.requires_grad_(True)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16).requires_grad_(True)
    y = dequant_linear(x, qw, scales, zeros, None, bits, gl)
    ref, grads = reference(x, q, z, scales, gl)
    assert rel(y, ref) < 1e-2
    dy = torch.randn(m, n, generator=gen).to(DEV, torch.bfloat16)
    y.backward(dy)
    dx_ref, ds_ref = grads(dy)
    assert rel(x.grad, dx_ref) < 1e-2 and rel(scales.grad, ds_ref) < 1e-2
    if tuning.autotune_enabled():
        assert (tmp_path / tuning.CACHE_FILE).exists()


@pytest.mark.skipif(not GPU, reason="the bf16 slab is cuBLAS's: CUDA only")
@pytest.mark.parametrize("bits,group", [(4, 128), (2, 64)])
def test_gpu_bf16_scale_gradient_from_a_bf16_slab(bits, group, monkeypatch):
    """bf16 inputs fold a bf16 x^T dy slab (the weight gradient's own precision): the scale
    gradient stays within 1% of float64, over 512-column slabs and a ragged last one."""
    from efficientqat.kernels import dequant

    monkeypatch.setattr(dequant, "SLAB_BYTES", 4 * 1024 * 512)
    gen = torch.Generator().manual_seed(bits + group)
    n, k, m = 1280, 1024, 2048
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.bfloat16)
    dy = torch.randn(m, n, generator=gen).to(DEV, torch.bfloat16)
    _, grads = reference(x, q, z, scales, gl)
    ds = dequant.dense_grad_scales(x, dy, qw, zeros, bits, gl, tuning.DENSE_CONFIG)
    assert ds.dtype == torch.float32 and rel(ds, grads(dy)[1]) < 1e-2


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 3])
def test_decode_paths_fp16(bits, m):
    """K = 512 so that M <= 16 takes the load-once tensor-core kernel for every bit width."""
    gen = torch.Generator().manual_seed(11 * bits + m)
    n, k = 64, 512
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, 128, gen, scale_dtype=torch.float16)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.float16)
    y = dequant_linear(x, qw, scales, zeros, None, bits, gl)
    ref, _ = reference(x, q, z, scales, gl)
    assert rel(y, ref) < 3e-3


@pytest.mark.parametrize("bits,group", [(4, 128), (2, 64), (8, 64), (2, -1), (3, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_tc_scales_per_step_or_per_weight(bits, group, dtype):
    """The tensor-core decode kernel at M = 1, 5 and 16, split-K 1 and 3, with bias: scale and
    zero point folded once per step where a step of 16 chunks lies inside one group (4-bit g128,
    8-bit g64, per-channel), applied per weight where it does not (2-bit g64)."""
    from efficientqat.kernels.gemv import gemv_tc_forward

    gen = torch.Generator().manual_seed(bits * 7 + group)
    n, k = 64, 1024
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(DEV, dtype)
    folds = gl % (16 * chunk_values(bits)) == 0
    for m in (1, 5, 16):
        x = torch.randn(m, k, generator=gen).to(DEV, dtype)
        ref = reference(x, q, z, scales, gl, bias)[0]
        for split in (1, 3):
            y = gemv_tc_forward(x, qw, scales, zeros, bias, bits, gl, tuning.Config(16, 32, 16, split, 4, 1))
            assert y.shape == (m, n) and y.dtype == dtype
            assert rel(y, ref) < (1e-5 if dtype == torch.float32 else 3e-3), (m, split, folds)


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 128), (2, 64)])
def test_gemv_tc_silu_mul_epilogue(bits, group):
    """With ``silu_mul`` the tensor-core kernel writes silu(gate) * up of an interleaved gate/up
    layer: against float64 through the PyTorch de-interleave, at M = 3 and 8, one summing program
    or split-K reduced in the kernel, plain and paired codes, a partial column tile (N = 96 over
    64-column tiles), with bias."""
    from efficientqat.fused_mlp import silu_mul_interleaved
    from efficientqat.kernels.gemv import PAIRED_CODES, PAIRED_TMA, PAIRED_XTILE, gemv_tc_forward, pairs_codes

    gen = torch.Generator().manual_seed(bits + group)
    n, k = 96, 512
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(DEV, torch.float16)
    for m in (3, 8):
        x = torch.randn(m, k, generator=gen).to(DEV, torch.float16)
        ref = silu_mul_interleaved(reference(x, q, z, scales, gl, bias)[0])
        for block_n, block_c, split, fixup, variant in ((64, 16, 1, False, 0), (32, 16, 2, True, 0),
                                                        (64, 4, 2, True, PAIRED_CODES),
                                                        (64, 4, 2, True, PAIRED_XTILE), (64, 4, 2, True, PAIRED_TMA)):
            if variant and not pairs_codes(bits, gl, x.dtype, block_c):
                continue
            cfg = tuning.Config(16, block_n, block_c, split, 4, 1, variant, fixup=fixup)
            y = gemv_tc_forward(x, qw, scales, zeros, bias, bits, gl, cfg, silu_mul=True)
            assert y.shape == (m, n // 2) and rel(y, ref) < 3e-3, (m, block_n, split, variant)


@pytest.mark.parametrize("bits,group,block_c", [(4, 128, 16), (4, -1, 16), (2, 256, 16), (2, -1, 8),
                                                 (2, 64, 4), (4, 32, 4)])
def test_gemv_tc_paired_codes_match_float64(bits, group, block_c):
    """The tensor-core kernel with codes taken as fp16 pairs ``1024 + q`` (two fields per and-or,
    no float conversion; the offset folded out per step with the zero point), as mma.sync's B or
    wgmma's A operand, with x as one tile a step split in registers, and so with the codes
    through TMA descriptors, against float64, at M =
    1, 5 and 16, split-K 1 and 3 (fixup workspace and atomics), with bias; 4-chunk steps put
    two slot pairs in each dot (w2g64, w4g32). A clear error where pairs do not apply (float32 x)."""
    from efficientqat.kernels.gemv import (PAIRED_CODES, PAIRED_TMA, PAIRED_WGMMA, PAIRED_XTILE, gemv_tc_forward,
                                           pairs_codes)

    gen = torch.Generator().manual_seed(bits * 11 + group)
    n, k = 96, 512  # two or more groups at each size; 2-bit 16-chunk steps: 2, so split 3 leaves a slice none
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(DEV, torch.float16)
    assert pairs_codes(bits, gl, torch.float16, block_c) and not pairs_codes(bits, gl, torch.float32, block_c)
    assert not pairs_codes(bits, gl, torch.float16, 4 * block_c) or group == -1  # a step past the group
    for m in (1, 5, 16):
        x = torch.randn(m, k, generator=gen).to(DEV, torch.float16)
        ref = reference(x, q, z, scales, gl, bias)[0]
        for variant, split, fixup in ((PAIRED_CODES, 1, False), (PAIRED_CODES, 3, False), (PAIRED_CODES, 3, True),
                                      (PAIRED_WGMMA, 1, False), (PAIRED_WGMMA, 3, True),
                                      (PAIRED_XTILE, 1, False), (PAIRED_XTILE, 3, True), (PAIRED_TMA, 3, True)):
            cfg = tuning.Config(16, 32, block_c, split, 4, 1, variant, fixup=fixup)
            y = gemv_tc_forward(x, qw, scales, zeros, bias, bits, gl, cfg)
            assert y.shape == (m, n) and y.dtype == torch.float16
            assert rel(y, ref) < 3e-3, (m, variant, split, fixup)
    with pytest.raises(ValueError, match="paired codes need"):
        gemv_tc_forward(x.float(), qw, scales, zeros, None, bits, gl, tuning.Config(16, 32, block_c, 1, 4, 1, PAIRED_CODES))


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 128), (2, 64)])
def test_every_kernel_reads_k_major_codes(bits, group):
    """Every kernel takes the codes' and the scales' strides: the same codes stored K-major (each
    column's words contiguous) beside column-major scales and zero points, as
    ``store_codes_k_major`` leaves a layer, give the float64 result in all three decode kernels
    (split-K with the in-kernel reduction), both GEMMs, the decoded-workspace path and both
    backward kernels of each kind; the scale gradients come back in the scales' layout."""
    from efficientqat.kernels.backward import grad_input, grad_scales
    from efficientqat.kernels.dequant import dense_forward, dense_grad_input, dense_grad_scales
    from efficientqat.kernels.gemm import gemm_forward
    from efficientqat.kernels.gemv import PAIRED_CODES, gemv1_forward, gemv_tc_forward
    from efficientqat.kernels.half2 import gemv_half2_forward

    gen = torch.Generator().manual_seed(bits * 7)
    n, k = 64, 512  # four groups of 128, eight of 64
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
    k_major = qw.t().contiguous().t()
    assert k_major.stride() == (1, qw.shape[0]) and torch.equal(k_major, qw)
    scales, zeros = (t.t().contiguous().t() for t in (scales, zeros))
    assert scales.stride() == zeros.stride() == (1, k // gl)
    x = torch.randn(40, k, generator=gen).to(DEV, torch.float16)
    ref, grads = reference(x, q, z, scales, gl)
    tc = tuning.Config(16, 32, 16, 2, 4, 1, PAIRED_CODES if bits == 4 else 0, fixup=True)  # a GPU dot: K >= 16
    assert rel(gemv_tc_forward(x[:16], k_major, scales, zeros, None, bits, gl, tc), ref[:16]) < 3e-3
    assert rel(gemv1_forward(x[:1], k_major, scales, zeros, None, bits, gl, tuning.Config(1, 32, 1, 3, 4, 1)),
               ref[:1]) < 3e-3
    half2 = tuning.Config(4, 32, 1, 2, 4, 1, tuning.HALF2, fixup=True)
    assert rel(gemv_half2_forward(x[:3], k_major, scales, zeros, None, bits, gl, half2), ref[:3]) < 3e-3
    for variant in (0, 1, 2):  # codes loaded per value, words expanded once, W as the A operand
        cfg = tuning.Config(16, 32, 32, 1, 4, 1, variant)
        assert rel(gemm_forward(x, k_major, scales, zeros, None, bits, gl, cfg), ref) < 3e-3, variant
    assert rel(dense_forward(x, k_major, scales, zeros, None, bits, gl, tuning.DENSE_CONFIG), ref) < 3e-3
    dy = torch.randn(40, n, generator=gen).to(DEV, torch.float16)
    dx_ref, ds_ref = grads(dy)
    fused = tuning.Config(16, 32, 32, 1, 4, 1)
    for dx in (grad_input(dy, k_major, scales, zeros, bits, gl, k, fused),
               dense_grad_input(dy, k_major, scales, zeros, bits, gl, k, tuning.DENSE_CONFIG)):
        assert rel(dx, dx_ref) < 3e-3
    for ds in (grad_scales(x, dy, k_major, zeros, bits, gl, fused),
               dense_grad_scales(x, dy, k_major, zeros, bits, gl, tuning.DENSE_CONFIG)):
        assert rel(ds, ds_ref) < 3e-3 and ds.stride() == scales.stride()


def test_kernels_refuse_scales_and_zero_points_of_different_layouts():
    from efficientqat.kernels.tiling import group_strides

    gen = torch.Generator().manual_seed(2)
    q, z, s, qw, zeros, scales, gl = rand_layer(32, 512, 4, 128, gen, scale_dtype=torch.float16)
    assert group_strides(scales, zeros) == (32, 1)
    with pytest.raises(ValueError, match="share shape and strides"):
        group_strides(scales.t().contiguous().t(), zeros)
    with pytest.raises(ValueError, match="share shape and strides"):
        dequant_linear(torch.randn(1, 512, device=DEV), qw, scales, zeros.t().contiguous().t(), None, 4, gl)


@pytest.mark.parametrize("bits,group,block_c,k", [(3, 128, 16, 1280), (3, -1, 16, 1280), (2, 64, 32, 1280),
                                                 (4, 128, 32, 1152), (8, 64, 32, 1088)])
def test_gemv_tc_ragged_last_step(bits, group, block_c, k):
    """K not a multiple of a step (3-bit K = 11008 is 21.5 steps of 16 chunks): the last step's
    missing chunks must add nothing, whichever program (split-K 1, 2, 5) gets it; the output is
    poisoned so a column no program writes fails."""
    from efficientqat.kernels.gemv import gemv_tc_forward

    gen = torch.Generator().manual_seed(bits * 13 + k)
    n = 96
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
    assert k % (block_c * chunk_values(bits))  # the case under test
    for m in (2, 16):
        x = torch.randn(m, k, generator=gen).to(DEV, torch.float32)
        ref = reference(x, q, z, scales, gl)[0]
        for split in (1, 2, 5):
            cfg = tuning.Config(16, 32, block_c, split, 4, 1)
            y = gemv_tc_forward(x, qw, scales, zeros, None, bits, gl, cfg)
            assert rel(y, ref) < 1e-5, (m, split)


def test_launch_variants_twin_every_split():
    base = [tuning.Config(1, 512, 4, 8, 4, 1), tuning.Config(1, 512, 4, 1, 4, 1), tuning.Config(1, 256, 4, 4, 4, 1)]
    fixed = [replace(base[0], fixup=True), replace(base[2], fixup=True)]  # split-K 1 has nothing to reduce
    assert candidates.with_launch_variants(base) == base + fixed


def test_chained_choice_times_the_tiles_as_they_launch_under_pdl(monkeypatch, tmp_path):
    """``choose(..., chain=True)`` times every tile that is one kernel a call under programmatic
    dependent launch, and each paired-fp16 tile also with its first codes requested before the
    wait (``early``); split-K tiles that zero their output first (a memset launch before each
    call) are left out; dense and unfused challengers stay as they are. The pick is cached under
    ``key|pdl``, apart from the unchained key's. Tuning off, the first tile goes out under PDL.
    ``chains_decode_launches`` holds where PDL is supported unless ``EFFICIENTQAT_PDL=0``."""
    monkeypatch.setenv("EFFICIENTQAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_MEMO", {})
    monkeypatch.setattr(tuning, "CACHE", tuning.ConfigCache())
    cuda_core = tuning.Config(1, 512, 4, 8, 4, 1, fixup=True)
    paired = tuning.Config(1, 1024, 4, 16, 4, 1, tuning.HALF2, fixup=True)
    zeroing = tuning.Config(1, 256, 4, 8, 4, 1, tuning.HALF2)  # split-K by atomics into a zeroed output
    tiles = [zeroing, cuda_core, paired, tuning.UNFUSED_CONFIG]
    twins = tuning.chained_twins(tiles)
    assert twins == [replace(cuda_core, pdl=True), replace(paired, pdl=True), replace(paired, pdl=True, early=True),
                     tuning.UNFUSED_CONFIG]
    # the early twin times fastest, the plain tiles (never launched chained) would be faster still
    cost = {zeroing: 0.1, replace(zeroing, pdl=True): 0.1, replace(zeroing, pdl=True, early=True): 0.1,
            replace(cuda_core, pdl=True): 3.0, replace(paired, pdl=True): 2.0,
            replace(paired, pdl=True, early=True): 1.0, tuning.UNFUSED_CONFIG: 5.0, cuda_core: 0.1, paired: 0.1}
    timed = []

    def fake_time(fn, flush_ms):
        return fn()

    def run(cfg):
        timed.append(cfg)
        return cost[cfg]

    monkeypatch.setattr(tuning, "cold_time_ms", fake_time)
    monkeypatch.setattr(tuning, "autotune_enabled", lambda: True)
    monkeypatch.setenv("EFFICIENTQAT_COMPILE_THREADS", "0")
    chosen = tuning.choose("dev|gemv1|m=1|n=8", lambda: tiles, run, chain=True)
    assert chosen == replace(paired, pdl=True, early=True)
    assert set(timed) == set(twins)  # nothing unchained was timed
    assert tuning.CACHE.get("dev|gemv1|m=1|n=8|pdl") == chosen and tuning.CACHE.get("dev|gemv1|m=1|n=8") is None
    assert tuning.choose("dev|gemv1|m=1|n=8", lambda: [], run, chain=True) is chosen  # memoised
    assert tuning.choose("dev|gemv1|m=1|n=8", lambda: tiles, run) == zeroing  # its own key, every tile timed

    monkeypatch.setattr(tuning, "autotune_enabled", lambda: False)
    assert tuning.choose("dev|gemv1|m=1|n=16", lambda: tiles, run, chain=True) == replace(cuda_core, pdl=True)
    monkeypatch.setattr(tuning, "pdl_supported", lambda device: True)
    monkeypatch.setenv("EFFICIENTQAT_PDL", "1")
    assert tuning.chains_decode_launches(torch.device("cpu"))
    monkeypatch.setenv("EFFICIENTQAT_PDL", "0")
    assert not tuning.chains_decode_launches(torch.device("cpu"))


def test_chained_choice_times_each_tile_behind_itself_on_weight_copies(monkeypatch, tmp_path):
    """With ``copies``, a chained key's tiles are timed as a chain of the layer's launch over
    distinct copies of its weights (``chained_time_ms``), not behind an L2 flush; the copies are
    built once a miss and never for an unchained key or a memoised one; where they do not fit in
    memory the tiles are timed cold."""
    monkeypatch.setenv("EFFICIENTQAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_MEMO", {})
    monkeypatch.setattr(tuning, "CACHE", tuning.ConfigCache())
    monkeypatch.setattr(tuning, "autotune_enabled", lambda: True)
    monkeypatch.setenv("EFFICIENTQAT_COMPILE_THREADS", "0")
    slow = tuning.Config(1, 512, 4, 8, 4, 1, fixup=True)
    fast = tuning.Config(1, 1024, 4, 16, 4, 1, fixup=True)
    weights = torch.arange(6.0)
    cost = {slow: 2.0, replace(slow, pdl=True): 2.0, fast: 1.0, replace(fast, pdl=True): 1.0}
    built, chains, tiles_run = [], [], []

    def run(cfg, w=(weights,)):
        tiles_run.append(cfg)
        return w[0].sum(), w[0].data_ptr()

    def copies():
        built.append(1)
        return [lambda cfg, w=w: run(cfg, w) for w in tuning.weight_copies(weights)]

    def chained(calls):  # each call a tile bound to one copy: the time follows the tile, every copy is run
        chains.append(len({call()[1] for call in calls}))
        return sum(cost[call.args[0]] for call in calls)

    monkeypatch.setattr(tuning, "chained_time_ms", chained)
    monkeypatch.setattr(tuning, "cold_time_ms", lambda fn, flush_ms: pytest.fail("timed behind a flush"))
    assert tuning.choose("dev|gemv1|m=1|n=8", lambda: [slow, fast], run, chain=True, copies=copies) == \
        replace(fast, pdl=True)
    count = len(tuning.weight_copies(weights))
    assert built == [1] and chains and set(chains) == {count}
    tuning.choose("dev|gemv1|m=1|n=8", lambda: [slow, fast], run, chain=True, copies=copies)  # memoised
    assert built == [1]
    monkeypatch.setattr(tuning, "cold_time_ms", lambda fn, flush_ms: (fn(), cost[tiles_run[-1]])[1])
    assert tuning.choose("dev|gemv1|m=1|n=16", lambda: [slow, fast], run, copies=copies) == fast
    assert built == [1]  # unchained: timed cold, no copies

    def no_room():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    chains.clear()  # no memory for the copies: timed cold, still the faster tile
    assert tuning.choose("dev|gemv1|m=1|n=32", lambda: [slow, fast], run, chain=True, copies=no_room) == \
        replace(fast, pdl=True)
    assert not chains


def test_weight_copies_overflow_the_l2_with_distinct_equal_tensors():
    """The originals first, then clones (own storage, same values) until the copies hold at
    least ``FLUSH_BYTES``; two at least, 64 at most."""
    codes, scales = torch.randint(0, 1 << 30, (256, 1024), dtype=torch.int32), torch.rand(4, 1024)
    copies = tuning.weight_copies(codes, scales)
    nbytes = codes.numel() * 4 + scales.numel() * 4
    assert copies[0][0] is codes and copies[0][1] is scales
    assert len(copies) * nbytes >= tuning.FLUSH_BYTES > (len(copies) - 1) * nbytes
    assert all(torch.equal(c[0], codes) and torch.equal(c[1], scales) for c in copies)
    assert len({c[0].data_ptr() for c in copies}) == len(copies)
    assert len(tuning.weight_copies(torch.zeros(tuning.FLUSH_BYTES, dtype=torch.uint8))) == 2
    assert len(tuning.weight_copies(torch.zeros(8))) == 64


@pytest.mark.parametrize("kernel", ["gemv1", "tc", "half2"])
def test_in_kernel_split_k_reduction(kernel):
    """``fixup`` configs: the last program of each column tile writes the sum of all partials
    (outputs poisoned, uneven split-K, several layers in a row sharing one workspace, a ragged
    last column tile), and every launch leaves the workspace and tile counters zero again."""
    from efficientqat.kernels import tiling
    from efficientqat.kernels.gemv import gemv1_forward, gemv_tc_forward
    from efficientqat.kernels.half2 import gemv_half2_forward

    bits, group = (4, 128) if kernel != "tc" else (3, 128)
    launch = {"gemv1": gemv1_forward, "tc": gemv_tc_forward, "half2": gemv_half2_forward}[kernel]
    gen = torch.Generator().manual_seed(len(kernel))
    for n, k, m, split in [(96, 1024, 1, 3), (160, 512, 3, 2), (96, 1024, 1, 8)]:
        m = 1 if kernel == "gemv1" else m
        q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
        x = torch.randn(m, k, generator=gen).to(DEV, torch.float16)
        bias = torch.randn(n, generator=gen).to(DEV, torch.float16)
        block_c = {"gemv1": 4, "tc": 16, "half2": 4}[kernel]
        cfg = tuning.Config(4 if kernel == "half2" else 1 if kernel == "gemv1" else 16, 64, block_c, split, 4, 1,
                            tuning.HALF2 if kernel == "half2" else 0, fixup=True)
        y = launch(x, qw, scales, zeros, bias, bits, gl, cfg)
        assert y.dtype == torch.float16 and rel(y, reference(x, q, z, scales, gl, bias)[0]) < 3e-3, (n, k, m, split)
        for entry in tiling._WORKSPACES.values():
            assert not entry.sums.any() and not entry.counts.any()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemm_expand_variant(bits):
    """The gemm variants: words loaded once and expanded (2/4/8 bits), and W as the A operand."""
    from efficientqat.kernels.gemm import gemm_forward

    gen = torch.Generator().manual_seed(bits)
    n, k, m = 64, 256, 40
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, 64, gen)
    x = torch.randn(m, k, generator=gen).to(DEV)
    for split in (1, 2):
        for variant in (1, 2):
            cfg = tuning.Config(32, 64, 64, split, 4, 2, variant)
            y = gemm_forward(x, qw, scales, zeros, None, bits, gl, cfg)
            assert rel(y, reference(x, q, z, scales, gl)[0]) < 1e-5


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 32), (8, 64), (4, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv1_variants(bits, group, dtype):
    """The M = 1 kernel with and without prefetch or a pipelined loop, with split-K ranges that
    are uneven (steps not divisible by the split) and longer than one step, with bias."""
    from efficientqat.kernels.gemv import gemv1_forward

    gen = torch.Generator().manual_seed(bits + group)
    n, k = 64, 256
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(DEV, dtype)
    x = torch.randn(1, k, generator=gen).to(DEV, dtype)
    ref = reference(x, q, z, scales, gl, bias)[0]
    vpc = chunk_values(bits)
    for prefetch, stages in ((0, 1), (1, 1), (0, 3)):
        for bc, split in ((1, 3), (2, 1), (1, 1)):
            if gl % (bc * vpc):
                continue
            cfg = tuning.Config(1, 32, bc, split, 4, stages, prefetch)
            y = gemv1_forward(x, qw, scales, zeros, bias, bits, gl, cfg)
            assert rel(y, ref) < (1e-5 if dtype == torch.float32 else 3e-3), (prefetch, stages, bc, split)


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (2, 64), (2, -1), (3, 128), (3, 32), (3, -1)])
def test_half2_kernel(bits, group):
    """The paired-fp16 kernel (emulated fma.f16x2 on the CPU, PTX on the GPU) against float64 at
    M = 1, 3 and 8 (rows past M masked), with column tiles that divide N and one that does not,
    split-K ranges that are uneven and longer than one step or exactly one step (words loaded
    before the rest), steps of 1-4 word rows (several widening flushes), with bias. Each
    interpreted launch costs seconds, so M = 1 takes every tile and M = 3 and 8 two each: M = 3
    (masked rows) the one-step-a-program tile and a column tile that leaves a partial tile,
    M = 8 (x pre-paired, beyond what the tuner offers: ``tuning.HALF2_MAX_M``) the uneven
    split-K tile and the one-step-a-program tile."""
    from efficientqat.kernels.half2 import gemv_half2_forward

    gen = torch.Generator().manual_seed(bits * 10 + group)
    n, k = 96, 256
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(DEV, torch.float16)
    vpc = chunk_values(bits)
    tiles = ((32, 1, 3), (32, 2, k // (2 * vpc)), (64, 4, 2), (64, 2, 1))
    for m, block_m, m_tiles in ((1, 1, tiles), (3, 4, tiles[1:3]), (8, 8, tiles[:2])):
        x = torch.randn(m, k, generator=gen).to(DEV, torch.float16)
        ref = reference(x, q, z, scales, gl, bias)[0]
        for block_n, bc, split in m_tiles:
            if gl % (bc * vpc):
                continue
            cfg = tuning.Config(block_m, block_n, bc, split, 4, 1, tuning.HALF2)
            y = gemv_half2_forward(x, qw, scales, zeros, bias, bits, gl, cfg)
            assert y.shape == (m, n) and y.dtype == torch.float16
            assert rel(y, ref) < 3e-3, (m, block_n, bc, split)


@pytest.mark.parametrize("bits,group", [(4, 128), (2, 64), (3, 128)])
def test_half2_silu_mul_epilogue(bits, group):
    """With ``silu_mul`` the paired-fp16 kernel writes silu(gate) * up of a layer whose columns
    alternate 16 gate and 16 up columns: against float64 through the PyTorch de-interleave, at
    M = 1 and 3, one summing program or split-K reduced in the kernel, a column tile that leaves
    a partial tile (N = 96 over 64-column tiles: 32 live columns, one gate/up pair), with bias."""
    from efficientqat.fused_mlp import silu_mul_interleaved
    from efficientqat.kernels.half2 import gemv_half2_forward

    gen = torch.Generator().manual_seed(bits)
    n, k = 96, 256
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(DEV, torch.float16)
    for m, block_m in ((1, 1), (3, 4)):
        x = torch.randn(m, k, generator=gen).to(DEV, torch.float16)
        ref = silu_mul_interleaved(reference(x, q, z, scales, gl, bias)[0])
        for block_n, split, fixup in ((64, 1, False), (64, 2, True), (32, 4, True)):
            cfg = tuning.Config(block_m, block_n, 1, split, 4, 1, tuning.HALF2, fixup=fixup)
            y = gemv_half2_forward(x, qw, scales, zeros, bias, bits, gl, cfg, silu_mul=True)
            assert y.shape == (m, n // 2) and rel(y, ref) < 3e-3, (m, block_n, split)


def test_silu_mul_dispatch_writes_the_epilogue_in_the_decode_kernels_and_pytorch_elsewhere(monkeypatch):
    """Which kernel writes silu(gate) * up: the paired-fp16 one at M = 1 (fp16), the tensor-core
    one at M = 8 and 12, none for bf16 at M = 1 (the CUDA-core kernel has no epilogue) or past
    the decode sizes (M = 40: PyTorch after the matmul). Untimed, each key's first candidate (on a
    GPU it is launched once more while the tuner checks that it compiles)."""
    from efficientqat.fused_mlp import silu_mul_interleaved
    from efficientqat.kernels import autograd, gemv, half2

    monkeypatch.setattr(tuning, "autotune_enabled", lambda: False)
    monkeypatch.setattr(tuning, "_MEMO", {})
    gen = torch.Generator().manual_seed(5)
    q, z, s, qw, zeros, scales, gl = rand_layer(64, 128, 4, 64, gen, scale_dtype=torch.float16)
    epilogues = []
    for module, name in ((half2, "gemv_half2_forward"), (gemv, "gemv_tc_forward")):
        real = getattr(module, name)
        monkeypatch.setattr(autograd, name, lambda *a, real=real, name=name, **kw:
                            (epilogues.append(name) if kw.get("silu_mul") else None) or real(*a, **kw))
    for dtype, m, writer in ((torch.float16, 1, "gemv_half2_forward"), (torch.float16, 8, "gemv_tc_forward"),
                             (torch.float16, 12, "gemv_tc_forward"), (torch.bfloat16, 1, None),
                             (torch.float16, 40, None)):
        x = torch.randn(m, 128, generator=gen).to(DEV, dtype)
        epilogues.clear()
        y = dequant_linear(x, qw, scales.to(dtype), zeros, None, 4, gl, silu_mul=True)
        assert y.shape == (m, 32) and rel(y, silu_mul_interleaved(reference(x, q, z, scales, gl)[0])) < 1e-2
        assert set(epilogues) == ({writer} if writer else set()), (dtype, m)


def test_silu_mul_tunes_the_epilogue_against_the_unfused_matmul(monkeypatch):
    """The SiLU key's candidates: tiles of both decode kernels (at M = 2) that sum in one program,
    then the unfused path, whose plain matmul key is tuned before the list is offered; when the
    unfused path wins, the plain matmul and PyTorch's silu * up give the result and no epilogue
    launch runs."""
    from efficientqat.fused_mlp import silu_mul_interleaved
    from efficientqat.kernels import autograd, gemv, half2

    gen = torch.Generator().manual_seed(8)
    q, z, s, qw, zeros, scales, gl = rand_layer(64, 128, 4, 64, gen, scale_dtype=torch.float16)
    x = torch.randn(2, 128, generator=gen).to(DEV, torch.float16)
    expected = silu_mul_interleaved(reference(x, q, z, scales, gl)[0])
    chosen, offered, epilogues = [], {}, []
    real_choose = tuning.choose

    def choose_unfused(key, cands, run, chain=False, copies=None):
        if "silu_mul" not in key:
            chosen.append(key)
            return real_choose(key, cands, run)
        offered[key] = list(cands())
        assert chosen, "the plain matmul is tuned before the epilogue's candidates are offered"
        return offered[key][-1]

    monkeypatch.setattr(tuning, "choose", choose_unfused)
    for module, name in ((half2, "gemv_half2_forward"), (gemv, "gemv_tc_forward")):
        real = getattr(module, name)
        monkeypatch.setattr(autograd, name, lambda *a, real=real, **kw: epilogues.append(kw.get("silu_mul")) or real(*a, **kw))
    y = dequant_linear(x, qw, scales, zeros, None, 4, gl, silu_mul=True)
    (cands,) = offered.values()
    assert cands[-1] == tuning.UNFUSED_CONFIG and all(c.fixup or c.split_k == 1 for c in cands[:-1])
    assert {c.variant == tuning.HALF2 for c in cands[:-1]} == {True, False}  # both kernels' tiles
    assert True not in epilogues
    assert y.shape == (2, 32) and rel(y, expected) < 1e-2


@pytest.mark.parametrize("bits,group", [(4, 128), (2, 64), (3, 32)])
def test_half2_k_lanes(bits, group):
    """K lanes (M = 1): a program sums several K steps side by side and adds the lanes up itself.
    Against float64: one step a lane or several (lane l takes every LANES-th step), a lane's steps
    in different groups, no split-K or split-K reduced in the kernel, a partial column tile, bias,
    and with the SiLU epilogue."""
    from efficientqat.fused_mlp import silu_mul_interleaved
    from efficientqat.kernels.half2 import gemv_half2_forward

    gen = torch.Generator().manual_seed(bits * 7 + group)
    n, k = 96, 512
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(DEV, torch.float16)
    x = torch.randn(1, k, generator=gen).to(DEV, torch.float16)
    ref = reference(x, q, z, scales, gl, bias)[0]
    steps = k // chunk_values(bits)  # BLOCK_C = 1
    for block_n, lanes, split in ((64, 4, steps // 4), (32, 8, 2), (64, 2, 1), (32, 16, steps // 16)):
        cfg = tuning.Config(1, block_n, 1, split, 4, 1, tuning.HALF2, fixup=split > 1, lanes=lanes)
        y = gemv_half2_forward(x, qw, scales, zeros, bias, bits, gl, cfg)
        assert y.shape == (1, n) and rel(y, ref) < 3e-3, (block_n, lanes, split)
        y = gemv_half2_forward(x, qw, scales, zeros, bias, bits, gl, cfg, silu_mul=True)
        assert rel(y, silu_mul_interleaved(ref)) < 3e-3, (block_n, lanes, split)
    with pytest.raises(ValueError, match="K lanes"):
        gemv_half2_forward(x, qw, scales, zeros, bias, bits, gl, tuning.Config(1, 32, 1, 3, 4, 1, tuning.HALF2, lanes=4))


def test_a_silu_epilogue_that_cannot_run_falls_back_once_with_a_warning(monkeypatch, caplog):
    from efficientqat.fused_mlp import silu_mul_interleaved
    from efficientqat.kernels import autograd

    real = autograd.gemv_half2_forward
    calls = []

    def broken(*args, silu_mul=False, **kwargs):
        calls.append(silu_mul)
        if silu_mul:
            raise RuntimeError("PassManager::run failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(autograd, "gemv_half2_forward", broken)
    monkeypatch.setattr(autograd, "_EPILOGUE_FAILED", set())
    gen = torch.Generator().manual_seed(6)
    q, z, s, qw, zeros, scales, gl = rand_layer(64, 128, 4, 64, gen, scale_dtype=torch.float16)
    x = torch.randn(1, 128, generator=gen).to(DEV, torch.float16)
    expected = silu_mul_interleaved(reference(x, q, z, scales, gl)[0])
    with caplog.at_level(logging.WARNING, logger="efficientqat.kernels.autograd"):
        for _ in range(2):
            assert rel(dequant_linear(x, qw, scales, zeros, None, 4, gl, silu_mul=True), expected) < 3e-3
    assert calls.count(True) == 1  # tried once, then the unfused path
    assert "SiLU epilogue does not run here (RuntimeError: PassManager::run failed)" in caplog.text


def test_half2_takes_only_fp16_and_2_to_4_bits():
    """Other inputs get an error naming the requirement; the decode candidates hold paired-fp16
    tiles only where they apply, after the measured ones, and the dispatcher runs them."""
    from efficientqat.kernels.half2 import gemv_half2_forward

    gen = torch.Generator().manual_seed(0)
    cfg = tuning.Config(1, 32, 1, 1, 4, 1, tuning.HALF2)
    for bits, dtype, m in ((8, torch.float16, 1), (4, torch.bfloat16, 1), (4, torch.float16, 2)):
        q, z, s, qw, zeros, scales, gl = rand_layer(32, 256, bits, 128, gen)
        x = torch.randn(m, 256, generator=gen).to(DEV, dtype)
        with pytest.raises(ValueError, match="paired-fp16 kernel takes fp16 x of at most 1 rows"):
            gemv_half2_forward(x, qw, scales, zeros, None, bits, gl, cfg)
    assert candidates.half2_candidates(1, 8192, 8192, 8, 128) == [] and candidates.half2_candidates(5, 8192, 8192, 4, 128) == []
    for bits in (2, 3, 4):
        for m in (1, 2, 3, 4):
            cands = candidates.half2_candidates(m, 8192, 8192, bits, 128)
            assert cands and all(c.variant == tuning.HALF2 and c.block_m == tuning.m_bucket(m) for c in cands)
            assert all(c.block_n * c.block_m <= 4096 and 128 % (c.block_k * chunk_values(bits)) == 0 for c in cands)


def test_dispatch_tries_half2_after_the_measured_kernels(monkeypatch):
    """fp16 x at M = 1 and M = 4 offers the paired-fp16 tiles after the kernels' own lists, and a
    tuned paired-fp16 config is launched through the paired-fp16 kernel; bf16 x is not offered it."""
    from efficientqat.kernels import autograd

    seen = {}

    def record(key, candidates, run, chain=False, copies=None):
        cands = list(candidates())
        seen[key.split("|")[1] + key.split("dtype=")[1]] = cands
        return next((c for c in cands if c.variant == tuning.HALF2), cands[0])

    monkeypatch.setattr(tuning, "choose", record)
    gen = torch.Generator().manual_seed(1)
    q, z, s, qw, zeros, scales, gl = rand_layer(64, 512, 4, 128, gen, scale_dtype=torch.float16)
    for m, dtype in ((1, torch.float16), (4, torch.float16), (4, torch.float32)):
        x = torch.randn(m, 512, generator=gen).to(DEV, dtype)
        y = dequant_linear(x, qw, scales, zeros, None, 4, gl)
        assert rel(y, reference(x, q, z, scales, gl)[0]) < 3e-3
    for name in ("gemv1float16", "gemv_tcfloat16"):
        variants = [c.variant for c in seen[name]]
        first = variants.index(tuning.HALF2)
        assert first > 0 and all(v == tuning.HALF2 for v in variants[first:])
    assert all(c.variant != tuning.HALF2 for c in seen["gemv_tcfloat32"])


@pytest.mark.skipif(not GPU, reason="the PTX of the paired-fp16 step runs on a GPU only")
@pytest.mark.parametrize("bits,group", [(4, 128), (2, 64), (3, 128)])
@pytest.mark.parametrize("m", [1, 4])
def test_gpu_half2_matches_float64(bits, group, m):
    from efficientqat.kernels.half2 import gemv_half2_forward

    gen = torch.Generator().manual_seed(bits)
    q, z, s, qw, zeros, scales, gl = rand_layer(4096, 4096, bits, group, gen, scale_dtype=torch.float16)
    x = torch.randn(m, 4096, generator=gen).to(DEV, torch.float16)
    ref = reference(x, q, z, scales, gl)[0]
    tiles = candidates.with_launch_variants(candidates.half2_candidates(m, 4096, 4096, bits, gl))
    if tuning.pdl_supported(x.device):  # under PDL, with and without the first codes loaded before the wait
        tiles += tuning.chained_twins(tiles[:4])
    for cfg in tiles:
        assert rel(gemv_half2_forward(x, qw, scales, zeros, None, bits, gl, cfg), ref) < 3e-3, cfg


@pytest.mark.skipif(not GPU, reason="the compiled tensor-core kernel's 64-bit x loads need a GPU")
@pytest.mark.parametrize("bits,group", [(4, 128), (3, 128), (2, 64), (8, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_tc_decode_matches_float64(bits, group, dtype):
    """The leading tensor-core decode tiles at M = 2 and 16, x read as 64-bit words, including an x that
    starts 2 bytes past an 8-byte boundary (copied first) and a ragged 3-bit K; at 2/4 bits also the
    paired-code tiles (mma.sync, wgmma and codes through TMA; fp16 and bf16)."""
    from efficientqat.kernels.gemv import PAIRED_CODES, PAIRED_TMA, PAIRED_WGMMA, gemv_tc_forward

    gen = torch.Generator().manual_seed(bits)
    k = 11008 if bits == 3 else 4096
    q, z, s, qw, zeros, scales, gl = rand_layer(1024, k, bits, group, gen, scale_dtype=dtype)
    for m in (2, 16):
        flat = torch.randn(m * k + 1, generator=gen).to(DEV, dtype)
        for x in (flat[:-1].view(m, k), flat[1:].view(m, k)):
            ref = reference(x, q, z, scales, gl)[0]
            tiles = candidates.gemv_tc_candidates(1024, k, bits, gl, dtype)
            # compile time: the leading tiles, and one of each paired-code variant (2/4 bits)
            paired = [next((c for c in tiles if c.variant == v), None) for v in (PAIRED_CODES, PAIRED_WGMMA, PAIRED_TMA)]
            for cfg in tiles[:4] + [c for c in paired if c is not None]:
                assert rel(gemv_tc_forward(x, qw, scales, zeros, None, bits, gl, cfg), ref) < 1e-2, (m, cfg)


@pytest.mark.skipif(not GPU, reason="the L2 prefetch is PTX: it runs on a GPU only")
@pytest.mark.parametrize("bits,group", [(4, 128), (3, 128), (2, 64)])
def test_gpu_l2_prefetch_leaves_the_output_alone(bits, group):
    """``Config.prefetch`` is a hint: the tensor-core decode tiles at M = 16 (plain, x-tile, codes
    through TMA) give the same output with the codes of their next 1 or 4 steps asked of L2 (past
    the last step, and 3-bit's ragged K, included) as without."""
    from efficientqat.kernels.gemv import PAIRED_TMA, PAIRED_XTILE, gemv_tc_forward

    gen = torch.Generator().manual_seed(bits)
    k = 11008 if bits == 3 else 4096
    q, z, s, qw, zeros, scales, gl = rand_layer(1024, k, bits, group, gen, scale_dtype=torch.float16)
    x = torch.randn(16, k, generator=gen).to(DEV, torch.float16)
    tiles = candidates.gemv_tc_candidates(1024, k, bits, gl, torch.float16)
    picked = tiles[:2] + [next(c for c in tiles if c.variant == v) for v in (PAIRED_XTILE, PAIRED_TMA) if bits != 3]
    for cfg in picked:
        plain = gemv_tc_forward(x, qw, scales, zeros, None, bits, gl, replace(cfg, prefetch=0))
        for ahead in (1, 4):
            # split-K sums by atomics in any order (fp16 ones round at each add): last bits may differ
            out = gemv_tc_forward(x, qw, scales, zeros, None, bits, gl, replace(cfg, prefetch=ahead))
            assert rel(out, plain.double().cpu()) < 3e-3, (cfg, ahead)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_gpu_capture_without_a_workspace_falls_back(monkeypatch):
    """A fixup launch first seen inside a graph capture allocates nothing there: it takes the
    zeroed-output path and is still right on replay."""
    from efficientqat.kernels import tiling
    from efficientqat.kernels.gemv import gemv1_forward

    monkeypatch.setattr(tiling, "_WORKSPACES", {})
    gen = torch.Generator().manual_seed(9)
    q, z, s, qw, zeros, scales, gl = rand_layer(1024, 1024, 4, 128, gen, scale_dtype=torch.float16)
    x = torch.randn(1, 1024, generator=gen).to(DEV, torch.float16)
    cfg = tuning.Config(1, 256, 16, 8, 4, 1, fixup=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv1_forward(x, qw, scales, zeros, None, 4, gl, cfg)
    graph.replay()
    torch.cuda.synchronize()
    assert not tiling._WORKSPACES and rel(y, reference(x, q, z, scales, gl)[0]) < 3e-3


@pytest.mark.skipif(not GPU, reason="programmatic dependent launch and CUDA graphs need a GPU")
@pytest.mark.parametrize("fixup,pdl", [(True, False), (True, True), (False, True)])
def test_gpu_chained_decode_launches(fixup, pdl):
    """Decode launches that feed each other, replayed as a CUDA graph: with programmatic
    dependent launch a kernel starts before its predecessor ends and must still read that
    predecessor's output (and the shared workspace) only after it is complete."""
    from efficientqat.kernels import tiling
    from efficientqat.kernels.gemv import gemv1_forward, gemv_tc_forward
    from efficientqat.kernels.half2 import gemv_half2_forward

    if pdl and not tuning.pdl_supported(torch.device(DEV)):
        pytest.skip("this GPU / Triton has no programmatic dependent launch")
    gen = torch.Generator().manual_seed(5)
    layers = [rand_layer(2048, 2048, 4, 128, gen, scale_dtype=torch.float16) for _ in range(3)]
    for m, launch, cfg in [(1, gemv1_forward, tuning.Config(1, 512, 16, 8, 4, 1)),
                           (4, gemv_tc_forward, tuning.Config(16, 128, 16, 8, 4, 2)),
                           (1, gemv_half2_forward, tuning.Config(1, 512, 4, 8, 4, 1, tuning.HALF2, early=True))]:
        cfg = replace(cfg, fixup=fixup, pdl=pdl)
        x = torch.randn(m, 2048, generator=gen).to(DEV, torch.float16)

        def chain():
            h = x
            for q, z, s, qw, zeros, scales, gl in layers:
                h = launch(h, qw, scales, zeros, None, 4, gl, cfg)  # kernel after kernel
            return h

        expected = x.double().cpu()
        for q, z, s, qw, zeros, scales, gl in layers:
            expected = reference(expected.to(DEV, torch.float16), q, z, scales, gl)[0]
        chain()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert rel(out, expected) < 1e-2, (m, cfg)
        assert all(not e.sums.any() and not e.counts.any() for e in tiling._WORKSPACES.values())


def test_large_m_dispatches_to_the_dense_path_by_default(monkeypatch):
    """From tuning.DENSE_FIRST_M rows on, the untuned default is decode + matmul for the forward,
    dx and ds alike (the kernels' launchers are made to fail, so only that path can pass)."""
    from efficientqat.kernels import autograd

    monkeypatch.setattr(tuning, "_MEMO", {})
    monkeypatch.setattr(tuning, "autotune_enabled", lambda: False)

    def refuse(*args, **kwargs):
        raise AssertionError("a fused kernel ran")

    for name in ("gemm_forward", "grad_input", "grad_scales"):
        monkeypatch.setattr(autograd, name, refuse)
    gen = torch.Generator().manual_seed(21)
    m, n, k = tuning.DENSE_FIRST_M, 64, 128
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, 4, 64, gen)
    scales.requires_grad_(True)
    x = torch.randn(m, k, generator=gen).to(DEV).requires_grad_(True)
    y = dequant_linear(x, qw, scales, zeros, None, 4, gl)
    ref, grads = reference(x, q, z, scales, gl)
    assert rel(y, ref) < 1e-5
    dy = torch.randn(m, n, generator=gen).to(DEV)
    y.backward(dy)
    dx_ref, ds_ref = grads(dy)
    assert rel(x.grad, dx_ref) < 1e-5 and rel(scales.grad, ds_ref) < 1e-5


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 128), (4, 32), (8, 128), (4, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_paths(bits, group, dtype, monkeypatch):
    """Decode + matmul (the large-M path): forward with bias, dx, and ds folded from float32
    x^T dy slabs (slab forced narrow so several slabs and a ragged last one are exercised)."""
    from efficientqat.kernels import dequant

    monkeypatch.setattr(dequant, "SLAB_BYTES", 4 * 256 * 128)  # 128-column slabs for K = 256
    gen = torch.Generator().manual_seed(31 * bits + group)
    n, k, m = 320, 256, 24
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen)
    bias = torch.randn(n, generator=gen).to(DEV, dtype)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    dy = torch.randn(m, n, generator=gen).to(DEV, dtype)
    ref, grads = reference(x, q, z, scales, gl, bias)
    dx_ref, ds_ref = grads(dy)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    cfg = tuning.DENSE_CONFIG
    assert rel(dequant.dense_forward(x, qw, scales.to(dtype), zeros, bias, bits, gl, cfg), ref) < tol
    assert rel(dequant.dense_grad_input(dy, qw, scales.to(dtype), zeros, bits, gl, k, cfg), dx_ref) < tol
    ds = dequant.dense_grad_scales(x, dy, qw, zeros, bits, gl, cfg)
    assert ds.dtype == torch.float32 and rel(ds, ds_ref) < tol
    w_t = dequant.decode_weight_t(qw, scales, zeros, bits, gl, torch.float32)
    expect = ((q - z.repeat_interleave(gl, 1)) * scales.t().cpu().repeat_interleave(gl, 1)).t()
    assert torch.equal(w_t.cpu(), expect.float())  # the decode is exact in float32


def rms_norm64(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm rounding (``row_ops.rms_norm``) as float64 input of the reference."""
    from efficientqat.row_ops import rms_norm

    return rms_norm(h, weight, eps).double()


@pytest.mark.parametrize("kernel", ["gemv1", "tc", "tc_x_tile", "half2"])
def test_decode_kernels_normalise_their_input_and_add_the_residual(kernel):
    """``RowOps`` inside the decode kernels: x = RMSNorm(h), written by each program for the K
    range it reads (uneven split-K, one step a program, K lanes, half2's pair order at M > 4, a
    ragged 3-bit last step on the tensor cores with its strided steps, paired codes with x read
    as one tile a step; rows that fit one load,
    normalised from registers, and longer rows in slices), and the
    residual added by the first K slice (atomic and in-kernel split-K reductions, with bias),
    against float64 of the same rounding; the caller's h is left as it was."""
    from efficientqat.kernels.gemv import PAIRED_XTILE, gemv1_forward, gemv_tc_forward
    from efficientqat.kernels.half2 import gemv_half2_forward
    from efficientqat.kernels.prologue import row_block
    from efficientqat.row_ops import RowOps

    bits, group = {"gemv1": (4, 128), "tc": (3, 128), "tc_x_tile": (4, 128), "half2": (2, 64)}[kernel]
    launch = {"gemv1": gemv1_forward, "tc": gemv_tc_forward, "tc_x_tile": gemv_tc_forward,
              "half2": gemv_half2_forward}[kernel]
    C = tuning.Config
    cases = {"gemv1": [(1, 512, C(1, 32, 2, 3, 4, 1)), (1, 512, C(1, 64, 1, 2, 4, 1, fixup=True))],
             "tc": [(3, 1280, C(16, 32, 16, 2, 4, 1, fixup=True)), (9, 1280, C(16, 64, 16, 1, 4, 1)),
                    (2, 512, C(16, 32, 16, 1, 4, 1))],
             "tc_x_tile": [(5, 512, C(16, 32, 16, 2, 4, 1, PAIRED_XTILE, fixup=True)),
                           (3, 1280, C(16, 32, 16, 3, 4, 1, PAIRED_XTILE))],
             "half2": [(1, 512, C(1, 32, 2, 2, 4, 1, tuning.HALF2, lanes=2)), (1, 512, C(1, 64, 2, 8, 4, 1, tuning.HALF2)),
                       (3, 512, C(4, 32, 1, 3, 4, 1, tuning.HALF2, fixup=True)),
                       (6, 512, C(8, 32, 2, 1, 4, 1, tuning.HALF2))]}
    assert {k <= row_block(k, cfg.block_m) for _, k, cfg in cases["tc"]} == {True, False}
    gen = torch.Generator().manual_seed(len(kernel) + 7)
    n = 96
    for m, k, cfg in cases[kernel]:
        q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
        bias = torch.randn(n, generator=gen).to(DEV, torch.float16)
        gamma = (torch.rand(k, generator=gen) + 0.5).to(DEV, torch.float16)
        h = (torch.randn(m, k, generator=gen) * 4).to(DEV, torch.float16)
        res = torch.randn(m, n, generator=gen).to(DEV, torch.float16)
        h_before = h.clone()
        ref = reference(rms_norm64(h, gamma, 1e-5), q, z, scales, gl, bias)[0] + res.double().cpu()
        y = launch(h, qw, scales, zeros, bias, bits, gl, cfg, ops=RowOps(gamma, 1e-5, res))
        assert y.shape == (m, n) and rel(y, ref) < 3e-3, (m, k, cfg)
        assert torch.equal(h, h_before)


def test_row_ops_dispatch_in_the_kernels_and_around_the_gemm():
    """``dequant_linear(..., ops=...)``: decode sizes through the kernels (the SiLU epilogue
    after a normalised input included), prefill sizes with PyTorch's norm and add around the
    GEMM, leading dimensions kept; bad shapes and a residual on silu(gate) * up are named."""
    from efficientqat.fused_mlp import silu_mul_interleaved
    from efficientqat.row_ops import RowOps

    gen = torch.Generator().manual_seed(11)
    n, k = 64, 256
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, 4, 128, gen, scale_dtype=torch.float16)
    gamma = (torch.rand(k, generator=gen) + 0.5).to(DEV, torch.float16)
    for m in (1, 2, 20):
        h = torch.randn(1, m, k, generator=gen).to(DEV, torch.float16)
        res = torch.randn(1, m, n, generator=gen).to(DEV, torch.float16)
        normed = rms_norm64(h[0], gamma, 1e-6)
        y = dequant_linear(h, qw, scales, zeros, None, 4, gl, ops=RowOps(gamma, 1e-6, res))
        assert y.shape == (1, m, n) and rel(y[0], reference(normed, q, z, scales, gl)[0] + res[0].double().cpu()) < 3e-3
        if m < 20:
            act = dequant_linear(h, qw, scales, zeros, None, 4, gl, silu_mul=True, ops=RowOps(gamma, 1e-6))
            assert rel(act[0], silu_mul_interleaved(reference(normed, q, z, scales, gl)[0])) < 3e-3
    with pytest.raises(ValueError, match="RMSNorm weight must have shape"):
        dequant_linear(h, qw, scales, zeros, None, 4, gl, ops=RowOps(gamma[:-32], 1e-6))
    with pytest.raises(ValueError, match="residual must have shape"):
        dequant_linear(h, qw, scales, zeros, None, 4, gl, ops=RowOps(residual=res[..., :-1]))
    with pytest.raises(ValueError, match="silu"):
        dequant_linear(h, qw, scales, zeros, None, 4, gl, silu_mul=True, ops=RowOps(residual=res[..., : n // 2]))


@pytest.mark.parametrize("bits,group,k,column_scales,chunks", [(4, 128, 2048, True, 0), (4, 32, 1536, True, 0),
                                                             (2, 64, 4096, False, 0), (4, -1, 1024, True, 0),
                                                             (3, 128, 2048, True, 1), (3, 64, 1536, True, 2)])
def test_kmajor_kernel_matches_float64(bits, group, k, column_scales, chunks):
    """The M = 1 kernel over K-major codes (whole columns a program, no split-K) against float64:
    several steps (the next step's codes in flight), a K its steps do not fill (1536: masked
    thread slots), per-channel groups, a bias, columns of four programs; scales and zero points
    column-major (``column_scales``, as ``store_codes_k_major`` stores them) or as a layer holds them;
    3-bit slots of one or two 32-value chunks (``chunks``)."""
    from efficientqat.kernels.kmajor import gemv_kmajor_forward

    gen = torch.Generator().manual_seed(bits + k)
    q, z, s, qw, zeros, scales, gl = rand_layer(32, k, bits, group, gen, scale_dtype=torch.float16)
    x = torch.randn(1, k, generator=gen).to(DEV, torch.float16)
    bias = torch.randn(32, generator=gen).to(DEV, torch.float16)
    if column_scales:
        scales, zeros = (t.t().contiguous().t() for t in (scales, zeros))
    y = gemv_kmajor_forward(x, qw.t().contiguous().t(), scales, zeros, bias, bits, gl,
                            tuning.Config(1, 8, chunks, 1, 1, 1, tuning.KMAJOR))
    assert y.shape == (1, 32) and rel(y, reference(x, q, z, scales, gl, bias)[0]) < 3e-3


def test_kmajor_kernel_refuses_what_it_cannot_take():
    from efficientqat.kernels.kmajor import gemv_kmajor_forward

    gen = torch.Generator().manual_seed(3)
    cfg = tuning.Config(1, 8, 0, 1, 1, 1, tuning.KMAJOR)
    for bits, group, m, k_major, named in ((4, 128, 1, False, "strides"), (8, 64, 1, True, "8-bit"),
                                            (2, 32, 1, True, "group 32"), (4, 128, 2, True, "not 2")):
        q, z, s, qw, zeros, scales, gl = rand_layer(32, 1024, bits, group, gen, scale_dtype=torch.float16)
        codes = qw.t().contiguous().t() if k_major else qw
        x = torch.randn(m, 1024, generator=gen).to(DEV, torch.float16)
        with pytest.raises(ValueError, match=named):
            gemv_kmajor_forward(x, codes, scales, zeros, None, bits, gl, cfg)


def test_dispatch_offers_the_kmajor_kernel_to_k_major_codes_at_m1_only(monkeypatch):
    """A layer whose codes are stored K-major is tuned under keys of its own, and at M = 1 with fp16 x
    and no row ops its candidates end with the K-major kernel's tiles, which then run; N-major
    codes, row ops (under a key of their own, where the K-major kernel's choice cannot reach) and
    M = 2 are not offered them."""
    from efficientqat.kernels import autograd
    from efficientqat.row_ops import RowOps

    seen = {}

    def record(key, candidates, run, chain=False, copies=None):
        cands = list(candidates())
        seen[key.split("|")[1] + "|" + key.split("|")[2]] = cands
        return next((c for c in cands if c.variant == tuning.KMAJOR), cands[0])

    monkeypatch.setattr(tuning, "choose", record)
    gen = torch.Generator().manual_seed(5)
    q, z, s, qw, zeros, scales, gl = rand_layer(64, 512, 4, 128, gen, scale_dtype=torch.float16)
    k_major = qw.t().contiguous().t()
    x = torch.randn(2, 512, generator=gen).to(DEV, torch.float16)
    ref = reference(x, q, z, scales, gl)[0]
    assert rel(autograd.forward_2d(x[:1], k_major, scales, zeros, None, 4, gl), ref[:1]) < 3e-3
    autograd.forward_2d(x[:1], qw, scales, zeros, None, 4, gl)
    autograd.forward_2d(x, k_major, scales, zeros, None, 4, gl)
    residual = torch.zeros(1, 64, device=DEV, dtype=torch.float16)
    autograd.forward_2d(x[:1], k_major, scales, zeros, None, 4, gl, ops=RowOps(residual=residual))
    variants = [c.variant for c in seen["gemv1_kmajor|m=1"]]
    first = variants.index(tuning.KMAJOR)
    assert first > 0 and all(v == tuning.KMAJOR for v in variants[first:])
    for key in ("gemv1|m=1", "gemv_tc_kmajor|m=2", "gemv1_residual_kmajor|m=1"):  # the residual: a key of its own
        assert all(c.variant != tuning.KMAJOR for c in seen[key])
    assert len(seen) == 4


def test_codes_stored_k_major_change_no_output_and_save_as_n_major():
    from efficientqat.packed_model import _unique_state_dict
    from efficientqat.qlinear import store_codes_k_major

    gen = torch.Generator().manual_seed(9)
    layer = PackedLinear.from_codes(torch.randint(0, 16, (64, 256), generator=gen), torch.rand(64, 2, generator=gen) * 0.01,
                                    torch.randint(0, 16, (64, 2), generator=gen), None, QuantSpec.from_name("w4g128"))
    n_major, scales = layer.qweight.clone(), layer.scales.detach().clone()
    x = torch.randn(3, 256, generator=gen)
    before = layer(x)
    assert layer.kernel_zeros().is_contiguous()  # built N-major before the repack
    model = torch.nn.Sequential(layer)
    assert store_codes_k_major(model) is model and layer.qweight.stride() == (1, 32)
    assert layer.scales.stride() == layer.kernel_zeros().stride() == (1, 2)  # rebuilt beside the scales
    assert isinstance(layer.scales, torch.nn.Parameter) and torch.equal(layer.scales, scales)
    assert torch.equal(layer.qweight, n_major) and torch.equal(layer(x), before)
    saved = _unique_state_dict(model)
    assert saved["0.qweight"].is_contiguous() and torch.equal(saved["0.qweight"], n_major)
    assert saved["0.scales"].is_contiguous() and torch.equal(saved["0.scales"], scales)
    three_bit = PackedLinear.from_codes(torch.randint(0, 8, (64, 256), generator=gen), torch.rand(64, 2, generator=gen),
                                        torch.randint(0, 8, (64, 2), generator=gen), None, QuantSpec.from_name("w3g128"))
    store_codes_k_major(three_bit)  # 3-bit layers stay N-major unless asked for (slower at M = 1)
    assert three_bit.qweight.is_contiguous() and three_bit.scales.is_contiguous()
    assert store_codes_k_major(three_bit, bits=(3,)).qweight.stride() == (1, 24) and three_bit.scales.stride() == (1, 2)


@pytest.mark.parametrize("bits", [2, 4])
def test_fragment_order_places_each_code_of_a_tile_step_once(bits):
    """The repack's map from (lane, word, half, field) to (row, K) inside a 16-row tile and a step is a
    bijection, and the rows and K values a lane's MMA registers meet are those of its B registers:
    its 16 K values of each quad contiguous (two vector loads of x)."""
    from efficientqat.kernels.fragments import _fragment_positions, step_k

    row, k = _fragment_positions(bits)
    flat = (row * step_k(bits) + k).flatten()
    assert sorted(flat.tolist()) == list(range(16 * step_k(bits)))
    lane = torch.arange(32).view(32, 1, 1, 1).expand_as(k)
    assert torch.equal(k % 64 // 16, lane % 4)  # lane t owns values 16 t .. 16 t + 15 of each quad
    assert torch.equal(row % 8, lane // 4)  # rows g and g + 8


def test_three_bit_fragment_order_places_each_code_of_a_unit_once():
    """At 3 bits the map from (lane, pair, half) to (row, K) inside a tile and a 128-K unit is a
    bijection with the same lane properties as at 2 and 4 bits."""
    from efficientqat.kernels.fragments import _pair_positions3

    row, k = _pair_positions3()
    assert sorted((row * 128 + k).flatten().tolist()) == list(range(16 * 128))
    lane = torch.arange(32).view(32, 1, 1).expand_as(k)
    assert torch.equal(k % 64 // 16, lane % 4) and torch.equal(row % 8, lane // 4)


def test_three_bit_fragment_codes_read_back_field_by_field():
    """The 3-bit repack read back as the kernel reads it (:func:`fragments._pair3`): of every two
    128-K units, the first block holds unit 0's words 0-3, the second unit 1's, the third both
    units' words 4-5; word ``i`` of a quad holds pairs ``5 i .. 5 i + 4`` at bits ``3 f`` of each
    half and bit ``i`` of the quad's 16th pair in bit 15 of each half."""
    from efficientqat.kernels.fragments import _pair_positions3, fragment_codes

    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (32, 512), generator=gen)
    blocks = fragment_codes(pack_qweight(codes, 3), 3).to(torch.int64) & 0xFFFFFFFF
    assert blocks.shape == (2, 6, 32, 4)
    row, k = _pair_positions3()
    blocks = blocks.view(2, 2, 3, 32, 4)  # [tile, unit pair, block, lane, word]
    for unit in range(2):
        words = torch.cat((blocks[:, :, unit], blocks[:, :, 2, :, 2 * unit:2 * unit + 2]), dim=-1)  # [.., 32, 6]
        for quad in range(2):
            for pair in range(16):
                for half in range(2):
                    if pair < 15:
                        got = words[..., 3 * quad + pair // 5] >> (16 * half + 3 * (pair % 5)) & 7
                    else:
                        got = sum((words[..., 3 * quad + i] >> (16 * half + 15) & 1) << i for i in range(3))
                    r, kk = row[:, 16 * quad + pair, half], k[:, 16 * quad + pair, half]  # per lane
                    want = codes.view(2, 16, 2, 2, 128)[:, r, :, unit, kk]  # [32 lanes, tile, unit pair]
                    assert torch.equal(got.permute(2, 0, 1), want)


def test_fragment_repack_in_column_chunks_matches_one_pass(monkeypatch):
    """The repack works :data:`REPACK_ROWS` columns at a time (a ragged last chunk here) and reads
    codes stored either way; every chunk size gives the same words."""
    from efficientqat.kernels import fragments

    gen = torch.Generator().manual_seed(8)
    qw = pack_qweight(torch.randint(0, 4, (80, 256), generator=gen), 2)
    monkeypatch.setattr(fragments, "REPACK_ROWS", 32)
    chunked = fragments.fragment_codes(qw, 2)
    monkeypatch.setattr(fragments, "REPACK_ROWS", 1024)
    assert torch.equal(chunked, fragments.fragment_codes(qw, 2))
    assert torch.equal(chunked, fragments.fragment_codes(qw.t().contiguous().t(), 2))


@pytest.mark.parametrize("bits,group,m,k,column_scales,block_n,warps,ahead,vectors,x_ahead", [
    (4, 128, 1, 1024, False, 16, 2, 1, 1, True), (2, 64, 5, 1536, True, 16, 8, 2, 1, True),
    (4, -1, 16, 512, True, 16, 4, 2, 2, True), (2, 128, 9, 1024, False, 48, 1, 1, 2, True),
    (4, 64, 3, 1536, True, 16, 4, 1, 2, True), (4, 192, 2, 768, False, 16, 1, 1, 1, True),
    (4, 64, 7, 2048, False, 16, 2, 2, 1, True), (2, 128, 12, 2560, True, 16, 4, 2, 2, True),
    (4, 128, 11, 1024, False, 16, 2, 0, 2, True), (2, 64, 3, 1536, True, 48, 8, 0, 1, True),
    (2, 64, 13, 1024, False, 48, 2, 1, 1, False), (4, 128, 6, 1280, True, 16, 4, 1, 2, False),
    (2, 64, 16, 2560, False, 16, 4, 2, 1, False), (3, 128, 1, 512, False, 16, 2, 1, 1, True),
    (3, 64, 9, 768, True, 32, 2, 1, 2, True), (3, 128, 4, 1536, False, 16, 4, 0, 1, True),
    (3, 256, 16, 1024, True, 16, 1, 2, 1, False), (3, -1, 5, 1024, False, 64, 2, 1, 2, False)])
def test_fragment_kernel_matches_float64(bits, group, m, k, column_scales, block_n, warps, ahead, vectors, x_ahead):
    """The ``mma.sync`` decode kernel over codes in fragment order against float64: one or two token
    tiles (M = 9, 16), steps its warps do not fill (1536 at 2 bits: 12 steps on 8 warps; 2560: 10 on 4),
    a long loop two steps ahead (16 steps a warp), steps loaded just before use (none ahead: rows past M read
    unmasked where the steps fill the warps, 11 rows on 8 steps and 2 warps), x alone read just before use
    (one or two steps of codes ahead; 10 steps on 4 warps, which they do not fill, 20 on 4, 8 on 2), per-channel
    groups, three tiles a program, a bias, scales and zero points N-major or column-major, one or two
    steps loaded ahead, steps of two vectors (a group a step at w2g128, two groups at w4g64, one step
    of a group at per-channel), groups of 192 (a group's quads over two steps); with two vectors a
    step a residual added to the output. At 3 bits (units of 128 K in three blocks every two): one
    unit a step (its half of the third block) or two, steps the warps do not fill (3 on 2 warps),
    none ahead, x just before use two steps ahead, groups of 64, 256 and per-channel; 64 columns (3-bit
    zero points pack 32 columns a word), 48 at 2 and 4 bits. On the CPU the warp's MMA is emulated with the PTX fragment
    layout; on the GPU this checks that layout against the hardware."""
    from efficientqat.kernels.fragments import fragment_codes, gemv_fragments_forward

    gen = torch.Generator().manual_seed(bits + k + m)
    n = 64 if bits == 3 else 48
    q, z, s, qw, zeros, scales, gl = rand_layer(n, k, bits, group, gen, scale_dtype=torch.float16)
    x = torch.randn(m, k, generator=gen).to(DEV, torch.float16)
    bias = torch.randn(n, generator=gen).to(DEV, torch.float16)
    if column_scales:
        scales, zeros = (t.t().contiguous().t() for t in (scales, zeros))
    residual = torch.randn(m, n, generator=gen).to(DEV, torch.float16) if vectors == 2 else None
    y = gemv_fragments_forward(x, fragment_codes(qw, bits), scales, zeros, bias, bits, gl,
                               tuning.Config(1, block_n, ahead, 1, warps, 1, tuning.FRAGMENTS, vectors=vectors,
                                             x_ahead=x_ahead), residual=residual)
    ref = reference(x, q, z, scales, gl, bias)[0] + (0 if residual is None else residual.double().cpu())
    assert y.shape == (m, n) and rel(y, ref) < 3e-3


def test_fragment_kernel_refuses_what_it_cannot_take():
    from efficientqat.kernels.fragments import fragment_codes, gemv_fragments_forward

    gen = torch.Generator().manual_seed(4)
    cfg = tuning.Config(1, 16, 1, 1, 1, 1, tuning.FRAGMENTS)
    q, z, s, qw, zeros, scales, gl = rand_layer(32, 512, 4, 128, gen, scale_dtype=torch.float16)
    codes = fragment_codes(qw, 4)
    for x, bits, group, named in ((torch.randn(17, 512), 4, 128, "not 17"), (torch.randn(1, 512), 3, 128, "3-bit"),
                                  (torch.randn(1, 512), 4, 32, "group 32")):
        with pytest.raises(ValueError, match=named):
            gemv_fragments_forward(x.to(DEV, torch.float16), codes, scales, zeros, None, bits, group, cfg)
    with pytest.raises(ValueError, match="steps of 512"):  # 8 vectors a step: 512 values of K = 640
        q, z, s, qw, zeros2, scales2, gl = rand_layer(32, 640, 4, 128, gen, scale_dtype=torch.float16)
        gemv_fragments_forward(torch.randn(1, 640).to(DEV, torch.float16), fragment_codes(qw, 4), scales2, zeros2, None,
                               4, 128, replace(cfg, vectors=8))
    with pytest.raises(ValueError, match="bfloat16"):
        gemv_fragments_forward(torch.randn(1, 512).to(DEV, torch.bfloat16), codes, scales, zeros, None, 4, 128, cfg)
    q, z, s, qw3, zeros3, scales3, gl = rand_layer(32, 1024, 3, 128, gen, scale_dtype=torch.float16)
    with pytest.raises(ValueError, match="at 3 bits K a multiple of 256, steps of 1 or 2 units"):  # 4 units: 512
        gemv_fragments_forward(torch.randn(1, 1024).to(DEV, torch.float16), fragment_codes(qw3, 3), scales3, zeros3,
                               None, 3, 128, replace(cfg, vectors=4))
    with pytest.raises(ValueError, match="3 steps ahead"):
        gemv_fragments_forward(torch.randn(1, 512).to(DEV, torch.float16), codes, scales, zeros, None, 4, 128,
                               replace(cfg, block_k=3))
    with pytest.raises(ValueError, match=r"0 steps ahead \(0, 1 or 2\), x just before use \(only with 1 or 2 steps"):
        gemv_fragments_forward(torch.randn(1, 512).to(DEV, torch.float16), codes, scales, zeros, None, 4, 128,
                               replace(cfg, block_k=0, x_ahead=False))


def test_three_bit_layers_hold_fragment_codes_unless_left_out_and_then_match_the_fallback(monkeypatch):
    """``store_codes_fragments`` gives 3-bit layers codes in fragment order by default (``bits``
    leaving 3 out leaves them alone), whose kernel the tuner is offered and, chosen, gives the
    fallback's output."""
    from efficientqat.kernels import autograd
    from efficientqat.qlinear import store_codes_fragments

    chosen = []

    def pick_fragments(key, candidates, run, chain=False, copies=None):
        chosen.append(next(c for c in candidates() if c.variant == tuning.FRAGMENTS))
        return chosen[-1]

    monkeypatch.setattr(tuning, "choose", pick_fragments)

    gen = torch.Generator().manual_seed(7)
    layer = PackedLinear.from_codes(torch.randint(0, 8, (64, 256), generator=gen),
                                    torch.rand(64, 2, generator=gen) * 0.01, torch.randint(0, 8, (64, 2), generator=gen),
                                    None, QuantSpec.from_name("w3g128")).to(DEV)
    store_codes_fragments(layer, bits=(2, 4))
    assert layer.fragment_codes is None
    store_codes_fragments(layer)
    assert layer.fragment_codes.shape == (4, 3, 32, 4)
    x = torch.randn(3, 256, generator=gen).to(DEV, torch.float16)
    fallback = x.double().cpu() @ layer.dequantize_weight(torch.float64).cpu().t()
    for m in (1, 3):
        y = autograd.forward_2d(x[:m], layer.qweight, layer.scales, layer.kernel_zeros(), None, 3, 128,
                                fragments=layer.fragment_codes)
        assert rel(y, fallback[:m]) < 3e-3
    assert len(chosen) == 2


def test_layers_holding_fragment_codes_are_offered_their_kernel_and_match_the_fallback(monkeypatch):
    """``store_codes_fragments`` gives a layer its codes in fragment order (outside the state dict);
    its fp16 calls at M <= 16 without a fused norm (with or without a residual, which the kernel
    adds; the plain matmul of the unfused SiLU path) are then tuned under keys of their own whose
    candidates end with the fragment-order kernel's tiles, which give the fallback's output; calls
    with a fused norm, and layers without those codes, are not offered them."""
    from efficientqat.qlinear import store_codes_fragments
    from efficientqat.row_ops import RowOps

    seen = {}
    real_choose = tuning.choose

    def record(key, candidates, run, chain=False, copies=None):
        cands = list(candidates())
        seen.setdefault(key.split("|")[1] + "|" + key.split("|")[2], []).append(cands)
        return next((c for c in cands if c.variant == tuning.FRAGMENTS), cands[0])

    gen = torch.Generator().manual_seed(6)
    layer = PackedLinear.from_codes(torch.randint(0, 4, (64, 512), generator=gen), torch.rand(64, 8, generator=gen) * 0.01,
                                    torch.randint(0, 4, (64, 8), generator=gen), None, QuantSpec.from_name("w2g64")).to(DEV)
    plain = PackedLinear.from_codes(layer.int_codes(), layer.scales.t(), layer.int_zeros(), None,
                                    QuantSpec.from_name("w2g64")).to(DEV)
    x = torch.randn(3, 512, generator=gen).to(DEV, torch.float16)
    fallback = x.double().cpu() @ layer.dequantize_weight(torch.float64).cpu().t()
    assert store_codes_fragments(torch.nn.Sequential(layer)) and layer.fragment_codes.shape == (4, 4, 32, 4)
    assert "fragment_codes" not in layer.state_dict()
    from efficientqat.kernels import autograd

    monkeypatch.setattr(tuning, "choose", record)
    g = layer.spec.group_len(512)
    weights = (layer.qweight, layer.scales, layer.kernel_zeros())
    for m in (1, 3):
        assert rel(autograd.forward_2d(x[:m], *weights, None, 2, g, fragments=layer.fragment_codes), fallback[:m]) < 3e-3
    residual = torch.randn(1, 64, generator=gen).to(DEV, torch.float16)
    y = autograd.forward_2d(x[:1], *weights, None, 2, g, ops=RowOps(residual=residual), fragments=layer.fragment_codes)
    assert rel(y, fallback[:1] + residual.double().cpu()) < 3e-3
    norm = torch.ones(512, device=DEV, dtype=torch.float16)
    autograd.forward_2d(x[:1], *weights, None, 2, g, ops=RowOps(norm_weight=norm, eps=1e-6),
                        fragments=layer.fragment_codes)
    autograd.forward_2d(x[:1], plain.qweight, plain.scales, plain.kernel_zeros(), None, 2, g)
    from efficientqat.fused_mlp import silu_mul_interleaved

    y = autograd.forward_2d(x[:1], *weights, None, 2, g, silu_mul=True, fragments=layer.fragment_codes)
    assert rel(y, silu_mul_interleaved(fallback[:1])) < 3e-3  # a gate/up layer: the unfused path reaches them
    assert "gemv_silu_mul_fragments|m=1" in seen
    assert len(seen["gemv1_fragments|m=1"]) == 3  # plain, residual and the unfused SiLU path's calls: one key
    for cands in seen["gemv1_fragments|m=1"] + seen["gemv_tc_fragments|m=4"]:
        variants = [c.variant for c in cands]
        first = variants.index(tuning.FRAGMENTS)
        assert first > 0 and all(v == tuning.FRAGMENTS for v in variants[first:])
    for key in ("gemv1_norm|m=1", "gemv1|m=1"):
        assert all(c.variant != tuning.FRAGMENTS for cands in seen[key] for c in cands)
    assert len(seen) == 5
    monkeypatch.setattr(tuning, "choose", real_choose)
    if not GPU:  # PackedLinear runs the kernels only on CUDA
        return
    assert rel(layer(x), fallback) < 3e-3
