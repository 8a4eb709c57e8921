"""RetinaFace's anchors and the decoding of its box and landmark offsets (biubug6's
``PriorBox`` with ``clip=False``, ``decode`` and ``decode_landm``)."""

from __future__ import annotations

import math

import torch

MIN_SIZES = ((16, 32), (64, 128), (256, 512))  # anchor sides per level, input pixels
STEPS = (8, 16, 32)  # the levels' strides
VARIANCE = (0.1, 0.2)  # centre and size offsets are scaled by these


def prior_boxes(
    height: int, width: int, device: str | torch.device = "cpu"
) -> torch.Tensor:  # fmt: skip
    """Anchors of an ``height x width`` input: ``[A, 4]`` (cx, cy, w, h), relative to the input.

    Ordered level by level (strides 8, 16, 32), then row, column and anchor size, which is
    the order of the heads' outputs (biubug6's ``PriorBox`` with ``clip=False``).
    """
    levels = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) * step / width
        cy, cx = torch.meshgrid(cy, cx, indexing="ij")
        size = torch.tensor(sizes, dtype=torch.float32, device=device)
        shape = (rows, cols, len(sizes))
        levels.append(
            torch.stack(
                [
                    cx[..., None].expand(shape),
                    cy[..., None].expand(shape),
                    (size / width).expand(shape),
                    (size / height).expand(shape),
                ],
                dim=-1,
            ).reshape(-1, 4)
        )
    return torch.cat(levels)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """``loc [..., A, 4]`` offsets + ``priors [A, 4]`` -> ``[..., A, 4]`` (x1, y1, x2, y2),
    relative to the input size."""
    centre = priors[:, :2] + loc[..., :2] * VARIANCE[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * VARIANCE[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def decode_landmarks(landms: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """``landms [..., A, 10]`` offsets + ``priors [A, 4]`` -> ``[..., A, 5, 2]`` points (x, y),
    relative to the input size."""
    offsets = landms.reshape(*landms.shape[:-1], 5, 2)
    return priors[:, None, :2] + offsets * VARIANCE[0] * priors[:, None, 2:]
