"""The checks of the ``validate`` stage: the thresholds (params.yaml ``validate``), the clip
table prepared for them, and one Great Expectations expectation per check."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from socialmae.data.validate.expectations import Check, gx_module
from socialmae.tasks import TASKS

UNLABELLED_DATASETS = ("voxceleb2",)  # pretraining-only sources: no labels, no targets
REQUIRED_COLUMNS = (
    "clip_id", "dataset", "speaker", "split", "label", "targets", "path", "status", "reason",
    "duration", "frames", "detection_rate", "sample_rate", "audio_rms_db",
)  # fmt: skip


@dataclass(frozen=True)
class ValidationThresholds:
    """Every number the ``validate`` stage checks against (``validate`` in params.yaml)."""

    min_detection_rate: float = 0.5  # per clip: share of sampled frames with the main face
    min_duration: float = 0.5  # seconds
    max_duration: float = 600.0  # seconds
    min_frames: int = 2  # face frames stored in the shard
    sample_rate: int = 16000  # the stored audio rate; the source rate (column) must be > 0
    min_audio_rms_db: float = -60.0  # dBFS; quieter clips are silent
    max_quarantine_fraction: float = 0.2  # the stage fails above this share of clips
    max_class_imbalance: float = 10.0  # largest / smallest class among accepted clips

    def __post_init__(self) -> None:
        checks = {
            "min_detection_rate": 0 <= self.min_detection_rate <= 1,
            "min_duration": self.min_duration >= 0,
            "max_duration": self.max_duration > self.min_duration,
            "min_frames": self.min_frames >= 1,
            "sample_rate": self.sample_rate > 0,
            "min_audio_rms_db": self.min_audio_rms_db <= 0,
            "max_quarantine_fraction": 0 <= self.max_quarantine_fraction <= 1,
            "max_class_imbalance": self.max_class_imbalance >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = {name: getattr(self, name) for name in bad}
            raise ValueError(f"invalid validation thresholds: {values}")


def fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float | int | np.number) else repr(value)


def parse_targets(text: Any) -> list[float] | None:
    try:
        values = json.loads(text) if isinstance(text, str) else list(text)
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def prepare(clips: pd.DataFrame) -> pd.DataFrame:
    """The clip table plus the helper columns the cross-row and targets checks read."""
    missing = [c for c in REQUIRED_COLUMNS if c not in clips.columns]
    if missing:
        raise ValueError(f"clip table lacks columns {missing}")
    frame = clips.reset_index(drop=True).copy()
    for name in ("dataset", "speaker", "split", "label", "reason", "path"):
        frame[name] = frame[name].fillna("").astype(str)
    frame["targets"] = frame["targets"].fillna("[]")
    frame.insert(0, "row", np.arange(len(frame), dtype=np.int64))
    # Cross-row rule as a column: how many splits the clip's (dataset, speaker) appears in.
    splits = frame.groupby(["dataset", "speaker"])["split"].transform("nunique")
    frame["speaker_splits"] = np.where(frame["speaker"] == "", 1, splits).astype(np.int64)
    parsed = [parse_targets(t) for t in frame["targets"]]
    frame["target_count"] = [-1 if p is None else len(p) for p in parsed]
    lows, highs = [], []
    for p in parsed:
        if not p:
            lows.append(np.nan)
            highs.append(np.nan)
        elif not all(math.isfinite(v) for v in p):
            lows.append(-math.inf)
            highs.append(math.inf)
        else:
            lows.append(min(p))
            highs.append(max(p))
    frame["target_min"] = np.asarray(lows, dtype=np.float64)
    frame["target_max"] = np.asarray(highs, dtype=np.float64)
    return frame


def clip_checks(t: ValidationThresholds) -> list[Check]:
    gx = gx_module()
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    ok = Column("status") == "ok"
    checks = [
        Check("clip_id_not_null", E.ExpectColumnValuesToNotBeNull(column="clip_id"),
               "missing_clip_id", lambda r: "clip id is missing", stage=True),
        Check("clip_id_unique", E.ExpectColumnValuesToBeUnique(column="clip_id"), stage=True),
        Check("speaker_one_split",
               E.ExpectColumnValuesToBeBetween(column="speaker_splits", max_value=1),
               stage=True),
        Check("status_not_null", E.ExpectColumnValuesToNotBeNull(column="status"),
               "unknown_status", lambda r: "status is missing"),
        Check("status_known",
               E.ExpectColumnValuesToBeInSet(column="status", value_set=["ok", "quarantined"]),
               "unknown_status", lambda r: f"unknown status {r['status']!r}"),
        Check("dataset_known",
               E.ExpectColumnValuesToBeInSet(
                   column="dataset", value_set=sorted([*TASKS, *UNLABELLED_DATASETS])),
               "unknown_dataset", lambda r: f"unknown dataset {r['dataset']!r}"),
    ]  # fmt: skip
    for name, task in sorted(TASKS.items()):
        in_dataset = Column("dataset") == name
        if task.kind == "classification":
            checks.append(Check(
                f"label_{name}",
                E.ExpectColumnValuesToBeInSet(
                    column="label", value_set=list(task.labels), row_condition=in_dataset),
                "bad_label",
                lambda r: f"label {r['label']!r} is not one of {r['dataset']}'s classes",
            ))  # fmt: skip
            continue
        n = task.num_outputs
        checks += [
            Check(f"label_{name}",
                   E.ExpectColumnValuesToBeInSet(
                       column="label", value_set=[""], row_condition=in_dataset),
                   "bad_label",
                   lambda r: f"{r['dataset']} clips take targets, not a label ({r['label']!r})"),
            Check(f"target_count_{name}",
                   E.ExpectColumnValuesToBeInSet(
                       column="target_count", value_set=[n], row_condition=in_dataset),
                   "bad_targets", lambda r, n=n: count_reason(r, n)),
            Check(f"target_min_{name}",
                   E.ExpectColumnValuesToBeBetween(
                       column="target_min", min_value=0.0,
                       row_condition=in_dataset & (Column("target_count") == n)),
                   "bad_targets", lambda r: f"targets outside [0, 1]: {r['targets']}"),
            Check(f"target_max_{name}",
                   E.ExpectColumnValuesToBeBetween(
                       column="target_max", max_value=1.0,
                       row_condition=in_dataset & (Column("target_count") == n)),
                   "bad_targets", lambda r: f"targets outside [0, 1]: {r['targets']}"),
        ]  # fmt: skip
    for name in UNLABELLED_DATASETS:
        checks.append(Check(
            f"label_{name}",
            E.ExpectColumnValuesToBeInSet(
                column="label", value_set=[""], row_condition=Column("dataset") == name),
            "bad_label", lambda r: f"{r['dataset']} clips are unlabelled, got {r['label']!r}",
        ))  # fmt: skip
    for column in ("duration", "frames", "detection_rate", "sample_rate", "audio_rms_db"):
        checks.append(Check(
            f"{column}_measured",
            E.ExpectColumnValuesToNotBeNull(column=column, row_condition=ok),
            "missing_measurement", lambda r, c=column: f"{c} was not measured",
        ))  # fmt: skip
    checks += [
        Check("detection_rate",
               E.ExpectColumnValuesToBeBetween(
                   column="detection_rate", min_value=t.min_detection_rate, row_condition=ok),
               "low_detection_rate",
               lambda r: f"face detected in {r['detection_rate']:.0%} of frames "
                         f"< {t.min_detection_rate:.0%}"),
        Check("duration",
               E.ExpectColumnValuesToBeBetween(
                   column="duration", min_value=t.min_duration, max_value=t.max_duration,
                   row_condition=ok),
               "bad_duration", lambda r: duration_reason(r, t)),
        Check("frames",
               E.ExpectColumnValuesToBeBetween(
                   column="frames", min_value=t.min_frames, row_condition=ok),
               "too_few_frames",
               lambda r: f"only {fmt(r['frames'])} face frames < {t.min_frames}"),
        Check("audio_rms_db",
               E.ExpectColumnValuesToBeBetween(
                   column="audio_rms_db", min_value=t.min_audio_rms_db, row_condition=ok),
               "silent_audio",
               lambda r: f"audio is silent: {r['audio_rms_db']:.1f} dBFS "
                         f"< {t.min_audio_rms_db:g} dBFS"),
        Check("sample_rate",
               E.ExpectColumnValuesToBeBetween(
                   column="sample_rate", min_value=0, strict_min=True, row_condition=ok),
               "no_sample_rate",
               lambda r: f"audio has no sample rate ({fmt(r['sample_rate'])} Hz)"),
    ]  # fmt: skip
    return checks


def count_reason(row: pd.Series, n: int) -> str:
    if row["target_count"] < 0:
        return f"targets are not a JSON list of numbers: {row['targets']!r}"
    return f"{row['dataset']} needs {n} targets, got {row['target_count']}"


def duration_reason(row: pd.Series, t: ValidationThresholds) -> str:
    if row["duration"] < t.min_duration:
        return f"too short: {row['duration']:.2f} s < {t.min_duration:g} s"
    return f"too long: {row['duration']:.1f} s > {t.max_duration:g} s"


def crop_category(reason: str) -> str:
    head = reason.split(":", 1)[0].strip() or "quarantined"
    return f"crop_faces: {head}"
