"""The ``validate`` stage: Great Expectations checks over ``clips.parquet`` and the manifest.

Per-clip problems (silent audio, too few face detections, bad labels, ...) quarantine the clip;
the stage fails only when a threshold is crossed: too many clips quarantined, a speaker in two
splits, duplicate clip ids, manifest clips missing from the clip table, or classes too
imbalanced. Outputs (all written atomically under ``out_dir``):

* ``validation.json``: the Great Expectations results (one per suite),
* ``data_docs/index.html``: the Data Docs site (built offline; the pages load their styles
  from public CDNs when viewed),
* ``quarantine.csv`` (clip_id, path, reason) and ``accepted.csv`` (clip_id, dataset, split),
* ``balance.json``: accepted clips per dataset x split x label and the imbalance ratios,
* ``metrics.json``: counts, quarantine fraction, per-reason counts and success flags.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from socialmae.data.clips import CLIPS_TABLE
from socialmae.data.errors import MediaError
from socialmae.data.manifest import read_manifest
from socialmae.io import atomic_write_text
from socialmae.tasks import TASKS

logger = logging.getLogger(__name__)

UNLABELLED_DATASETS = ("voxceleb2",)  # pretraining-only sources: no labels, no targets
CLIPS_SUITE = "socialmae_clips"
MANIFEST_SUITE = "socialmae_manifest_coverage"
DOCS_SITE = "socialmae"
REQUIRED_COLUMNS = (
    "clip_id", "dataset", "speaker", "split", "label", "targets", "path", "status", "reason",
    "duration", "frames", "detection_rate", "sample_rate", "audio_rms_db",
)  # fmt: skip
OUTPUTS = {
    "validation": "validation.json",
    "quarantine": "quarantine.csv",
    "accepted": "accepted.csv",
    "balance": "balance.json",
    "metrics": "metrics.json",
}
DATA_DOCS_DIR = "data_docs"


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


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class _Check:
    """One expectation plus how its unexpected rows are read.

    ``reason`` turns a failing row into a quarantine reason (row-level checks); ``category``
    is the key of the per-reason counts; ``stage`` marks checks whose failure fails the stage.
    """

    key: str
    expectation: Any
    category: str = ""
    reason: Callable[[pd.Series], str] | None = None
    stage: bool = False


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float | int | np.number) else repr(value)


def _parse_targets(text: Any) -> list[float] | None:
    try:
        values = json.loads(text) if isinstance(text, str) else list(text)
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _prepare(clips: pd.DataFrame) -> pd.DataFrame:
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
    parsed = [_parse_targets(t) for t in frame["targets"]]
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


def _clip_checks(t: ValidationThresholds) -> list[_Check]:
    gx = _gx()
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    ok = Column("status") == "ok"
    checks = [
        _Check("clip_id_not_null", E.ExpectColumnValuesToNotBeNull(column="clip_id"),
               "missing_clip_id", lambda r: "clip id is missing", stage=True),
        _Check("clip_id_unique", E.ExpectColumnValuesToBeUnique(column="clip_id"), stage=True),
        _Check("speaker_one_split",
               E.ExpectColumnValuesToBeBetween(column="speaker_splits", max_value=1),
               stage=True),
        _Check("status_not_null", E.ExpectColumnValuesToNotBeNull(column="status"),
               "unknown_status", lambda r: "status is missing"),
        _Check("status_known",
               E.ExpectColumnValuesToBeInSet(column="status", value_set=["ok", "quarantined"]),
               "unknown_status", lambda r: f"unknown status {r['status']!r}"),
        _Check("dataset_known",
               E.ExpectColumnValuesToBeInSet(
                   column="dataset", value_set=sorted([*TASKS, *UNLABELLED_DATASETS])),
               "unknown_dataset", lambda r: f"unknown dataset {r['dataset']!r}"),
    ]  # fmt: skip
    for name, task in sorted(TASKS.items()):
        in_dataset = Column("dataset") == name
        if task.kind == "classification":
            checks.append(_Check(
                f"label_{name}",
                E.ExpectColumnValuesToBeInSet(
                    column="label", value_set=list(task.labels), row_condition=in_dataset),
                "bad_label",
                lambda r: f"label {r['label']!r} is not one of {r['dataset']}'s classes",
            ))  # fmt: skip
            continue
        n = task.num_outputs
        checks += [
            _Check(f"label_{name}",
                   E.ExpectColumnValuesToBeInSet(
                       column="label", value_set=[""], row_condition=in_dataset),
                   "bad_label",
                   lambda r: f"{r['dataset']} clips take targets, not a label ({r['label']!r})"),
            _Check(f"target_count_{name}",
                   E.ExpectColumnValuesToBeInSet(
                       column="target_count", value_set=[n], row_condition=in_dataset),
                   "bad_targets", lambda r, n=n: _count_reason(r, n)),
            _Check(f"target_min_{name}",
                   E.ExpectColumnValuesToBeBetween(
                       column="target_min", min_value=0.0,
                       row_condition=in_dataset & (Column("target_count") == n)),
                   "bad_targets", lambda r: f"targets outside [0, 1]: {r['targets']}"),
            _Check(f"target_max_{name}",
                   E.ExpectColumnValuesToBeBetween(
                       column="target_max", max_value=1.0,
                       row_condition=in_dataset & (Column("target_count") == n)),
                   "bad_targets", lambda r: f"targets outside [0, 1]: {r['targets']}"),
        ]  # fmt: skip
    for name in UNLABELLED_DATASETS:
        checks.append(_Check(
            f"label_{name}",
            E.ExpectColumnValuesToBeInSet(
                column="label", value_set=[""], row_condition=Column("dataset") == name),
            "bad_label", lambda r: f"{r['dataset']} clips are unlabelled, got {r['label']!r}",
        ))  # fmt: skip
    for column in ("duration", "frames", "detection_rate", "sample_rate", "audio_rms_db"):
        checks.append(_Check(
            f"{column}_measured",
            E.ExpectColumnValuesToNotBeNull(column=column, row_condition=ok),
            "missing_measurement", lambda r, c=column: f"{c} was not measured",
        ))  # fmt: skip
    checks += [
        _Check("detection_rate",
               E.ExpectColumnValuesToBeBetween(
                   column="detection_rate", min_value=t.min_detection_rate, row_condition=ok),
               "low_detection_rate",
               lambda r: f"face detected in {r['detection_rate']:.0%} of frames "
                         f"< {t.min_detection_rate:.0%}"),
        _Check("duration",
               E.ExpectColumnValuesToBeBetween(
                   column="duration", min_value=t.min_duration, max_value=t.max_duration,
                   row_condition=ok),
               "bad_duration", lambda r: _duration_reason(r, t)),
        _Check("frames",
               E.ExpectColumnValuesToBeBetween(
                   column="frames", min_value=t.min_frames, row_condition=ok),
               "too_few_frames",
               lambda r: f"only {_fmt(r['frames'])} face frames < {t.min_frames}"),
        _Check("audio_rms_db",
               E.ExpectColumnValuesToBeBetween(
                   column="audio_rms_db", min_value=t.min_audio_rms_db, row_condition=ok),
               "silent_audio",
               lambda r: f"audio is silent: {r['audio_rms_db']:.1f} dBFS "
                         f"< {t.min_audio_rms_db:g} dBFS"),
        _Check("sample_rate",
               E.ExpectColumnValuesToBeBetween(
                   column="sample_rate", min_value=0, strict_min=True, row_condition=ok),
               "no_sample_rate",
               lambda r: f"audio has no sample rate ({_fmt(r['sample_rate'])} Hz)"),
    ]  # fmt: skip
    return checks


def _count_reason(row: pd.Series, n: int) -> str:
    if row["target_count"] < 0:
        return f"targets are not a JSON list of numbers: {row['targets']!r}"
    return f"{row['dataset']} needs {n} targets, got {row['target_count']}"


def _duration_reason(row: pd.Series, t: ValidationThresholds) -> str:
    if row["duration"] < t.min_duration:
        return f"too short: {row['duration']:.2f} s < {t.min_duration:g} s"
    return f"too long: {row['duration']:.1f} s > {t.max_duration:g} s"


def _crop_category(reason: str) -> str:
    head = reason.split(":", 1)[0].strip() or "quarantined"
    return f"crop_faces: {head}"


# --------------------------------------------------------------------------- GE plumbing


def _gx() -> Any:
    """Import Great Expectations lazily (slow), with analytics off and its logger quiet.

    ``GX_ANALYTICS_ENABLED`` is only set when unset; GE's logger only gets WARNING when no
    level was configured for it (its import logs hundreds of INFO lines otherwise).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    import great_expectations

    return great_expectations


