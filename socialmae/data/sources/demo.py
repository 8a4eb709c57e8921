"""The embedded offline demo dataset: real faces that speak synthetic emotional speech.

Everything comes from installed wheels, nothing is downloaded:

* faces: the astronaut photo (Eileen Collins, ``skimage.data.astronaut``), Grace Hopper
  (matplotlib's ``grace_hopper.jpg``) and six faces of ``skimage.data.lfw_subset`` (25x25
  grayscale Labeled Faces in the Wild crops, upscaled 4.5x, sharpened and sepia-toned, their
  padding blurred into a background). Each sits in a ``size x size`` frame with its face box
  52% (photos) or 56% (LFW) of the frame high.
* speech: the 12 CREMA-D sentences spoken by espeak-ng (the ``espeakng-loader`` wheel, called
  through ctypes), with rate, volume, pitch and pitch range set by the emotion label (plus a
  per-identity voice and small per-clip jitter), resampled to 16 kHz mono.
* animation: the jaw opens with the speech loudness (RMS per video frame) and a dark mouth
  appears between the lips; brows, eyes, mouth corners and head motion follow the label
  (anger: lowered brows and a fast small head shake; happiness: raised mouth corners and a
  nod; sadness: lowered corners and a slow droop; fear: raised brows, widened eyes, the head
  pulled up, a tremor; disgust: a one-sided lip raise and a turn away; neutral: still), all
  as smooth warps of the photo (``scipy.ndimage.map_coordinates``).

Landmarks (face box, eyes, nose, mouth corners) of each photo were measured once with the
RetinaFace MobileNet-0.25 detector the crop stage uses and are stored below.
"""

from __future__ import annotations

import _ctypes
import ctypes
import logging
import math
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd
from PIL import Image, ImageFilter
from scipy import ndimage, signal

from socialmae.data.manifest import ManifestRow, read_manifest, write_manifest
from socialmae.data.sources.splits import assign_speaker_splits
from socialmae.io import atomic_write
from socialmae.tasks import EMOTIONS

log = logging.getLogger(__name__)

DATASET = "demo"
SAMPLE_RATE = 16_000
FACE_HEIGHT = 0.52  # face box height as a fraction of the frame side (photos)
LFW_FACE_HEIGHT = 0.56  # the same for the tight LFW crops (their box is taller than the crop)

