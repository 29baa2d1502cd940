"""Hydra callback: after a multirun, gather every job's metrics.json into one sweep summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from efficientqat.evaluate import format_table
from efficientqat.run_folder import atomic_path, write_json

log = logging.getLogger(__name__)


def summarize(sweep_dir: Path) -> str:
    """Write summary.md / summary.json under ``sweep_dir`` from its jobs' metrics; return the table."""
    jobs = sorted(sweep_dir.glob("*/metrics.json"))
    rows, seen_refs = [], set()
    datasets: list[str] = []
    for path in jobs:
        metrics = json.loads(path.read_text())
        for row in metrics["rows"]:
            key = (row["method"], row["setting"])
            if row["setting"] == "-" and key in seen_refs:
                continue  # the unquantized model appears once
            seen_refs.add(key)
            rows.append({**row, "job": path.parent.name})
            datasets = datasets or list(row["ppl"])
    if not rows:
        return ""
    ref = next((r["method"] for r in rows if r["setting"] == "-"), None)
    table = format_table(rows, datasets, reference=ref)
    write_json(sweep_dir / "summary.json", {"jobs": [p.parent.name for p in jobs], "rows": rows})
    with atomic_path(sweep_dir / "summary.md") as tmp:
        tmp.write_text(f"# Sweep summary ({len(jobs)} jobs)\n\n{table}\n")
    return table


class SweepSummary(Callback):
    """Registered in conf/*.yaml under hydra.callbacks; a no-op for single runs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = summarize(sweep_dir)
        if table:
            print(f"\nSweep summary ({sweep_dir / 'summary.md'}):\n{table}\n")
