"""``pipelines/bench_tuning.py`` without a GPU: its comparison table, and that a run without a CUDA
device (or a failing child process) stops with an error that says so."""

from __future__ import annotations

import pytest
import torch

from conftest import load_pipeline


@pytest.fixture(scope="module")
def bench():
    return load_pipeline("bench_tuning")


def test_table_compares_each_mode_with_the_first(bench):
    args = bench.parse_args(["--shape", "4096,11008", "--quant", "w3g128", "--threads", "0,8"])
    assert (args.n, args.k, args.thread_counts) == (4096, 11008, [0, 8])
    cfg = {"block_n": 512, "split_k": 86}
    rows = [{"threads": 0, "first_s": 120.0, "tuned_s": 2e-4, "configs": {"H200|gemv1|m=1": cfg}},
            {"threads": 8, "first_s": 30.0, "tuned_s": 2e-4, "configs": {"H200|gemv1|m=1": cfg}}]
    text = bench.table(rows, args)
    assert "4096 x 11008, w3g128, M = 1" in text
    assert "| 0 | 120.0 (1.00x) | 0.20 |" in text and "| 8 | 30.0 (4.00x) | 0.20 |" in text
    assert "gemv1: {'block_n': 512, 'split_k': 86}" in text


def test_sm90_table_reports_compile_time_per_thread_count(bench):
    args = bench.parse_args(["--sm90", "--quant", "w3g128", "--threads", "0,2"])
    rows = [{"threads": 0, "first_s": 21.6, "tuned_s": 0.0, "configs": {}, "tiles": 10},
            {"threads": 2, "first_s": 10.8, "tuned_s": 0.0, "configs": {}, "tiles": 10}]
    text = bench.table(rows, args)
    assert "compiling its 10 M = 1 paired-fp16 tiles for sm_90" in text
    assert "| 0 | 21.6 (1.00x) |" in text and "| 2 | 10.8 (2.00x) |" in text


def test_bad_arguments_are_named(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--threads", "eight"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_refuses_and_a_failed_child_is_reported(bench):
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main(["--threads", "0"])
    with pytest.raises(RuntimeError, match="the 3-thread run failed"):
        bench.run_mode(bench.parse_args(["--shape", "64,128", "--quant", "w4g64"]), 3)
