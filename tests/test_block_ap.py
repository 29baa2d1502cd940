"""Block-AP on tiny models of each supported family: it learns, it packs, it resumes exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose
from efficientqat import blockap as blockap_cli
from efficientqat.block_ap import quantize_model_block_ap
from efficientqat.errors import TrainingDivergedError
from efficientqat.model_utils import load_causal_lm
from efficientqat.packed_model import load_packed_model
from efficientqat.run_folder import RunFolder
from efficientqat.settings import block_train_config


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_block_ap_beats_round_to_nearest_on_every_block(arch, tiny_overrides, tmp_path):
    cfg = compose("blockap", tiny_overrides(arch, "w2g64"))
    metrics = blockap_cli.run_blockap(cfg, tmp_path / "run")
    for block in metrics["blocks"]:
        # init_val_loss is the block's output MSE with round-to-nearest weights on the same inputs
        assert block["val_loss"][-1] < block["init_val_loss"], block
    rows = {r["method"]: r for r in metrics["rows"]}
    assert set(rows) == {"FP32", "RTN", "Block-AP"}
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["quantization_config"]
    assert saved["bits"] == 2 and saved["group_size"] == 32 and saved["sym"] is False
    assert saved["format"] == "gptq_v2"
    model = load_packed_model(tmp_path / "run" / "model", torch.float32)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def _run_until(cfg, run_dir, stop_after_block=None):
    """Block-AP as the CLI runs it, optionally 'killed' right after a block is committed."""
    device = torch.device("cpu")

    def stop(stats):
        if stop_after_block is not None and stats["block"] == stop_after_block:
            raise KeyboardInterrupt("simulated kill")

    from efficientqat.data import TextSource, calibration_windows
    from efficientqat.model_utils import load_tokenizer
    from efficientqat.settings import activation_config, quant_spec, result_settings

    tok = load_tokenizer(cfg.model.path)
    train, val = calibration_windows(TextSource(cfg.data.source), tok, 8, 2, 64, 0)
    run = RunFolder(run_dir, result_settings(cfg, device), "blockap")
    model = load_causal_lm(cfg.model.path, torch.float32)
    quantize_model_block_ap(model, train, val, quant_spec(cfg), block_train_config(cfg, device),
                            activation_config(cfg), run, device, torch.float32, on_block_done=stop)
    return run


@pytest.mark.parametrize("snapshot", ["always", "never"])
def test_resume_after_kill_gives_identical_packed_weights(snapshot, tiny_overrides, tmp_path):
    cfg = compose("blockap", tiny_overrides("qwen2", "w3g128") + [f"activations.snapshot={snapshot}"])
    _run_until(cfg, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _run_until(cfg, tmp_path / "killed", stop_after_block=0)
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert state["next_block"] == 1
    assert (tmp_path / "killed" / "ckpt" / "acts_001.safetensors").exists() == (snapshot == "always")
    resumed = _run_until(cfg, tmp_path / "killed")
    assert resumed.next_block == 2
    for i in range(2):
        a = load_file(str(tmp_path / "straight" / "ckpt" / f"block_{i:03d}.safetensors"))
        b = load_file(str(tmp_path / "killed" / "ckpt" / f"block_{i:03d}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_cli_run_resumes_and_skips_finished_work(tiny_overrides, tmp_path, monkeypatch):
    cfg = compose("blockap", tiny_overrides("llama", "w4g128") + ["train.epochs=1"])
    real = blockap_cli.quantize_model_block_ap

    def killed_after_block_0(*args, **kwargs):
        def stop(stats):
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **{**kwargs, "on_block_done": stop})

    monkeypatch.setattr(blockap_cli, "quantize_model_block_ap", killed_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        blockap_cli.run_blockap(cfg, tmp_path / "run")
    monkeypatch.setattr(blockap_cli, "quantize_model_block_ap", real)
    metrics = blockap_cli.run_blockap(cfg, tmp_path / "run")
    assert [b["block"] for b in metrics["blocks"]] == [0, 1]
    again = blockap_cli.run_blockap(cfg, tmp_path / "run")  # finished: nothing is redone
    assert again["table"] == metrics["table"]


def test_nan_loss_stops_with_a_clear_error_and_a_valid_run_folder(tiny_overrides, tmp_path, model_factory):
    from efficientqat.model_utils import decoder_layers

    folder = tmp_path / "nan-model"
    model = load_causal_lm(str(model_factory("llama")), torch.float32)
    with torch.no_grad():
        decoder_layers(model)[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    import shutil

    for f in model_factory("llama").glob("tokenizer*"):
        shutil.copy(f, folder)
    overrides = [o for o in tiny_overrides("llama", "w4g128") if not o.startswith("model.path")]
    cfg = compose("blockap", overrides + [f"model.path={folder}", "eval.baselines=[]"])
    with pytest.raises(TrainingDivergedError, match="block 1"):
        blockap_cli.run_blockap(cfg, tmp_path / "run")
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["next_block"] == 1 and not state["done"]
    assert not list((tmp_path / "run").rglob("*.tmp"))
