"""The ``crop_faces`` stage: decode each manifest clip, find and track the main face, and
write square 224x224 face crops plus 16 kHz audio into tar shards with a per-clip table.

Clips are processed in parallel (a process pool, one face detector per worker) and grouped
into shards of ``clips_per_shard``; each finished shard is committed with a sidecar holding
its signature, so a re-run skips shards whose clips and parameters have not changed. A clip
that cannot be used is never an error for the stage: it lands in the table as
``quarantined`` with its reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from socialmae.data.clips import CLIP_COLUMNS, CLIPS_TABLE, ClipRecord
from socialmae.data.decode import SAMPLE_RATE, MediaInfo, decode_audio, iter_frames, probe
from socialmae.data.errors import MediaError
from socialmae.data.face_tracks import smooth_square_boxes, square_crop, track_main_face
from socialmae.data.faces import Backbone, FaceDetector
from socialmae.data.features import rms_db
from socialmae.data.shards import ShardSample, encode_jpeg, write_shard
from socialmae.io import atomic_write, atomic_write_text
from socialmae.lifecycle import die_with_parent
from socialmae.params import check_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CropParams:
    """Face cropping settings (``crop`` in params.yaml)."""

    frame_rate: float = 4.0  # face frames stored per second of video
    image_size: int = 224  # side of the stored square crops
    margin: float = 0.25  # crop side = face box side x (1 + margin)
    smooth_window: int = 5  # moving average of box centre and size, in sampled frames
    max_side: int = 1280  # decode frames no larger than this (aspect kept)
    max_seconds: float = 600.0  # longer clips keep their first max_seconds
    min_duration: float = 0.5  # shorter clips are quarantined
    detector_backbone: Backbone = "mobilenet0.25"
    detector_weights: str | None = None  # path/URL of ResNet-50 weights; None: bundled model
    detector_max_size: int = 640
    detector_confidence: float = 0.7
    detector_batch: int = 8
    jpeg_quality: int = 90
    clips_per_shard: int = 64
    workers: int = 2
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks = {
            "frame_rate": self.frame_rate > 0,
            "image_size": self.image_size >= 16,
            "margin": self.margin >= 0,
            "smooth_window": self.smooth_window >= 1,
            "max_side": self.max_side >= 64,
            "max_seconds": self.max_seconds > 0,
            "min_duration": self.min_duration >= 0,
            "detector_confidence": 0 < self.detector_confidence < 1,
            "detector_batch": self.detector_batch >= 1,
            "jpeg_quality": 1 <= self.jpeg_quality <= 100,
            "clips_per_shard": self.clips_per_shard >= 1,
            "workers": self.workers >= 1,
        }
        check_device(self.device)
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = {name: getattr(self, name) for name in bad}
            raise ValueError(f"invalid crop params: {values}")


# --------------------------------------------------------------------------- one clip


def build_detector(params: CropParams) -> FaceDetector:
    """A RetinaFace detector with the crop settings' weights, size, threshold and device."""
    return FaceDetector(
        weights=params.detector_weights,
        backbone=params.detector_backbone,  # type: ignore[arg-type]
        max_size=params.detector_max_size,
        confidence=params.detector_confidence,
        device=params.device,
    )


@dataclass
class FaceTrack:
    """One media file as the model sees it: its main face cropped over time, and its voice."""

    info: MediaInfo  # the container's facts (fps, size, audio format)
    times: list[float]  # [N] seconds of the sampled frames
    squares: np.ndarray  # [N, 3] smoothed square boxes (x, y, side) in decoded-frame pixels
    scale: float  # source pixels per decoded-frame pixel (frames are decoded at <= max_side)
    detected: np.ndarray  # [N] bool: the main face was detected in that frame
    crops: list[bytes]  # [N] JPEG crops, image_size x image_size (what the shards store)
    audio: np.ndarray  # [samples] float32 16 kHz mono, cut to ``duration``
    duration: float  # seconds usable from both streams
    faces_max: int  # most faces seen in one frame
    frame_rate: float  # frames sampled per second

    def meta(self, **fields: Any) -> dict[str, Any]:
        """The shard sample's metadata: ``fields`` (clip id, dataset, split, label, targets)
        then times, boxes (source pixels), detections, duration and frame rate."""
        return {
            **fields,
            "times": [round(t, 4) for t in self.times],
            "boxes": np.round(self.squares * self.scale, 1).tolist(),
            "detected": self.detected.tolist(),
            "duration": self.duration,
            "frame_rate": self.frame_rate,
        }


