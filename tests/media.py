"""Real media files for tests, written with PyAV from real face photos that ship in wheels."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image
from skimage import data

# Container -> (video codec, audio codec, pixel format).
CODECS = {
    ".mp4": ("libx264", "aac", "yuv420p"),
    ".mkv": ("libx264", "flac", "yuv420p"),
    ".webm": ("libvpx-vp9", "libopus", "yuv420p"),
    ".avi": ("mpeg4", "libmp3lame", "yuv420p"),
    ".flv": ("flv", "libmp3lame", "yuv420p"),
}


def face_photo(size: int = 224) -> np.ndarray:
    """The astronaut photo cropped around her face: ``[size, size, 3]`` uint8."""
    face = Image.fromarray(data.astronaut()).crop((110, 0, 330, 220))
    return np.asarray(face.resize((size, size), Image.Resampling.BICUBIC))


def frame_with_faces(width: int, height: int, faces: int = 1, face_size: int | None = None):
    """A gray frame with ``faces`` copies of the face photo side by side (none if 0)."""
    frame = np.full((height, width, 3), 90, dtype=np.uint8)
    if faces == 0:
        return frame
    side = face_size or min(height, width // faces)
    photo = face_photo(side)
    for k in range(faces):
        x = k * width // faces + (width // faces - side) // 2
        y = (height - side) // 2
        frame[y : y + side, x : x + side] = photo
    return frame


def write_clip(
    path: Path,
    seconds: float = 2.0,
    fps: int = 25,
    size: tuple[int, int] = (224, 224),
    faces: int = 1,
    audio_rate: int | None = 16_000,
    channels: int = 1,
    video: bool = True,
    silent: bool = False,
    frames: int | None = None,
    vfr: bool = False,
    gop: int | None = None,
    numbered: bool = False,
) -> Path:
    """Write a clip: a (slightly moving) face video and a voiced tone.

    Args:
        size: (width, height); faces: how many faces per frame (0 = none).
        audio_rate: None for no audio track; frames: exact number of video frames.
        vfr: variable frame rate (frame durations alternate between 1 and 3 ticks).
        gop: frames between keyframes (None: the codec's default).
        numbered: every frame carries its index as a strip of black and white cells, so any
            two frames differ.
    """
    vcodec, acodec, pix_fmt = CODECS[path.suffix]
    width, height = size
    base = frame_with_faces(width, height, faces) if video else None
    with av.open(str(path), "w") as container:
        vstream = astream = None
        if video:
            vstream = container.add_stream(vcodec, rate=fps)
            vstream.width, vstream.height, vstream.pix_fmt = width, height, pix_fmt
            if gop is not None:
                vstream.codec_context.gop_size = gop
            if vfr:
                vstream.codec_context.time_base = Fraction(1, 2 * fps)
        if audio_rate is not None:
            rate = {"libopus": 48_000, "libmp3lame": 22_050}.get(acodec, audio_rate)
            astream = container.add_stream(acodec, rate=rate)
            astream.layout = "stereo" if channels == 2 else "mono"
        if vstream is not None:
            count = frames if frames is not None else int(seconds * fps)
            pts = 0
            for i in range(count):
                shift = int(3 * np.sin(i / 5))
                image = np.roll(base, shift, axis=1)
                if numbered:
                    bits = (i >> np.arange(8)) & 1  # [8] index bits, a 16-pixel cell each
                    image[:16, : 8 * 16] = np.repeat(bits * 255, 16).astype(np.uint8)[None, :, None]
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                if vfr:
                    frame.pts, frame.time_base = pts, Fraction(1, 2 * fps)
                    pts += 1 if i % 2 == 0 else 3
                for packet in vstream.encode(frame):
                    container.mux(packet)
            for packet in vstream.encode():
                container.mux(packet)
        if astream is not None:
            rate = astream.codec_context.sample_rate
            t = np.arange(int(seconds * rate)) / rate
            envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)  # syllable-like loudness
            wave = 0.0 if silent else 0.3 * envelope * np.sin(2 * np.pi * 220 * t)
            samples = np.broadcast_to(np.asarray(wave, dtype=np.float32), t.shape)
            samples = np.repeat(samples[None, :], channels, axis=0)  # [C, N] planar
            chunk = astream.codec_context.frame_size or 1024
            for start in range(0, samples.shape[1], chunk):
                block = np.ascontiguousarray(samples[:, start : start + chunk])
                frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=astream.layout)
                frame.sample_rate = rate
                frame.pts = start
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    return path
