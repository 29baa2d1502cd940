"""``load_quantized``: one call from a run folder or a GPTQ-v2 export to a ready-to-generate model.

Every path goes through :func:`efficientqat.packed_model.load_packed_model`, so the layers are
our ``PackedLinear`` (Triton kernels on CUDA, PyTorch dequantize-then-matmul elsewhere) and no
dense weight is ever materialised. A GPTQ-v2 export holds exactly our tensors under a
``quant_method: gptq`` config, so it is loaded through a scratch folder that links the
tensors and carries our own config (no second loader to keep in sync).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from efficientqat.errors import ModelLoadError, RunFolderError
from efficientqat.fused_attention import fuse_decode_attention_
from efficientqat.fused_decoder import fuse_decoder_layers_
from efficientqat.fused_projections import fuse_projections_
from efficientqat.packed_model import QUANT_METHOD, load_packed_model, quantization_config
from efficientqat.qlinear import prepare_kernel_zeros_, store_codes_fragments
from efficientqat.quantizer import QuantSpec
from efficientqat.run_folder import STATE_FILE


def packed_model_dir(path: str | Path) -> Path:
    """The packed model folder of a finished run (given the run folder or its ``model/``).

    Any stage's run folder qualifies (Block-AP, E2E-QP): all that matters is that its
    ``state.json`` says done and ``model/`` holds a packed model of ours.
    """
    folder = Path(path).expanduser()
    run = folder if (folder / STATE_FILE).is_file() else folder.parent
    if not (run / STATE_FILE).is_file():
        if (folder / "config.json").is_file() and read_quant_config(folder).get("quant_method") == QUANT_METHOD:
            return folder  # a bare packed model folder (copied out of a run)
        raise RunFolderError(f"'{path}' is neither a run folder (no {STATE_FILE}) nor a packed model of ours")
    try:
        state = json.loads((run / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{run / STATE_FILE} is unreadable: {err}") from err
    if not state.get("done"):
        raise RunFolderError(
            f"run '{run}' is not finished (stage {state.get('stage')}, state.json done=false): "
            "finish it (run the same command again to resume) before exporting or loading it"
        )
    model_dir = run / "model"
    if read_quant_config(model_dir).get("quant_method") != QUANT_METHOD:
        raise ModelLoadError(f"'{model_dir}' is not a packed model of ours (no efficientqat quantization_config)")
    return model_dir


def read_quant_config(folder: Path) -> dict[str, Any]:
    """``quantization_config`` of a model folder's config.json ({} when there is none)."""
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"'{folder}' has no config.json: not a Hugging Face model folder")
    return json.loads(config.read_text()).get("quantization_config") or {}


def gptq_v2_spec(qc: dict[str, Any]) -> QuantSpec:
    """QuantSpec of a GPTQ config our layers can run as is (v2 zeros, in-order groups)."""
    fmt = qc.get("checkpoint_format", qc.get("format"))
    if fmt != "gptq_v2":
        raise ModelLoadError(f"GPTQ checkpoint_format '{fmt}' is not gptq_v2 (exact zero points); cannot load it")
    if qc.get("desc_act"):
        raise ModelLoadError("GPTQ checkpoints with desc_act=true (act-order) are not supported")
    return QuantSpec(int(qc["bits"]), int(qc["group_size"]))


def load_quantized(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
    fuse: bool = True, fused_attention: bool = True, fused_layers: bool = True, fragment_codes: bool = False,
) -> nn.Module:
    """A Hugging Face causal LM with our packed layers, ready for ``generate()``.

    ``path``: a finished run folder, its ``model/``, or a GPTQ-v2 export. ``device`` defaults
    to CUDA when present; ``dtype`` to fp16 on CUDA and fp32 on the CPU. ``fuse`` merges each
    layer's q/k/v and gate/up into one packed matmul apiece (fewer, larger launches per decode
    step; see :mod:`efficientqat.fused_projections`); ``state_dict()`` still reads unfused. Pass
    ``fuse=False`` for tools that wrap single projections (LoRA adapters on ``q_proj``, say).
    ``fused_attention`` gives Llama / Mistral / Qwen2 / Qwen3 attention a one-kernel decode step
    over a static cache (rotary, cache write, attention; :mod:`efficientqat.fused_attention`);
    every other call keeps Hugging Face's forward. ``fused_layers`` (with both of the above)
    moves each decoder layer's RMSNorms and residual adds of those steps into its matmuls
    (:mod:`efficientqat.fused_decoder`). ``fragment_codes`` gives each packed layer whose shape
    allows it a second copy of its codes in ``mma`` fragment order
    (:func:`efficientqat.qlinear.store_codes_fragments`), so fp16 calls at M <= 16 without a fused
    norm may take that decode kernel: on an H200 8192^2 layers ran 1.6-2.6x faster at M = 4 and 16
    than on the codes as saved (BENCHMARKS.md, session 26), for 0.5 bytes a weight more memory at
    4 bits; whole-model generation with it is not yet timed.
    """
    model = _load_unfused(path, device, dtype)
    if fuse:
        fuse_projections_(model)
    if fragment_codes:
        store_codes_fragments(model)
    if fused_attention:
        fuse_decode_attention_(model)
    if fused_layers:
        fuse_decoder_layers_(model)
    return prepare_kernel_zeros_(model)


def _load_unfused(path: str | Path, device: str | torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    folder = Path(path).expanduser()
    qc = read_quant_config(folder) if (folder / "config.json").is_file() else {}
    if qc.get("quant_method") != "gptq":
        return load_packed_model(packed_model_dir(folder), dtype, device).to(dtype)
    spec = gptq_v2_spec(qc)
    with tempfile.TemporaryDirectory(prefix="eqat-gptq-") as scratch:
        view = Path(scratch)
        for item in folder.iterdir():
            if item.name != "config.json":
                (view / item.name).symlink_to(item.resolve())
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = quantization_config(spec)
        (view / "config.json").write_text(json.dumps(config))
        model = load_packed_model(view, dtype, device).to(dtype)
    model.config.quantization_config = qc
    return model