def face_track(
    path: str | os.PathLike[str],
    params: CropParams,
    detector: FaceDetector,
    need_audio: bool = True,
) -> FaceTrack:
    """Decode ``path`` once (frames at ``params.frame_rate``, the audio), detect faces in
    batches, track the main face, smooth its box and crop it.

    Without ``need_audio`` (a caller that uses the face alone) a file without audio gets
    silence. Raises :class:`MediaError` naming the file and the reason it cannot be used;
    any other exception is a bug and propagates.
    """
    path = str(path)
    info = probe(path)
    if not info.has_video:
        raise MediaError(path, "no video stream")
    if not info.has_audio and need_audio:
        raise MediaError(path, "no audio stream")
    audio = decode_audio(path, SAMPLE_RATE, params.max_seconds) if info.has_audio else None

    times: list[float] = []
    images: list[np.ndarray] = []  # small: frame_rate x max_seconds frames of <= max_side
    detections: list[list[Any]] = []
    frames = iter_frames(path, params.frame_rate, params.max_side, params.max_seconds)
    for batch in _batches(frames, params.detector_batch):
        batch_images = [image for _, image in batch]
        detections.extend(detector.detect(batch_images))
        times.extend(t for t, _ in batch)
        images.extend(batch_images)
    frame_size = (images[-1].shape[1], images[-1].shape[0]) if images else (0, 0)

    video_seconds = times[-1] + 1.0 / params.frame_rate
    if audio is None:  # a silent file, allowed when the caller does not need the voice
        audio = np.zeros(round(video_seconds * SAMPLE_RATE), dtype=np.float32)
    duration = round(min(video_seconds, audio.size / SAMPLE_RATE), 3)
    if duration < params.min_duration:
        reason = f"too short: {duration:.2f} s < {params.min_duration} s"
        raise MediaError(path, reason, duration=duration)
    boxes, detected = track_main_face(detections, frame_size)
    faces_max = max(len(faces) for faces in detections)
    if not detected.any():
        raise MediaError(
            path, f"no face detected in {len(detections)} sampled frames", duration=duration,
            faces_max=faces_max, detection_rate=round(float(detected.mean()), 4),
        )  # fmt: skip
    squares = smooth_square_boxes(boxes, detected, params.smooth_window)  # [N, 3]
    crops = [
        encode_jpeg(square_crop(image, box, params.margin, params.image_size), params.jpeg_quality)
        for image, box in zip(images, squares, strict=True)
    ]
    return FaceTrack(
        info=info, times=times, squares=squares,
        scale=info.width / frame_size[0] if frame_size[0] else 1.0, detected=detected,
        crops=crops, audio=audio[: round(duration * SAMPLE_RATE)], duration=duration,
        faces_max=faces_max, frame_rate=params.frame_rate,
    )  # fmt: skip


def _batches(
    frames: Iterator[tuple[float, np.ndarray]], size: int
) -> Iterator[list[tuple[float, np.ndarray]]]:
    batch: list[tuple[float, np.ndarray]] = []
    for item in frames:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_DETECTOR: FaceDetector | None = None  # the stage's worker processes build theirs once


def _stage_detector(params: CropParams) -> FaceDetector:
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = build_detector(params)
    return _DETECTOR


def process_clip(row: dict[str, Any], params: CropParams) -> tuple[ClipRecord, ShardSample | None]:
    """The crop stage's work on one manifest row: :func:`face_track`, then the clip table
    record and the shard sample.

    Returns ``(record, sample)``, or ``(record, None)`` with ``status="quarantined"`` and the
    reason when the clip cannot be used: any failure, even an unexpected one, quarantines the
    clip and the stage goes on.
    """
    record = ClipRecord(
        clip_id=str(row["clip_id"]),
        dataset=str(row["dataset"]),
        speaker=str(row["speaker"]),
        split=str(row["split"]),
        label=str(row["label"]),
        targets=json.dumps([float(t) for t in row["targets"]]),
        path=str(row["abs_path"]),
        status="quarantined",
    )
    detector = _stage_detector(params)  # unusable weights stop the stage: not a clip's fault
    try:
        track = face_track(record.path, params, detector)
    except MediaError as exc:
        _describe_media(record)
        for name, value in exc.facts.items():
            setattr(record, name, value)
        record.reason = exc.reason
        return record, None
    except Exception as exc:  # a clip must never take the stage down
        logger.exception("%s: unexpected failure", record.path)
        _describe_media(record)
        record.reason = f"unexpected failure: {type(exc).__name__}: {exc}"
        return record, None
    info = track.info
    record.fps, record.width, record.height = info.fps, info.width, info.height
    record.sample_rate, record.channels = info.sample_rate, info.channels
    record.duration = track.duration
    record.faces_max = track.faces_max
    record.detection_rate = round(float(track.detected.mean()), 4)
    record.box_size = round(float(np.median(track.squares[:, 2])) * track.scale, 1)
    record.frames = len(track.crops)
    record.audio_rms_db = round(rms_db(track.audio), 2)
    record.status = "ok"
    meta = track.meta(
        clip_id=record.clip_id, dataset=record.dataset, split=record.split, label=record.label,
        targets=json.loads(record.targets),
    )  # fmt: skip
    return record, ShardSample(meta=meta, audio=track.audio, frames=track.crops)


def _describe_media(record: ClipRecord) -> None:
    """Fill the container facts of a quarantined clip's record where the file has them."""
    try:
        info = probe(record.path)
    except MediaError:
        return
    record.fps, record.width, record.height = info.fps, info.width, info.height
    record.sample_rate, record.channels = info.sample_rate, info.channels


# --------------------------------------------------------------------------- the stage


