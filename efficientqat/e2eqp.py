"""``python -m efficientqat.e2eqp init_from=<run>``: E2E-QP on the packed model of a Block-AP run.

Loads ``<init>/model``, trains only the per-group step sizes end to end (resumable, one or more
processes under torchrun), saves a packed model of the same format into ``<run>/model``, and
prints perplexity beside the init run's rows, also written to ``<run>/metrics.json``. Rank 0
owns the run folder; the other ranks only train.
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

from efficientqat.cli import publish_metrics, run_in_hydra_dir
from efficientqat.data import eval_windows
from efficientqat.distributed import DistContext, init_distributed, shutdown
from efficientqat.e2e_data import load_e2e_data
from efficientqat.e2e_trainer import E2ETrainConfig, freeze_step_sizes_, train_step_sizes_, trainable_step_sizes_
from efficientqat.errors import ConfigError, ModelLoadError
from efficientqat.evaluate import device_name, evaluate_once, format_table
from efficientqat.model_utils import load_tokenizer, resolve_path
from efficientqat.packed_model import load_packed_model, save_packed_model, spec_from_config
from efficientqat.quantizer import QuantSpec
from efficientqat.run_folder import STATE_FILE, RunFolder, atomic_path
from efficientqat.settings import DTYPES, register_resolvers, resolve_device, resolve_dtype, text_source
from efficientqat.tracking import Tracker

log = logging.getLogger("efficientqat.e2eqp")
register_resolvers()
INIT_STAGES = ("blockap", "e2eqp")


def check_init_run(init: Path) -> tuple[dict[str, Any], QuantSpec]:
    """The finished run state of ``init`` and the QuantSpec of its packed model; ModelLoadError otherwise."""
    from transformers import AutoConfig

    state_file = init / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError):
        raise ModelLoadError(f"init_from='{init}' is not a run folder of ours (no readable {STATE_FILE})") from None
    if state.get("stage") not in INIT_STAGES or not state.get("done"):
        raise ModelLoadError(f"init_from='{init}' is not a finished Block-AP/E2E-QP run "
                             f"(stage {state.get('stage')}, done {state.get('done')})")
    if not (init / "model" / "config.json").is_file():
        raise ModelLoadError(f"init_from='{init}' has no packed model in {init / 'model'}")
    return state, spec_from_config(AutoConfig.from_pretrained(init / "model"))


def check_quant(cfg: DictConfig, spec: QuantSpec) -> None:
    """A ``quant`` given in the config must describe the checkpoint, not silently differ from it."""
    quant = cfg.get("quant")
    if quant is None:
        return
    wanted = (int(quant.wbits), int(quant.group_size))
    if wanted != (spec.bits, spec.group_size):
        raise ConfigError(f"quant asks for {wanted[0]}-bit, group {wanted[1]}, but init_from holds a "
                          f"{spec.bits}-bit, group {spec.group_size} model ({spec.name})")


def e2e_train_config(cfg: DictConfig, spec: QuantSpec, device: torch.device) -> E2ETrainConfig:
    """Typed training settings; the learning rate defaults to the published one for the init run's bits."""
    t = cfg.e2e_train
    lr = t.lr if t.lr is not None else t.lr_by_bits.get(spec.bits)
    if lr is None:
        raise ConfigError(f"e2e_train.lr is null and lr_by_bits has no entry for {spec.bits} bits")
    precision = str(t.precision)
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"e2e_train.precision='{precision}' must be auto, bf16, fp16 or fp32")
    if precision == "auto":
        autocast = torch.bfloat16 if device.type == "cuda" else None
    else:
        autocast = None if precision == "fp32" else DTYPES[precision]
    for key in ("epochs", "global_batch", "micro_batch", "eval_every", "save_every"):
        if int(t[key]) < 1:
            raise ConfigError(f"e2e_train.{key}={t[key]} must be at least 1")
    return E2ETrainConfig(
        lr=float(lr), weight_decay=float(t.weight_decay), warmup_ratio=float(t.warmup_ratio), epochs=int(t.epochs),
        max_steps=None if t.max_steps is None else int(t.max_steps), global_batch=int(t.global_batch),
        micro_batch=int(t.micro_batch), grad_clip=None if t.grad_clip is None else float(t.grad_clip),
        gradient_checkpointing=bool(t.gradient_checkpointing), autocast_dtype=autocast,
        eval_every=int(t.eval_every), save_every=int(t.save_every), seed=int(cfg.seed),
    )


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (matching the bf16 autocast), float32 on the CPU."""
    if name == "auto" and device.type == "cuda":
        return torch.bfloat16
    return resolve_dtype(name, device)


def run_e2eqp(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The whole E2E-QP job on this process (one of several under torchrun).

    Returns the metrics written to ``run_dir/metrics.json`` on rank 0 and ``{}`` on the others.
    """
    ctx = init_distributed(resolve_device(str(cfg.device)))
    try:
        return _run(cfg, Path(run_dir), ctx)
    finally:
        shutdown(ctx)


