"""crop_faces and the loader on a corpus of real and broken media files."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from media import write_clip

from socialmae.data import crop as crop_module
from socialmae.data.clips import CLIPS_TABLE
from socialmae.data.crop import (
    CropParams,
    decode_rows,
    detect_clips,
    detect_rows,
    process_rows,
)
from socialmae.data.crop_stage import crop_faces
from socialmae.data.dataset import ShardDataset
from socialmae.data.errors import MediaError
from socialmae.data.faces import DetectorWeightsError
from socialmae.data.features import log_mel, torch_threads
from socialmae.data.inputs import load_clip
from socialmae.data.manifest import ManifestRow, read_manifest, write_manifest
from socialmae.data.sampling import Augment, ClipSampling, sample_clip
from socialmae.model import get_preset
from socialmae.state_dicts import CheckpointError
from socialmae.tasks import get_task

PARAMS = CropParams(workers=1, clips_per_shard=4, frame_rate=4.0)


def _corpus(root: Path) -> dict[str, str]:
    """Write the corpus; returns clip id -> expected outcome ("ok" or a reason fragment)."""
    clips = root / "clips"
    clips.mkdir(parents=True)
    expected: dict[str, str] = {}

    def add(name: str, outcome: str, **kwargs) -> None:
        write_clip(clips / name, **kwargs)
        expected[name] = outcome

    add("good.mp4", "ok", seconds=2.0)
    add("good.webm", "ok", seconds=1.5)
    add("stereo48k.mp4", "ok", audio_rate=48_000, channels=2)
    add("8k.mkv", "ok", audio_rate=8_000)
    add("silence.mp4", "ok", silent=True)  # kept here, quarantined by validation
    add("two-faces.mp4", "ok", size=(448, 224), faces=2)
    add("4k.mp4", "ok", size=(3840, 2160), seconds=1.0, fps=5)
    add("émotion-日本.mp4", "ok")
    add("no-audio.mp4", "no audio stream", audio_rate=None)
    add("audio-only.mkv", "no video stream", video=False)
    add("no-face.mp4", "no face detected", faces=0)
    add("tiny-frames.mp4", "no face detected", size=(16, 16))
    add("single-frame.mp4", "too short", frames=1, seconds=1.0)
    (clips / "zero.mp4").write_bytes(b"")
    expected["zero.mp4"] = "file is empty"
    (clips / "random.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
    expected["random.mp4"] = "not a readable media file"
    whole = (clips / "good.mp4").read_bytes()
    (clips / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    expected["truncated.mp4"] = "not a readable media file"
    labels = get_task("demo").labels
    rows = [
        ManifestRow(
            clip_id=name,
            path=f"clips/{name}",
            dataset="demo",
            speaker=f"s{i % 3}",
            split=("train", "val", "test")[i % 3],
            label=labels[i % len(labels)],
        )
        for i, name in enumerate(sorted(expected))
    ]
    write_manifest(rows, root)
    return expected


@pytest.fixture(scope="module")
def cropped(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = _corpus(root / "raw")
    out = root / "shards"
    metrics = crop_faces(read_manifest(root / "raw"), out, PARAMS)
    return root, out, expected, metrics


def test_every_clip_gets_the_right_outcome(cropped):
    _, out, expected, metrics = cropped
    table = pd.read_parquet(out / CLIPS_TABLE).set_index("clip_id")
    assert sorted(table.index) == sorted(expected)  # nothing lost
    for clip_id, outcome in expected.items():
        row = table.loc[clip_id]
        if outcome == "ok":
            assert row["status"] == "ok", (clip_id, row["reason"])
            assert row["frames"] >= 4 and row["detection_rate"] > 0.5
            assert row["shard"].startswith("shard-")
        else:
            assert row["status"] == "quarantined", clip_id
            assert outcome in row["reason"], (clip_id, row["reason"])
    assert table.loc["two-faces.mp4", "faces_max"] == 2
    assert table.loc["stereo48k.mp4", "sample_rate"] == 48_000
    assert table.loc["4k.mp4", "width"] == 3840 and table.loc["4k.mp4", "box_size"] > 1000
    assert table.loc["silence.mp4", "audio_rms_db"] < -60 < table.loc["good.mp4", "audio_rms_db"]
    assert metrics["ok"] == sum(v == "ok" for v in expected.values())
    assert metrics["quarantined"] == len(expected) - metrics["ok"]


def test_rerun_skips_finished_shards_and_redoes_changed_ones(cropped):
    root, out, expected, _ = cropped
    manifest = read_manifest(root / "raw")
    half_written = out / ".shard-00001.tar.k7x2m9q4.tmp"  # what a killed run leaves
    half_written.write_bytes(b"half a shard")
    again = crop_faces(manifest, out, PARAMS)
    assert again["processed"] == 0 and again["skipped_unchanged"] == len(expected)
    assert not half_written.exists()
    markers = {p.name: p.read_bytes() for p in out.glob("shard-*.json")}
    for path in (root / "raw" / "clips").iterdir():  # same bytes, new times (a re-download)
        os.utime(path, (1e9, 1e9))
    fourth = crop_faces(manifest, out, dataclasses.replace(PARAMS, workers=PARAMS.workers + 1))
    assert fourth["processed"] == 0, "same content, same output params: nothing to redo"
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.json")} == markers
    write_clip(root / "raw" / "clips" / "good.webm", seconds=2.5)  # one clip changed
    third = crop_faces(manifest, out, PARAMS)
    assert third["processed"] == PARAMS.clips_per_shard
    table = pd.read_parquet(out / CLIPS_TABLE).set_index("clip_id")
    assert table.loc["good.webm", "duration"] == pytest.approx(2.5, abs=0.3)


def test_shard_dataset_items(cropped):
    _, out, _, _ = cropped
    config = get_preset("tiny")
    task = get_task("demo")
    data = ShardDataset(out, config, task=task, train=False)
    assert len(data) == 8
    item = data[0]
    assert item["audio"].shape == (1024, 128) and item["video"].shape == (3, 8, 224, 224)
    assert item["target"].shape == (6,) and item["target"].sum() == 1
    assert item["label"] == int(item["target"].argmax())
    again = data[0]
    assert torch.equal(item["video"], again["video"])  # evaluation is deterministic
    train = ShardDataset(out, config, task=task, train=True, sampling=ClipSampling(1.0))
    good = int(train.table.index[train.table["clip_id"] == "good.mp4"][0])  # 2 s > 1 s window
    train.set_epoch(0)
    first = train[good]["audio"]
    train.set_epoch(1)
    assert not torch.equal(first, train[good]["audio"])  # training windows move
    train.set_epoch(0)
    assert torch.equal(first, train[good]["audio"])  # reproducible


def test_aligned_and_reference_audio_windows(cropped):
    _, out, _, _ = cropped
    config = get_preset("tiny")
    aligned = ShardDataset(out, config, train=False)[0]["audio"]
    whole = ShardDataset(out, config, train=False, sampling=ClipSampling(audio_window="clip"))
    reference = whole[0]["audio"]
    pad = (0 - config.fbank_mean) / config.fbank_std  # normalised zero padding
    assert torch.allclose(aligned[400:], torch.full_like(aligned[400:], pad))  # 4 s window
    assert not torch.allclose(reference[150:200], aligned[150:200])


def test_windows_are_cut_from_the_stored_fbank(cropped):
    """The loader's fbank of a window comes from the shard, not from FFTs: exactly the clip's
    own for a window over the whole clip, the window's to 0.1% otherwise (float rounding; windows
    start on the 10 ms hop); a window tiled past the clip's end is computed."""
    _, out, _, _ = cropped
    config = get_preset("tiny")
    data = ShardDataset(out, config, train=True, sampling=ClipSampling(1.0))
    good = int(data.table.index[data.table["clip_id"] == "good.mp4"][0])  # 2 s
    clip = data.clip(good)
    starts = set()
    for epoch in range(6):
        rng = np.random.default_rng(epoch)
        window = sample_clip(clip, config, data.sampling, True, rng)
        starts.add(window.start)
        assert window.fbank is not None and window.start * 100 == pytest.approx(
            round(window.start * 100), abs=1e-6
        )
        computed = log_mel(window.audio)
        assert window.fbank.shape == computed.shape == (98, 128)
        torch.testing.assert_close(window.fbank, computed, atol=1e-3, rtol=1e-3)
    assert len(starts) > 1
    whole = sample_clip(clip, config, ClipSampling(audio_window="clip"), False, None)
    with torch_threads(1):
        assert torch.equal(whole.fbank, log_mel(clip.audio))
    tiled = sample_clip(clip, config, ClipSampling(4.0), True, np.random.default_rng(0))
    assert tiled.fbank is None  # 4 s over a 2 s clip: wraps around
    item = ShardDataset(out, config, train=False, sampling=ClipSampling(1.0))[good]["audio"]
    window = sample_clip(clip, config, ClipSampling(1.0), False, None)
    expected = (log_mel(window.audio) - config.fbank_mean) / config.fbank_std
    torch.testing.assert_close(item[:98], expected, atol=1e-3, rtol=0)


