"""Where the data stages write, relative to the project root (the paths dvc.yaml tracks)."""

from __future__ import annotations

from pathlib import Path

RAW = Path("data/raw")  # download: data/raw/<dataset>/ (media or links, manifest)
FACES = Path("data/interim/faces")  # crop_faces: shards + clips.parquet + quarantine
VALIDATION = Path("data/processed/validation")  # validate: accepted.csv, reports
