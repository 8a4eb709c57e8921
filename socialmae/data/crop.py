"""The crop stage's work on one clip: decode it, find and track the main face, and make
square face crops plus 16 kHz audio (the shard sample) and the clip table record; and the
local engine that does it for a shard in this machine's processes (the stage itself:
:mod:`socialmae.data.crop_stage`)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from socialmae.data.clips import ClipRecord
from socialmae.data.decode import SAMPLE_RATE, MediaInfo, decode_audio, iter_frames, probe
from socialmae.data.errors import MediaError
from socialmae.data.face_tracks import smooth_square_boxes, square_crop, track_main_face
from socialmae.data.faces import Backbone, Face, FaceDetector
from socialmae.data.features import rms_db, torch_threads
from socialmae.data.shards import ShardSample, encode_jpeg
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
    detector_batch: int = 8  # frames per detector call
    detector_clips: int = 1  # consecutive clips of a shard whose frames share those calls
    jpeg_quality: int = 90
    clips_per_shard: int = 64
    workers: int = 2  # local: processes; ray on CPUs: detector actors
    device: str = "cpu"  # the detector's; cuda: one per GPU (ray: actors_per_gpu share one)
    engine: Literal["local", "ray"] = "local"  # who does the work; the output is the same
    ray_address: str | None = None  # ray: null starts Ray here; "auto", "ray://head:10001"
    actors_per_gpu: int = 1  # ray: detector actors sharing one GPU

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
            "detector_clips": self.detector_clips >= 1,
            "jpeg_quality": 1 <= self.jpeg_quality <= 100,
            "clips_per_shard": self.clips_per_shard >= 1,
            "workers": self.workers >= 1,
            "engine": self.engine in ("local", "ray"),
            "actors_per_gpu": self.actors_per_gpu >= 1,
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
        batch_size=params.detector_batch,
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


@dataclass
class DecodedClip:
    """A media file decoded for cropping: the frames sampled at ``frame_rate`` and the voice."""

    path: str
    info: MediaInfo
    times: list[float]  # [N] seconds of the sampled frames
    images: list[np.ndarray]  # [N] RGB uint8 [H, W, 3], at most max_side
    audio: np.ndarray | None  # [samples] float32 16 kHz mono; None: the file has no voice


def decode_clip(
    path: str | os.PathLike[str], params: CropParams, need_audio: bool = True
) -> DecodedClip:
    """Decode ``path`` once: frames at ``params.frame_rate`` (only those are converted), and the
    audio. Raises :class:`MediaError` naming the file and the reason it cannot be used."""
    path = str(path)
    info = probe(path)
    if not info.has_video:
        raise MediaError(path, "no video stream")
    if not info.has_audio and need_audio:
        raise MediaError(path, "no audio stream")
    audio = decode_audio(path, SAMPLE_RATE, params.max_seconds) if info.has_audio else None
    times: list[float] = []
    images: list[np.ndarray] = []  # small: frame_rate x max_seconds frames of <= max_side
    for time_s, image in iter_frames(path, params.frame_rate, params.max_side, params.max_seconds):
        times.append(time_s)
        images.append(image)
    return DecodedClip(path, info, times, images, audio)


def detect_clips(
    clips: Sequence[DecodedClip], detector: FaceDetector, batch: int
) -> list[list[list[Face]]]:
    """Faces in every frame of ``clips``: their frames, in order, go to the detector up to
    ``batch`` at a time, across clip boundaries but never across frame sizes (a batch is padded
    to its largest frame, which would move the faces of the smaller ones); ``result[c][i]`` are
    the faces of frame ``i`` of clip ``c``.

    The detector's numbers depend (in the last bits) on what shares its batch, so the callers
    fix which clips go together (a shard's consecutive clips, ``crop.detector_clips`` at a
    time), never how the stage spreads its work."""
    frames = [image for clip in clips for image in clip.images]
    found: list[list[Face]] = []
    start = 0
    while start < len(frames):
        end = start + 1
        while end < min(start + batch, len(frames)) and frames[end].shape == frames[start].shape:
            end += 1
        found.extend(detector.detect(frames[start:end]))
        start = end
    detections, first = [], 0
    for clip in clips:
        detections.append(found[first : first + len(clip.images)])
        first += len(clip.images)
    return detections


def finish_track(clip: DecodedClip, detections: list[list[Face]], params: CropParams) -> FaceTrack:
    """Track the main face over ``clip``'s detections, smooth its box and crop it.

    Raises :class:`MediaError` (too short, no face) naming the file."""
    path, info, times, images, audio = clip.path, clip.info, clip.times, clip.images, clip.audio
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


def face_track(
    path: str | os.PathLike[str],
    params: CropParams,
    detector: FaceDetector,
    need_audio: bool = True,
) -> FaceTrack:
    """Decode ``path`` once (frames at ``params.frame_rate``, the audio), detect faces in
    batches, track the main face, smooth its box and crop it: :func:`decode_clip`, then
    :func:`detect_clips`, then :func:`finish_track`.

    Without ``need_audio`` (a caller that uses the face alone) a file without audio gets
    silence. Raises :class:`MediaError` naming the file and the reason it cannot be used;
    any other exception is a bug and propagates.
    """
    clip = decode_clip(path, params, need_audio)
    return finish_track(clip, detect_clips([clip], detector, params.detector_batch)[0], params)


_DETECTOR: FaceDetector | None = None  # the stage's worker processes build theirs once


def stage_detector(params: CropParams) -> FaceDetector:
    """The crop stage's detector in this process, built once from the first ``params``."""
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = build_detector(params)
    return _DETECTOR


