"""E2E-QP: only step sizes learn, the loss falls, resume and two processes reproduce one run, bad input is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from efficientqat.blockap import run_blockap
from efficientqat.distributed import DistContext
from efficientqat.e2e_data import IGNORE_INDEX, load_e2e_data
from efficientqat.e2e_trainer import trainable_step_sizes_, validation_loss
from efficientqat.e2eqp import check_init_run, e2e_train_config, run_e2eqp
from efficientqat.errors import ConfigError, DataError, ModelLoadError, RunFolderError
from efficientqat.model_utils import load_tokenizer
from efficientqat.packed_model import load_packed_model
from efficientqat.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
_CACHE: dict[str, Path] = {}


@pytest.fixture
def blockap_run(tiny_overrides, tmp_path_factory) -> Path:
    """A finished w2g64 Block-AP run of the tiny llama (built once per session)."""
    if "blockap" not in _CACHE:
        folder = tmp_path_factory.mktemp("blockap") / "run"
        run_blockap(compose("blockap", tiny_overrides("llama", "w2g64") + ["train.epochs=1"]), folder)
        _CACHE["blockap"] = folder
    return _CACHE["blockap"]


@pytest.fixture
def e2e_overrides(blockap_run, text_files):
    def make(*extra: str) -> list[str]:
        return [
            f"init_from={blockap_run}", "device=cpu", f"e2e_data.source={text_files['train']}",
            "e2e_data.context=64", "e2e_data.max_samples=32", "e2e_data.n_val=4", "e2e_train.global_batch=8",
            "e2e_train.micro_batch=2", "e2e_train.lr=2e-3", "e2e_train.max_steps=4", "e2e_train.eval_every=2",
            "e2e_train.save_every=2", "eval.seqlen=64", f"eval.sets.heldout.source={text_files['heldout']}",
            "wandb.mode=disabled", *extra,
        ]

    return make


@pytest.fixture
def e2e_run(e2e_overrides, tmp_path_factory) -> Path:
    """An uninterrupted single-process E2E-QP run (built once per session)."""
    if "e2e" not in _CACHE:
        folder = tmp_path_factory.mktemp("e2e") / "run"
        run_e2eqp(compose("e2eqp", e2e_overrides()), folder)
        _CACHE["e2e"] = folder
    return _CACHE["e2e"]


def _final_step_sizes(run: Path) -> dict[str, torch.Tensor]:
    step = json.loads((run / "state.json").read_text())["step"]
    return torch.load(run / "ckpt" / f"e2e_step_{step:06d}.pt", weights_only=True)["step_sizes"]


def test_only_step_sizes_get_gradients(blockap_run):
    model = load_packed_model(blockap_run / "model", torch.float32)
    step_sizes = trainable_step_sizes_(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(step_sizes) and all(p.dtype == torch.float32 for p in step_sizes.values())


def test_training_changes_only_step_sizes_and_lowers_the_loss(blockap_run, e2e_run, e2e_overrides):
    before, after = load_file(blockap_run / "model" / "model.safetensors"), load_file(e2e_run / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        if name.endswith(".scales"):
            assert after[name].dtype == torch.float16 and not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    cfg = compose("e2eqp", e2e_overrides())
    tokenizer = load_tokenizer(str(blockap_run / "model"))
    _, val = load_e2e_data(cfg.e2e_data, tokenizer)
    model = load_packed_model(blockap_run / "model", torch.float32)
    train_cfg = e2e_train_config(cfg, check_init_run(blockap_run)[1], torch.device("cpu"))
    initial = validation_loss(model, val, train_cfg, DistContext(0, 1, torch.device("cpu")), 0)
    metrics = json.loads((e2e_run / "metrics.json").read_text())
    assert metrics["final_val"]["val/loss"] < initial["val/loss"]
    assert [r["method"] for r in metrics["rows"]][-2:] == ["Block-AP", "E2E-QP"]
    assert "E2E-QP | w2g" in metrics["table"]



class _Killed(Exception):
    pass


class _KilledAtStep3(Tracker):
    """Stands in for a kill: the run dies while logging step 3 (after the step-2 checkpoint)."""

    def log(self, metrics):
        if metrics["step"] == 3:
            raise _Killed


def test_resume_after_kill_equals_uninterrupted(e2e_run, e2e_overrides, tmp_path, monkeypatch):
    cfg = compose("e2eqp", e2e_overrides())
    with monkeypatch.context() as patch:
        patch.setattr("efficientqat.e2eqp.Tracker", _KilledAtStep3)
        with pytest.raises(_Killed):
            run_e2eqp(cfg, tmp_path / "run")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 2 and not state["done"]
    run_e2eqp(cfg, tmp_path / "run")
    resumed, reference = _final_step_sizes(tmp_path / "run"), _final_step_sizes(e2e_run)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    saved, saved_ref = (load_file(run / "model" / "model.safetensors") for run in (tmp_path / "run", e2e_run))
    assert all(torch.equal(saved[k], saved_ref[k]) for k in saved_ref)


def test_two_gloo_processes_through_the_cli_equal_one(e2e_run, e2e_overrides, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "efficientqat.e2eqp", *e2e_overrides(f"hydra.run.dir={tmp_path / 'dist'}")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| E2E-QP | w2g32 |" in proc.stdout
    two, one = _final_step_sizes(tmp_path / "dist"), _final_step_sizes(e2e_run)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "dist" / "metrics.json").read_text())["world_size"] == 2


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("+quant=w3g128", ConfigError, "3-bit, group 128.*w2g32"),
        ("e2e_data.max_samples=4", DataError, "fewer than one global batch"),
        ("e2e_data.n_val=100000", DataError, "n_val=100000"),
        ("e2e_data.source=/nonexistent/text.txt", DataError, "/nonexistent/text.txt"),
        ("e2e_train.micro_batch=3", ConfigError, "micro_batch=3"),
    ],
)
def test_bad_input_is_named_and_writes_nothing(override, error, message, e2e_overrides, tmp_path):
    with pytest.raises(error, match=message):
        run_e2eqp(compose("e2eqp", e2e_overrides(override)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_init_from_must_be_a_finished_packed_run(blockap_run, e2e_overrides, tmp_path):
    for init in (tmp_path, blockap_run / "model", REPO / "efficientqat" / "assets" / "tiny-llama"):
        with pytest.raises(ModelLoadError, match="init_from"):
            run_e2eqp(compose("e2eqp", e2e_overrides(f"init_from={init}")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_with_another_config_is_refused_untouched(e2e_run, e2e_overrides):
    before = {p: p.read_bytes() for p in e2e_run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="e2e_train"):
        run_e2eqp(compose("e2eqp", e2e_overrides("e2e_train.lr=1e-3")), e2e_run)
    assert {p: p.read_bytes() for p in e2e_run.rglob("*") if p.is_file()} == before


def test_alpaca_prompt_is_masked(blockap_run, tmp_path):
    rows = [{"instruction": f"Say word {i}.", "input": "" if i % 2 else "context", "output": f"word {i}"}
            for i in range(6)]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    cfg = compose("e2eqp", ["e2e_data=alpaca_local", f"e2e_data.source={tmp_path / 'alpaca.json'}",
                            "e2e_data.n_val=2", "e2e_data.target_max_len=4"])
    tokenizer = load_tokenizer(str(blockap_run / "model"))
    train, val = load_e2e_data(cfg.e2e_data, tokenizer)
    assert (len(train), len(val)) == (4, 2)
    for ids, labels in zip(train.input_ids, train.labels):
        scored = labels != IGNORE_INDEX
        n = int(scored.sum())
        assert 1 <= n <= 4 and scored[-n:].all() and not scored[:-n].any()
        assert torch.equal(labels[-n:], ids[-n:])
    batch = train.batch([0, 1], pad_id=0)
    assert batch["labels"][batch["attention_mask"] == 0].eq(IGNORE_INDEX).all()
