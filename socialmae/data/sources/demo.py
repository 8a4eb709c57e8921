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
from collections.abc import Iterable
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
from socialmae.lifecycle import die_with_parent
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
        "en-us+f2",
        2,
    ),
    Identity(
        "grace_hopper",
        "grace_hopper",
        (177, 106, 176, 221),
        ((218, 187), (303, 186), (259, 247), (231, 273), (299, 272)),
        "en-us+f4",
        -3,
    ),
    Identity(
        "lfw063",
        "lfw",
        (1.2, -1.7, 19.1, 26.6),
        ((4.4, 7.6), (13.2, 7.0), (7.8, 13.7), (5.9, 17.6), (13.5, 17.2)),
        "en-us+m1",
        -4,
        63,
        (1.0, 0.86, 0.72),
    ),
    Identity(
        "lfw052",
        "lfw",
        (1.5, -2.0, 19.7, 26.1),
        ((5.7, 7.9), (14.9, 7.8), (9.4, 11.9), (6.0, 16.2), (15.1, 16.0)),
        "en-us+f2",
        4,
        52,
        (1.0, 0.84, 0.76),
    ),
    Identity(
        "lfw001",
        "lfw",
        (1.2, -2.0, 18.9, 26.8),
        ((4.9, 8.5), (13.5, 8.5), (8.0, 13.8), (5.4, 17.5), (13.3, 17.5)),
        "en-us+m3",
        2,
        1,
        (0.98, 0.88, 0.74),
    ),
    Identity(
        "lfw046",
        "lfw",
        (1.8, -0.5, 18.8, 23.4),
        ((6.0, 9.0), (14.6, 9.0), (9.6, 14.4), (7.1, 17.5), (14.0, 17.5)),
        "en-us+f4",
        0,
        46,
        (1.0, 0.87, 0.70),
    ),
    Identity(
        "lfw060",
        "lfw",
        (0.1, -2.3, 20.1, 27.8),
        ((5.6, 9.1), (14.8, 8.7), (10.6, 14.1), (6.9, 18.8), (14.4, 18.5)),
        "en-us+m1",
        0,
        60,
        (0.96, 0.88, 0.80),
    ),
    Identity(
        "lfw093",
        "lfw",
        (1.3, -2.2, 18.6, 26.7),
        ((6.7, 8.3), (15.9, 8.4), (11.9, 13.7), (7.2, 17.4), (15.3, 17.4)),
        "en-us+f2",
        -2,
        93,
        (1.0, 0.85, 0.74),
    ),
    Identity(
        "lfw006",
        "lfw",
        (-2.8, -1.2, 21.7, 25.4),
        ((3.3, 9.5), (14.3, 9.2), (9.5, 16.4), (5.1, 19.2), (13.3, 19.0)),
        "en-us+m3",
        -2,
        6,
        (0.97, 0.87, 0.76),
    ),
    Identity(
        "lfw031",
        "lfw",
        (1.1, -1.4, 19.8, 25.2),
        ((5.7, 9.4), (14.2, 7.8), (10.1, 14.0), (7.9, 18.4), (14.9, 17.0)),
        "en-us+f4",
        3,
        31,
        (1.0, 0.86, 0.73),
    ),
    Identity(
        "lfw015",
        "lfw",
        (2.6, 0.2, 17.9, 22.8),
        ((7.8, 9.3), (16.2, 8.4), (12.9, 14.1), (9.6, 18.3), (15.8, 17.6)),
        "en-us+m1",
        4,
        15,
        (0.99, 0.85, 0.72),
    ),
    Identity(
        "lfw075",
        "lfw",
        (2.7, -1.7, 19.5, 26.3),
        ((5.3, 8.3), (13.2, 9.4), (5.6, 13.9), (4.8, 18.4), (10.7, 19.2)),
        "en-us+f2",
        -4,
        75,
        (1.0, 0.88, 0.78),
    ),
    Identity(
        "lfw041",
        "lfw",
        (2.2, 0.6, 18.6, 22.8),
        ((6.5, 8.5), (14.9, 8.4), (10.3, 13.6), (7.5, 17.5), (14.3, 17.4)),
        "en-us+m3",
        -3,
        41,
        (0.96, 0.86, 0.75),
    ),
    Identity(
        "lfw094",
        "lfw",
        (1.7, -1.7, 19.3, 25.9),
        ((6.9, 7.7), (16.4, 7.9), (11.6, 13.8), (7.0, 16.7), (15.5, 17.0)),
        "en-us+f4",
        1,
        94,
        (1.0, 0.85, 0.71),
    ),
    Identity(
        "lfw055",
        "lfw",
        (0.7, -1.9, 20.7, 26.1),
        ((5.6, 8.4), (15.3, 7.5), (10.5, 14.2), (7.9, 18.6), (14.8, 17.9)),
        "en-us+m1",
        3,
        55,
        (0.98, 0.87, 0.77),
    ),
    Identity(
        "lfw037",
        "lfw",
        (1.9, -0.7, 19.0, 24.0),
        ((6.6, 9.8), (15.4, 8.8), (11.4, 12.8), (8.1, 17.2), (16.1, 16.4)),
        "en-us+m3",
        1,
        37,
        (0.97, 0.88, 0.79),
    ),
    Identity(
        "lfw074",
        "lfw",
        (2.5, -2.3, 18.2, 25.6),
        ((5.0, 8.6), (12.9, 8.9), (7.2, 13.9), (6.3, 17.1), (12.9, 17.2)),
        "en-us+m1",
        -2,
        74,
        (1.0, 0.86, 0.74),
    ),
    Identity(
        "lfw053",
        "lfw",
        (1.5, -1.0, 17.6, 25.7),
        ((8.0, 7.0), (16.3, 7.6), (13.3, 11.6), (8.5, 17.1), (15.3, 17.6)),
        "en-us+f2",
        -1,
        53,
        (0.99, 0.88, 0.78),
    ),
    Identity(
        "lfw064",
        "lfw",
        (1.3, -1.0, 19.0, 24.2),
        ((6.2, 7.8), (15.0, 7.4), (10.8, 11.4), (7.5, 17.0), (14.7, 16.6)),
        "en-us+m3",
        2,
        64,
        (0.82, 0.66, 0.55),
    ),
    Identity(
        "lfw091",
        "lfw",
        (1.4, -1.3, 18.5, 26.1),
        ((6.1, 8.4), (15.4, 8.1), (11.2, 13.4), (7.5, 18.4), (14.9, 18.2)),
        "en-us+f4",
        1,
        91,
        (1.0, 0.87, 0.76),
    ),
    Identity(
        "lfw002",
        "lfw",
        (1.8, -0.5, 19.1, 24.7),
        ((4.8, 9.1), (13.5, 7.5), (8.4, 13.3), (7.0, 18.5), (14.1, 17.2)),
        "en-us+m1",
        4,
        2,
        (0.97, 0.86, 0.75),
    ),
    Identity(
        "lfw018",
        "lfw",
        (0.8, -2.0, 21.1, 26.5),
        ((5.6, 8.7), (15.2, 8.8), (9.5, 15.0), (7.1, 18.8), (14.1, 18.9)),
        "en-us+f2",
        -4,
        18,
        (0.93, 0.8, 0.68),
    ),
    Identity(
        "lfw020",
        "lfw",
        (0.8, -2.1, 20.5, 25.7),
        ((5.0, 8.0), (14.6, 7.7), (8.9, 13.2), (6.5, 17.4), (14.0, 17.2)),
        "en-us+m3",
        -3,
        20,
        (1.0, 0.85, 0.73),
    ),
    Identity(
        "lfw029",
        "lfw",
        (0.5, -0.5, 21.3, 31.1),
        ((7.2, 9.5), (16.1, 9.1), (12.6, 13.5), (9.2, 22.0), (15.3, 21.6)),
        "en-us+f4",
        3,
        29,
        (0.98, 0.84, 0.72),
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
    "anger": Prosody(pitch=60, range=85, rate=210, volume=200),
    "disgust": Prosody(pitch=30, range=35, rate=125, volume=80),
    "fear": Prosody(pitch=90, range=65, rate=240, volume=125),
    "happiness": Prosody(pitch=75, range=100, rate=185, volume=160),
    "neutral": Prosody(pitch=45, range=25, rate=160, volume=100),
    "sadness": Prosody(pitch=15, range=5, rate=100, volume=45),
}


