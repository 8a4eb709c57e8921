"""The manifest table every dataset source writes: one row per clip.

Stored as ``manifest.parquet`` under ``data/raw/<dataset>/``; ``path`` is relative to that
directory so the tree can move (DVC remotes, other machines).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from socialmae.data.errors import MediaError
from socialmae.io import atomic_write
from socialmae.tasks import get_task

MANIFEST_NAME = "manifest.parquet"
SPLITS = ("train", "val", "test")
COLUMNS = ("clip_id", "path", "dataset", "speaker", "split", "label", "targets", "extra")


@dataclass
class ManifestRow:
    """One clip of a dataset.

    Attributes:
        clip_id: unique within the dataset, stable across runs (used for shard keys).
        path: the media file, relative to the manifest's directory.
        dataset: the source name (a key of ``socialmae.tasks.TASKS`` or ``voxceleb2``).
        speaker: identity (actor, speaker, participant); splits never share one.
        split: ``train``, ``val`` or ``test``.
        label: class name for classification tasks, ``""`` when unlabelled.
        targets: regression targets in ``TaskSpec.labels`` order, empty otherwise.
        extra: source-specific fields (sentence, intensity level, ...), JSON-serialisable.
    """

    clip_id: str
    path: str
    dataset: str
    speaker: str
    split: str
    label: str = ""
    targets: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def write_manifest(rows: list[ManifestRow], directory: str | os.PathLike[str]) -> Path:
    """Validate and write ``rows`` to ``directory/manifest.parquet`` atomically."""
    frame = pd.DataFrame([asdict(r) for r in rows], columns=list(COLUMNS))
    frame["extra"] = frame["extra"].map(lambda e: json.dumps(e, sort_keys=True))
    target = Path(directory) / MANIFEST_NAME
    check_manifest(frame, target)
    atomic_write(target, lambda tmp: frame.to_parquet(tmp, index=False))
    return target


def read_manifest(directory_or_file: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a manifest (``extra`` decoded) with absolute ``path`` values in ``abs_path``."""
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise MediaError(path, "no manifest")
    frame = pd.read_parquet(path)
    check_manifest(frame, path)
    frame["extra"] = frame["extra"].map(json.loads)
    frame["abs_path"] = [str((path.parent / p).resolve()) for p in frame["path"]]
    return frame


def check_manifest(frame: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Structural checks shared by writer and reader (content checks live in validation)."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise MediaError(path, f"manifest lacks columns {missing}")
    if frame["clip_id"].duplicated().any():
        dupes = frame.loc[frame["clip_id"].duplicated(), "clip_id"].tolist()[:5]
        raise MediaError(path, f"duplicate clip ids {dupes}")
    bad_split = sorted(set(frame["split"]) - set(SPLITS))
    if bad_split:
        raise MediaError(path, f"unknown splits {bad_split}")
    for dataset in set(frame["dataset"]) - {"voxceleb2"}:
        task = get_task(dataset)
        rows = frame[frame["dataset"] == dataset]
        if task.kind == "classification":
            unknown = sorted(set(rows["label"]) - set(task.labels) - {""})
            if unknown:
                raise MediaError(path, f"labels {unknown} not in {dataset}'s {task.labels}")
        else:
            sizes = {len(t) for t in rows["targets"]} - {0}
            if sizes - {task.num_outputs}:
                raise MediaError(path, f"{dataset} targets need {task.num_outputs} values")
