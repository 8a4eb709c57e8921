"""The ``validate`` stage: quarantine lists, reports, Data Docs and stage-level thresholds."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest

from socialmae.data.clips import CLIP_COLUMNS, ClipRecord
from socialmae.data.manifest import ManifestRow, write_manifest
from socialmae.data.validate import (
    CLIPS_SUITE,
    ValidationFailed,
    ValidationReport,
    ValidationThresholds,
    run_validate,
    validate,
)

THRESHOLDS = ValidationThresholds()
FI_TARGETS = "[0.5, 0.4, 0.6, 0.3, 0.7]"
BAD = {"cremad_silent", "cremad_blurry", "cremad_noaudio", "fi_out_of_range"}


def clip(clip_id: str, dataset: str = "cremad", speaker: str = "1001", split: str = "train",
         label: str = "anger", **fields) -> ClipRecord:  # fmt: skip
    """An ok clip with plausible measurements; ``fields`` override any of them."""
    targets = FI_TARGETS if dataset == "firstimpressions" else "[]"
    if dataset != "cremad":
        label = ""
    record = ClipRecord(
        clip_id=clip_id, dataset=dataset, speaker=speaker, split=split, label=label,
        targets=targets, path=f"/data/{dataset}/{clip_id}.mp4", status="ok", duration=2.5,
        fps=25.0, width=480, height=360, frames=10, faces_max=1, detection_rate=0.95,
        box_size=120.0, sample_rate=44100, channels=1, audio_rms_db=-22.5,
        shard="shard-00000.tar",
    )  # fmt: skip
    return replace(record, **fields)


def good_clips() -> list[ClipRecord]:
    """20 usable clips: 12 CREMA-D (4 speakers, 3 balanced classes), 5 FI, 3 VoxCeleb2."""
    splits = {"1001": "train", "1002": "train", "1003": "val", "1004": "test"}
    labels = ("anger", "happiness", "sadness")
    records = [
        clip(f"cremad_{i:02d}", speaker=spk, split=splits[spk], label=labels[i % 3])
        for i, spk in enumerate(s for s in splits for _ in range(3))
    ]
    records += [
        clip(f"fi_{i}", "firstimpressions", f"yt{i}", ("train", "train", "val", "test", "train")[i])
        for i in range(5)
    ]
    records += [clip(f"vox_{i}", "voxceleb2", "id0001", "train") for i in range(3)]
    return records


def bad_clips() -> list[ClipRecord]:
    return [
        clip("cremad_silent", audio_rms_db=-91.2),
        clip("cremad_blurry", speaker="1002", detection_rate=0.12),
        clip(
            "cremad_noaudio",
            speaker="1003",
            split="val",
            status="quarantined",
            reason="no audio stream",
            duration=0.0,
            frames=0,
            detection_rate=0.0,
            sample_rate=0,
            audio_rms_db=float("-inf"),
            shard="",
        ),
        clip(
            "fi_out_of_range",
            "firstimpressions",
            "yt9",
            "test",
            targets="[0.5, 1.3, 0.2, 0.4, 0.6]",
        ),
    ]


def table(records: list[ClipRecord]) -> pd.DataFrame:
    return pd.DataFrame([asdict(r) for r in records], columns=list(CLIP_COLUMNS))


def manifest_of(records: list[ClipRecord]) -> pd.DataFrame:
    return pd.DataFrame({"clip_id": [r.clip_id for r in records],
                         "dataset": [r.dataset for r in records]})  # fmt: skip


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> ValidationReport:
    records = good_clips() + bad_clips()
    out = tmp_path_factory.mktemp("validate-mixed")
    return validate(table(records), manifest_of(records), THRESHOLDS, out)


def test_quarantine_lists_exactly_the_bad_clips_with_readable_reasons(mixed):
    assert mixed.passed, mixed.failures
    assert not mixed.gx_success  # GE itself flags the failing rows
    reasons = dict(zip(mixed.quarantine["clip_id"], mixed.quarantine["reason"], strict=True))
    assert set(reasons) == BAD
    assert reasons["cremad_silent"] == "audio is silent: -91.2 dBFS < -60 dBFS"
    assert reasons["cremad_blurry"] == "face detected in 12% of frames < 50%"
    assert reasons["cremad_noaudio"] == "no audio stream"
    assert reasons["fi_out_of_range"].startswith("targets outside [0, 1]: [0.5, 1.3")
    assert sorted(mixed.accepted) == sorted(r.clip_id for r in good_clips())

    written = pd.read_csv(mixed.files["quarantine"], keep_default_na=False)
    assert list(written.columns) == ["clip_id", "path", "reason"]
    assert set(written["clip_id"]) == BAD
    assert written.set_index("clip_id").loc["cremad_silent", "path"].endswith("cremad_silent.mp4")
    accepted = pd.read_csv(mixed.files["accepted"])
    assert set(accepted["clip_id"]) == set(mixed.accepted)


def test_reports_json_and_data_docs(mixed):
    strict = {"parse_constant": lambda c: pytest.fail(f"non-strict JSON constant {c}")}
    validation = json.loads(mixed.files["validation"].read_text(), **strict)
    assert validation["success"] is False
    assert validation["results"][CLIPS_SUITE]["results"]

    metrics = json.loads(mixed.files["metrics"].read_text(), **strict)
    assert metrics["clips"] == 24
    assert metrics["accepted"] == 20
    assert metrics["quarantined"] == 4
    assert metrics["quarantine_fraction"] == pytest.approx(4 / 24, abs=1e-6)
    assert metrics["reasons"] == {
        "bad_targets": 1,
        "crop_faces: no audio stream": 1,
        "low_detection_rate": 1,
        "silent_audio": 1,
    }
    assert metrics["success"]["passed"] is True

    balance = json.loads(mixed.files["balance"].read_text(), **strict)
    cremad = balance["datasets"]["cremad"]
    assert cremad["totals"] == {"anger": 4, "happiness": 4, "sadness": 4}
    assert cremad["counts"]["val"] == {"anger": 1, "happiness": 1, "sadness": 1}
    assert balance["imbalance_ratio"] == 1.0

    index = mixed.data_docs_index
    assert index == mixed.files["metrics"].parent / "data_docs" / "index.html"
    assert index.is_file()
    assert CLIPS_SUITE in index.read_text()


def test_everything_good_passes_via_run_validate(tmp_path: Path):
    records = good_clips()
    clips_dir = tmp_path / "faces"
    clips_dir.mkdir()
    table(records).to_parquet(clips_dir / "clips.parquet", index=False)
    by_dataset: dict[str, list[ManifestRow]] = {}
    for r in records:
        by_dataset.setdefault(r.dataset, []).append(ManifestRow(
            clip_id=r.clip_id, path=f"{r.clip_id}.mp4", dataset=r.dataset, speaker=r.speaker,
            split=r.split, label=r.label, targets=json.loads(r.targets)))  # fmt: skip
    manifests = []
    for name, rows in by_dataset.items():
        (tmp_path / "raw" / name).mkdir(parents=True)
        manifests.append(write_manifest(rows, tmp_path / "raw" / name))

    report = run_validate(clips_dir, manifests, THRESHOLDS, tmp_path / "validated")
    assert report.passed and report.gx_success
    assert report.failures == []
    assert len(report.quarantine) == 0
    assert len(report.accepted) == 20
    assert pd.read_csv(report.files["quarantine"]).empty


def test_half_quarantined_fails_after_writing_outputs(tmp_path: Path):
    records = good_clips()[:8] + [
        clip(f"broken_{i}", speaker="1001", status="quarantined", reason="no video stream")
        for i in range(8)
    ]
    clips_file = tmp_path / "clips.parquet"
    table(records).to_parquet(clips_file, index=False)
    rows = [ManifestRow(r.clip_id, f"{r.clip_id}.mp4", r.dataset, r.speaker, r.split, r.label)
            for r in records]  # fmt: skip
    (tmp_path / "raw").mkdir()
    manifest = write_manifest(rows, tmp_path / "raw")

    with pytest.raises(ValidationFailed) as caught:
        run_validate(clips_file, manifest, THRESHOLDS, tmp_path / "out")
    report = caught.value.report
    assert not report.passed
    assert any("quarantine fraction 50.0%" in f and "8 of 16" in f for f in report.failures)
    assert "quarantine fraction 50.0%" in str(caught.value)
    assert report.metrics["success"]["quarantine_fraction"] is False
    assert len(pd.read_csv(report.files["quarantine"])) == 8  # outputs are there to read
    assert report.data_docs_index.is_file()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("speaker_leak", "speakers in more than one split: [cremad/1001 (train, val)]"),
        ("duplicate_id", "duplicate clip ids: [cremad_00]"),
        ("missing_clip", "manifest clips missing from the clip table: [ghost]"),
        ("imbalance", "class imbalance 11.0 > max 10 in cremad (anger 11 vs happiness 1"),
    ],
)
def test_stage_level_failures(tmp_path: Path, case: str, expected: str):
    records = good_clips()
    manifest_records = list(records)
    if case == "speaker_leak":
        records.append(clip("cremad_leak", speaker="1001", split="val"))
        manifest_records = records
    elif case == "duplicate_id":
        records.append(clip("cremad_00", speaker="1002"))
    elif case == "missing_clip":
        manifest_records = [*records, clip("ghost")]
    elif case == "imbalance":
        records = [r for r in records if r.dataset != "cremad"]
        records += [clip(f"a{i}", label="anger") for i in range(11)]
        records += [clip("h0", label="happiness")]
        manifest_records = records
    report = validate(table(records), manifest_of(manifest_records), THRESHOLDS, tmp_path)
    assert not report.passed
    assert len(report.failures) == 1, report.failures
    assert expected in report.failures[0]
    assert json.loads(report.files["metrics"].read_text())["success"]["passed"] is False


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="max_duration"):
        ValidationThresholds(min_duration=10.0, max_duration=5.0)
    with pytest.raises(ValueError, match="min_detection_rate"):
        ValidationThresholds(min_detection_rate=1.5)