def test_augmentation_and_mixup(cropped):
    _, out, _, _ = cropped
    config = get_preset("tiny")
    task = get_task("demo")
    plain = ShardDataset(out, config, task=task, train=True)
    augmented = ShardDataset(
        out, config, task=task, train=True, augment=Augment(freqm=48, timem=192, mixup=1.0)
    )
    item = augmented[1]
    assert not torch.equal(item["audio"], plain[1]["audio"])
    assert item["target"].sum().item() == pytest.approx(1.0)
    assert (item["target"] > 0).sum() in (1, 2)  # mixed with another clip (maybe same label)


@pytest.mark.parametrize("train", [True, False])
def test_audio_only_items_skip_the_faces_and_keep_every_other_value(cropped, train):
    _, out, _, _ = cropped
    config, task = get_preset("tiny"), get_task("demo")
    augment = Augment(freqm=24, timem=96, flip=True, crop_scale=0.8) if train else None
    both, audio_only = (
        ShardDataset(out, config, task=task, train=train, augment=augment, faces=faces)
        for faces in (True, False)
    )
    for index in range(len(both)):
        full, slim = both[index], audio_only[index]
        assert full["video"].shape == (3, 8, 224, 224) and slim["video"].numel() == 0
        assert torch.equal(full["audio"], slim["audio"])
        assert torch.equal(full["target"], slim["target"]) and full["label"] == slim["label"]


