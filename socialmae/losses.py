"""Pretraining losses: masked reconstruction and audio-visual contrastive (InfoNCE).

Pure functions; the weights that combine them live in :class:`LossWeights`, outside the model,
so training code and hyper-parameter search can set them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """``total = mae * (L_audio + L_video) + contrastive * L_c`` (paper: 1.0 and 0.01)."""

    mae: float = 1.0
    contrastive: float = 0.01
    temperature: float = 0.05
    bidirectional: bool = False

    def __post_init__(self) -> None:
        if self.mae < 0 or self.contrastive < 0:
            raise ValueError(f"loss weights must be >= 0, got {self}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised targets ``(x - mean) / sqrt(var + eps)`` over the last axis."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """Mean squared error over removed patches only.

    Args:
        pred, target: ``[B, L, P]`` per-patch predictions and pixels/fbank values.
        mask: ``[B, L]``, 1 for removed patches.
        norm_pix: normalise each target patch first.
    Returns:
        scalar: mean over removed patches of the per-patch MSE.
    """
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, L]
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


def contrastive_loss(
    audio: torch.Tensor,
    video: torch.Tensor,
    temperature: float = 0.05,
    bidirectional: bool = False,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE between L2-normalised audio and video representations.

    The reference (single direction) scores, for each video, which audio in the batch is its
    own: ``-mean_j log_softmax(A V^T / tau, dim=0)[j, j]``; ``bidirectional`` averages it with
    the audio-to-video direction.

    Args:
        audio: ``[Na, D]`` pooled audio tokens; video: ``[Nv, D]`` pooled video tokens.
        offset: positives are ``audio[offset + j]`` for ``video[j]`` (for negatives gathered
            from other ranks, ``Na >= Nv``); 0 with ``Na == Nv`` is the plain batch.
    Returns:
        (loss, accuracy): scalars; accuracy is the share of correct top-1 matches.
    """
    a = F.normalize(audio.float(), dim=-1)
    v = F.normalize(video.float(), dim=-1)
    sim = a @ v.T / temperature  # [Na, Nv]
    targets = torch.arange(v.shape[0], device=sim.device) + offset  # [Nv]
    loss = F.cross_entropy(sim.T, targets)  # softmax over audio, for each video
    acc = (sim.argmax(dim=0) == targets).float().mean()
    if bidirectional:
        rows = sim[offset : offset + v.shape[0]]  # [Nv, Nv] only local audio as queries
        local = targets - offset
        loss = 0.5 * (loss + F.cross_entropy(rows, local))
        acc = 0.5 * (acc + (rows.argmax(dim=1) == local).float().mean())
    return loss, acc


def total_loss(
    loss_audio: torch.Tensor,
    loss_video: torch.Tensor,
    loss_contrastive: torch.Tensor,
    weights: LossWeights,
) -> torch.Tensor:
    """``weights.mae * (loss_audio + loss_video) + weights.contrastive * loss_contrastive``."""
    return weights.mae * (loss_audio + loss_video) + weights.contrastive * loss_contrastive
