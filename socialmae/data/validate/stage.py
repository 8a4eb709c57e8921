"""The ``validate`` stage: run the checks, quarantine clips, fail on stage-level problems and
write the outputs atomically."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from socialmae.data.clips import CLIPS_TABLE
from socialmae.data.errors import MediaError
from socialmae.data.manifest import read_manifest
from socialmae.data.validate.checks import (
    ValidationThresholds,
    clip_checks,
    crop_category,
    prepare,
)
from socialmae.data.validate.expectations import (
    CLIPS_SUITE,
    DATA_DOCS_DIR,
    MANIFEST_SUITE,
    Check,
    failing_rows,
    run_expectations,
)
from socialmae.io import atomic_write_text
from socialmae.tasks import TASKS

logger = logging.getLogger(__name__)

OUTPUTS = {
    "validation": "validation.json",
    "quarantine": "quarantine.csv",
    "accepted": "accepted.csv",
    "balance": "balance.json",
    "metrics": "metrics.json",
}


@dataclass
class ValidationReport:
    """What ``validate`` decided and where it wrote it.

    Attributes:
        passed: no stage-level threshold was crossed.
        failures: one readable line per crossed threshold (empty when passed).
        accepted: clip ids that passed every check.
        quarantine: one row per rejected clip: clip_id, path, reason (reasons joined by "; ").
        metrics: the content of ``metrics.json``.
        balance: the content of ``balance.json``.
        gx_success: Great Expectations' own verdict (False as soon as one clip fails a check).
        files: output name -> path (validation, quarantine, accepted, balance, metrics).
        data_docs_index: the Data Docs ``index.html``.
        notes: things worth knowing that fail nothing (extra clips, empty classes, ...).
    """

    passed: bool
    failures: list[str]
    accepted: list[str]
    quarantine: pd.DataFrame
    metrics: dict[str, Any]
    balance: dict[str, Any]
    gx_success: bool
    files: dict[str, Path]
    data_docs_index: Path
    notes: list[str] = field(default_factory=list)


class ValidationFailed(RuntimeError):  # noqa: N818 (the stage's name for it)
    """The ``validate`` stage crossed a threshold; ``report`` holds everything it found."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        lines = "\n".join(f"  - {f}" for f in report.failures)
        super().__init__(
            f"data validation failed ({len(report.failures)} problem(s); see "
            f"{report.files.get('metrics', 'metrics.json')}):\n{lines}"
        )


