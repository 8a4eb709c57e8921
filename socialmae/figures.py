"""Figures shared by pretraining, the CLI and the notebooks."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from socialmae.data.features import video_to_frames
from socialmae.io import atomic_write
from socialmae.model import SocialMAE


def save_reconstruction_figure(
    model: SocialMAE,
    audio: torch.Tensor,
    video: torch.Tensor,
    path: str | os.PathLike[str],
    seed: int = 0,
    mask_ratio: float = 0.75,
    title: str | None = None,
) -> Path:
    """The paper's Fig. 2 for the first clip: original, masked and reconstructed frames (rows)
    with the spectrogram beside them.

    Args:
        audio: ``[B, 1024, 128]`` normalised fbank; video: ``[B, 3, T, 224, 224]`` normalised.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rec = model.reconstruct(
        audio[:1].to(device), video[:1].to(device), mask_ratio, mask_ratio,
        generator=torch.Generator(device=device).manual_seed(seed),
    )  # fmt: skip
    model.train(was_training)
    order = model.config.channel_order
    rows = [
        ("original", rec.video, rec.audio),
        ("masked", rec.video_masked, rec.audio_masked),
        ("reconstructed", rec.video_reconstructed, rec.audio_reconstructed),
    ]
    frames = rec.video.shape[2]
    fig = Figure(figsize=(1.6 * (frames + 2), 5.4))
    FigureCanvasAgg(fig)  # no pyplot: no global state, no backend selection
    axes = fig.subplots(3, frames + 1, squeeze=False)
    lo, hi = float(rec.audio.min()), float(rec.audio.max())
    for r, (name, clip, fbank) in enumerate(rows):
        images = video_to_frames(clip[0], order)  # [T, H, W, 3]
        if name == "masked":  # removed patches are 0 in normalised space: show them grey
            removed = (clip[0].abs().sum(dim=0) == 0).cpu().numpy()  # [T, H, W]
            images[removed] = 128
        for t in range(frames):
            axes[r, t].imshow(images[t])
            axes[r, t].axis("off")
        axes[r, 0].set_title(name, loc="left", fontsize=9)
        axes[r, frames].imshow(
            fbank[0].T.float().cpu().numpy(), aspect="auto", origin="lower", vmin=lo, vmax=hi
        )
        axes[r, frames].set_xticks([])
        axes[r, frames].set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()

    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=70, format="png"))