def _context(docs_dir: Path) -> Any:
    """An ephemeral GX context (in-memory stores) whose one Data Docs site is ``docs_dir``."""
    gx = _gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config, cloud_mode=False)


def _run_suite(
    context: Any, name: str, frame: pd.DataFrame, checks: list[_Check]
) -> tuple[Any, dict[str, Any]]:
    """Validate ``frame`` against ``checks``; returns (GX result, check key -> GX result)."""
    gx = _gx()

    asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("whole_table")
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for check in checks:
        check.expectation.meta = {"check": check.key, "stage": check.stage}
        suite.add_expectation(check.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": ["row", "clip_id"],
        },
    )
    by_key = {r.expectation_config.meta["check"]: r for r in result.results}
    return result, by_key


def _failing_rows(result: Any) -> list[int]:
    rows = (result.result or {}).get("unexpected_index_list") or []
    return [int(r["row"]) for r in rows]


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


def _swap_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` in place of ``target`` (rename; the old tree is removed after)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    new.rename(target)
    if old.exists():
        shutil.rmtree(old)


# --------------------------------------------------------------------------- the stage


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


def _expectations(
    frame: pd.DataFrame, coverage: pd.DataFrame, checks: list[_Check], out: Path
) -> tuple[Any, Any, dict[str, Any], list[_Check]]:
    """Run the clip suite on ``frame`` and the manifest-coverage suite on ``coverage`` with
    Great Expectations, and build the Data Docs site in ``out``; the two suite results, every
    check's result by key, and the coverage checks."""
    gx = _gx()
    coverage_checks = [
        _Check(
            "manifest_clips_present",
            gx.expectations.ExpectColumnValuesToBeInSet(column="in_clip_table", value_set=[True]),
            stage=True,
        )
    ]
    docs_tmp = Path(tempfile.mkdtemp(prefix=f".{DATA_DOCS_DIR}.", dir=out))
    docs_tmp.chmod(0o755)  # mkdtemp makes it private; the site is meant to be read
    try:
        context = _context(docs_tmp)
        clips_result, by_key = _run_suite(context, CLIPS_SUITE, frame, checks)
        cover_result, cover_by_key = _run_suite(context, MANIFEST_SUITE, coverage, coverage_checks)
        context.build_data_docs(site_names=[DOCS_SITE])
        _swap_dir(docs_tmp, out / DATA_DOCS_DIR)
    finally:
        if docs_tmp.exists():
            shutil.rmtree(docs_tmp)
    return clips_result, cover_result, {**by_key, **cover_by_key}, coverage_checks


def _row_outcome(frame: pd.DataFrame, checks: list[_Check], by_key: dict[str, Any]) -> _RowOutcome:
    """Every rejected row with its reasons (crop_faces' first), grouped by clip."""
    reasons: dict[int, list[str]] = {}
    categories: dict[str, int] = {}
    crop_quarantined = (frame["status"] == "quarantined").to_numpy()
    for row in np.flatnonzero(crop_quarantined):
        text = frame.at[row, "reason"] or "quarantined by crop_faces (no reason given)"
        reasons[int(row)] = [text]
        categories[_crop_category(text)] = categories.get(_crop_category(text), 0) + 1
    for check in checks:
        if check.reason is None:
            continue
        for row in dict.fromkeys(_failing_rows(by_key[check.key])):
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
    null_ids = _failing_rows(by_key["clip_id_not_null"])
    flags["clip_ids_present"] = not null_ids
    if null_ids:
        failures.append(f"{len(null_ids)} rows of the clip table have no clip id")
    dupes = frame.loc[frame["clip_id"].duplicated(keep=False) & frame["clip_id"].notna()]
    flags["clip_ids_unique"] = bool(by_key["clip_id_unique"].success) and dupes.empty
    if not flags["clip_ids_unique"]:
        ids = sorted(set(dupes["clip_id"].astype(str)))
        failures.append(f"{len(ids)} duplicate clip ids: {_preview(ids)}")
    leak_rows = _failing_rows(by_key["speaker_one_split"])
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
    frame = _prepare(clips)
    checks = _clip_checks(thresholds)
    manifest_ids = manifest["clip_id"].astype(str)
    clip_ids = set(frame["clip_id"].dropna().astype(str))
    coverage = pd.DataFrame({
        "row": np.arange(len(manifest), dtype=np.int64),
        "clip_id": manifest_ids.to_numpy(),
        "in_clip_table": manifest_ids.isin(clip_ids).to_numpy(),
    })  # fmt: skip

    clips_result, cover_result, by_key, coverage_checks = _expectations(
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
    missing_rows = _failing_rows(by_key["manifest_clips_present"])
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