def clip_record(row: Mapping[str, Any]) -> ClipRecord:
    """The clip table record of a manifest row, quarantined until :func:`accept` says ok."""
    return ClipRecord(
        clip_id=str(row["clip_id"]),
        dataset=str(row["dataset"]),
        speaker=str(row["speaker"]),
        split=str(row["split"]),
        label=str(row["label"]),
        targets=json.dumps([float(t) for t in row["targets"]]),
        path=str(row["abs_path"]),
        status="quarantined",
    )


def quarantine(record: ClipRecord, exc: BaseException) -> ClipRecord:
    """``record`` quarantined for ``exc``: a :class:`MediaError`'s reason and facts, or an
    unexpected failure (logged with its traceback: a clip must never take the stage down)."""
    _describe_media(record)
    if isinstance(exc, MediaError):
        for name, value in exc.facts.items():
            setattr(record, name, value)
        record.reason = exc.reason
    else:
        logger.error("%s: unexpected failure", record.path, exc_info=exc)
        record.reason = f"unexpected failure: {type(exc).__name__}: {exc}"
    return record


def accept(record: ClipRecord, track: FaceTrack) -> tuple[ClipRecord, ShardSample]:
    """``record`` filled from ``track`` (status ok), and the clip's shard sample."""
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


# A clip through the steps of its work: its record and what it has come to (None: quarantined,
# the reason in the record): decoded media, detections, the shard sample.
Decoded = tuple[ClipRecord, DecodedClip | None]
Detected = tuple[ClipRecord, DecodedClip | None, list[list[Face]] | None]
ClipResult = tuple[ClipRecord, ShardSample | None]


def decode_rows(rows: Sequence[Mapping[str, Any]], params: CropParams) -> list[Decoded]:
    """Step 1 of the crop stage's work on consecutive manifest rows: each clip's record and its
    decoded media (:func:`decode_clip`), or the record quarantined."""
    decoded: list[Decoded] = []
    for row in rows:
        record = clip_record(row)
        try:
            decoded.append((record, decode_clip(record.path, params)))
        except Exception as exc:  # a clip must never take the stage down
            decoded.append((quarantine(record, exc), None))
    return decoded