@dataclass(frozen=True)
class Expression:
    """Face and head motion of an emotion (the prototypical action units of acted emotion,
    held from a fast onset to the end of the clip); distances are fractions of the face
    height, so they look the same on every face and survive tracking and a 2-4 fps sampling."""

    brow: float = 0.0  # brows lowered (+) or raised (-)
    brow_inner: float = 0.0  # inner ends of the brows raised (+): the oblique brows of sadness
    frown: float = 0.0  # brows drawn together towards the midline
    eyes: float = 0.0  # vertical stretch around the eyes: + wide open, - narrowed
    smile: float = 0.0  # mouth corners raised (+) or lowered (-)
    stretch: float = 0.0  # mouth corners pulled outwards (+) or pressed inwards (-)
    sneer: float = 0.0  # one-sided upper-lip and nose raise
    gape: float = 0.0  # jaw held open beyond the speech movement
    jaw: float = 1.0  # gain of the loudness-driven jaw opening
    roll: float = 0.0  # head tilt in degrees, to a random side
    nod: tuple[float, float] = (0.0, 0.0)  # vertical head oscillation (amplitude, Hz)
    shake: tuple[float, float] = (0.0, 0.0)  # horizontal head oscillation (amplitude, Hz)
    tremor: float = 0.0  # irregular head jitter (amplitude)
    drift: tuple[float, float] = (0.0, 0.0)  # head displacement over the clip (x, y)


