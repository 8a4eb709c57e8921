"""Stage entry points shared by the CLI (and so dvc.yaml) and Prefect flows.

Each reads its own section of params.yaml, calls the library, writes its outputs and a small
metrics JSON atomically, and returns the metrics dict.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from socialmae.data.errors import MediaError
from socialmae.data.manifest import read_manifest
from socialmae.data.sources.catalog import SOURCES, check_names, parse_download
from socialmae.io import atomic_write_text, remove_temporaries
from socialmae.layout import FACES, RAW, VALIDATION
from socialmae.orchestration import RAY_ADDRESS_ENV
from socialmae.params import ParamsError, from_mapping, load_params

CROP_METRICS_NAME = "crop_metrics.json"  # beside the shards, never inside them: its timings
# change on every run and would change the hash of the tracked shard directory


@dataclass(frozen=True)
class DataParams:
    """Which datasets the pipeline uses (``data`` in params.yaml): names of
    ``socialmae.data.sources.catalog.SOURCES``, each configured by ``download.<name>``."""

    datasets: tuple[str, ...] = ("demo",)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _datasets(params: dict[str, Any]) -> tuple[str, ...]:
    data = from_mapping(DataParams, params.get("data"), "data")
    return check_names(data.datasets, "data.datasets")


def stage_download(params_path: str | os.PathLike[str], root: Path = RAW) -> dict[str, Any]:
    """Produce raw clips (or links to them) and a manifest per dataset under ``root/<dataset>/``.

    Each selected dataset's ``download.<name>`` section goes to its prepare function (see
    ``socialmae.data.sources.catalog``); a dataset that ends up with no clip stops the stage.
    """
    params = load_params(params_path)
    names = _datasets(params)
    sections = parse_download(params.get("download"), names)
    metrics: dict[str, Any] = {}
    for name in names:
        remove_temporaries(root / name, recursive=True)  # what a killed run half-wrote
        try:
            frame = SOURCES[name].prepare(sections[name], root / name)
        except ParamsError as exc:  # a field the prepare step found unusable
            raise ParamsError(f"download.{name}.{exc.key}", exc.reason) from exc
        missing = frame.attrs.get("missing")
        if not len(frame):
            absent = f" ({len(missing)} listed but missing)" if missing else ""
            raise MediaError(root / name, f"{name}: no clips{absent}")
        result: dict[str, Any] = {"clips": len(frame), "speakers": int(frame["speaker"].nunique())}
        if missing is not None:  # sources that list files report how many were absent
            result["missing"] = len(missing)
        metrics[name] = result
        _write_json(root / name / "download_metrics.json", result)
    return metrics


def stage_crop_faces(
    params_path: str | os.PathLike[str], root: Path = RAW, out: Path = FACES
) -> dict[str, Any]:
    """Face crops and audio into shards, with the per-clip table; counts and timings go to
    ``crop_metrics.json`` beside ``out`` (see :data:`CROP_METRICS_NAME`)."""
    # here, not at the top: the detector's torch and torchvision cost the other stages ~4 s
    from socialmae.data.crop import CropParams
    from socialmae.data.crop_stage import crop_faces

    params = load_params(params_path)
    crop = from_mapping(CropParams, params.get("crop"), "crop")
    address = os.environ.get(RAY_ADDRESS_ENV)
    if address:  # where the work runs, not what it makes: the output is the same
        crop = replace(crop, engine="ray", ray_address=address)
    manifest = pd.concat([read_manifest(root / d) for d in _datasets(params)], ignore_index=True)
    metrics = crop_faces(manifest, out, crop)
    _write_json(out.parent / CROP_METRICS_NAME, metrics)
    return metrics


def stage_validate(
    params_path: str | os.PathLike[str],
    root: Path = RAW,
    faces: Path = FACES,
    out: Path = VALIDATION,
) -> dict[str, Any]:
    """Great Expectations checks; raises ``ValidationFailed`` when a threshold is crossed."""
    from socialmae.data.validate import ValidationThresholds, run_validate

    params = load_params(params_path)
    thresholds = from_mapping(ValidationThresholds, params.get("validate"), "validate")
    manifests = [root / d for d in _datasets(params)]
    return run_validate(faces, manifests, thresholds, out).metrics
