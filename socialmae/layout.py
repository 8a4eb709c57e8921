"""Where the pipeline's stages read and write, relative to the project root: the paths
dvc.yaml tracks and the defaults of the stage commands."""

from __future__ import annotations

from pathlib import Path

RAW = Path("data/raw")  # download: data/raw/<dataset>/ (media or links, manifest)
FACES = Path("data/interim/faces")  # crop_faces: shards + clips.parquet + quarantine
VALIDATION = Path("data/processed/validation")  # validate: accepted.csv, reports
OUTPUTS = Path("outputs")
PRETRAIN = OUTPUTS / "pretrain"  # pretrain: model/, metrics.json, history.csv
TUNE = OUTPUTS / "tune"  # tune@task: <task>/best_params.json, <task>/study/
FINETUNE = OUTPUTS / "finetune"  # finetune@task: <task>/modes/<mode>/, <task>/metrics.json
REGISTER = OUTPUTS / "register"  # register@task: <task>/decision.json
BEST_PARAMS = "best_params.json"  # tune@task's output file, read by finetune@task
