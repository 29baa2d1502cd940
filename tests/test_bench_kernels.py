"""``pipelines/bench_kernels.py``'s cost model, the part of the kernel benchmark that runs without
a GPU: per setting and M, time = fixed cost per call + bytes / marginal rate over the shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import PIPELINES, load_pipeline

SCRIPT = PIPELINES / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    return load_pipeline("bench_kernels")


def row(n: int, k: int, quant: str, m: int, fixed_us: float, rate: float, cublas_fixed_us: float) -> dict:
    """A timing row of a kernel that costs ``fixed_us`` plus its bytes at ``rate`` B/s, next to a
    cuBLAS that costs ``cublas_fixed_us`` plus its 16-bit bytes at 4.8 TB/s."""
    moved = n * k // 2 + m * (n + k) * 2
    dense = (n * k + m * (n + k)) * 2
    return dict(n=n, k=k, quant=quant, m=m, dtype="float16", bytes=moved,
                triton_ms=(fixed_us + moved / rate * 1e6) * 1e-3, cublas_ms=(cublas_fixed_us + dense / 4.8e12 * 1e6) * 1e-3)


def test_cost_model_recovers_fixed_cost_and_rate(bench):
    shapes = [(4096, 4096), (12288, 4096), (22016, 4096), (4096, 11008)]
    rows = [row(n, k, "w4g128", 1, 4.5, 3.9e12, 7.0) for n, k in shapes]
    rows += [row(n, k, "w2g64", 1, 3.0, 2.2e12, 7.0) for n, k in shapes]
    rows += [row(n, k, "w4g128", 16, 9.0, 1.0e12, 7.0) for n, k in shapes[:2]]  # two shapes: no fit
    fits = {(f["quant"], f["m"]): f for f in bench.cost_model(rows)}
    assert set(fits) == {("w4g128", 1), ("w2g64", 1)}
    for (quant, _), fixed, rate in ((("w4g128", 1), 4.5, 3.9e12), (("w2g64", 1), 3.0, 2.2e12)):
        f = fits[(quant, 1)]
        assert f["fixed_us"] == pytest.approx(fixed, rel=1e-6) and f["rate"] == pytest.approx(rate, rel=1e-6)
        assert f["residual_us"] < 1e-6 and f["shapes"] == 4
        assert f["cublas_fixed_us"] == pytest.approx(7.0, rel=1e-6) and f["cublas_rate"] == pytest.approx(4.8e12, rel=1e-6)
    table = bench.cost_table(list(fits.values()), 4.23e12)
    assert "| w4g128 | 1 | float16 | 4 | 4.50 | 3.90 (0.92) |" in table


@pytest.mark.parametrize("layout,name", [("k-major", "w4g128 K-major"), ("fragments", "w4g128 fragments")])
def test_other_layouts_are_a_setting_of_their_own(bench, layout, name):
    """Rows timed with ``--k-major`` or ``--fragments`` are fitted and tabled apart from the same
    quantization N-major."""
    shapes = [(4096, 4096), (12288, 4096), (22016, 4096)]
    rows = [row(n, k, "w4g128", 1, 4.5, 3.9e12, 7.0) for n, k in shapes]
    rows += [dict(row(n, k, "w4g128", 1, 3.5, 3.9e12, 7.0), layout=layout) for n, k in shapes]
    fits = {f["quant"]: f for f in bench.cost_model(rows)}
    assert fits["w4g128"]["fixed_us"] == pytest.approx(4.5) and fits[name]["fixed_us"] == pytest.approx(3.5)
    assert f"| 4096x4096 | {name} | 1 |" in bench.table([dict(r, rel_err=0, torch_ms=1, speedup_cublas=1,
                                                                      speedup_torch=1, bw_frac=1) for r in rows], 4e12, "x")


def test_fit_reads_stored_runs_later_files_winning(tmp_path):
    """``--fit`` on stored runs (no GPU): rows written before ``bytes`` existed carry it as
    bw_frac x time x copy rate, and a later run's row replaces the earlier one of its shape."""
    shapes = [(4096, 4096), (12288, 4096), (22016, 4096)]
    copy_bw = 4.0e12
    old = []
    for n, k in shapes:
        r = row(n, k, "w4g128", 1, 5.0, 3.5e12, 7.0)
        r["bw_frac"] = r.pop("bytes") / (r["triton_ms"] * 1e-3) / copy_bw
        old.append(r)
    old[2]["triton_ms"] *= 3  # a slow tile, re-timed below
    newer = [row(22016, 4096, "w4g128", 1, 5.0, 3.5e12, 7.0)]
    for name, rows in (("old.json", old), ("new.json", newer)):
        (tmp_path / name).write_text(json.dumps({"device": "x", "copy_bw": copy_bw, "rows": rows}))
    done = subprocess.run([sys.executable, str(SCRIPT), "--fit", str(tmp_path / "old.json"), str(tmp_path / "new.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| w4g128 | 1 | float16 | 3 | 5.00 | 3.50 (0.88) | 0.00 |" in done.stdout


def test_rows_record_the_configs_chosen_while_they_ran(bench, monkeypatch):
    """A row stores the tiles its timings ran (chosen since it started), not those of earlier rows."""
    from dataclasses import asdict

    earlier, this_row = bench.tuning.Config(1, 64, 4), bench.tuning.Config(16, 256, 16, 8, 4, 1, fixup=True, pdl=True)
    monkeypatch.setattr(bench.tuning, "_MEMO", {"dev|gemv1|m=1": earlier})
    before = set(bench.tuning.chosen_configs())
    bench.tuning._MEMO["dev|gemv_tc|m=16|pdl"] = this_row
    assert bench.configs_since(before) == {"dev|gemv_tc|m=16|pdl": asdict(this_row)}