def test_load_clip_matches_the_shards(cropped):
    root, out, _, _ = cropped
    config = get_preset("tiny")
    path = root / "raw" / "clips" / "good.mp4"
    inputs = load_clip(path, config, PARAMS)
    assert inputs.audio.shape == (1024, 128) and inputs.video.shape == (3, 8, 224, 224)
    assert inputs.boxes.shape == (8, 3) and inputs.times.shape == (8,)
    # a 2 s clip in a 4 s window is tiled: times wrap around but stay inside the clip
    assert np.all((inputs.times >= 0) & (inputs.times < 2.1))
    item = ShardDataset(out, config, train=False)
    index = item.table.index[item.table["clip_id"] == "good.mp4"][0]
    torch.testing.assert_close(inputs.video, item[index]["video"])
    with pytest.raises(MediaError, match="no face detected") as info:
        load_clip(root / "raw" / "clips" / "no-face.mp4", config, PARAMS)
    assert "no-face.mp4" in str(info.value)


class _BrokenDetector:
    """A detector that fails as a bug or an exhausted device would (not a media problem)."""

    def detect(self, images):
        raise RuntimeError("CUDA out of memory (simulated)")


def test_inference_raises_what_the_stage_quarantines(cropped, monkeypatch):
    """One clip path for both: the stage turns any failure into a quarantined record and
    goes on; inference (load_clip) lets a non-media error propagate instead of reporting it
    as a bad file."""
    root, _, _, _ = cropped
    path = root / "raw" / "clips" / "good.mp4"
    with pytest.raises(RuntimeError, match="out of memory"):
        load_clip(path, get_preset("tiny"), PARAMS, detector=_BrokenDetector())
    monkeypatch.setattr(crop_module, "_DETECTOR", _BrokenDetector())
    row = {"clip_id": "good.mp4", "dataset": "d", "speaker": "s", "split": "train",
           "label": "anger", "targets": [], "abs_path": str(path)}  # fmt: skip
    [(record, sample)] = process_rows([row], PARAMS)
    assert sample is None and record.status == "quarantined"
    assert record.reason.startswith("unexpected failure: RuntimeError: CUDA out of memory")
    assert record.width > 0 and record.fps > 0  # what the file is, even when quarantined


@pytest.mark.parametrize("workers", [1, 2])
def test_unusable_detector_weights_stop_the_stage_before_any_clip(cropped, tmp_path, monkeypatch,
                                                                  workers):  # fmt: skip
    """Bad detector weights are the stage's problem, not every clip's: the stage raises one
    DetectorWeightsError (a CheckpointError: the CLI's exit 2) and writes no shard or table."""
    root, _, _, _ = cropped
    monkeypatch.setattr(crop_module, "_DETECTOR", None)
    bad = dataclasses.replace(PARAMS, workers=workers, detector_backbone="resnet50",
                              detector_weights=str(tmp_path / "missing.pth"))  # fmt: skip
    out = tmp_path / "shards"
    with pytest.raises(DetectorWeightsError, match=r"missing\.pth: no such file") as caught:
        crop_faces(read_manifest(root / "raw"), out, bad)
    assert isinstance(caught.value, CheckpointError)
    assert not list(out.glob("shard-*")) and not (out / CLIPS_TABLE).exists()


