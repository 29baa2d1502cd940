"""What every Hydra entry point shares: the run folder from Hydra's runtime, and plain errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from efficientqat.errors import EfficientQATError
from efficientqat.run_folder import RunFolder, write_json
from efficientqat.tracking import Tracker


def run_in_hydra_dir(prog: str, job: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> Any:
    """Run ``job(cfg, <Hydra output dir>)``; a user's problem ends the program with one line, no traceback."""
    try:
        return job(cfg, Path(HydraConfig.get().runtime.output_dir))
    except EfficientQATError as err:
        raise SystemExit(f"{prog}: error: {err}") from None


def publish_metrics(run: RunFolder, metrics: dict[str, Any], tracker: Tracker) -> None:
    """Write metrics.json, hand the perplexities to the tracker, then mark the run done (the commit point)."""
    write_json(run.root / "metrics.json", metrics)
    tracker.summary({f"ppl/{r['method']}/{k}": v for r in metrics["rows"] for k, v in r["ppl"].items()})
    tracker.finish()
    run.commit(done=True)
