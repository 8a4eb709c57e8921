"""Stage entry points shared by the CLI (and so dvc.yaml) and Prefect flows.

Each reads its own section of params.yaml, calls the library, writes its outputs and a small
metrics JSON atomically, and returns the metrics dict.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from socialmae.data.crop import CropParams, crop_faces
from socialmae.data.manifest import read_manifest
from socialmae.io import atomic_write_text
from socialmae.params import ParamsError, from_mapping, load_yaml

RAW = Path("data/raw")
FACES = Path("data/interim/faces")
VALIDATION = Path("data/processed/validation")


@dataclass(frozen=True)
class DataParams:
    """Which datasets the pipeline uses (``data`` in params.yaml)."""

    datasets: tuple[str, ...] = ("demo",)


@dataclass(frozen=True)
class DemoParams:
    """The generated demo set (``download.demo``)."""

    clips_per_label: int = 8
    identities: int = 4
    seconds: float = 3.0
    seed: int = 0
    workers: int = 1


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _datasets(params: dict[str, Any]) -> tuple[str, ...]:
    data = from_mapping(DataParams, params.get("data"), "data")
    unsupported = sorted(set(data.datasets) - {"demo"})
    if unsupported:
        raise ParamsError(
            "data.datasets",
            f"{unsupported}: only the demo set is wired into the pipeline so far; use the "
            "socialmae.data.sources functions for the others",
        )
    return data.datasets


def stage_download(params_path: str | os.PathLike[str], root: Path = RAW) -> dict[str, Any]:
    """Produce raw clips and a manifest per dataset under ``root/<dataset>/``."""
    from socialmae.data.sources.demo import prepare_demo

    params = load_yaml(params_path)
    metrics: dict[str, Any] = {}
    for name in _datasets(params):
        section = (params.get("download") or {}).get(name)
        demo = from_mapping(DemoParams, section, f"download.{name}")
        frame = prepare_demo(
            root / name,
            clips_per_label=demo.clips_per_label,
            identities=demo.identities,
            seconds=demo.seconds,
            seed=demo.seed,
            workers=demo.workers,
        )
        metrics[name] = {"clips": len(frame), "speakers": int(frame["speaker"].nunique())}
        _write_json(root / name / "download_metrics.json", metrics[name])
    return metrics


def stage_crop_faces(
    params_path: str | os.PathLike[str], root: Path = RAW, out: Path = FACES
) -> dict[str, Any]:
    """Face crops and audio into shards, with the per-clip table."""
    params = load_yaml(params_path)
    crop = from_mapping(CropParams, params.get("crop"), "crop")
    manifest = pd.concat([read_manifest(root / d) for d in _datasets(params)], ignore_index=True)
    metrics = crop_faces(manifest, out, crop)
    _write_json(out / "crop_metrics.json", metrics)
    return metrics


def stage_validate(
    params_path: str | os.PathLike[str],
    root: Path = RAW,
    faces: Path = FACES,
    out: Path = VALIDATION,
) -> dict[str, Any]:
    """Great Expectations checks; raises ``ValidationFailed`` when a threshold is crossed."""
    from socialmae.data.validate import ValidationThresholds, run_validate

    params = load_yaml(params_path)
    thresholds = from_mapping(ValidationThresholds, params.get("validate"), "validate")
    manifests = [root / d for d in _datasets(params)]
    return run_validate(faces, manifests, thresholds, out).metrics
