"""``python -m efficientqat.blockap``: Block-AP on a Hugging Face causal LM, with baselines.

Evaluates the unquantized model and round-to-nearest at the same bits/group, runs Block-AP
(resumable), saves the packed model into ``<run>/model`` and prints one perplexity table,
also written to ``<run>/metrics.json``. Run folder and outputs come from Hydra's runtime.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from efficientqat.block_ap import quantize_model_block_ap
from efficientqat.data import calibration_windows, eval_windows
from efficientqat.errors import ConfigError
from efficientqat.cli import publish_metrics, run_in_hydra_dir
from efficientqat.evaluate import device_name, evaluate_once, format_table
from efficientqat.model_utils import check_model_source, decoder_layers, linear_modules, load_causal_lm, load_tokenizer
from efficientqat.packed_model import load_packed_model, pack_rtn_, save_packed_model
from efficientqat.qlinear import check_packable
from efficientqat.quantizer import QuantSpec
from efficientqat.run_folder import RunFolder, atomic_path
from efficientqat.settings import (
    activation_config,
    block_train_config,
    quant_spec,
    register_resolvers,
    resolve_device,
    resolve_dtype,
    result_settings,
    text_source,
)
from efficientqat.tracking import Tracker

log = logging.getLogger("efficientqat.blockap")
register_resolvers()


def check_quantizable(model: nn.Module, spec: QuantSpec) -> None:
    """Fail before any work if a decoder Linear cannot take this bits/group setting."""
    for i, block in enumerate(decoder_layers(model)):
        for name, linear in linear_modules(block).items():
            check_packable(linear.in_features, linear.out_features, spec, f"layers.{i}.{name}")


def run_blockap(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The whole Block-AP job; returns the metrics it writes to ``run_dir/metrics.json``."""
    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(cfg.model.dtype), device)
    spec = quant_spec(cfg)
    train_cfg = block_train_config(cfg, device)
    act_cfg = activation_config(cfg)
    check_model_source(str(cfg.model.path))
    run = RunFolder(run_dir, result_settings(cfg, device), "blockap")
    if run.done:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        print(f"{run_dir} already holds this finished run:\n{metrics['table']}")
        return metrics
    with atomic_path(run_dir / "config.yaml") as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)
    torch.manual_seed(int(cfg.seed))

    tokenizer = load_tokenizer(str(cfg.model.path), bool(cfg.model.trust_remote_code))
    d = cfg.data
    train_windows, val_windows = calibration_windows(
        text_source(d), tokenizer, int(d.n_train), int(d.n_val), int(d.seqlen), int(cfg.seed)
    )
    eval_sets = {
        name: eval_windows(text_source(node), tokenizer, int(cfg.eval.seqlen), cfg.eval.get("max_windows"))
        for name, node in cfg.eval.sets.items()
    }

    def load_fp() -> nn.Module:
        model = load_causal_lm(str(cfg.model.path), dtype, bool(cfg.model.trust_remote_code))
        check_quantizable(model, spec)
        return model

    fp_label = {torch.float16: "FP16", torch.bfloat16: "BF16", torch.float32: "FP32"}[dtype]
    bs = int(cfg.eval.batch_size)
    baselines = list(cfg.eval.baselines)
    unknown = set(baselines) - {"fp", "rtn"}
    if unknown:
        raise ConfigError(f"eval.baselines has unknown entries {sorted(unknown)}; use fp and/or rtn")
    if "fp" in baselines:
        evaluate_once(run, "fp", fp_label, "-", load_fp, eval_sets, device, bs)
    if "rtn" in baselines:
        evaluate_once(run, "rtn", "RTN", spec.name, lambda: pack_rtn_(load_fp(), spec, dtype), eval_sets, device, bs)

    model_dir = run_dir / "model"
    tracker = Tracker(str(cfg.wandb.mode), str(cfg.wandb.project), run_dir,
                      f"blockap-{cfg.model.name}-{spec.name}", f"blockap-{run.fingerprint}",
                      OmegaConf.to_container(cfg, resolve=True))
    if not run.state.get("model_saved"):
        start = time.perf_counter()
        model = quantize_model_block_ap(
            load_fp(), train_windows, val_windows, spec, train_cfg, act_cfg, run, device, dtype,
            on_block_done=tracker.log, on_epoch=tracker.log,
        )
        save_packed_model(model, tokenizer, model_dir, spec, stage="blockap",
                          calibration={"source": str(d.source), "docs": d.docs, "n_train": int(d.n_train),
                                       "n_val": int(d.n_val), "seqlen": int(d.seqlen)})
        run.commit(model_saved=True, blockap_seconds=run.state.get("blockap_seconds", 0.0) + time.perf_counter() - start)
    evaluate_once(run, "blockap", "Block-AP", spec.name, lambda: load_packed_model(model_dir, dtype),
                   eval_sets, device, bs)

    evals = run.state["evals"]
    baseline_rows = [evals[k] for k in ("fp", "rtn") if k in evals]
    # the Block-AP row reports the quantization time, not its evaluation time (kept in the state as it was)
    rows = baseline_rows + [{**evals["blockap"], "seconds": run.state["blockap_seconds"]}]
    table = format_table(rows, list(eval_sets), reference=fp_label if "fp" in baselines else None)
    metrics = {
        "model": str(cfg.model.path), "quant": spec.name, "device": device_name(device), "dtype": str(dtype),
        "calibration": {"source": str(d.source), "docs": d.docs, "n_train": int(d.n_train), "n_val": int(d.n_val),
                        "seqlen": int(d.seqlen), "epochs": int(cfg.train.epochs)},
        "eval": {"seqlen": int(cfg.eval.seqlen), "windows": {k: int(v.shape[0]) for k, v in eval_sets.items()}},
        "rows": rows, "blocks": run.state["blocks"], "blockap_seconds": run.state["blockap_seconds"], "table": table,
    }
    publish_metrics(run, metrics, tracker)
    print(f"\nBlock-AP {cfg.model.name} {spec.name} — calibration {d.n_train}x{d.seqlen} tokens, "
          f"{cfg.train.epochs} epochs, run folder {run_dir}\n{table}\n")
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="blockap")
def main(cfg: DictConfig) -> None:
    run_in_hydra_dir("efficientqat.blockap", run_blockap, cfg)


if __name__ == "__main__":
    main()
