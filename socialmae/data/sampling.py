"""What the model sees of a clip: the sampling window (8 face frames spread over about 4 s,
a random window in training, the centred one in evaluation, starting on the fbank's 10 ms
grid; shorter clips are tiled), its audio (the same window by default, or the reference's first
10.24 s) and that audio's fbank (cut from the shard's stored one), the augmentations, and
the model inputs (the Kaldi fbank padded to 1024 frames and normalised, ImageNet-normalised
frames in RGB or the reference's BGR)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from socialmae.data.decode import SAMPLE_RATE
from socialmae.data.features import (
    fbank_framing,
    frames_to_video,
    log_mel,
    normalize_fbank,
    pad_frames,
)
from socialmae.model.config import SocialMAEConfig

REFERENCE_AUDIO_SECONDS = 10.24


@dataclass(frozen=True)
class ClipSampling:
    """Which frames and audio of a clip the model sees."""

    window_seconds: float = 4.0
    audio_window: Literal["aligned", "clip"] = "aligned"

    def __post_init__(self) -> None:
        if self.window_seconds <= 0:
            raise ValueError(f"window_seconds must be positive, got {self.window_seconds}")
        if self.audio_window not in ("aligned", "clip"):
            raise ValueError(f"audio_window must be aligned or clip, got {self.audio_window!r}")


AugmentScope = Literal["audio", "window"]


@dataclass(frozen=True)
class Augment:
    """Fine-tuning augmentation.

    Audio (on the fbank): SpecAugment masks, a shift along the mel axis, noise and a time roll.
    With ``scope: audio`` they act on the clip's real audio frames only and the time mask is
    scaled to the share of the window the audio fills; ``scope: window`` is the CAV-MAE
    reference recipe (freqm 48, timem 192, noise, mixup 0.5 over all 1024 frames, padding
    included). Video (on the face frames, the same for every frame of a clip): a random
    square crop and a left-right mirror.
    """

    freqm: int = 0  # widest frequency mask, in mel bins
    timem: int = 0  # widest time mask, in frames of a full window (see scope)
    noise: bool = False  # small uniform noise and a random time roll of the fbank
    freq_shift: int = 0  # widest shift of the spectrum along the mel axis, in bins
    mixup: float = 0.0  # probability of mixing with another clip (lambda ~ Beta(10, 10))
    flip: bool = False  # mirror half the clips left-right
    crop_scale: float = 1.0  # smallest side of the random square crop (fraction; 1: no crop)
    scope: AugmentScope = "audio"

    def __post_init__(self) -> None:
        for name in ("freqm", "timem", "freq_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.mixup <= 1:
            raise ValueError(f"mixup must be in [0, 1], got {self.mixup}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.scope not in ("audio", "window"):
            raise ValueError(f"scope must be audio or window, got {self.scope!r}")


def augment_fbank(
    feats: torch.Tensor,
    real: int,
    augment: Augment,
    rng: np.random.Generator,
    stats: tuple[float, float],
) -> torch.Tensor:
    """Augment and normalise a raw fbank ``[L, mel]`` whose first ``real`` frames are audio.

    Returns the normalised ``[L, mel]`` (``(x - mean) / std`` with ``stats``).
    """
    length, mel = feats.shape
    span = length if augment.scope == "window" else max(1, min(real, length))
    feats = feats.clone()
    region = feats[:span]  # a view: edits land in feats
    if augment.freq_shift > 0:
        shift = int(rng.integers(-augment.freq_shift, augment.freq_shift + 1))
        if shift:
            region.copy_(torch.roll(region, shift, dims=1))
            edge = slice(0, shift) if shift > 0 else slice(mel + shift, mel)
            region[:, edge] = region[:, shift if shift > 0 else mel + shift - 1, None]
    if augment.freqm > 0:
        width = int(rng.integers(0, augment.freqm))
        first = int(rng.integers(0, mel - width + 1))
        region[:, first : first + width] = 0
    if augment.timem > 0:
        widest = augment.timem if augment.scope == "window" else augment.timem * span / length
        width = int(rng.integers(0, max(1, round(widest))))
        first = int(rng.integers(0, span - width + 1))
        region[first : first + width] = 0
    mean, std = stats
    feats = normalize_fbank(feats, mean, std)
    if augment.noise:
        region = feats[:span]
        noise = torch.from_numpy(rng.random(region.shape, dtype=np.float32))
        region.add_(noise * (float(rng.random()) / 10))
        region.copy_(torch.roll(region, int(rng.integers(-span, span)), dims=0))
    return feats


def crop_region(
    side: int, augment: Augment, rng: np.random.Generator
) -> tuple[tuple[int, int, int] | None, bool]:
    """The random square ``(x, y, side)`` (None: the whole frame) and mirror flag of a clip."""
    region = None
    if augment.crop_scale < 1:
        crop = round(side * float(rng.uniform(augment.crop_scale, 1.0)))
        x, y = (int(v) for v in rng.integers(0, side - crop + 1, size=2))
        region = (x, y, crop)
    return region, bool(augment.flip and rng.random() < 0.5)


@dataclass
class StoredClip:
    """A clip as stored by the crop stage: metadata, audio and lazy frame access."""

    meta: dict[str, Any]
    audio: np.ndarray  # [N] at 16 kHz
    frame: Callable[[int], np.ndarray]  # index -> [H, W, 3] uint8
    fbank: Callable[[], np.ndarray] | None = None  # -> [F, 128] log-mel of ``audio`` (stored)


def window_start(
    duration: float, window: float, train: bool, rng: np.random.Generator | None
) -> float:
    """Seconds where the window starts: random in training, centred otherwise, on the fbank's
    hop grid (so its fbank is a run of the clip's fbank frames); 0 when the clip is shorter."""
    if duration <= window:
        return 0.0
    start = float(rng.uniform(0.0, duration - window)) if train else (duration - window) / 2
    hop = fbank_framing()[0]
    return math.floor(start * SAMPLE_RATE / hop + 1e-9) * hop / SAMPLE_RATE


def _tile(audio: np.ndarray, start: float, seconds: float) -> np.ndarray:
    """``seconds`` of audio from ``start``, looping a shorter clip; ``[seconds * 16000]``."""
    need = round(seconds * SAMPLE_RATE)
    if audio.size == 0:
        return np.zeros(need, dtype=np.float32)
    first = round(start * SAMPLE_RATE)
    index = (first + np.arange(need)) % audio.size if first + need > audio.size else None
    return audio[index] if index is not None else audio[first : first + need]


@dataclass
class ClipWindow:
    """The part of a clip the model sees."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    audio: np.ndarray  # [N] at 16 kHz
    times: np.ndarray  # [T] seconds of the frames in the clip
    frame_index: np.ndarray  # [T] positions of the frames among the stored ones
    start: float  # seconds
    fbank: torch.Tensor | None = None  # [F, mel] raw log-mel of ``audio`` when the clip stores it


def sample_clip(
    clip: StoredClip,
    config: SocialMAEConfig,
    sampling: ClipSampling,
    train: bool,
    rng: np.random.Generator,
) -> ClipWindow:
    """Pick the window: ``config.num_frames`` frames spread over it and its audio."""
    meta = clip.meta
    duration = float(meta["duration"])
    times_stored = np.asarray(meta["times"], dtype=np.float64)
    start = window_start(duration, sampling.window_seconds, train, rng)
    step = sampling.window_seconds / config.num_frames
    wanted = start + (np.arange(config.num_frames) + 0.5) * step
    wanted = np.mod(wanted, max(duration, 1e-6))  # tiles clips shorter than the window
    index = np.abs(times_stored[None, :] - wanted[:, None]).argmin(axis=1)
    frames = np.stack([clip.frame(int(i)) for i in index])  # [T, H, W, 3]
    audio = audio_window(clip.audio, start, sampling)
    fbank = window_fbank(clip, start, sampling, config.num_mel_bins)
    return ClipWindow(frames, audio, times_stored[index], index, start, fbank)


def audio_window(audio: np.ndarray, start: float, sampling: ClipSampling) -> np.ndarray:
    """The audio the model hears ``[N]``: the window from ``start`` (``aligned``), or the
    reference's first 10.24 s."""
    if sampling.audio_window == "aligned":
        return _tile(audio, start, sampling.window_seconds)
    return audio[: int(REFERENCE_AUDIO_SECONDS * SAMPLE_RATE)]


def window_fbank(
    clip: StoredClip, start: float, sampling: ClipSampling, num_mel_bins: int
) -> torch.Tensor | None:
    """``log_mel`` of :func:`audio_window` cut from the clip's stored fbank ``[F, mel]``: the
    same frames (to float rounding: the window's mean is removed from each frame either way),
    without the FFTs. None when the clip stores no fbank of ``num_mel_bins`` or the window is
    not a run of its frames (tiled past the clip's end, or not on the hop grid)."""
    if clip.fbank is None:
        return None
    hop, length = fbank_framing()
    if sampling.audio_window == "aligned":
        first, need = round(start * SAMPLE_RATE), round(sampling.window_seconds * SAMPLE_RATE)
        if first % hop or first + need > clip.audio.size:
            return None
    else:
        first, need = 0, min(clip.audio.size, int(REFERENCE_AUDIO_SECONDS * SAMPLE_RATE))
    if need < length:
        return None
    stored = clip.fbank()
    offset, frames = first // hop, 1 + (need - length) // hop
    if stored.shape[1] != num_mel_bins or offset + frames > stored.shape[0]:
        return None
    return torch.from_numpy(stored[offset : offset + frames])


def to_inputs(
    frames: np.ndarray,
    audio: np.ndarray,
    config: SocialMAEConfig,
    rng: np.random.Generator | None = None,
    augment: Augment | None = None,
    fbank_stats: tuple[float, float] | None = None,
    feats: torch.Tensor | None = None,
    faces: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``[T, H, W, 3]`` uint8 and audio ``[N]`` -> fbank ``[L, mel]`` (``L`` the config's
    ``audio_length``), video ``[3, T, S, S]`` (``S`` its ``image_size``; other frame sizes are
    resized), normalised with ``fbank_stats`` or the config's statistics. ``feats`` is the
    raw log-mel of ``audio`` when the caller already has it. With ``faces`` False (an
    audio-only model) the frames are left alone and video is an empty ``[0]`` tensor; the
    fbank is the same."""
    if frames.shape[1] != frames.shape[2]:
        raise ValueError(f"face frames must be square, got {frames.shape[1:3]}")
    feats = log_mel(audio, config.num_mel_bins) if feats is None else feats
    real = feats.shape[0]
    feats = pad_frames(feats, config.audio_length)  # [L, mel]
    stats = fbank_stats or (config.fbank_mean, config.fbank_std)
    if augment is not None and rng is not None:
        feats = augment_fbank(feats, real, augment, rng, stats)
        # the frames' draws come last: without faces, skipping them changes no other number
        region, flip = crop_region(frames.shape[1], augment, rng) if faces else (None, False)
    else:
        feats, region, flip = normalize_fbank(feats, *stats), None, False
    if not faces:
        return feats, torch.empty(0)
    video = frames_to_video(frames, config.channel_order, config.image_size, region, flip)
    return feats, video