def _jsonable(value: Any) -> Any:
    """Strict-JSON copy: numpy scalars unwrapped, non-finite floats written as strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# --------------------------------------------------------------------------- writing


def _atomic_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def _balance(accepted: pd.DataFrame, t: ValidationThresholds) -> dict[str, Any]:
    """Accepted clips per dataset x split x label and the largest/smallest class ratio."""
    datasets: dict[str, Any] = {}
    worst = 1.0
    for name, rows in sorted(accepted.groupby("dataset"), key=lambda kv: str(kv[0])):
        task = TASKS.get(str(name))
        if task is None or task.kind != "classification":
            continue
        counts = rows.groupby(["split", "label"]).size()
        per_split = {
            str(split): {str(label): int(n) for label, n in group.droplevel(0).items()}
            for split, group in counts.groupby(level=0)
        }
        totals = rows["label"].value_counts()
        ratio = float(totals.max() / totals.min()) if len(totals) else 1.0
        worst = max(worst, ratio)
        datasets[str(name)] = {
            "counts": per_split,
            "totals": {str(k): int(v) for k, v in totals.sort_index().items()},
            "imbalance_ratio": round(ratio, 4),
            "largest": str(totals.idxmax()) if len(totals) else "",
            "smallest": str(totals.idxmin()) if len(totals) else "",
            "missing_classes": [c for c in task.labels if c not in totals.index],
        }
    return {
        "datasets": datasets,
        "imbalance_ratio": round(worst, 4),
        "max_class_imbalance": t.max_class_imbalance,
    }


def _preview(items: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in list(items)[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}]"


@dataclass
class _RowOutcome:
    """Which rows of the clip table are accepted, and every rejected clip with its reasons."""

    accepted_mask: np.ndarray  # [rows] bool
    crop_quarantined: np.ndarray  # [rows] bool: quarantined by crop_faces already
    quarantine: pd.DataFrame  # clip_id, path, reason (one row per rejected clip)
    categories: dict[str, int]  # reason category -> rows


def _row_outcome(frame: pd.DataFrame, checks: list[Check], by_key: dict[str, Any]) -> _RowOutcome:
    """Every rejected row with its reasons (crop_faces' first), grouped by clip."""
    reasons: dict[int, list[str]] = {}
    categories: dict[str, int] = {}
    crop_quarantined = (frame["status"] == "quarantined").to_numpy()
    for row in np.flatnonzero(crop_quarantined):
        text = frame.at[row, "reason"] or "quarantined by crop_faces (no reason given)"
        reasons[int(row)] = [text]
        categories[crop_category(text)] = categories.get(crop_category(text), 0) + 1
    for check in checks:
        if check.reason is None:
            continue
        for row in dict.fromkeys(failing_rows(by_key[check.key])):
            text = check.reason(frame.iloc[row])
            listed = reasons.setdefault(row, [])
            if text not in listed:
                listed.append(text)
            categories[check.category] = categories.get(check.category, 0) + 1

    accepted_mask = (frame["status"] == "ok").to_numpy() & frame["clip_id"].notna().to_numpy()
    accepted_mask[list(reasons)] = False
    by_clip: dict[str, tuple[str, list[str]]] = {}
    for row in np.flatnonzero(~accepted_mask):
        clip_id = frame.at[row, "clip_id"]
        key = "" if pd.isna(clip_id) else str(clip_id)
        _path, listed = by_clip.setdefault(key, (frame.at[row, "path"], []))
        listed.extend(r for r in reasons.get(int(row), ["rejected"]) if r not in listed)
    quarantine = pd.DataFrame(
        [(k, p, "; ".join(r)) for k, (p, r) in by_clip.items()],
        columns=["clip_id", "path", "reason"],
    )
    return _RowOutcome(accepted_mask, crop_quarantined, quarantine, categories)


def _stage_checks(
    frame: pd.DataFrame,
    coverage: pd.DataFrame,
    quarantined: int,
    fraction: float,
    missing_rows: list[int],
    by_key: dict[str, Any],
    balance: dict[str, Any],
    thresholds: ValidationThresholds,
) -> tuple[dict[str, bool], list[str]]:
    """The stage-level thresholds: ``(flag per check, failure messages)``; ``quarantined``
    clips, their ``fraction`` of the table, ``missing_rows`` of ``coverage`` (manifest clips
    absent from the clip table)."""
    failures: list[str] = []
    n_clips = len(frame)
    flags: dict[str, bool] = {}
    flags["not_empty"] = n_clips > 0
    if not flags["not_empty"]:
        failures.append("the clip table is empty")
    flags["quarantine_fraction"] = fraction <= thresholds.max_quarantine_fraction
    if not flags["quarantine_fraction"]:
        failures.append(
            f"quarantine fraction {fraction:.1%} ({quarantined} of {n_clips} clips) "
            f"> max {thresholds.max_quarantine_fraction:.1%}"
        )
    null_ids = failing_rows(by_key["clip_id_not_null"])
    flags["clip_ids_present"] = not null_ids
    if null_ids:
        failures.append(f"{len(null_ids)} rows of the clip table have no clip id")
    dupes = frame.loc[frame["clip_id"].duplicated(keep=False) & frame["clip_id"].notna()]
    flags["clip_ids_unique"] = bool(by_key["clip_id_unique"].success) and dupes.empty
    if not flags["clip_ids_unique"]:
        ids = sorted(set(dupes["clip_id"].astype(str)))
        failures.append(f"{len(ids)} duplicate clip ids: {_preview(ids)}")
    leak_rows = failing_rows(by_key["speaker_one_split"])
    flags["speakers_in_one_split"] = not leak_rows
    if leak_rows:
        leaks = frame.iloc[leak_rows].groupby(["dataset", "speaker"])["split"].unique()
        described = [f"{d}/{s} ({', '.join(sorted(v))})" for (d, s), v in leaks.items()]
        failures.append(f"{len(described)} speakers in more than one split: {_preview(described)}")
    flags["manifest_covered"] = not missing_rows
    if missing_rows:
        ids = coverage["clip_id"].iloc[missing_rows].tolist()
        failures.append(f"{len(ids)} manifest clips missing from the clip table: {_preview(ids)}")
    flags["class_balance"] = balance["imbalance_ratio"] <= thresholds.max_class_imbalance
    if not flags["class_balance"]:
        for name, info in balance["datasets"].items():
            if info["imbalance_ratio"] > thresholds.max_class_imbalance:
                failures.append(
                    f"class imbalance {info['imbalance_ratio']:.1f} > max "
                    f"{thresholds.max_class_imbalance:g} in {name} ({info['largest']} "
                    f"{info['totals'][info['largest']]} vs {info['smallest']} "
                    f"{info['totals'][info['smallest']]} accepted clips)"
                )
    return flags, failures


def _notes(
    extra: list[str], accepted: pd.DataFrame, balance: dict[str, Any], sample_rate: int
) -> list[str]:
    """What is worth saying but fails nothing."""
    notes: list[str] = []
    if extra:
        notes.append(f"{len(extra)} clips are not in the manifest: {_preview(extra)}")
    for name, info in balance["datasets"].items():
        if info["missing_classes"]:
            notes.append(f"{name} has no accepted clips of {info['missing_classes']}")
    upsampled = int((accepted["sample_rate"] < sample_rate).sum())
    if upsampled:
        notes.append(f"{upsampled} accepted clips have source audio below "
                     f"{sample_rate} Hz (upsampled)")  # fmt: skip
    return notes


def validate(
    clips: pd.DataFrame,
    manifest: pd.DataFrame,
    thresholds: ValidationThresholds,
    out_dir: str | os.PathLike[str],
) -> ValidationReport:
    """Check the clip table against ``thresholds`` with Great Expectations and write reports.

    Never raises for data problems: the returned report says whether the stage passed
    (see :func:`run_validate` for the raising variant).
    """
    out = Path(out_dir).resolve()  # GE site stores need absolute paths
    out.mkdir(parents=True, exist_ok=True)
    frame = prepare(clips)
    checks = clip_checks(thresholds)
    manifest_ids = manifest["clip_id"].astype(str)
    clip_ids = set(frame["clip_id"].dropna().astype(str))
    coverage = pd.DataFrame({
        "row": np.arange(len(manifest), dtype=np.int64),
        "clip_id": manifest_ids.to_numpy(),
        "in_clip_table": manifest_ids.isin(clip_ids).to_numpy(),
    })  # fmt: skip

    clips_result, cover_result, by_key, coverage_checks = run_expectations(
        frame, coverage, checks, out
    )
    gx_success = bool(clips_result.success and cover_result.success)
    failures = [
        f"check {check.key} could not run: {info.get('exception_message')}"
        for check in [*checks, *coverage_checks]
        if (info := by_key[check.key].exception_info or {}).get("raised_exception")
    ]
    outcome = _row_outcome(frame, checks, by_key)
    accepted, quarantine = frame[outcome.accepted_mask], outcome.quarantine
    accepted_ids = list(dict.fromkeys(accepted["clip_id"].astype(str)))
    balance = _balance(accepted, thresholds)
    n_clips = len(frame)
    fraction = len(quarantine) / n_clips if n_clips else 0.0
    missing_rows = failing_rows(by_key["manifest_clips_present"])
    flags, stage_failures = _stage_checks(
        frame, coverage, len(quarantine), fraction, missing_rows, by_key, balance, thresholds
    )
    failures += stage_failures
    extra = sorted(clip_ids - set(manifest_ids))
    notes = _notes(extra, accepted, balance, thresholds.sample_rate)
    passed = not failures
    metrics: dict[str, Any] = {
        "clips": n_clips,
        "manifest_clips": len(manifest),
        "accepted": len(accepted_ids),
        "quarantined": len(quarantine),
        "quarantine_fraction": round(fraction, 6),
        "quarantined_by_crop_faces": int(outcome.crop_quarantined.sum()),
        "quarantined_by_validate": int((~outcome.accepted_mask & ~outcome.crop_quarantined).sum()),
        "missing_from_clip_table": len(missing_rows),
        "not_in_manifest": len(extra),
        "imbalance_ratio": balance["imbalance_ratio"],
        "reasons": dict(sorted(outcome.categories.items())),
        "success": {"passed": passed, "great_expectations": gx_success, **flags},
    }

    files = {key: out / name for key, name in OUTPUTS.items()}
    _atomic_json(
        files["validation"],
        {
            "success": gx_success,
            "results": {
                CLIPS_SUITE: clips_result.to_json_dict(),
                MANIFEST_SUITE: cover_result.to_json_dict(),
            },
        },
    )
    atomic_write_text(files["quarantine"], quarantine.to_csv(index=False))
    accepted_table = accepted[["clip_id", "dataset", "split"]].drop_duplicates("clip_id")
    atomic_write_text(files["accepted"], accepted_table.to_csv(index=False))
    _atomic_json(files["balance"], balance)
    _atomic_json(files["metrics"], metrics)

    for clip_id, reason in zip(quarantine["clip_id"], quarantine["reason"], strict=True):
        logger.warning("quarantined %s: %s", clip_id, reason)
    for note in notes:
        logger.info("validate: %s", note)
    for failure in failures:
        logger.error("validate: %s", failure)
    logger.info(
        "validate: %d clips, %d accepted, %d quarantined (%.1f%%); %s",
        n_clips, len(accepted_ids), len(quarantine), 100 * fraction,
        "passed" if passed else "FAILED",
    )  # fmt: skip
    return ValidationReport(
        passed=passed,
        failures=failures,
        accepted=accepted_ids,
        quarantine=quarantine,
        metrics=metrics,
        balance=balance,
        gx_success=gx_success,
        files=files,
        data_docs_index=out / DATA_DOCS_DIR / "index.html",
        notes=notes,
    )


def run_validate(
    clips_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    thresholds: ValidationThresholds,
    out_dir: str | os.PathLike[str],
) -> ValidationReport:
    """Read ``clips.parquet`` (file or directory) and the manifest(s), validate, write reports.

    Raises:
        ValidationFailed: a stage-level threshold was crossed (after every output is written).
        MediaError: the clip table or a manifest cannot be read.
    """
    path = Path(clips_path)
    if path.is_dir():
        path = path / CLIPS_TABLE
    if not path.is_file():
        raise MediaError(path, "no clip table (run crop_faces first)")
    clips = pd.read_parquet(path)
    manifests = (
        [manifest_path] if isinstance(manifest_path, str | os.PathLike) else list(manifest_path)
    )
    manifest = pd.concat([read_manifest(m) for m in manifests], ignore_index=True)
    report = validate(clips, manifest, thresholds, out_dir)
    if not report.passed:
        raise ValidationFailed(report)
    return report
