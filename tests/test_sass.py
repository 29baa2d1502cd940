"""The tensor-core decode kernel compiled for Hopper (sm_90) without a GPU: the interpreter that
runs the other kernel tests never compiles, so a kernel that computes right there can still fail
to compile or spill on the GPU. Runs ``pipelines/sass_stats.py`` (Triton's own ptxas, nvdisasm and
cuobjdump) in a process without ``TRITON_INTERPRET``."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import has_cuda_toolchain, run_compiled

if not has_cuda_toolchain():
    pytest.skip("this Triton build has no CUDA toolchain", allow_module_level=True)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return run_compiled("sass_stats", *args)


def sass(*args: str) -> dict:
    done = run_script("--json", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_paired_codes_compile_for_hopper_with_fewer_instructions_per_weight():
    tile = ["--bits", "4", "--group", "128", "--block-n", "256", "--block-c", "16", "--warps", "4", "--stages", "3"]
    unit, paired = sass(*tile), sass(*tile, "--paired")
    assert paired["local_stores"] == 0 and paired["loop_instructions"] > 0
    # no float conversion per weight: fewer instructions and registers than the unit-float tile
    assert paired["per_weight"] < 0.8 * unit["per_weight"] and paired["registers"] < unit["registers"]


@pytest.mark.parametrize("wgmma", [False, True])
def test_two_pairs_per_dot_compile_for_w2g64(wgmma):
    stats = sass("--bits", "2", "--group", "64", "--block-n", "256", "--block-c", "4", "--paired", *(["--wgmma"] if wgmma else []))
    assert stats["local_stores"] == 0 and stats["loop_instructions"] > 0


def test_paired_codes_as_the_wgmma_register_operand_compile_for_hopper():
    tile = ["--bits", "4", "--group", "128", "--block-n", "128", "--block-c", "16", "--warps", "4", "--stages", "3", "--paired"]
    stats, synchronous = sass(*tile, "--wgmma"), sass(*tile)
    assert all(op.startswith("HGMMA") for op in stats["tensor_ops"]) and stats["tensor_ops"]
    assert all(op.startswith("HMMA") for op in synchronous["tensor_ops"]) and synchronous["tensor_ops"]
    assert stats["local_stores"] == 0 and stats["per_weight"] <= 1.05 * synchronous["per_weight"]


def test_paired_codes_refuse_a_step_past_the_group():
    done = run_script("--bits", "2", "--group", "64", "--block-c", "16", "--paired")
    assert done.returncode != 0 and "inside --group 64" in done.stderr


def test_k_major_codes_reach_shared_memory_in_16_byte_copies():
    """N-major codes meet a K-major shared tile and go over in 4-byte async copies (session 7's
    profile: L1 65-70% busy at M = 16); stored K-major they need a quarter of the copy instructions
    (x's few copies unchanged: 36 -> 12 in all at this tile with Triton 3.9)."""
    tile = ["--bits", "4", "--group", "128", "--block-n", "256", "--block-c", "16", "--warps", "4", "--stages", "3", "--paired"]
    n_major, k_major = sass(*tile), sass(*tile, "--k-major")
    assert k_major["local_stores"] == 0 and k_major["loop_async_copies"] > 0
    assert 3 * k_major["loop_async_copies"] <= n_major["loop_async_copies"]


def test_one_stage_paired_tile_loads_its_codes_without_async_copies():
    """Unpipelined, the paired tile takes its codes straight into registers (the tuner's one-stage
    twins, ``candidates.paired_code_twins``): no ``cp.async`` in the loop, fewer instructions per
    weight than the pipelined tile, no spills."""
    tile = ["--bits", "4", "--group", "128", "--block-n", "256", "--block-c", "16", "--warps", "4", "--paired"]
    one, two = sass(*tile, "--stages", "1"), sass(*tile, "--stages", "2")
    assert two["loop_async_copies"] > 0 and one["loop_async_copies"] == 0 and one["local_stores"] == 0
    assert one["per_weight"] < two["per_weight"]


def test_x_read_as_one_tile_a_step_costs_fewer_instructions_and_registers():
    """``PAIRED_XTILE``: one load of x a step split in registers, against 64-bit words split by
    shifts per slot, at the one-stage tile (Triton 3.6: 200 against 208 registers)."""
    tile = ["--bits", "4", "--group", "128", "--block-n", "256", "--block-c", "16", "--warps", "4", "--paired",
            "--stages", "1"]
    words, x_tile = sass(*tile), sass(*tile, "--x-tile")
    assert x_tile["local_stores"] == 0 and x_tile["loop_async_copies"] == 0
    assert x_tile["per_weight"] < words["per_weight"] and x_tile["registers"] <= words["registers"]


def test_k_lanes_issue_fewer_instructions_per_weight_than_the_split_k_tile_they_replace():
    """sm_90, 4096^2 at w4g128: the split-K tile the tuner picked on an H200 (512 columns, split
    128) against the K-lane tile that needs no split-K (32 lanes); both without spills."""
    split = sass("--half2", "--bits", "4", "--block-n", "512", "--block-c", "4", "--warps", "4", "--split", "128")
    lanes = sass("--half2", "--bits", "4", "--block-n", "32", "--block-c", "16", "--warps", "4", "--lanes", "32")
    assert split["local_stores"] == 0 and lanes["local_stores"] == 0
    assert lanes["per_weight"] < 0.7 * split["per_weight"]


def test_half2_stats_refuse_lanes_that_do_not_divide_the_steps():
    done = run_script("--half2", "--bits", "4", "--block-c", "16", "--split", "3", "--lanes", "4")
    assert done.returncode != 0 and "must divide the 32 steps" in done.stderr


def test_codes_through_tma_and_the_l2_prefetch_add_no_global_load():
    """``PAIRED_TMA``: the codes reach shared memory by the tensor-memory accelerator, so the
    three-stage tile issues fewer global loads than the x-tile tile it comes from; ``prefetch``
    then asks L2 for the step after by ``prefetch.global.L2`` (``CCTL.E.PF2``), which writes no
    register: the loads stay as they were, and nothing spills."""
    tile = ["--bits", "4", "--group", "128", "--block-n", "256", "--block-c", "16", "--warps", "4", "--paired"]
    x_tile = sass(*tile, "--stages", "1", "--x-tile")
    tma, ahead = sass(*tile, "--stages", "3", "--tma"), sass(*tile, "--stages", "3", "--tma", "--prefetch", "1")
    assert tma["global_loads"] < x_tile["global_loads"] and tma["l2_prefetches"] == x_tile["l2_prefetches"] == 0
    assert ahead["l2_prefetches"] >= 2 and ahead["global_loads"] == tma["global_loads"]
    assert tma["local_stores"] == ahead["local_stores"] == 0


def test_half2_stats_refuse_the_tensor_core_kernels_options():
    done = run_script("--half2", "--bits", "4", "--prefetch", "1")
    assert done.returncode != 0 and "not to --half2" in done.stderr


def test_kmajor_kernel_compiles_for_hopper_at_4_and_3_bits():
    """The K-major M = 1 kernel, which the interpreter tests only emulate, compiles for sm_90 without
    spills at 4 and 3 bits at the tuner's tiles on an H200 (session 20; the 2-bit loop is the 4-bit
    one's with more fields a word), and its
    3-bit slots of two chunks spend fewer instructions a weight than slots of one (the per-slot
    zero-point fold and scale are shared by twice the weights)."""
    four = sass("--kmajor", "--bits", "4", "--group", "128", "--block-n", "4", "--warps", "2")
    one, two = (sass("--kmajor", "--bits", "3", "--block-n", "4", "--warps", "1", "--block-c", c) for c in ("1", "2"))
    assert all(stats["local_stores"] == 0 and stats["loop_instructions"] > 0 for stats in (four, one))
    assert two["per_weight"] < one["per_weight"]  # (two chunks spill a few registers with Triton 3.9, not 3.6)
    assert run_script("--kmajor", "--bits", "3", "--block-c", "4").returncode != 0


def test_the_fragment_kernel_decodes_m16_in_fewer_instructions_per_weight_than_the_tensor_core_tile():
    """sm_90, w4g128 at M = 16: the ``mma.sync`` kernel over codes in fragment order (its tuned tile on
    an H200, 32 columns on 8 warps: 3.64 lane-instructions a weight under Triton 3.6 and 3.9, no
    spills) against the ``tl.dot`` decode tile the tuner chose there (256 columns, 16 chunks, codes
    through TMA: 4.80 under 3.6, 5.10 under 3.9); its loop runs the MMAs itself (HMMA.16816), two a
    register set at M = 16."""
    fragments = sass("--fragments", "--bits", "4", "--group", "128", "--block-n", "32", "--warps", "8", "--tokens", "16")
    one_token = sass("--fragments", "--bits", "4", "--group", "128", "--block-n", "32", "--warps", "8")
    dot = sass("--bits", "4", "--group", "128", "--block-n", "256", "--block-c", "16", "--warps", "4", "--stages", "3",
               "--paired", "--tma")
    assert fragments["local_stores"] == 0
    assert fragments["per_weight"] < 0.8 * dot["per_weight"]
    assert fragments["tensor_ops"] == 16 and one_token["tensor_ops"] == 8
