"""GPTQ export: our packed tensors already are GPTQ-v2's (``qweight/qzeros/scales/g_idx``,
exact zero points, 3-bit as the dense stream), so the export is the same tensors under a
``quant_method: gptq, checkpoint_format: gptq_v2`` config, which GPTQModel and vLLM's
``gptq_gemm`` path read (see :mod:`efficientqat.exporters.runtime_support`).

GPTQ v1 stores ``zero - 1`` and runtimes add the 1 back, so an asymmetric model with a zero
point of 0 (which ours have: zero points span the whole ``[0, 2^b - 1]``) cannot be written as
v1 without changing its weights: that export is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from efficientqat.errors import ConfigError
from efficientqat.exporters.common import write_model_folder
from efficientqat.packed_model import _unique_state_dict
from efficientqat.quantizer import QuantSpec
from efficientqat.run_folder import atomic_path


def gptq_config(spec: QuantSpec) -> dict[str, Any]:
    """quantization_config of a GPTQ-v2 checkpoint (fields GPTQModel, transformers and vLLM read)."""
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq_v2",
        "format": "gptq_v2",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": False,
        "desc_act": False,
        "static_groups": False,
        "true_sequential": True,
        "lm_head": False,
        "pack_dtype": "int32",
        "damp_percent": 0.01,
        "meta": {"quantizer": ["efficientqat"]},
    }


def refuse_gptq_v1(spec: QuantSpec) -> None:
    """GPTQ v1 cannot hold our asymmetric zero points; say so and what to use instead."""
    raise ConfigError(
        f"format=gptq_v1 cannot represent this asymmetric {spec.name} model: v1 stores zero points as "
        "'zero - 1', so a zero point of 0 (used by asymmetric group quantization) would be lost. "
        "Use format=gptq_v2 (GPTQModel, vLLM gptq with checkpoint_format gptq_v2) or format=compressed_tensors"
    )


def write_gptq_v2(model: nn.Module, tokenizer: Any, spec: QuantSpec, folder: Path) -> None:
    """The packed model's tensors as they are, with GPTQ-v2 config.json and quantize_config.json."""
    qc = gptq_config(spec)
    write_model_folder(folder, model, tokenizer, _unique_state_dict(model), {"quantization_config": qc})
    with atomic_path(folder / "quantize_config.json") as tmp:
        tmp.write_text(json.dumps(qc, indent=2) + "\n")