EXPRESSIONS: dict[str, Expression] = {
    "anger": Expression(
        brow=0.12, frown=0.05, eyes=-0.35, stretch=-0.06, smile=-0.04, jaw=0.8, shake=(0.12, 0.9)
    ),
    "disgust": Expression(brow=0.05, eyes=-0.25, sneer=0.14, smile=-0.05, jaw=0.7),
    "fear": Expression(brow=-0.12, eyes=0.5, stretch=0.08, gape=0.07, tremor=0.05),
    "happiness": Expression(smile=0.14, stretch=0.06, eyes=-0.25, nod=(0.12, 0.7)),
    "neutral": Expression(),
    "sadness": Expression(brow_inner=0.1, eyes=-0.2, smile=-0.12, jaw=0.6, roll=8.0),
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


def _face_displacement(
    layout: FaceLayout,
    expr: Expression,
    x: np.ndarray,
    y: np.ndarray,
    ramp: float,
    gap: float,
    side: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Forward displacement ``(dx, dy)`` of the face points ``(x, y)`` (frame pixels, any
    shape) for ``expr`` at strength ``ramp`` with the jaw ``gap`` pixels open."""
    h, w = layout.face_height, layout.box[2]
    eyes, nose, mouth = layout.eyes, layout.nose, layout.mouth
    mouth_c = layout.mouth_center
    eye_y = float(eyes[:, 1].mean())
    face_cx = float(eyes[:, 0].mean() * 0.5 + mouth_c[0] * 0.5)
    chin_y = layout.box[1] + layout.box[3]
    # The jaw region: below the mouth line, down to the chin.
    jaw = (
        _smoothstep(y, mouth_c[1] - 0.02 * h, mouth_c[1] + 0.08 * h)
        * (1 - _smoothstep(y, chin_y, chin_y + 0.22 * h))
        * _gauss(x, face_cx, 0.38 * w)
    )
    dy = gap * jaw
    dx = np.zeros_like(dy)
    brows = _gauss(y, eye_y - 0.13 * h, 0.07 * h) * _gauss(x, face_cx, 0.32 * w)
    if expr.brow:
        dy += ramp * expr.brow * h * brows
    if expr.brow_inner:
        dy -= ramp * expr.brow_inner * h * brows * _gauss(x, face_cx, 0.14 * w)
    if expr.frown:
        dx -= ramp * expr.frown * h * brows * np.tanh((x - face_cx) / (0.12 * w))
    if expr.eyes:
        dy += (
            ramp
            * expr.eyes
            * (y - eye_y)
            * _gauss(y, eye_y, 0.06 * h)
            * _gauss(x, face_cx, 0.35 * w)
        )
    if expr.smile or expr.stretch:
        rows = _gauss(y, float(mouth_c[1]), 0.08 * h)
        for corner in mouth:
            bump = rows * _gauss(x, float(corner[0]), 0.1 * h)
            outwards = 1.0 if corner[0] > mouth_c[0] else -1.0
            dy -= ramp * expr.smile * h * bump
            dx += ramp * (0.4 * abs(expr.smile) + expr.stretch) * h * bump * outwards
    if expr.sneer:
        sx = float(mouth[side][0] * 0.6 + nose[0] * 0.4)
        sy = float(mouth_c[1] * 0.55 + nose[1] * 0.45)
        dy -= ramp * expr.sneer * h * _gauss(y, sy, 0.08 * h) * _gauss(x, sx, 0.09 * h)
    return dx, dy


def render_frames(
    layout: FaceLayout,
    loudness: np.ndarray,
    label: str,
    fps: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Animate ``layout``: the jaw follows ``loudness`` ``[T]``, the rest follows ``label``.

    The face first deforms (smooth displacement fields around brows, eyes, mouth and jaw),
    then the head moves rigidly (tilt about the face centre, translation). The smooth source
    coordinates are computed on a quarter-resolution grid, upsampled, and every frame is
    resampled at once. Returns RGB uint8 ``[T, size, size, 3]``.
    """
    import torch
    import torch.nn.functional as F

    expr = EXPRESSIONS[label]
    size = layout.image.shape[0]
    h = layout.face_height
    frames = loudness.shape[0]
    duration = max(frames / fps, 1e-6)
    mouth, mouth_c = layout.mouth, layout.mouth_center
    face_cx = float(layout.eyes[:, 0].mean() * 0.5 + mouth_c[0] * 0.5)
    face_cy = layout.box[1] + 0.5 * h

    # Per-clip randomness: intensity, onset, head offset, sway, phases, sides of sneer and tilt.
    intensity = rng.uniform(0.8, 1.2)
    onset = rng.uniform(0.3, 0.6)
    offset = rng.uniform(-0.03, 0.03, size=2) * size
    sway_amp = rng.uniform(0.002, 0.006, size=2) * size
    sway_hz = rng.uniform(0.2, 0.45, size=2)
    phases = rng.uniform(0, 2 * np.pi, size=4)
    jitter = rng.normal(0.0, 1.0, size=(frames, 2))
    side = 1 if rng.random() < 0.5 else 0
    tilt = 1.0 if rng.random() < 0.5 else -1.0  # the head tilts to either shoulder
    # The expression swells and ebbs with the speech's emphasis (0.5-0.8 Hz, slow enough for a
    # 2-4 fps sampling), never below half its peak once it has set in.
    pulse_hz, pulse_phase = rng.uniform(0.5, 0.8), rng.uniform(0, 2 * np.pi)

    # Per-frame strengths and rigid motion, [T].
    tau = np.arange(frames) / fps
    pulse = 0.75 + 0.25 * np.sin(2 * np.pi * pulse_hz * tau + pulse_phase)
    ramp = intensity * pulse * _smoothstep(tau, 0.0, onset)
    hx = offset[0] + sway_amp[0] * np.sin(2 * np.pi * sway_hz[0] * tau + phases[0])
    hy = offset[1] + sway_amp[1] * np.sin(2 * np.pi * sway_hz[1] * tau + phases[1])
    hy += ramp * expr.nod[0] * h * np.sin(2 * np.pi * expr.nod[1] * tau + phases[2])
    hx += ramp * expr.shake[0] * h * np.sin(2 * np.pi * expr.shake[1] * tau + phases[3])
    hx += ramp * expr.tremor * h * jitter[:, 0] + intensity * expr.drift[0] * h * tau / duration
    hy += ramp * expr.tremor * h * jitter[:, 1] + intensity * expr.drift[1] * h * tau / duration
    angle = np.radians(ramp * expr.roll * tilt)
    cos = np.cos(angle).astype(np.float32)[:, None, None]
    sin = np.sin(angle).astype(np.float32)[:, None, None]
    # Jaw opening from loudness (lightly smoothed) plus a held gape.
    smoothed = np.convolve(np.pad(loudness, 1, mode="edge"), [0.25, 0.5, 0.25], "valid")
    gap = expr.jaw * 0.07 * h * (1.0 - np.exp(-smoothed / 0.07)) + ramp * expr.gape * h

    def face_points(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``axis x axis`` moved into the face's frame (the rigid motion undone):
        ``qx, qy`` ``[T, len(axis), len(axis)]``."""
        px = (axis[None, None, :] - hx[:, None, None] - face_cx).astype(np.float32)
        py = (axis[None, :, None] - hy[:, None, None] - face_cy).astype(np.float32)
        return cos * px + sin * py + face_cx, -sin * px + cos * py + face_cy

    qx, qy = face_points((np.arange(size // 4) + 0.5) * 4 - 0.5)  # quarter resolution
    ramp_t, gap_t = ramp[:, None, None], gap[:, None, None]
    dx, dy = _face_displacement(layout, expr, qx, qy, ramp_t, gap_t, side)
    coarse = torch.from_numpy(np.stack([qx - dx, qy - dy], axis=1).astype(np.float32))
    source = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    grid = (source.permute(0, 2, 3, 1) + 0.5) * (2.0 / size) - 1.0  # [T, H, W, (x, y)]
    image = torch.from_numpy(layout.image).permute(2, 0, 1)[None].expand(frames, -1, -1, -1)
    video = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # The open mouth: a dark ellipse between the lips, carried by the head motion; drawn in
    # face coordinates over the full-resolution pixels.
    qx, qy = face_points(np.arange(size, dtype=np.float32))
    rx = 0.42 * float(np.linalg.norm(mouth[1] - mouth[0]))
    rx = rx * (1.0 + ramp_t * max(expr.stretch, 0.0) * 4.0)
    ry = 0.5 * gap_t + 0.5
    r = np.hypot((qx - mouth_c[0]) / rx, (qy - mouth_c[1] - 0.45 * gap_t) / ry)
    strength = np.where(gap_t > 0.3, np.minimum(1.0, gap_t / 3.0) * 0.5, 0.0)
    alpha = torch.from_numpy((np.clip((1.0 - r) * 3.0, 0, 1) * strength).astype(np.float32))
    dark = torch.tensor([55.0, 22.0, 28.0]).view(1, 3, 1, 1)
    video = torch.lerp(video, dark, alpha[:, None])
    return (video + 0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


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
    identities: int = 24,
    sentences: int = 1,
    seconds: float = 3.0,
    fps: int = 25,
    size: int = 224,
    seed: int = 0,
) -> list[ClipSpec]:
    """The clips of a demo set (deterministic): as in CREMA-D, every identity speaks each of
    its ``sentences`` sentences in all six emotions, so neither the sentence nor the speaker
    says anything about the label. Identity ``i`` takes the sentences after identity
    ``i - 1``'s (cycling through the 12)."""
    names = identity_names(identities)
    codes = list(SENTENCES)
    if not 1 <= sentences <= len(codes):
        raise ValueError(f"sentences: expected 1..{len(codes)}, got {sentences}")
    specs = []
    for i, identity in enumerate(names):
        for j in range(sentences):
            sentence = codes[(i * sentences + j) % len(codes)]
            for li, label in enumerate(EMOTIONS):
                clip_id = f"{identity}_{sentence}_{EMOTION_CODES[label]}"
                spec = ClipSpec(
                    clip_id, identity, label, sentence, (seed, i, j, li), seconds, fps, size
                )
                specs.append(spec)
    return specs


def voice_kind(name: str) -> str:
    """``male`` or ``female``: the kind of an identity's espeak-ng voice (``+m3``, ``+f2``)."""
    return "male" if "+m" in _identity(name).voice else "female"


def _logged(results: Iterable[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """The results in order, with a progress line every tenth (logs, not a terminal bar:
    `make demo` is often piped)."""
    out = []
    step = max(1, total // 10)
    for done, result in enumerate(results, 1):
        out.append(result)
        if done % step == 0 or done == total:
            log.info("demo: %d/%d clips generated", done, total)
    return out


def _make_clip_task(args: tuple[ClipSpec, str]) -> dict[str, Any]:
    return make_clip(*args)


def prepare_demo(
    out_dir: Path,
    identities: int = 24,
    sentences: int = 1,
    seconds: float = 3.0,
    fps: int = 25,
    size: int = 224,
    seed: int = 0,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
    workers: int = 1,
) -> pd.DataFrame:
    """Generate the demo set under ``out_dir`` (``clips/*.mp4`` + ``manifest.parquet``).

    ``identities x sentences x 6`` clips of ``seconds`` at ``fps`` (``size x size`` video,
    16 kHz mono audio; see :func:`demo_specs`); splits are by identity (``splits`` fractions,
    seeded), with both voice kinds on every side when there are enough identities. Same seed,
    same clips; generated clips of other settings are removed. ``workers > 1`` renders clips
    in a spawned process pool. Returns the manifest as :func:`read_manifest` gives it.
    """
    if seconds <= 0 or fps <= 0 or size < 32 or size % 2:
        raise ValueError(
            f"need seconds > 0, fps > 0, even size >= 32; got {seconds}, {fps}, {size}"
        )
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    specs = demo_specs(identities, sentences, seconds, fps, size, seed)
    jobs = [(s, str(out_dir)) for s in specs]
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            min(workers, len(jobs)), mp_context=context, initializer=die_with_parent
        ) as pool:
            extras = _logged(pool.map(_make_clip_task, jobs), len(jobs))
    else:
        extras = _logged(map(_make_clip_task, jobs), len(jobs))
    names = identity_names(identities)
    speaker_split = assign_speaker_splits(names, splits, seed, {n: voice_kind(n) for n in names})
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
    wanted = {f"{s.clip_id}.mp4" for s in specs}
    for stale in (out_dir / "clips").glob("*.mp4"):  # clips of an earlier, other demo set
        if stale.name not in wanted:
            stale.unlink()
    log.info("demo: %d clips of %d identities in %s", len(rows), identities, out_dir)
    return read_manifest(out_dir)
