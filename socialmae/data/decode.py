"""Decoding any container the user has (mp4, flv, avi, webm, mkv, ...) with PyAV.

Audio comes out as 16 kHz mono float32; video frames are sampled at a configured rate by
their timestamps (variable frame rate safe) and streamed, so a ten-minute clip never sits in
memory at once. Every failure is a :class:`MediaError` naming the file and the reason.
"""

from __future__ import annotations

import bisect
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
# A jump to a keyframe flushes the decoder and restarts its threads: it pays once it skips
# about this many frames (benchmarks/decode.py: at 4 samples/s and keyframes every 12 frames,
# jumps over ~5 frames made sampling 15% slower; at 1 sample/s, jumps over 12-24 frames made
# it 1.5-2.5x faster).
MIN_FRAMES_SKIPPED = 10


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


def _packet_times(path: str | os.PathLike[str]) -> tuple[list[float], list[float]]:
    """Presentation times (seconds, container clock) of the first video stream's packets and of
    its keyframes, sorted, from demuxing alone (nothing is decoded). Both lists are empty when a
    packet has no timestamp: such a stream is decoded from start to end."""
    times: list[float] = []
    keyframes: list[float] = []
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                if packet.pts is None:
                    return [], []
                time = float(packet.pts * packet.time_base)
                times.append(time)
                if packet.is_keyframe:
                    keyframes.append(time)
        except av.FFmpegError:
            pass  # index what demuxed; decoding meets the same damage and reports it
    return sorted(times), sorted(keyframes)


def iter_frames(
    path: str | os.PathLike[str],
    rate: float,
    max_side: int | None = 1280,
    max_seconds: float | None = None,
    seek: bool = True,
) -> Iterator[tuple[float, np.ndarray]]:
    """Frames sampled every ``1 / rate`` seconds by presentation time.

    For each target time the latest frame shown at that time is used, so variable frame rate
    and dropped frames are handled. Frames larger than ``max_side`` are scaled down (aspect kept).
    Only frames that are shown are converted, and with ``seek`` only the frames needed are
    decoded: when the next target lies past a keyframe and at least ``MIN_FRAMES_SKIPPED``
    frames come before that keyframe, the decoder jumps to it (the frames in between are shown
    at no target time). The output is the same with and without ``seek``.

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
        # Index the packets only where a jump can pay: more than MIN_FRAMES_SKIPPED frames
        # between two samples (at 4 samples/s a 25 fps video has 6; the index costs a demux).
        fps = float(stream.average_rate or 0)
        jumps_possible = seek and (fps <= 0 or fps / rate > MIN_FRAMES_SKIPPED)
        packet_times, keyframes = _packet_times(path) if jumps_possible else ([], [])
        step = 1.0 / rate
        first: float | None = None
        previous = None
        target = 0.0
        emitted = 0
        last_time = 0.0
        decoded = seeks = 0  # for the debug line: frames out of the decoder, jumps
        shown = 0  # frames out of the decoder since it started at the beginning
        frames = container.decode(stream)
        after: float | None = None  # after a jump: frames shown before the keyframe are dropped
        epsilon = 1e-6

        def convert(frame) -> np.ndarray:
            return frame.to_ndarray(format="rgb24", width=out_w, height=out_h)

        try:
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                decoded += 1
                shown += 1
                if after is not None:
                    if frame.time is not None and frame.time < after - epsilon:
                        continue  # shown before the keyframe (an open GOP's leading frames)
                    if frame.time is None or frame.time > after + epsilon:
                        # The keyframe did not come out first: decode from the start instead
                        # (the frames already taken come again and change nothing; a frame is
                        # only yielded once a later one is seen) and jump no more.
                        logger.debug(
                            "%s: no frame at keyframe %.3f s; decoding in order", path, after
                        )
                        container.seek(0)
                        frames, keyframes, after, shown = container.decode(stream), [], None, 0
                        continue
                    after = None
                time = (
                    frame.time
                    if frame.time is not None
                    else (shown - 1) / float(stream.average_rate or 25)
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
                # Jump ahead when the next target is shown at or after a later keyframe and
                # enough frames lie between this one and that keyframe.
                latest = bisect.bisect_right(keyframes, target + first + epsilon) - 1
                if frame.time is not None and latest >= 0:
                    keyframe = keyframes[latest]
                    between = bisect.bisect_left(packet_times, keyframe - epsilon) - (
                        bisect.bisect_right(packet_times, frame.time + epsilon)
                    )
                    if keyframe > frame.time + epsilon and between >= MIN_FRAMES_SKIPPED:
                        container.seek(
                            round(keyframe / stream.time_base), backward=True, stream=stream
                        )
                        frames, after, seeks = container.decode(stream), keyframe, seeks + 1
        except av.FFmpegError as exc:
            if previous is None:
                raise MediaError(path, f"video stream cannot be decoded ({exc})") from exc
            logger.warning("%s: video decoding stopped early (%s); keeping what decoded", path, exc)
        if previous is None:
            raise MediaError(path, "video stream holds no frames")
        logger.debug("%s: decoded %d frames, %d jumps", path, decoded, seeks)
        # The last frame is shown for one frame period.
        frame_period = 1.0 / float(stream.average_rate) if stream.average_rate else step
        end = last_time + frame_period
        if max_seconds is not None:
            end = min(end, max_seconds)
        while target < end or emitted == 0:
            yield target, convert(previous)
            emitted += 1
            target = emitted * step
