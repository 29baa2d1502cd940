"""Perplexity by the GPTQ protocol, and the comparison table printed at the end of a run."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
from torch import nn

from efficientqat.run_folder import RunFolder

log = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, each scored from its first token."""
    model.to(device).eval()
    nll, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        shift_labels = ids[:, 1:].reshape(-1)
        nll += nn.functional.cross_entropy(shift_logits, shift_labels, reduction="sum").item()
        count += shift_labels.numel()
    return math.exp(nll / count)


def evaluate_once(
    run: RunFolder, key: str, label: str, setting: str, build: Callable[[], nn.Module],
    eval_sets: dict[str, torch.Tensor], device: torch.device, batch_size: int,
) -> None:
    """Perplexity of one model on every eval set, cached in the run state (not redone on resume)."""
    evals = run.state.setdefault("evals", {})
    if key in evals:
        return
    start = time.perf_counter()
    model = build()
    ppl = {name: perplexity(model, windows, device, batch_size) for name, windows in eval_sets.items()}
    evals[key] = {"method": label, "setting": setting, "ppl": ppl, "seconds": time.perf_counter() - start}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run.commit(evals=evals)
    log.info("%s %s: %s", label, setting, {k: round(v, 3) for k, v in ppl.items()})


def device_name(device: torch.device) -> str:
    """What metrics.json records as the device."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def format_table(rows: list[dict[str, object]], datasets: list[str], reference: str | None = None) -> str:
    """Markdown table of perplexities, with the relative change against the ``reference`` row."""
    ref = next((r for r in rows if r["method"] == reference), None)
    header = ["method", "setting"] + [f"{d} ppl" for d in datasets]
    if ref:
        header += [f"{d} Δ%" for d in datasets]
    header.append("seconds")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ppl = row["ppl"]
        cells = [str(row["method"]), str(row["setting"])] + [f"{ppl[d]:.2f}" for d in datasets]
        if ref:
            cells += [f"{100 * (ppl[d] / ref['ppl'][d] - 1):+.1f}" for d in datasets]
        cells.append(f"{row.get('seconds', 0.0):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
