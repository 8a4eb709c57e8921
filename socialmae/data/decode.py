"""Decoding any container the user has (mp4, flv, avi, webm, mkv, ...) with PyAV.

Audio comes out as 16 kHz mono float32; video frames are sampled at a configured rate by
their timestamps (variable frame rate safe) and streamed, so a ten-minute clip never sits in
memory at once. Every failure is a :class:`MediaError` naming the file and the reason.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from socialmae.data.errors import MediaError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class MediaInfo:
    """Container-level facts about a media file (from its headers, nothing decoded)."""

    path: str
    duration: float  # seconds (0.0 when the container does not say)
    has_video: bool
    has_audio: bool
    fps: float  # average frame rate (0.0 without video)
    width: int
    height: int
    sample_rate: int  # source audio rate (0 without audio)
    channels: int


def _open(path: str | os.PathLike[str]) -> av.container.InputContainer:
    p = Path(path)
    if not p.is_file():
        raise MediaError(path, "no such file")
    if p.stat().st_size == 0:
        raise MediaError(path, "file is empty")
    try:
        return av.open(str(p), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError(path, f"not a readable media file ({exc})") from exc


def probe(path: str | os.PathLike[str]) -> MediaInfo:
    """Read stream headers; raises :class:`MediaError` for unreadable files or no streams."""
    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is None and audio is None:
            raise MediaError(path, "no audio or video stream")
        duration = (container.duration or 0) / av.time_base
        rate = video.average_rate if video is not None else None
        return MediaInfo(
            path=str(path),
            duration=float(duration),
            has_video=video is not None,
            has_audio=audio is not None,
            fps=float(rate) if rate else 0.0,
            width=video.codec_context.width if video is not None else 0,
            height=video.codec_context.height if video is not None else 0,
            sample_rate=audio.codec_context.sample_rate if audio is not None else 0,
            channels=audio.codec_context.channels if audio is not None else 0,
        )


def decode_audio(
    path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """The first audio stream as mono float32 at ``sample_rate``: ``[N]`` in [-1, 1].

    Any source rate and channel layout is resampled (and down-mixed) by FFmpeg.
    """
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(path, "no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks: list[np.ndarray] = []
        limit = math.inf if max_seconds is None else max_seconds * sample_rate
        total = 0
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if total >= limit:
                    break
            else:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as exc:
            if not chunks:
                raise MediaError(path, f"audio stream cannot be decoded ({exc})") from exc
            logger.warning("%s: audio decoding stopped early (%s); keeping what decoded", path, exc)
    if not chunks:
        raise MediaError(path, "audio stream holds no samples")
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    if max_seconds is not None:
        audio = audio[: int(max_seconds * sample_rate)]
    return audio


def _output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def iter_frames(
    path: str | os.PathLike[str],
    rate: float,
    max_side: int | None = 1280,
    max_seconds: float | None = None,
) -> Iterator[tuple[float, np.ndarray]]:
    """Frames sampled every ``1 / rate`` seconds by presentation time.

    For each target time the latest frame shown at that time is used, so variable frame rate
    and dropped frames are handled. Frames larger than ``max_side`` are scaled down (aspect kept).

    Yields:
        (time in seconds from the first frame, RGB uint8 ``[H, W, 3]``).
    """
    if rate <= 0:
        raise ValueError(f"frame rate must be positive, got {rate}")
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise MediaError(path, f"video stream has no frame size ({width}x{height})")
        out_w, out_h = _output_size(width, height, max_side)
        step = 1.0 / rate
        first: float | None = None
        previous = None
        target = 0.0
        emitted = 0
        last_time = 0.0

        def convert(frame) -> np.ndarray:
            return frame.to_ndarray(format="rgb24", width=out_w, height=out_h)

        try:
            for index, frame in enumerate(container.decode(stream)):
                time = (
                    frame.time
                    if frame.time is not None
                    else index / float(stream.average_rate or 25)
                )
                first = time if first is None else first
                time -= first
                if max_seconds is not None and time > max_seconds:
                    break
                while previous is not None and target < time:
                    yield target, convert(previous)
                    emitted += 1
                    target = emitted * step
                previous, last_time = frame, time
        except av.FFmpegError as exc:
            if previous is None:
                raise MediaError(path, f"video stream cannot be decoded ({exc})") from exc
            logger.warning("%s: video decoding stopped early (%s); keeping what decoded", path, exc)
        if previous is None:
            raise MediaError(path, "video stream holds no frames")
        # The last frame is shown for one frame period.
        frame_period = 1.0 / float(stream.average_rate) if stream.average_rate else step
        end = last_time + frame_period
        if max_seconds is not None:
            end = min(end, max_seconds)
        while target < end or emitted == 0:
            yield target, convert(previous)
            emitted += 1
            target = emitted * step
