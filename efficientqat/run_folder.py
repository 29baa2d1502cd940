"""A run folder: its identity (config fingerprint), resumable progress, and atomic writes.

Layout (under the Hydra run directory)::

    config.yaml            resolved config of this run (written once)
    state.json             {"fingerprint", "stage", "next_block", "done"}: the commit point
    ckpt/block_007.safetensors   packed state of each finished block
    ckpt/acts_007.safetensors    activation snapshot at the start of block 7 (optional)
    model/                 the packed model in Hugging Face layout (when done)
    metrics.json           perplexity table and per-block stats

Every file is written to a temporary name in the same folder and renamed into place, and
``state.json`` is replaced last, so a run killed at any instant resumes from the last
finished block and never sees a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from efficientqat.errors import RunFolderError

STATE_FILE = "state.json"


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync and rename it onto ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(target: Path, data: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def fingerprint(settings: dict[str, Any]) -> str:
    """Stable hash of the settings that determine a run's result."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RunFolder:
    """Progress of one resumable run, guarded by the fingerprint of its result-defining config."""

    def __init__(self, root: Path, settings: dict[str, Any], stage: str) -> None:
        self.root = Path(root)
        self.stage = stage
        self.settings = settings
        self.fingerprint = fingerprint(settings)
        self.ckpt = self.root / "ckpt"
        self.state = self._claim()

    def _claim(self) -> dict[str, Any]:
        """Adopt the folder: fresh, or a resumable run with the same fingerprint; else refuse."""
        state_file = self.root / STATE_FILE
        if state_file.exists():
            try:
                state = json.loads(state_file.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise RunFolderError(f"{state_file} is unreadable ({err}); not touching this folder") from err
            if state.get("stage") != self.stage or state.get("fingerprint") != self.fingerprint:
                changed = sorted(
                    k for k in set(self.settings) | set(state.get("settings", {}))
                    if self.settings.get(k) != state.get("settings", {}).get(k)
                )
                raise RunFolderError(
                    f"output folder {self.root} holds another run (stage {state.get('stage')}, settings differ in: "
                    f"{', '.join(changed) or 'stage'}); choose another folder with hydra.run.dir=... "
                    "or remove that one yourself"
                )
            return state
        foreign = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        foreign = [n for n in foreign if n not in (".hydra", f"{self.stage}.log", "wandb", "config.yaml")]
        if foreign:
            raise RunFolderError(
                f"output folder {self.root} already holds files that are not from this run ({', '.join(sorted(foreign)[:5])}); "
                "choose another folder with hydra.run.dir=..."
            )
        state = {"stage": self.stage, "fingerprint": self.fingerprint, "settings": self.settings,
                 "next_block": 0, "done": False, "blocks": []}
        write_json(self.root / STATE_FILE, state)
        return state

    @property
    def next_block(self) -> int:
        return int(self.state["next_block"])

    @property
    def done(self) -> bool:
        return bool(self.state["done"])

    def block_file(self, index: int) -> Path:
        return self.ckpt / f"block_{index:03d}.safetensors"

    def snapshot_file(self, index: int) -> Path:
        return self.ckpt / f"acts_{index:03d}.safetensors"

    def commit(self, **updates: Any) -> None:
        """Record progress: the single atomic step that makes finished work count."""
        self.state.update(updates)
        write_json(self.root / STATE_FILE, self.state)