def _run(cfg: DictConfig, run_dir: Path, ctx: DistContext) -> dict[str, Any]:
    device = ctx.device
    init = Path(resolve_path(str(cfg.init_from))).resolve()
    init_state, spec = check_init_run(init)
    check_quant(cfg, spec)
    train_cfg = e2e_train_config(cfg, spec, device)
    dtype = model_dtype(str(cfg.dtype), device)
    tokenizer = load_tokenizer(str(init / "model"))
    train, val = load_e2e_data(cfg.e2e_data, tokenizer)
    train_cfg.total_steps(len(train))
    train_cfg.micro_batches_per_rank(ctx.world)
    eval_sets = {name: eval_windows(text_source(node), tokenizer, int(cfg.eval.seqlen), cfg.eval.get("max_windows"))
                 for name, node in cfg.eval.sets.items()}
    container = OmegaConf.to_container(cfg, resolve=True)
    settings = {"init_from": str(init), "init_fingerprint": init_state.get("fingerprint"), "quant": spec.name,
                "e2e_data": container["e2e_data"], "e2e_train": {**container["e2e_train"], "lr": train_cfg.lr},
                "seed": int(cfg.seed), "dtype": str(dtype), "device_type": device.type}
    run = ctx.main_first(lambda: RunFolder(run_dir, settings, "e2eqp"))
    run = run or RunFolder(run_dir, settings, "e2eqp")  # other ranks: the folder is claimed, only read it
    if run.done:
        metrics = json.loads((run_dir / "metrics.json").read_text()) if ctx.is_main else {}
        if ctx.is_main:
            print(f"{run_dir} already holds this finished run:\n{metrics['table']}")
        return metrics
    if ctx.is_main:
        with atomic_path(run_dir / "config.yaml") as tmp:
            OmegaConf.save(cfg, tmp, resolve=True)
    torch.manual_seed(int(cfg.seed))

    model_dir = run_dir / "model"
    tracker = (Tracker(str(cfg.wandb.mode), str(cfg.wandb.project), run_dir, f"e2eqp-{init.name}-{spec.name}",
                       f"e2eqp-{run.fingerprint}", container) if ctx.is_main else None)
    if not run.state.get("model_saved"):
        start = time.perf_counter()
        model = load_packed_model(init / "model", dtype)
        model.config.use_cache = False
        step_sizes = trainable_step_sizes_(model)
        pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        final = train_step_sizes_(model, step_sizes, train, val, train_cfg, run, ctx, pad_id,
                                  tracker.log if tracker else lambda metrics: None)
        if ctx.is_main:
            freeze_step_sizes_(model)
            save_packed_model(model.cpu(), tokenizer, model_dir, spec, stage="e2eqp", init_from=str(init),
                              e2e_data={"name": str(cfg.e2e_data.name), "source": str(cfg.e2e_data.source),
                                        "examples": len(train)})
            run.commit(model_saved=True, final_val=final,
                       e2e_seconds=run.state.get("e2e_seconds", 0.0) + time.perf_counter() - start)
        del model
    if not ctx.is_main:
        return {}

    bs = int(cfg.eval.batch_size)
    init_rows = _init_rows(init, cfg, eval_sets)
    if init_rows is None:  # the init run was evaluated differently: evaluate its model here
        evaluate_once(run, "init", "Block-AP" if init_state["stage"] == "blockap" else "E2E-QP (init)", spec.name,
                       lambda: load_packed_model(init / "model", dtype), eval_sets, device, bs)
        init_rows = [run.state["evals"]["init"]]
    evaluate_once(run, "e2eqp", "E2E-QP", spec.name, lambda: load_packed_model(model_dir, dtype), eval_sets, device, bs)
    row = {**run.state["evals"]["e2eqp"], "seconds": run.state["e2e_seconds"]}
    rows = init_rows + [row]
    reference = next((r["method"] for r in rows if r["setting"] == "-"), None)
    table = format_table(rows, list(eval_sets), reference=reference)
    metrics = {
        "init_from": str(init), "quant": spec.name, "device": device_name(device), "dtype": str(dtype),
        "world_size": ctx.world, "e2e_data": container["e2e_data"],
        "train": {"lr": train_cfg.lr, "steps": train_cfg.total_steps(len(train)), "global_batch": train_cfg.global_batch,
                  "examples": len(train)},
        "final_val": run.state["final_val"],
        "eval": {"seqlen": int(cfg.eval.seqlen), "windows": {k: int(v.shape[0]) for k, v in eval_sets.items()}},
        "rows": rows, "e2e_seconds": run.state["e2e_seconds"], "table": table,
    }
    publish_metrics(run, metrics, tracker)
    print(f"\nE2E-QP {spec.name} from {init} — {len(train)} examples of {cfg.e2e_data.name}, "
          f"run folder {run_dir}\n{table}\n")
    return metrics


def _init_rows(init: Path, cfg: DictConfig, eval_sets: dict[str, torch.Tensor]) -> list[dict[str, Any]] | None:
    """The init run's table rows when it was evaluated on the same windows as this run; else None."""
    try:
        metrics = json.loads((init / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (metrics.get("eval", {}).get("seqlen") == int(cfg.eval.seqlen)
            and metrics["eval"].get("windows") == {k: int(v.shape[0]) for k, v in eval_sets.items()})
    rows = [r for r in metrics["rows"] if r["method"] != "E2E-QP"] if same else []
    return rows or None


@hydra.main(version_base="1.3", config_path="../conf", config_name="e2eqp")
def main(cfg: DictConfig) -> None:
    run_in_hydra_dir("efficientqat.e2eqp", run_e2eqp, cfg)


if __name__ == "__main__":
    main()
