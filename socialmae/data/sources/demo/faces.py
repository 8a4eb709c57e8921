"""The demo's identities: face photos from installed wheels (skimage, matplotlib), their
measured landmarks, voices, and where each face sits in a frame.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

log = logging.getLogger(__name__)


FACE_HEIGHT = 0.52  # face box height as a fraction of the frame side (photos)


LFW_FACE_HEIGHT = 0.56  # the same for the tight LFW crops (their box is taller than the crop)


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


def get_identity(name: str) -> Identity:
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
    identity = get_identity(name)
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


def voice_kind(name: str) -> str:
    """``male`` or ``female``: the kind of an identity's espeak-ng voice (``+m3``, ``+f2``)."""
    return "male" if "+m" in get_identity(name).voice else "female"
