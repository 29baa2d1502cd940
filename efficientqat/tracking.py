"""Experiment tracking through wandb that never blocks on the network.

``mode: auto`` logs online only when a wandb login exists (WANDB_API_KEY or a netrc entry),
otherwise offline into the run folder (sync later with ``wandb sync``); ``disabled`` (tests,
machines without wandb) turns it into a no-op.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _has_login() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if _has_login() else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"wandb.mode='{mode}' must be online, offline, disabled or auto")
    return mode


class Tracker:
    """Thin wrapper over a wandb run; every method is safe to call when tracking is off."""

    def __init__(
        self, mode: str, project: str, run_dir: Path, name: str, run_id: str, config: dict[str, Any]
    ) -> None:
        self.run = None
        mode = resolve_mode(mode)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed; tracking is off")
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, mode=mode,
                                  resume="allow", id=run_id)
        except Exception as err:  # tracking must never stop a quantization run
            log.warning("wandb could not start (%s); tracking is off", err)

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
