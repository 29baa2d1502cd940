"""The command line: bad input gets a named error and leaves files alone; sweeps compose and summarise."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose
from efficientqat.blockap import run_blockap
from efficientqat.errors import ConfigError, DataError, ModelLoadError, RunFolderError

REPO = Path(__file__).resolve().parents[1]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("quant.wbits=5", ConfigError, "wbits=5"),
        ("quant.group_size=48", ConfigError, r"layers\.0\..*group_size=48 does not divide"),
        ("model.path=/nonexistent/model", ModelLoadError, "/nonexistent/model"),
        ("data.source=/nonexistent/calib.jsonl", DataError, "/nonexistent/calib.jsonl"),
        ("data.n_train=100000", DataError, "100000"),
        ("train.epochs=0", ConfigError, "train.epochs=0"),
    ],
)
def test_bad_input_is_named_and_writes_nothing_else(override, error, message, tiny_overrides, tmp_path):
    cfg = compose("blockap", tiny_overrides("llama") + ["train.epochs=1", override])
    with pytest.raises(error, match=message):
        run_blockap(cfg, tmp_path / "run")
    leftovers = [p.name for p in (tmp_path / "run").glob("*")] if (tmp_path / "run").exists() else []
    assert set(leftovers) <= {"state.json", "config.yaml"}, leftovers


def test_folder_of_another_run_or_foreign_files_is_refused_untouched(tiny_overrides, tmp_path):
    base = tiny_overrides("llama") + ["train.epochs=1", "eval.baselines=[]"]
    run_blockap(compose("blockap", base), tmp_path / "run")
    before = _tree_digest(tmp_path / "run")
    with pytest.raises(RunFolderError, match="holds another run.*quant"):
        run_blockap(compose("blockap", base + ["quant.wbits=2"]), tmp_path / "run")
    assert _tree_digest(tmp_path / "run") == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(RunFolderError, match="notes.txt"):
        run_blockap(compose("blockap", base), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "efficientqat.blockap", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_two_value_sweep_runs_and_leaves_one_summary(tiny_overrides, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "quant=w4g128,w2g64", f"hydra.sweep.dir={sweep_dir}", "train.epochs=1"]
    args += [o for o in tiny_overrides("llama") if not o.startswith("quant=")]
    proc = _cli(args, REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (sweep_dir / "summary.md").read_text()
    assert "w4g32" in summary and "w2g32" in summary and summary.count("| FP32 |") == 1
    assert (sweep_dir / "0-w4g32" / "model" / "config.json").exists()
    assert "Sweep summary" in proc.stdout


def test_cli_error_is_one_clear_line(tiny_overrides, tmp_path):
    proc = _cli(tiny_overrides("llama") + ["model.path=/nonexistent/model", f"hydra.run.dir={tmp_path}/r"], REPO)
    assert proc.returncode != 0
    assert "efficientqat.blockap: error: model path '/nonexistent/model' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
