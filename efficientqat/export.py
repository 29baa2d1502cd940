"""``python -m efficientqat.export run=<run folder> format=<fmt> out=<folder>``: ship a finished run.

Formats: ``gptq_v2`` (GPTQModel, vLLM gptq), ``compressed_tensors`` (vLLM pack-quantized),
``dense`` (plain fp16/bf16 checkpoint); ``gptq_v1`` is refused for our asymmetric models.
The export is written into a temporary folder beside ``out``, re-read by an independent
reader and checked (weights bit for bit, logits), and only then renamed to ``out``: a failed
or interrupted export leaves nothing at ``out``, and an ``out`` holding files is never touched.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from efficientqat.cli import run_in_hydra_dir
from efficientqat.errors import ConfigError, RunFolderError
from efficientqat.exporters.compressed_tensors import write_compressed_tensors
from efficientqat.exporters.dense import DTYPES, write_dense
from efficientqat.exporters.gptq import refuse_gptq_v1, write_gptq_v2
from efficientqat.exporters.read_compressed_tensors import read_compressed_tensors
from efficientqat.exporters.read_dense import read_dense
from efficientqat.exporters.read_gptq import read_gptq_v2
from efficientqat.exporters.readback import ReadBack
from efficientqat.exporters.common import packed_layers
from efficientqat.exporters.runtime_support import support_report
from efficientqat.exporters.verify import check_logits, check_weights, probe_sequences
from efficientqat.loading import packed_model_dir
from efficientqat.packed_model import load_packed_model, spec_from_config
from efficientqat.quantizer import QuantSpec

FORMATS = ("gptq_v2", "gptq_v1", "compressed_tensors", "dense")


@dataclass(frozen=True)
class Plan:
    """How one format is written and read back, and what the check compares."""

    write: Callable[[nn.Module, Any, QuantSpec, Path], None]
    read: Callable[[Path, nn.Module], ReadBack]
    weight_dtype: torch.dtype | None  # dtype the weights are compared in (None: fp32 dequantization)
    logit_rel_tol: float


def plan_for(fmt: str, dense_dtype: str) -> Plan:
    if fmt == "gptq_v2":
        return Plan(write_gptq_v2, lambda p, _: read_gptq_v2(p), None, 1e-5)
    if fmt == "compressed_tensors":
        return Plan(write_compressed_tensors, lambda p, _: read_compressed_tensors(p), None, 1e-5)
    if fmt == "dense":
        if dense_dtype not in DTYPES:
            raise ConfigError(f"dtype={dense_dtype} is not a dense export dtype; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dense_dtype]
        return Plan(lambda m, t, s, p: write_dense(m, t, s, p, dtype),
                    lambda p, m: read_dense(p, sorted(packed_layers(m))), dtype, 3e-2)
    raise ConfigError(f"format={fmt} is unknown; choose one of {', '.join(FORMATS)}")


def check_out_folder(out: Path) -> None:
    """Refuse an ``out`` that exists and holds anything (it is never overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunFolderError(f"output folder {out} already exists and is not empty; choose another out=... "
                             "or remove it yourself (nothing was written)")


def export(run: str | Path, fmt: str, out: str | Path, dtype: str = "float16") -> dict[str, Any]:
    """Export a finished run to ``out`` in ``fmt``, checked; returns what the check measured."""
    out = Path(out).expanduser().resolve()
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt} is unknown; choose one of {', '.join(FORMATS)}")
    model_dir = packed_model_dir(run)
    check_out_folder(out)
    source = load_packed_model(model_dir, torch.float32)
    spec = spec_from_config(source.config)
    if fmt == "gptq_v1":
        refuse_gptq_v1(spec)
    plan = plan_for(fmt, dtype)
    tokenizer = _tokenizer(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        with torch.no_grad():
            plan.write(source, tokenizer, spec, staging)
        read = plan.read(staging, source)
        layers = check_weights(source, read, plan.weight_dtype)
        rel = check_logits(source, read, probe_sequences(int(source.config.vocab_size)), plan.logit_rel_tol)
        check_out_folder(out)  # still free?
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    report = support_report("gptq_v2" if fmt.startswith("gptq") else fmt, spec.bits)
    print(f"exported {model_dir} ({spec.name}) as {fmt} to {out}\n"
          f"check: {layers} quantized layers bit-identical to the source; logits max relative diff {rel:.1e}\n{report}")
    return {"out": str(out), "format": fmt, "layers_checked": layers, "logits_rel_diff": rel}


def _tokenizer(model_dir: Path) -> Any:
    """The run's tokenizer, or None when the model folder has none."""
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_in_hydra_dir("efficientqat.export", lambda c, _run_dir: export(str(c.run), str(c.format), str(c.out), str(c.dtype)), cfg)


if __name__ == "__main__":
    main()