# CREMA-D sentence codes and texts.
SENTENCES: dict[str, str] = {
    "IEO": "It's eleven o'clock",
    "TIE": "That is exactly what happened",
    "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about",
    "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold",
    "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment",
    "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before",
    "TSI": "The surface is slick",
    "WSI": "We'll stop in a couple of minutes",
}
EMOTION_CODES = dict(zip(EMOTIONS, ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"), strict=True))


@dataclass(frozen=True)
class Identity:
    """A face photo with its landmarks (source pixels) and a voice."""

    name: str
    source: str  # "astronaut", "grace_hopper" or "lfw"
    box: tuple[float, float, float, float]  # face box x, y, width, height
    landmarks: tuple[tuple[float, float], ...]  # right eye, left eye, nose, mouth R, mouth L
    voice: str  # espeak-ng voice name (language + variant)
    pitch_offset: int  # added to the emotion's espeak pitch (0-100 scale)
    lfw_index: int = -1
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # colour of grayscale sources


IDENTITIES: tuple[Identity, ...] = (
    Identity(
        "astronaut",
        "astronaut",
        (177, 56, 95, 120),
        ((204, 100), (247, 103), (223, 129), (202, 138), (244, 140)),
        "en-us+f3",
        4,
    ),
    Identity(
        "grace_hopper",
        "grace_hopper",
        (177, 106, 176, 221),
        ((218, 187), (303, 186), (259, 247), (231, 273), (299, 272)),
        "en-us+f4",
        -6,
    ),
    Identity(
        "lfw063",
        "lfw",
        (1.2, -1.7, 19.1, 26.6),
        ((4.4, 7.6), (13.2, 7.0), (7.8, 13.7), (5.9, 17.6), (13.5, 17.2)),
        "en-us+m3",
        -8,
        63,
        (1.0, 0.86, 0.72),
    ),
    Identity(
        "lfw052",
        "lfw",
        (1.5, -2.0, 19.7, 26.1),
        ((5.7, 7.9), (14.9, 7.8), (9.4, 11.9), (6.0, 16.2), (15.1, 16.0)),
        "en-us+f2",
        8,
        52,
        (1.0, 0.84, 0.76),
    ),
    Identity(
        "lfw001",
        "lfw",
        (1.2, -2.0, 18.9, 26.8),
        ((4.9, 8.5), (13.5, 8.5), (8.0, 13.8), (5.4, 17.5), (13.3, 17.5)),
        "en-us+m1",
        0,
        1,
        (0.98, 0.88, 0.74),
    ),
    Identity(
        "lfw046",
        "lfw",
        (1.8, -0.5, 18.8, 23.4),
        ((6.0, 9.0), (14.6, 9.0), (9.6, 14.4), (7.1, 17.5), (14.0, 17.5)),
        "en-us+f5",
        2,
        46,
        (1.0, 0.87, 0.70),
    ),
    Identity(
        "lfw060",
        "lfw",
        (0.1, -2.3, 20.1, 27.8),
        ((5.6, 9.1), (14.8, 8.7), (10.6, 14.1), (6.9, 18.8), (14.4, 18.5)),
        "en-us+m7",
        -4,
        60,
        (0.96, 0.88, 0.80),
    ),
    Identity(
        "lfw093",
        "lfw",
        (1.3, -2.2, 18.6, 26.7),
        ((6.7, 8.3), (15.9, 8.4), (11.9, 13.7), (7.2, 17.4), (15.3, 17.4)),
        "en-us+f1",
        6,
        93,
        (1.0, 0.85, 0.74),
    ),
)


@dataclass(frozen=True)
class Prosody:
    """espeak-ng settings: pitch and range 0-100, rate in words per minute, volume 0-200."""

    pitch: float
    range: float
    rate: float
    volume: float


EMOTION_PROSODY: dict[str, Prosody] = {
    "anger": Prosody(pitch=55, range=90, rate=205, volume=175),
    "disgust": Prosody(pitch=32, range=40, rate=130, volume=95),
    "fear": Prosody(pitch=82, range=60, rate=225, volume=110),
    "happiness": Prosody(pitch=72, range=95, rate=185, volume=140),
    "neutral": Prosody(pitch=48, range=50, rate=165, volume=100),
    "sadness": Prosody(pitch=25, range=12, rate=112, volume=65),
}


@dataclass(frozen=True)
class Expression:
    """Face and head motion of an emotion; distances are fractions of the face height."""

    brow: float = 0.0  # brow displacement, + down
    smile: float = 0.0  # mouth corner displacement, + up
    eyes: float = 0.0  # vertical stretch around the eyes
    sneer: float = 0.0  # one-sided upper lip / nose raise
    shake: tuple[float, float] = (0.0, 0.0)  # horizontal oscillation (amplitude, Hz)
    nod: tuple[float, float] = (0.0, 0.0)  # vertical oscillation (amplitude, Hz)
    drift: tuple[float, float] = (0.0, 0.0)  # head displacement over the clip (x, y)
    jaw: float = 1.0  # gain of the loudness-driven jaw opening


EXPRESSIONS: dict[str, Expression] = {
    "anger": Expression(brow=0.05, smile=-0.01, shake=(0.022, 4.0), jaw=1.1),
    "disgust": Expression(brow=0.02, sneer=0.05, drift=(-0.06, 0.01), jaw=0.8),
    "fear": Expression(brow=-0.05, eyes=0.35, shake=(0.008, 7.5), drift=(0.0, -0.05)),
    "happiness": Expression(smile=0.05, nod=(0.028, 1.4), jaw=1.1),
    "neutral": Expression(),
    "sadness": Expression(brow=-0.015, smile=-0.035, drift=(0.0, 0.09), jaw=0.7),
}


@dataclass(frozen=True)
class FaceLayout:
    """An identity placed in a frame: ``image`` ``[size, size, 3]`` float32 in 0-255 and its
    landmarks in frame pixels (x, y)."""

    image: np.ndarray
    box: tuple[float, float, float, float]  # x, y, width, height
    eyes: np.ndarray  # [2, 2]
    nose: np.ndarray  # [2]
    mouth: np.ndarray  # [2, 2] corners

    @property
    def mouth_center(self) -> np.ndarray:
        return self.mouth.mean(axis=0)

    @property
    def face_height(self) -> float:
        return self.box[3]


def identity_names(count: int) -> list[str]:
    """The first ``count`` identity names (at most ``len(IDENTITIES)``)."""
    if not 1 <= count <= len(IDENTITIES):
        raise ValueError(f"identities: expected 1..{len(IDENTITIES)}, got {count}")
    return [i.name for i in IDENTITIES[:count]]


def _identity(name: str) -> Identity:
    for identity in IDENTITIES:
        if identity.name == name:
            return identity
    names = [i.name for i in IDENTITIES]
    raise KeyError(f"unknown demo identity {name!r}; choose one of {names}")


def _source_image(identity: Identity) -> np.ndarray:
    """The identity's photo, RGB float32 ``[H, W, 3]`` in 0-255."""
    from skimage import data

    if identity.source == "astronaut":
        return data.astronaut().astype(np.float32)
    if identity.source == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
    gray = data.lfw_subset()[identity.lfw_index].astype(np.float32) * 255.0
    return gray[..., None] * np.asarray(identity.tint, dtype=np.float32)


@lru_cache(maxsize=16)
def face_layout(name: str, size: int = 224) -> FaceLayout:
    """Place identity ``name`` in a ``size x size`` frame (face box centred, about half as high)."""
    identity = _identity(name)
    src = _source_image(identity)
    bx, by, bw, bh = identity.box
    scale = (LFW_FACE_HEIGHT if identity.source == "lfw" else FACE_HEIGHT) * size / bh
    cx, cy = bx + bw / 2, by + bh / 2

    def to_frame(points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - (cx, cy)) * scale + size / 2

    # Inverse map: frame (u, v) -> source (x, y); reflect-pad so nothing falls outside.
    pad = math.ceil(size / scale)
    padded = np.pad(src, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    sx = (xs + 0.5 - size / 2) / scale + cx - 0.5 + pad
    sy = (ys + 0.5 - size / 2) / scale + cy - 0.5 + pad
    image = np.stack(
        [
            ndimage.map_coordinates(padded[..., c], [sy, sx], order=3, mode="nearest")
            for c in range(3)
        ],
        axis=-1,
    )
    if identity.source == "lfw":
        # Sharpen the upscaled crop, then blur what lies outside it into a background.
        pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        image = np.asarray(pil.filter(ImageFilter.UnsharpMask(3, 90, 2)), dtype=np.float32)
        h, w = src.shape[:2]
        x0, y0 = to_frame(np.array([[0.0, 0.0]]))[0]
        x1, y1 = to_frame(np.array([[w, h]]))[0]
        feather = 0.04 * size
        inside = np.minimum(
            np.clip(np.minimum(xs - x0, x1 - xs) / feather, 0, 1),
            np.clip(np.minimum(ys - y0, y1 - ys) / feather, 0, 1),
        )[..., None]
        clamp_x = np.clip(xs, x0, x1 - 1).astype(int)
        clamp_y = np.clip(ys, y0, y1 - 1).astype(int)
        edge = image[clamp_y, clamp_x]  # the crop's border, smeared outwards
        blurred = ndimage.gaussian_filter(edge, sigma=(0.08 * size, 0.08 * size, 0))
        image = inside * image + (1 - inside) * (0.6 * blurred + 0.4 * blurred.mean((0, 1)))
    image = np.clip(image, 0, 255).astype(np.float32)
    marks = to_frame(np.asarray(identity.landmarks))
    box = (*to_frame(np.array([[bx, by]]))[0], bw * scale, bh * scale)
    return FaceLayout(image, tuple(float(v) for v in box), marks[:2], marks[2], marks[3:5])


# --------------------------------------------------------------------------- speech


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "espeak_Initialize": (
        [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int],
        ctypes.c_int,
    ),
    "espeak_SetSynthCallback": ([_CALLBACK], None),
    "espeak_SetVoiceByName": ([ctypes.c_char_p], ctypes.c_int),
    "espeak_SetParameter": ([ctypes.c_int, ctypes.c_int, ctypes.c_int], ctypes.c_int),
    "espeak_ng_SetRandSeed": ([ctypes.c_long], None),
    "espeak_Synth": (
        [
            ctypes.c_char_p,  # text
            ctypes.c_size_t,  # size
            ctypes.c_uint,  # position
            ctypes.c_int,  # position_type
            ctypes.c_uint,  # end_position
            ctypes.c_uint,  # flags
            ctypes.c_void_p,  # unique_identifier
            ctypes.c_void_p,  # user_data
        ],
        ctypes.c_int,
    ),
    "espeak_Terminate": ([], ctypes.c_int),
}


class _Espeak:
    """espeak-ng (the ``espeakng-loader`` wheel) through ctypes, in synchronous mode.

    The library keeps synthesis state in C statics that no API call resets (e.g. the phase of
    its pitch flutter), so an utterance would depend on everything spoken before it in the
    process. To make equal arguments give equal samples, every utterance gets a freshly
    loaded and initialised library (``dlopen``/``espeak_Initialize`` ... ``espeak_Terminate``
    /``dlclose``: about 5 ms). The library's path is checked once per process.
    """

    _lock = threading.Lock()
    _paths: tuple[str, str] | None = None

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # referenced while the library may call it

    @classmethod
    def paths(cls) -> tuple[str, str]:
        """(shared library, data directory); a RuntimeError when espeak-ng is unusable."""
        if cls._paths is None:
            try:
                import espeakng_loader

                library, data = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
            except (ImportError, RuntimeError) as exc:
                raise RuntimeError(f"espeak-ng (espeakng-loader) is not available: {exc}") from exc
            if not Path(library).is_file():
                raise RuntimeError(f"espeak-ng library not found at {library}")
            cls._paths = (library, data)
        return cls._paths

    def _collect(self, wav: Any, count: int, events: Any) -> int:
        if wav and count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def synth(
        self, text: str, voice: str, pitch: int, range_: int, rate: int, volume: int, seed: int
    ) -> tuple[np.ndarray, int]:
        """(16-bit samples ``[N]`` int16, sample rate); same arguments, same samples."""
        library, data = self.paths()
        with self._lock:
            try:
                lib = ctypes.CDLL(library)
            except OSError as exc:
                raise RuntimeError(
                    f"espeak-ng library cannot be loaded ({library}): {exc}"
                ) from exc
            try:
                for name, (argtypes, restype) in _SIGNATURES.items():
                    getattr(lib, name).argtypes = argtypes
                    getattr(lib, name).restype = restype
                # AUDIO_OUTPUT_SYNCHRONOUS = 2: espeak_Synth returns when the callback has
                # received every sample.
                sample_rate = lib.espeak_Initialize(2, 0, data.encode(), 0)
                if sample_rate <= 0:
                    raise RuntimeError(f"espeak_Initialize failed ({sample_rate}) with {data}")
                try:
                    lib.espeak_SetSynthCallback(self._callback)
                    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                        raise RuntimeError(f"espeak-ng has no voice {voice!r}")
                    # espeakRATE=1, espeakVOLUME=2, espeakPITCH=3, espeakRANGE=4 (absolute).
                    for key, value in ((1, rate), (2, volume), (3, pitch), (4, range_)):
                        lib.espeak_SetParameter(key, int(value), 0)
                    lib.espeak_ng_SetRandSeed(seed)  # breath noise
                    self._chunks = []
                    encoded = text.encode() + b"\0"
                    # POS_CHARACTER = 1, espeakCHARS_UTF8 = 1.
                    err = lib.espeak_Synth(encoded, len(encoded), 0, 1, 0, 1, None, None)
                    if err != 0:
                        raise RuntimeError(f"espeak_Synth failed ({err}) for {text!r}")
                    chunks, self._chunks = self._chunks, []
                finally:
                    lib.espeak_Terminate()
            finally:
                handle = lib._handle
                del lib
                _ctypes.dlclose(handle)
        samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        return samples, sample_rate


def synthesize_speech(
    text: str,
    *,
    voice: str = "en-us",
    pitch: float = 50,
    range_: float = 50,
    rate: float = 175,
    volume: float = 100,
    seconds: float | None = None,
    lead: float = 0.0,
    sample_rate: int = SAMPLE_RATE,
    seed: int = 0,
) -> np.ndarray:
    """Speak ``text`` with espeak-ng: mono float32 ``[N]`` in [-1, 1] at ``sample_rate``.

    ``lead`` seconds of silence come first; with ``seconds`` the result is padded with
    silence or cut to exactly ``round(seconds * sample_rate)`` samples. espeak-ng's noise
    generator is seeded with ``seed``, so equal arguments give equal samples.
    """
    raw, rate_in = _Espeak().synth(
        text, voice, round(pitch), round(range_), round(rate), round(volume), seed
    )
    audio = raw.astype(np.float32) / 32768.0
    if sample_rate != rate_in:
        g = math.gcd(sample_rate, rate_in)
        audio = signal.resample_poly(audio, sample_rate // g, rate_in // g)
    audio = np.concatenate([np.zeros(round(lead * sample_rate), np.float32), audio])
    if seconds is not None:
        n = round(seconds * sample_rate)
        audio = np.pad(audio[:n], (0, max(0, n - audio.size)))
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def frame_loudness(audio: np.ndarray, fps: float, frames: int, sample_rate: int = SAMPLE_RATE):
    """RMS of ``audio`` ``[N]`` over each video frame's interval: ``[frames]`` float32."""
    edges = np.round(np.arange(frames + 1) * sample_rate / fps).astype(int)
    out = np.zeros(frames, dtype=np.float32)
    for t in range(frames):
        chunk = audio[edges[t] : edges[t + 1]]
        out[t] = float(np.sqrt(np.mean(np.square(chunk, dtype=np.float64)))) if chunk.size else 0
    return out


# --------------------------------------------------------------------------- animation


def _gauss(values: np.ndarray, center: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((values - center) / sigma) ** 2).astype(np.float32)


def _smoothstep(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((values - lo) / (hi - lo), 0, 1)
    return (t * t * (3 - 2 * t)).astype(np.float32)


def render_frames(
    layout: FaceLayout,
    loudness: np.ndarray,
    label: str,
    fps: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Animate ``layout``: the jaw follows ``loudness`` ``[T]``, the rest follows ``label``.

    Returns RGB uint8 ``[T, size, size, 3]``.
    """
    expr = EXPRESSIONS[label]
    image = layout.image
    size = image.shape[0]
    h = layout.face_height
    frames = loudness.shape[0]
    duration = max(frames / fps, 1e-6)
    axis = np.arange(size, dtype=np.float32)
    eyes, nose, mouth = layout.eyes, layout.nose, layout.mouth
    mouth_c = layout.mouth_center
    mouth_w = float(np.linalg.norm(mouth[1] - mouth[0]))
    eye_y = float(eyes[:, 1].mean())
    face_cx = float(eyes[:, 0].mean() * 0.5 + mouth_c[0] * 0.5)
    chin_y = layout.box[1] + layout.box[3]

    # Per-clip randomness: intensity, head offset, sway, phases, side of the sneer.
    intensity = rng.uniform(0.8, 1.2)
    offset = rng.uniform(-0.03, 0.03, size=2) * size
    sway_amp = rng.uniform(0.002, 0.006, size=2) * size
    sway_hz = rng.uniform(0.2, 0.45, size=2)
    phases = rng.uniform(0, 2 * np.pi, size=5)
    side = 1 if rng.random() < 0.5 else 0

    # Jaw opening from loudness (lightly smoothed); up to ~14% of the face height.
    smoothed = np.convolve(np.pad(loudness, 1, mode="edge"), [0.25, 0.5, 0.25], "valid")
    opening = expr.jaw * 0.14 * h * (1.0 - np.exp(-smoothed / 0.07))

    # Static profiles (frame axes): jaw region below the mouth line, down to the chin.
    jaw_y = _smoothstep(axis, mouth_c[1] - 0.02 * h, mouth_c[1] + 0.08 * h) * (
        1 - _smoothstep(axis, chin_y, chin_y + 0.22 * h)
    )
    jaw_x = _gauss(axis, face_cx, 0.38 * layout.box[2])
    brow_y = _gauss(axis, eye_y - 0.13 * h, 0.07 * h)
    brow_x = _gauss(axis, face_cx, 0.32 * layout.box[2])
    eye_prof_y = (axis - eye_y) * _gauss(axis, eye_y, 0.06 * h)
    eye_x = _gauss(axis, face_cx, 0.35 * layout.box[2])
    corner_y = _gauss(axis, mouth_c[1], 0.06 * h)
    corners_x = [_gauss(axis, float(c[0]), 0.08 * h) for c in mouth]
    sneer_x = _gauss(axis, float(mouth[side][0] * 0.6 + nose[0] * 0.4), 0.09 * h)
    sneer_y = _gauss(axis, float(mouth_c[1] * 0.55 + nose[1] * 0.45), 0.08 * h)

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    lips_rx = 0.42 * mouth_w
    dark = np.array([55.0, 22.0, 28.0], dtype=np.float32)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        tau = t / fps
        ramp = intensity * min(1.0, tau / 0.4)
        progress = tau / duration
        # Head translation: per-clip offset + sway + emotion motion.
        hx = offset[0] + sway_amp[0] * math.sin(2 * np.pi * sway_hz[0] * tau + phases[0])
        hy = offset[1] + sway_amp[1] * math.sin(2 * np.pi * sway_hz[1] * tau + phases[1])
        hx += ramp * expr.shake[0] * h * math.sin(2 * np.pi * expr.shake[1] * tau + phases[2])
        hy += ramp * expr.nod[0] * h * math.sin(2 * np.pi * expr.nod[1] * tau + phases[3])
        hx += intensity * expr.drift[0] * h * progress
        hy += intensity * expr.drift[1] * h * progress
        # Local forward displacements (dx, dy) in face coordinates.
        dy = opening[t] * np.outer(jaw_y, jaw_x)
        dx = np.zeros_like(dy)
        if expr.brow:
            dy += ramp * expr.brow * h * np.outer(brow_y, brow_x)
        if expr.eyes:
            dy += ramp * expr.eyes * np.outer(eye_prof_y, eye_x)
        if expr.smile:
            for k, cx in enumerate(corners_x):
                bump = np.outer(corner_y, cx)
                dy -= ramp * expr.smile * h * bump
                dx += ramp * 0.4 * abs(expr.smile) * h * bump * (1 if k == 1 else -1)
        if expr.sneer:
            dy -= ramp * expr.sneer * h * np.outer(sneer_y, sneer_x)
        # Backward map: output pixel p shows the photo at p - head - local displacement.
        src_x = xs - hx - dx
        src_y = ys - hy - dy
        frame = np.stack(
            [
                ndimage.map_coordinates(
                    image[..., c], [src_y, src_x], order=1, mode="nearest", prefilter=False
                )
                for c in range(3)
            ],
            axis=-1,
        )
        # The open mouth: a dark ellipse between the lips.
        gap = opening[t]
        if gap > 0.3:
            mx, my = mouth_c[0] + hx, mouth_c[1] + hy + 0.45 * gap
            ry = 0.5 * gap + 0.5
            y0, y1 = int(max(0, my - ry - 2)), int(min(size, my + ry + 3))
            x0, x1 = int(max(0, mx - lips_rx - 2)), int(min(size, mx + lips_rx + 3))
            if y1 > y0 and x1 > x0:
                r = np.sqrt(
                    ((xs[y0:y1, x0:x1] - mx) / lips_rx) ** 2 + ((ys[y0:y1, x0:x1] - my) / ry) ** 2
                )
                alpha = (np.clip((1.0 - r) * 3.0, 0, 1) * min(1.0, gap / 3.0) * 0.85)[..., None]
                frame[y0:y1, x0:x1] = (1 - alpha) * frame[y0:y1, x0:x1] + alpha * dark
        out[t] = np.clip(frame + 0.5, 0, 255).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- encoding


def write_clip(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    audio: np.ndarray,
    fps: int,
    sample_rate: int = SAMPLE_RATE,
) -> Path:
    """Write RGB uint8 ``frames`` ``[T, H, W, 3]`` and mono float32 ``audio`` ``[N]`` as an
    mp4 (H.264 yuv420p crf 23 veryfast + AAC), atomically (``socialmae.io.atomic_write``)."""
    path = Path(path)

    def encode(tmp: Path) -> None:
        with av.open(str(tmp), "w", format="mp4") as container:
            video = container.add_stream("libx264", rate=fps)
            video.width, video.height = frames.shape[2], frames.shape[1]
            video.pix_fmt = "yuv420p"
            # mbtree off: with it, this x264 build's output depends on uninitialised memory
            # (the first encode in a process differs from run to run); without, it does not.
            video.options = {
                "crf": "23",
                "preset": "veryfast",
                "threads": "1",
                "x264-params": "mbtree=0",
            }
            sound = container.add_stream("aac", rate=sample_rate, layout="mono")
            sound.bit_rate = 64_000
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1, fps)
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
            step = 1024
            for start in range(0, audio.size, step):
                chunk = np.ascontiguousarray(audio[None, start : start + step], dtype=np.float32)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                container.mux(sound.encode(frame))
            container.mux(sound.encode(None))

    return atomic_write(path, encode)


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one demo clip."""

    clip_id: str
    identity: str
    label: str
    sentence: str  # CREMA-D code
    seed: tuple[int, ...]
    seconds: float
    fps: int
    size: int


def _clip_prosody(spec: ClipSpec, rng: np.random.Generator) -> dict[str, float]:
    base = EMOTION_PROSODY[spec.label]
    identity = _identity(spec.identity)
    return {
        "pitch": float(np.clip(base.pitch + identity.pitch_offset + rng.normal(0, 3), 0, 100)),
        "range": float(np.clip(base.range + rng.normal(0, 4), 0, 100)),
        "rate": float(base.rate * rng.uniform(0.93, 1.07)),
        "volume": float(np.clip(base.volume * rng.uniform(0.92, 1.08), 0, 200)),
    }


def make_clip(spec: ClipSpec, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Synthesise, animate and encode one clip to ``out_dir/clips/<clip_id>.mp4``.

    Returns the clip's ``extra`` fields (sentence text and the espeak-ng settings used).
    """
    rng = np.random.default_rng(list(spec.seed))
    prosody = _clip_prosody(spec, rng)
    lead = float(rng.uniform(0.08, 0.3))
    identity = _identity(spec.identity)
    text = SENTENCES[spec.sentence]
    audio = synthesize_speech(
        text,
        voice=identity.voice,
        pitch=round(prosody["pitch"]),
        range_=round(prosody["range"]),
        rate=round(prosody["rate"]),
        volume=round(prosody["volume"]),
        seconds=spec.seconds,
        lead=lead,
        seed=int(rng.integers(1, 2**31 - 1)),
    )
    frames_n = round(spec.seconds * spec.fps)
    loud = frame_loudness(audio, spec.fps, frames_n)
    frames = render_frames(face_layout(spec.identity, spec.size), loud, spec.label, spec.fps, rng)
    write_clip(Path(out_dir) / "clips" / f"{spec.clip_id}.mp4", frames, audio, spec.fps)
    return {
        "sentence": text,
        "sentence_code": spec.sentence,
        "pitch": round(prosody["pitch"]),
        "rate": round(prosody["rate"]),
        "range": round(prosody["range"]),
        "volume": round(prosody["volume"]),
        "voice": identity.voice,
    }


def demo_specs(
    clips_per_label: int = 8,
    identities: int = 4,
    seconds: float = 3.0,
    fps: int = 25,
    size: int = 224,
    seed: int = 0,
) -> list[ClipSpec]:
    """The clips of a demo set, round-robin over identities and sentences (deterministic)."""
    names = identity_names(identities)
    codes = list(SENTENCES)
    specs = []
    for li, label in enumerate(EMOTIONS):
        for k in range(clips_per_label):
            n = li * clips_per_label + k
            identity = names[n % len(names)]
            sentence = codes[(li * 7 + k * 5) % len(codes)]
            clip_id = f"{identity}_{sentence}_{EMOTION_CODES[label]}_{k:02d}"
            specs.append(
                ClipSpec(clip_id, identity, label, sentence, (seed, li, k), seconds, fps, size)
            )
    return specs


def _make_clip_task(args: tuple[ClipSpec, str]) -> dict[str, Any]:
    return make_clip(*args)


def prepare_demo(
    out_dir: Path,
    clips_per_label: int = 8,
    identities: int = 4,
    seconds: float = 3.0,
    fps: int = 25,
    size: int = 224,
    seed: int = 0,
    splits: tuple[float, float, float] = (0.5, 0.25, 0.25),
    workers: int = 1,
) -> pd.DataFrame:
    """Generate the demo set under ``out_dir`` (``clips/*.mp4`` + ``manifest.parquet``).

    ``6 * clips_per_label`` clips of ``seconds`` at ``fps`` (``size x size`` video, 16 kHz mono
    audio), spread round-robin over the first ``identities`` faces; splits are by identity
    (``splits`` fractions, seeded). Same seed, same clips. ``workers > 1`` renders clips in a
    spawned process pool. Returns the manifest as :func:`read_manifest` gives it.
    """
    if clips_per_label < 1:
        raise ValueError(f"clips_per_label: expected >= 1, got {clips_per_label}")
    if seconds <= 0 or fps <= 0 or size < 32 or size % 2:
        raise ValueError(
            f"need seconds > 0, fps > 0, even size >= 32; got {seconds}, {fps}, {size}"
        )
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    specs = demo_specs(clips_per_label, identities, seconds, fps, size, seed)
    jobs = [(s, str(out_dir)) for s in specs]
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            extras = list(pool.map(_make_clip_task, jobs))
    else:
        extras = [_make_clip_task(job) for job in jobs]
    speaker_split = assign_speaker_splits([s.identity for s in specs], splits, seed)
    rows = [
        ManifestRow(
            clip_id=s.clip_id,
            path=f"clips/{s.clip_id}.mp4",
            dataset=DATASET,
            speaker=s.identity,
            split=speaker_split[s.identity],
            label=s.label,
            extra=extra,
        )
        for s, extra in zip(specs, extras, strict=True)
    ]
    write_manifest(rows, out_dir)
    log.info("demo: %d clips of %d identities in %s", len(rows), identities, out_dir)
    return read_manifest(out_dir)
