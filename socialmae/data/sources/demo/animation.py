"""The demo's faces in motion: the jaw follows the speech loudness; brows, eyes, mouth
corners and head motion follow the emotion label, as smooth warps of the photo.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from socialmae.data.sources.demo.faces import FaceLayout

log = logging.getLogger(__name__)


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

    def face_points(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixels ``ys x xs`` moved into the face's frame (the rigid motion undone):
        ``qx, qy`` ``[T, len(ys), len(xs)]``."""
        px = (xs[None, None, :] - hx[:, None, None] - face_cx).astype(np.float32)
        py = (ys[None, :, None] - hy[:, None, None] - face_cy).astype(np.float32)
        return cos * px + sin * py + face_cx, -sin * px + cos * py + face_cy

    quarter = (np.arange(size // 4) + 0.5) * 4 - 0.5  # quarter resolution
    qx, qy = face_points(quarter, quarter)
    ramp_t, gap_t = ramp[:, None, None], gap[:, None, None]
    dx, dy = _face_displacement(layout, expr, qx, qy, ramp_t, gap_t, side)
    coarse = torch.from_numpy(np.stack([qx - dx, qy - dy], axis=1).astype(np.float32))
    source = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    grid = (source.permute(0, 2, 3, 1) + 0.5) * (2.0 / size) - 1.0  # [T, H, W, (x, y)]
    image = torch.from_numpy(layout.image).permute(2, 0, 1)[None].expand(frames, -1, -1, -1)
    video = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # The open mouth: a dark ellipse between the lips, carried by the head motion; drawn in
    # face coordinates over the full-resolution pixels of the box that can hold it (outside the
    # ellipse alpha is 0, where lerp returns the pixels unchanged).
    rx = 0.42 * float(np.linalg.norm(mouth[1] - mouth[0]))
    rx = rx * (1.0 + ramp_t * max(expr.stretch, 0.0) * 4.0)
    ry = 0.5 * gap_t + 0.5
    strength = np.where(gap_t > 0.3, np.minimum(1.0, gap_t / 3.0) * 0.5, 0.0)
    open_frames = strength[:, 0, 0] > 0
    if open_frames.any():
        # Where each frame's ellipse centre lands in the picture; the ellipse lies within its
        # larger radius of it (the head's motion is rigid), plus 2 pixels for rounding.
        centre_x, centre_y = float(mouth_c[0]) - face_cx, mouth_c[1] + 0.45 * gap - face_cy
        c, s = cos[:, 0, 0], sin[:, 0, 0]
        pixel_x = hx + face_cx + c * centre_x - s * centre_y
        pixel_y = hy + face_cy + s * centre_x + c * centre_y
        reach = np.maximum(rx[:, 0, 0], ry[:, 0, 0]) + 2.0
        x0, x1, y0, y1 = (
            int(np.clip(np.floor(np.min((pixel_x - reach)[open_frames])), 0, size)),
            int(np.clip(np.ceil(np.max((pixel_x + reach)[open_frames])) + 1, 0, size)),
            int(np.clip(np.floor(np.min((pixel_y - reach)[open_frames])), 0, size)),
            int(np.clip(np.ceil(np.max((pixel_y + reach)[open_frames])) + 1, 0, size)),
        )
        axis = np.arange(size, dtype=np.float32)
        qx, qy = face_points(axis[x0:x1], axis[y0:y1])
        r = np.hypot((qx - mouth_c[0]) / rx, (qy - mouth_c[1] - 0.45 * gap_t) / ry)
        alpha = torch.from_numpy((np.clip((1.0 - r) * 3.0, 0, 1) * strength).astype(np.float32))
        dark = torch.tensor([55.0, 22.0, 28.0]).view(1, 3, 1, 1)
        box = video[:, :, y0:y1, x0:x1]
        box.copy_(torch.lerp(box, dark, alpha[:, None]))
    return (video + 0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