def test_metadata_records_times_and_boxes(cropped):
    _, out, _, _ = cropped
    data = ShardDataset(out, get_preset("tiny"))
    meta = data.clip(0).meta
    assert len(meta["times"]) == meta["frames"] == len(meta["boxes"])
    assert json.dumps(meta)  # plain JSON


def test_loader_feeds_a_multiprocess_dataloader(cropped):
    _, out, _, _ = cropped
    data = ShardDataset(out, get_preset("tiny"), task=get_task("demo"), train=False)
    data[0]  # opens a reader in the parent: its file handle must not cross into workers
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(b["video"].shape[0] for b in batches) == len(data)
    assert batches[0]["audio"].shape == (4, 1024, 128)
    assert sorted(c for b in batches for c in b["clip_id"]) == sorted(data.table["clip_id"])


def _rows(root: Path, names: list[str]) -> list[dict]:
    manifest = read_manifest(root / "raw")
    return manifest[manifest["clip_id"].isin(names)].sort_values("clip_id").to_dict("records")


def test_detector_batches_across_clips_give_the_same_shards_with_any_workers(cropped, tmp_path):
    """With crop.detector_clips, consecutive clips of a shard share the detector's batches; the
    groups are fixed by the shard, so one process or two make the same bytes."""
    root, _, _, _ = cropped
    manifest = read_manifest(root / "raw")
    manifest = manifest[~manifest["clip_id"].isin(["4k.mp4", "two-faces.mp4"])]  # time
    outputs = []
    for workers in (1, 2):
        params = dataclasses.replace(PARAMS, workers=workers, detector_clips=3, detector_batch=5)
        out = tmp_path / f"workers-{workers}"
        crop_faces(manifest, out, params)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    table = pd.read_parquet(tmp_path / "workers-1" / CLIPS_TABLE)
    assert (table["status"] == "ok").sum() >= 4  # broken clips in a group quarantine alone


class _FailsOnLargeFrames:
    """A real detector that fails on any batch holding a frame wider than 1,000 pixels."""

    def __init__(self, detector) -> None:
        self.detector = detector

    def detect(self, images):
        if any(image.shape[1] > 1000 for image in images):
            raise RuntimeError("frame too large for this device (simulated)")
        return self.detector.detect(images)


def test_a_group_whose_detection_fails_quarantines_only_the_failing_clip(cropped):
    root, _, _, _ = cropped
    rows = _rows(root, ["4k.mp4", "good.mp4", "good.webm"])  # 4k decodes at 1280 px
    detector = _FailsOnLargeFrames(crop_module.build_detector(PARAMS))
    detected = detect_rows(decode_rows(rows, PARAMS), detector, batch=64)
    outcome = {record.clip_id: (record.status, record.reason) for record, _, _ in detected}
    assert outcome["4k.mp4"][0] == "quarantined"
    assert "frame too large for this device" in outcome["4k.mp4"][1]
    assert outcome["good.mp4"][0] == outcome["good.webm"][0] == "quarantined"  # until accepted
    faces = {record.clip_id: found for record, _, found in detected}
    assert faces["4k.mp4"] is None
    assert all(len(f) > 0 for f in faces["good.mp4"]) and all(
        len(f) > 0 for f in faces["good.webm"]
    )


def test_detections_across_clips_come_back_to_their_frames(cropped):
    """Frames of several clips share the detector's batches and each clip gets its own frames'
    faces back, in order: the same as alone at batch 1, within a millipixel at batch 64."""
    root, _, _, _ = cropped
    rows = _rows(root, ["good.mp4", "good.webm", "two-faces.mp4"])
    clips = [clip for _, clip in decode_rows(rows, PARAMS)]
    detector = crop_module.build_detector(PARAMS)
    for batch, tolerance in ((1, 0.0), (64, 1e-3)):
        together = detect_clips(clips, detector, batch)
        assert [len(found) for found in together] == [len(clip.images) for clip in clips]
        for clip, found in zip(clips, together, strict=True):
            alone = detect_clips([clip], detector, batch)[0]
            assert [len(faces) for faces in found] == [len(faces) for faces in alone]
            for faces, expected in zip(found, alone, strict=True):
                for face, other in zip(faces, expected, strict=True):
                    np.testing.assert_allclose(face.bbox, other.bbox, atol=tolerance, rtol=0)