def _worker_init(params: CropParams) -> None:
    die_with_parent()  # a killed stage leaves no detector workers behind
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    _stage_detector(params)


_UNSIGNED_PARAMS = ("workers",)  # how the work is spread, not what it produces


def _signature(rows: pd.DataFrame, params: CropParams) -> str:
    """What a shard was made from: the params that shape the output and each clip's id, path
    (:func:`portable_path`) and content. The content, not the modification time: the marker
    lives in the tracked output, so a source rewritten with the same bytes must leave it
    unchanged."""
    settings = {k: v for k, v in asdict(params).items() if k not in _UNSIGNED_PARAMS}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for clip_id, path in zip(rows["clip_id"], rows["abs_path"], strict=True):
        h.update(f"{clip_id}\0{portable_path(path)}\0{_file_digest(path)}\n".encode())
    return h.hexdigest()


def _file_digest(path: str) -> str:
    """BLAKE2b of the file's bytes (cheap next to decoding it), or ``missing``."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "blake2b").hexdigest()
    except FileNotFoundError:
        return "missing"


def crop_faces(manifest: pd.DataFrame, out_dir: str | os.PathLike[str], params: CropParams) -> dict:
    """Run face cropping over a manifest (``read_manifest`` output, several datasets allowed).

    Writes ``out_dir/shard-NNNNN.tar`` (+ ``.parquet`` per-shard table and ``.json`` commit
    marker), ``out_dir/clips.parquet`` (every clip, ok or quarantined) and returns metrics.

    Raises:
        DetectorWeightsError: the detector's weights cannot be used (before any clip is read).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = manifest.sort_values(["dataset", "clip_id"]).reset_index(drop=True)
    chunks = [
        rows.iloc[i : i + params.clips_per_shard]
        for i in range(0, len(rows), params.clips_per_shard)
    ]
    start = time.perf_counter()
    _stage_detector(params)  # weights checked (and converted or downloaded) once, up front
    pool = None
    if params.workers > 1 and len(rows) > 1:
        pool = ProcessPoolExecutor(
            max_workers=params.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(params,),
        )
    skipped = processed = 0
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("cropping faces", total=len(rows))
            for number, chunk in enumerate(chunks):
                name = f"shard-{number:05d}"
                marker = out / f"{name}.json"
                signature = _signature(chunk, params)
                if (
                    marker.is_file()
                    and json.loads(marker.read_text()).get("signature") == signature
                    and (out / f"{name}.parquet").is_file()
                ):
                    skipped += len(chunk)
                    progress.advance(task, len(chunk))
                    continue
                records_in = chunk.to_dict("records")
                if pool is None:
                    results = (process_clip(r, params) for r in records_in)
                else:
                    results = pool.map(process_clip, records_in, [params] * len(records_in))
                records, samples = [], []
                for record, sample in results:
                    records.append(record)
                    if sample is not None:
                        sample.meta["shard"] = f"{name}.tar"
                        record.shard = f"{name}.tar"
                        samples.append(sample)
                    progress.advance(task)
                write_shard(out / f"{name}.tar", samples)
                _write_table(records, out / f"{name}.parquet")
                marker_text = json.dumps({"signature": signature, "clips": len(records)}) + "\n"
                atomic_write_text(marker, marker_text)
                processed += len(records)
                logger.info("crop_faces: %s done (%d of %d clips)", name,
                            processed + skipped, len(rows))  # fmt: skip
    finally:
        if pool is not None:
            pool.shutdown()
    for stale in out.glob("shard-*.*"):
        if int(stale.name[6:11]) >= len(chunks):
            stale.unlink()
    table = pd.concat(
        [pd.read_parquet(out / f"shard-{n:05d}.parquet") for n in range(len(chunks))],
        ignore_index=True,
    ) if chunks else pd.DataFrame(columns=list(CLIP_COLUMNS))  # fmt: skip
    table["path"] = table["path"].map(portable_path)  # also in shards an older version wrote
    atomic_write(out / CLIPS_TABLE, lambda tmp: table.to_parquet(tmp, index=False))
    seconds = time.perf_counter() - start
    ok = table[table["status"] == "ok"]
    metrics = {
        "clips": len(table),
        "ok": len(ok),
        "quarantined": int((table["status"] != "ok").sum()),
        "processed": processed,
        "skipped_unchanged": skipped,
        "frames": int(ok["frames"].sum()) if len(ok) else 0,
        "seconds": round(seconds, 2),
        "clips_per_second": round(processed / seconds, 3) if processed and seconds else 0.0,
        "shards": len(chunks),
    }
    for clip_id, reason in zip(table["clip_id"], table["reason"], strict=True):
        if reason:
            logger.warning("quarantined %s: %s", clip_id, reason)
    return metrics


def _write_table(records: list[ClipRecord], path: Path) -> None:
    frame = pd.DataFrame([asdict(r) for r in records], columns=list(CLIP_COLUMNS))
    frame["path"] = frame["path"].map(portable_path)
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def portable_path(path: str) -> str:
    """``path`` relative to the working directory (the project root, where stages run) when it
    lies below it, else as it is: the clip table is a tracked output, and the checkout's
    location must not change its bytes."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path
