"""A short, real pretraining run on generated audiovisual clips (the CPU demo's main job until
the ``dvc repro`` pipeline lands).

Each generated clip shares one latent "speaker pitch" k between its modalities: the fbank has
energy in mel band k that switches on and off like syllables at a rhythm set by k, and the
video shows a bright square at height k that moves across the frames. The masked autoencoder
can learn to reconstruct both, and the contrastive loss can learn to pair them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from socialmae.checkpoints import load_checkpoint
from socialmae.figures import save_reconstruction_figure
from socialmae.io import atomic_write_text
from socialmae.losses import LossWeights
from socialmae.model import SocialMAE, SocialMAEConfig, get_preset

logger = logging.getLogger(__name__)

LEVELS = 8  # distinct latent values k


def synthetic_clips(
    config: SocialMAEConfig, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated clips whose audio and video share a latent ``k``.

    Returns:
        audio ``[B, audio_length, num_mel_bins]``, video ``[B, C, T, H, W]``, k ``[B]``.
    """
    c = config
    k = torch.randint(0, LEVELS, (batch,), generator=generator)  # [B]
    audio = 0.3 * torch.randn(batch, c.audio_length, c.num_mel_bins, generator=generator)
    band = c.num_mel_bins // LEVELS
    mel = torch.arange(c.num_mel_bins)
    in_band = (mel[None, :] // band) == k[:, None]  # [B, F]
    half_period = (12 + 2 * k)[:, None]  # syllable rhythm set by k, [B, 1] frames
    phase = torch.randint(0, 64, (batch, 1), generator=generator)
    frames = torch.arange(c.audio_length)[None, :] + phase
    voiced = ((frames // half_period) % 2 == 0).float()  # [B, T]
    audio += 2.5 * voiced[:, :, None] * in_band[:, None, :].float()

    side, size = c.image_size, c.image_size // 5
    video = 0.3 * torch.randn(batch, c.in_chans, c.num_frames, side, side, generator=generator)
    rows = torch.arange(side)
    top = (k * (side - size) // (LEVELS - 1))[:, None]  # [B, 1]
    row_on = (rows[None, :] >= top) & (rows[None, :] < top + size)  # [B, H]
    t = torch.arange(c.num_frames)[None, :]
    left = (t * (side - size) // max(c.num_frames - 1, 1)).expand(batch, -1)  # [B, T]
    col_on = (rows[None, None, :] >= left[..., None]) & (
        rows[None, None, :] < left[..., None] + size
    )
    square = row_on[:, None, :, None] & col_on[:, :, None, :]  # [B, T, H, W]
    video += 2.0 * square[:, None].float()
    return audio, video, k


@dataclass
class SmokeResult:
    steps: int
    batch: int
    first_loss: float
    last_loss: float
    first_loss_mae_video: float
    last_loss_mae_video: float
    last_contrastive_accuracy: float
    seconds: float
    parameters: int


def pretrain_smoke(
    out_dir: str | Path,
    preset: str = "tiny",
    steps: int = 60,
    batch: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
) -> SmokeResult:
    """Pretrain ``preset`` on generated clips; write the model, metrics and a reconstruction.

    Outputs in ``out_dir``: ``model/`` (safetensors + config), ``metrics.json``,
    ``reconstruction.png``. The saved model is reloaded and checked against the trained one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = get_preset(preset)
    model = SocialMAE(config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
    )
    data_gen = torch.Generator().manual_seed(seed)
    mask_gen = torch.Generator().manual_seed(seed + 1)
    weights = LossWeights(contrastive=0.1)
    history = []
    start = time.perf_counter()
    for step in range(steps):
        audio, video, _ = synthetic_clips(config, batch, data_gen)
        result = model(audio, video, weights=weights, generator=mask_gen)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        if not torch.isfinite(result.loss):
            raise FloatingPointError(f"non-finite loss {result.loss.item()} at step {step}")
        history.append(
            (result.loss.item(), result.loss_mae_video.item(), result.contrastive_accuracy.item())
        )
        if step % 10 == 0 or step == steps - 1:
            logger.info("step %d loss %.4f", step, history[-1][0])
    seconds = time.perf_counter() - start

    model.eval()
    model.save_pretrained(out / "model")
    reloaded = load_checkpoint(out / "model")
    audio, video, _ = synthetic_clips(config, 2, torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        if not torch.equal(model.embed(audio, video), reloaded.embed(audio, video)):
            raise RuntimeError(f"{out / 'model'} does not reproduce the trained model")
    save_reconstruction_figure(model, audio, video, out / "reconstruction.png", seed)

    tail = history[-5:]  # average the last steps: single-batch losses are noisy
    summary = SmokeResult(
        steps=steps,
        batch=batch,
        first_loss=history[0][0],
        last_loss=sum(h[0] for h in tail) / len(tail),
        first_loss_mae_video=history[0][1],
        last_loss_mae_video=sum(h[1] for h in tail) / len(tail),
        last_contrastive_accuracy=sum(h[2] for h in tail) / len(tail),
        seconds=round(seconds, 2),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    atomic_write_text(out / "metrics.json", json.dumps(asdict(summary), indent=2) + "\n")
    return summary
