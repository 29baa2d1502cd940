"""``python pipelines/full_qat.py [-m quant=w2g64,w3g128,w4g128]``: the whole EfficientQAT method as one job.

Block-AP into ``<job>/blockap``, E2E-QP from its packed model into ``<job>/e2eqp`` (which
evaluates and puts its rows beside the FP/RTN/Block-AP ones), and that table as
``<job>/metrics.json`` so a sweep's summary compares every stage of every setting. Both stages
resume on their own, so starting a killed job again continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, open_dict

from efficientqat.blockap import run_blockap
from efficientqat.e2eqp import run_e2eqp
from efficientqat.cli import run_in_hydra_dir
from efficientqat.run_folder import write_json


def run_full_qat(cfg: DictConfig, job_dir: Path) -> dict[str, Any]:
    """Block-AP, then E2E-QP initialised from it; returns (and writes) the E2E-QP metrics."""
    run_blockap(cfg, job_dir / "blockap")
    e2e_cfg = cfg.copy()
    with open_dict(e2e_cfg):
        e2e_cfg.init_from = str(job_dir / "blockap")
    metrics = run_e2eqp(e2e_cfg, job_dir / "e2eqp")
    write_json(job_dir / "metrics.json", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="full_qat")
def main(cfg: DictConfig) -> None:
    run_in_hydra_dir("full_qat", run_full_qat, cfg)


if __name__ == "__main__":
    main()
