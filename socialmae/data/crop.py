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
from socialmae.data.decode import SAMPLE_RATE, decode_audio, iter_frames, probe
from socialmae.data.errors import MediaError
from socialmae.data.face_tracks import smooth_square_boxes, square_crop, track_main_face
from socialmae.data.faces import Backbone
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

_DETECTOR: Any = None


def _detector(params: CropParams) -> Any:
    """The face detector of this process, built once."""
    global _DETECTOR
    if _DETECTOR is None:
        from socialmae.data.faces import FaceDetector

        _DETECTOR = FaceDetector(
            weights=params.detector_weights,
            backbone=params.detector_backbone,  # type: ignore[arg-type]
            max_size=params.detector_max_size,
            confidence=params.detector_confidence,
            device=params.device,
        )
    return _DETECTOR


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


def process_clip(
    row: dict[str, Any], params: CropParams, need_audio: bool = True
) -> tuple[ClipRecord, ShardSample | None]:
    """Decode, detect, track and crop one manifest row.

    Returns the clip's record and its shard sample, or ``(record, None)`` with
    ``status="quarantined"`` and the reason when the clip cannot be used. Without
    ``need_audio`` (inference from the face alone) a file without audio gets silence.
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
    try:
        return _process(record, params, need_audio)
    except MediaError as exc:
        record.reason = exc.reason
    except Exception as exc:  # a clip must never take the stage down
        logger.exception("%s: unexpected failure", record.path)
        record.reason = f"unexpected failure: {type(exc).__name__}: {exc}"
    return record, None


def _process(
    record: ClipRecord, params: CropParams, need_audio: bool = True
) -> tuple[ClipRecord, ShardSample | None]:
    path = record.path
    info = probe(path)
    record.fps, record.width, record.height = info.fps, info.width, info.height
    record.sample_rate, record.channels = info.sample_rate, info.channels
    if not info.has_video:
        raise MediaError(path, "no video stream")
    if not info.has_audio and need_audio:
        raise MediaError(path, "no audio stream")
    audio = decode_audio(path, SAMPLE_RATE, params.max_seconds) if info.has_audio else None

    detector = _detector(params)
    times: list[float] = []
    detections: list[list[Any]] = []
    frame_size = (0, 0)
    frames = iter_frames(path, params.frame_rate, params.max_side, params.max_seconds)
    for batch in _batches(frames, params.detector_batch):
        images = [image for _, image in batch]
        frame_size = (images[0].shape[1], images[0].shape[0])
        detections.extend(detector.detect(images))
        times.extend(t for t, _ in batch)

    video_seconds = times[-1] + 1.0 / params.frame_rate
    if audio is None:  # a silent file, allowed when the caller does not need the voice
        audio = np.zeros(round(video_seconds * SAMPLE_RATE), dtype=np.float32)
    record.duration = round(min(video_seconds, audio.size / SAMPLE_RATE), 3)
    if record.duration < params.min_duration:
        raise MediaError(path, f"too short: {record.duration:.2f} s < {params.min_duration} s")
    record.faces_max = max(len(faces) for faces in detections)
    boxes, detected = track_main_face(detections, frame_size)
    record.detection_rate = round(float(detected.mean()), 4)
    if not detected.any():
        raise MediaError(path, f"no face detected in {len(detections)} sampled frames")
    squares = smooth_square_boxes(boxes, detected, params.smooth_window)  # [N, 3]
    scale = info.width / frame_size[0] if frame_size[0] else 1.0
    record.box_size = round(float(np.median(squares[:, 2])) * scale, 1)

    crops = []
    again = iter_frames(path, params.frame_rate, params.max_side, params.max_seconds)
    for (_, image), box in zip(again, squares, strict=False):
        crops.append(encode_jpeg(square_crop(image, box, params.margin, params.image_size),
                                 params.jpeg_quality))  # fmt: skip
    audio = audio[: round(record.duration * SAMPLE_RATE)]
    record.frames = len(crops)
    record.audio_rms_db = round(rms_db(audio), 2)
    record.status = "ok"
    meta = {
        "clip_id": record.clip_id,
        "dataset": record.dataset,
        "split": record.split,
        "label": record.label,
        "targets": json.loads(record.targets),
        "times": [round(t, 4) for t in times[: len(crops)]],
        "boxes": np.round(squares[: len(crops)] * scale, 1).tolist(),
        "detected": detected[: len(crops)].tolist(),
        "duration": record.duration,
        "frame_rate": params.frame_rate,
    }
    return record, ShardSample(meta=meta, audio=audio, frames=crops)


# --------------------------------------------------------------------------- the stage


def _worker_init(params: CropParams) -> None:
    die_with_parent()  # a killed stage leaves no detector workers behind
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    _detector(params)


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
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = manifest.sort_values(["dataset", "clip_id"]).reset_index(drop=True)
    chunks = [
        rows.iloc[i : i + params.clips_per_shard]
        for i in range(0, len(rows), params.clips_per_shard)
    ]
    start = time.perf_counter()
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
