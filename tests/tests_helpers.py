"""Small helpers shared by test modules."""

from __future__ import annotations

import torch


def tiny_inputs(
    batch: int = 2, frames: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised fbank ``[B, 1024, 128]`` and video ``[B, 3, T, 224, 224]``."""
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, 1024, 128, generator=g)
    video = torch.randn(batch, 3, frames, 224, 224, generator=g)
    return audio, video