def detect_rows(decoded: Sequence[Decoded], detector: FaceDetector, batch: int) -> list[Detected]:
    """Step 2: the faces of the decoded clips, their frames sharing the detector's batches
    (:func:`detect_clips`). Should that fail, each clip is detected alone and only those that
    fail again are quarantined."""
    clips = [clip for _, clip in decoded if clip is not None]
    try:
        found = iter(detect_clips(clips, detector, batch))
    except Exception:  # one bad clip must not quarantine its neighbours
        found = None
    detected: list[Detected] = []
    for record, clip in decoded:
        if clip is None:
            detected.append((record, None, None))
            continue
        try:
            faces = next(found) if found is not None else detect_clips([clip], detector, batch)[0]
            detected.append((record, clip, faces))
        except Exception as exc:  # a clip must never take the stage down
            detected.append((quarantine(record, exc), None, None))
    return detected


def finish_rows(detected: Sequence[Detected], params: CropParams) -> list[ClipResult]:
    """Step 3: each clip tracked and cropped (:func:`finish_track`), its record and shard
    sample; or its record quarantined and no sample."""
    results: list[ClipResult] = []
    for record, clip, faces in detected:
        if clip is None or faces is None:
            results.append((record, None))
            continue
        try:
            results.append(accept(record, finish_track(clip, faces, params)))
        except Exception as exc:  # a clip must never take the stage down
            results.append((quarantine(record, exc), None))
    return results


def process_rows(rows: Sequence[Mapping[str, Any]], params: CropParams) -> list[ClipResult]:
    """The crop stage's work on consecutive manifest rows in one process (a group of
    ``crop.detector_clips``): decode, detect, track and crop; ``(record, sample)`` per row, in
    order, or ``(record, None)`` with ``status="quarantined"`` and the reason when the clip
    cannot be used: any failure, even an unexpected one, quarantines its clip and the stage
    goes on."""
    detector = stage_detector(params)  # unusable weights stop the stage: not a clip's fault
    decoded = decode_rows(rows, params)
    return finish_rows(detect_rows(decoded, detector, params.detector_batch), params)


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
    stage_detector(params)


@dataclass(frozen=True)
class ShardJob:
    """One output shard to make: its name, its manifest rows (in output order), its signature."""

    name: str  # shard-NNNNN
    rows: list[dict[str, Any]]
    signature: str


ShardResults = Iterator[tuple[ShardJob, list[ClipResult]]]  # each finished shard, rows in order
Engine = Callable[[list[ShardJob], CropParams, Callable[[int], None]], ShardResults]


def detector_groups(
    rows: Sequence[Mapping[str, Any]], params: CropParams
) -> list[list[Mapping[str, Any]]]:
    """A shard's rows in consecutive groups of ``params.detector_clips`` (the clips whose frames
    share the detector's batches): fixed by the shard, whatever engine and workers."""
    size = params.detector_clips
    return [list(rows[i : i + size]) for i in range(0, len(rows), size)]


def local_engine(
    jobs: list[ShardJob], params: CropParams, advance: Callable[[int], None]
) -> ShardResults:
    """Shards one after the other, their clips spread over ``params.workers`` processes (each
    with its own detector) in groups of ``params.detector_clips``; yields each shard's results
    in row order when it is done."""
    pool = None
    if params.workers > 1 and sum(len(job.rows) for job in jobs) > 1:
        pool = ProcessPoolExecutor(
            max_workers=params.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(params,),
        )
    try:
        for job in jobs:
            groups = detector_groups(job.rows, params)
            if pool is None:
                results = (process_rows(group, params) for group in groups)
            else:
                results = pool.map(process_rows, groups, [params] * len(groups))
            done: list[ClipResult] = []
            with torch_threads(1):  # as in the workers: the detector's numbers depend on it
                for group_results in results:
                    done.extend(group_results)
                    advance(len(group_results))
            yield job, done
    finally:
        if pool is not None:
            pool.shutdown()
