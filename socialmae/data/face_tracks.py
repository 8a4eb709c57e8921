"""Main-face tracking across sampled frames, box smoothing and square face crops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from PIL import Image


class Detection(Protocol):
    """What tracking needs from a detector's face (``socialmae.data.faces.Face`` fits)."""

    bbox: tuple[float, float, float, float]
    score: float


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``[4]`` boxes (x1, y1, x2, y2)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class _Track:
    boxes: dict[int, np.ndarray] = field(default_factory=dict)
    weight: float = 0.0
    last: int = -1


def track_main_face(
    detections: Sequence[Sequence[Detection]],
    frame_size: tuple[int, int],
    min_iou: float = 0.3,
    max_gap: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Link detections into tracks and keep the most prominent one.

    A detection joins the track whose last box overlaps it most (IoU >= ``min_iou``, seen in
    the last ``max_gap`` frames); a track's weight sums score x relative area x centrality,
    so the largest, most central, most persistent face wins over passers-by.

    Args:
        detections: per sampled frame, the faces found (any order).
        frame_size: (width, height) of the frames the boxes refer to.
    Returns:
        boxes ``[N, 4]`` (NaN where the main face was not detected) and detected ``[N]`` bool.
    """
    width, height = frame_size
    centre = np.array([width / 2, height / 2])
    half_diagonal = float(np.hypot(width, height)) / 2
    tracks: list[_Track] = []
    for index, faces in enumerate(detections):
        taken: set[int] = set()
        for face in sorted(faces, key=lambda f: -f.score):
            box = np.asarray(face.bbox, dtype=np.float64)
            best, best_iou = None, min_iou
            for t, track in enumerate(tracks):
                if t in taken or index - track.last > max_gap:
                    continue
                overlap = iou(track.boxes[track.last], box)
                if overlap >= best_iou:
                    best, best_iou = t, overlap
            if best is None:
                tracks.append(_Track())
                best = len(tracks) - 1
            track = tracks[best]
            taken.add(best)
            track.boxes[index], track.last = box, index
            area = max(box[2] - box[0], 0) * max(box[3] - box[1], 0) / (width * height)
            distance = np.linalg.norm((box[:2] + box[2:]) / 2 - centre) / half_diagonal
            track.weight += face.score * area * (1.0 - 0.5 * min(distance, 1.0))
    boxes = np.full((len(detections), 4), np.nan)
    detected = np.zeros(len(detections), dtype=bool)
    if tracks:
        main = max(tracks, key=lambda t: t.weight)
        for index, box in main.boxes.items():
            boxes[index], detected[index] = box, True
    return boxes, detected


def smooth_square_boxes(boxes: np.ndarray, detected: np.ndarray, window: int = 5) -> np.ndarray:
    """Square boxes per frame: gaps interpolated, centre and side moving-averaged.

    Args:
        boxes: ``[N, 4]`` (x1, y1, x2, y2), NaN rows where not detected; needs one detection.
        window: moving-average length in frames (1 disables smoothing).
    Returns:
        ``[N, 3]`` (centre x, centre y, side).
    """
    if not detected.any():
        raise ValueError("no detected box to smooth")
    known = np.flatnonzero(detected)
    index = np.arange(len(boxes))
    cx = (boxes[known, 0] + boxes[known, 2]) / 2
    cy = (boxes[known, 1] + boxes[known, 3]) / 2
    side = np.maximum(boxes[known, 2] - boxes[known, 0], boxes[known, 3] - boxes[known, 1])
    tracks = np.stack([np.interp(index, known, v) for v in (cx, cy, side)], axis=1)  # [N, 3]
    if window > 1 and len(boxes) > 1:
        pad = window // 2
        padded = np.pad(tracks, ((pad, window - 1 - pad), (0, 0)), mode="edge")
        kernel = np.ones(window) / window
        tracks = np.stack(
            [np.convolve(padded[:, k], kernel, mode="valid") for k in range(3)], axis=1
        )
    return tracks


def square_crop(frame: np.ndarray, box: np.ndarray, margin: float, size: int) -> np.ndarray:
    """Cut a square around ``box`` (centre x, centre y, side) enlarged by ``margin``.

    Parts outside the frame are black. Returns ``[size, size, 3]`` uint8 (bicubic resize).
    """
    cx, cy, side = (float(v) for v in box)
    half = side * (1.0 + margin) / 2
    region = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    crop = Image.fromarray(frame).crop(region)
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))
