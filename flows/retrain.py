"""Retraining when new data arrives: download (forced, so new clips in the sources are picked
up) -> crop_faces -> validate -> tune -> finetune -> register for every task, each through
``dvc repro``. DVC re-runs only what the new data changes, and the register stage's gate alone
decides whether a model is promoted. A markdown report artifact says what happened.

    python -m flows.retrain [ROOT]     # once, from the repository root

Deployments: prefect.yaml (work pool, cron schedule) or ``python -m flows.serve``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow

from flows.pipeline import report, run_stages
from socialmae import orchestration

RETRAIN_ARTIFACT = "socialmae-retrain"


@flow(name="socialmae-retrain")
def retrain(
    root: str = ".",
    refresh_data: bool = True,
    pretrain: bool = False,
    gpus: int = 1,
    download_retries: int = 3,
    retry_delay_seconds: float = 60.0,
) -> list[orchestration.StageRun]:
    """Re-ingest the data and retrain the task models; promotion only through the gate.

    Args:
        root: the project (dvc.yaml, params.yaml).
        refresh_data: force the download stage (DVC cannot see new files in a source).
        pretrain: also re-run pretraining when its inputs changed (off: the task models
            are fine-tuned from the recorded pretrained model).
        gpus: pretraining processes (torchrun above 1); used only with ``pretrain``.
        download_retries: retries of the download stage, ``retry_delay_seconds`` apart.
    """
    project = Path(root).resolve()
    tasks = orchestration.project_tasks(project)
    stages = orchestration.pipeline_stages(project, tasks, pretrain=pretrain)
    force = ["download"] if refresh_data else []
    runs = run_stages(project, stages, gpus, force, download_retries, retry_delay_seconds)
    report(project, tasks, runs, "Social-MAE retraining", RETRAIN_ARTIFACT)
    return runs


if __name__ == "__main__":
    retrain(root=sys.argv[1] if len(sys.argv) > 1 else ".")
