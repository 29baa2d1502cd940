"""What every Hydra entry point shares: the run folder from Hydra's runtime, and plain errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from efficientqat.errors import EfficientQATError


def run_in_hydra_dir(prog: str, job: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> Any:
    """Run ``job(cfg, <Hydra output dir>)``; a user's problem ends the program with one line, no traceback."""
    try:
        return job(cfg, Path(HydraConfig.get().runtime.output_dir))
    except EfficientQATError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
