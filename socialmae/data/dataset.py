"""The loader: shards -> model inputs, and ``load_clip`` for any video file.

Per clip it takes 8 face frames spread over a 4 s window (about 2 fps; a random window in
training, the centred one in evaluation; clips shorter than the window are tiled), the audio
of the same window by default (``audio_window="clip"`` keeps the reference's first 10.24 s of
the file), the Kaldi fbank padded to 1024 frames and normalised, and ImageNet-normalised
frames in RGB (or the reference's BGR). Randomness comes from a per-item generator seeded by
(seed, epoch, index), so runs and resumed runs see the same samples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from socialmae.data.clips import CLIPS_TABLE
from socialmae.data.crop import CropParams, process_clip
from socialmae.data.decode import SAMPLE_RATE
from socialmae.data.errors import MediaError
from socialmae.data.features import fbank, frames_to_video, normalize_fbank
from socialmae.data.shards import ShardReader, decode_jpeg
from socialmae.model.config import SocialMAEConfig, get_preset
from socialmae.tasks import TaskSpec

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


@dataclass(frozen=True)
class Augment:
    """Fine-tuning augmentation (CAV-MAE's: freqm 48, timem 192, noise, mixup 0.5)."""

    freqm: int = 0  # widest frequency mask, in mel bins
    timem: int = 0  # widest time mask, in frames
    noise: bool = False  # small uniform noise and a random time roll of the fbank
    mixup: float = 0.0  # probability of mixing with another clip (lambda ~ Beta(10, 10))


@dataclass
class ClipInputs:
    """Model inputs for one clip."""

    audio: torch.Tensor  # [1024, 128] normalised fbank
    video: torch.Tensor  # [3, T, 224, 224] normalised frames
    times: np.ndarray  # [T] seconds of the sampled frames
    boxes: np.ndarray  # [T, 3] face square (centre x, centre y, side) in source pixels
    clip_id: str


@dataclass
class _Clip:
    """A stored clip: metadata, audio and lazy frame access."""

    meta: dict[str, Any]
    audio: np.ndarray  # [N] at 16 kHz
    frame: Callable[[int], np.ndarray]  # index -> [H, W, 3] uint8


def _window(duration: float, window: float, train: bool, rng: np.random.Generator) -> float:
    if duration <= window:
        return 0.0
    return float(rng.uniform(0.0, duration - window)) if train else (duration - window) / 2


def _tile(audio: np.ndarray, start: float, seconds: float) -> np.ndarray:
    """``seconds`` of audio from ``start``, looping a shorter clip; ``[seconds * 16000]``."""
    need = round(seconds * SAMPLE_RATE)
    if audio.size == 0:
        return np.zeros(need, dtype=np.float32)
    first = round(start * SAMPLE_RATE)
    index = (first + np.arange(need)) % audio.size if first + need > audio.size else None
    return audio[index] if index is not None else audio[first : first + need]


def sample_clip(
    clip: _Clip,
    config: SocialMAEConfig,
    sampling: ClipSampling,
    train: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pick the window: frames ``[T, H, W, 3]``, audio ``[N]``, times ``[T]``, frame indices."""
    meta = clip.meta
    duration = float(meta["duration"])
    times_stored = np.asarray(meta["times"], dtype=np.float64)
    start = _window(duration, sampling.window_seconds, train, rng)
    step = sampling.window_seconds / config.num_frames
    wanted = start + (np.arange(config.num_frames) + 0.5) * step
    wanted = np.mod(wanted, max(duration, 1e-6))  # tiles clips shorter than the window
    index = np.abs(times_stored[None, :] - wanted[:, None]).argmin(axis=1)
    frames = np.stack([clip.frame(int(i)) for i in index])  # [T, H, W, 3]
    if sampling.audio_window == "aligned":
        audio = _tile(clip.audio, start, sampling.window_seconds)
    else:
        audio = clip.audio[: int(REFERENCE_AUDIO_SECONDS * SAMPLE_RATE)]
    return frames, audio, times_stored[index], index


def to_inputs(
    frames: np.ndarray,
    audio: np.ndarray,
    config: SocialMAEConfig,
    rng: np.random.Generator | None = None,
    augment: Augment | None = None,
    fbank_stats: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``[T, H, W, 3]`` uint8 and audio ``[N]`` -> fbank ``[1024, 128]``, video
    ``[3, T, H, W]`` (normalised with ``fbank_stats`` or the config's statistics)."""
    if frames.shape[1] != config.image_size or frames.shape[2] != config.image_size:
        raise ValueError(f"frames are {frames.shape[1:3]}, the model takes {config.image_size}")
    feats = fbank(audio, config.num_mel_bins, config.audio_length)  # [1024, 128]
    if augment is not None and rng is not None:
        for axis, widest in ((1, augment.freqm), (0, augment.timem)):
            if widest > 0:
                width = int(rng.integers(0, widest))
                first = int(rng.integers(0, feats.shape[axis] - width + 1))
                feats.narrow(axis, first, width).zero_()
    mean, std = fbank_stats or (config.fbank_mean, config.fbank_std)
    feats = normalize_fbank(feats, mean, std)
    if augment is not None and rng is not None and augment.noise:
        feats = feats + torch.from_numpy(rng.random(feats.shape, dtype=np.float32)) * (
            float(rng.random()) / 10
        )
        feats = torch.roll(feats, int(rng.integers(-feats.shape[0], feats.shape[0])), dims=0)
    return feats, frames_to_video(frames, config.channel_order)


class ShardDataset(torch.utils.data.Dataset):
    """Clips of the shards written by ``crop_faces`` as model inputs.

    Items are dicts: ``audio [1024, 128]``, ``video [3, T, 224, 224]``, ``target [C]`` (one-hot,
    possibly mixed, for classification; trait scores for regression; empty when unlabelled),
    ``label`` (class index, -1 when none), ``clip_id`` and ``index`` (position in the dataset).
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike[str],
        config: SocialMAEConfig,
        split: str | None = None,
        task: TaskSpec | None = None,
        train: bool = False,
        sampling: ClipSampling | None = None,
        augment: Augment | None = None,
        accepted: set[str] | None = None,
        fbank_stats: tuple[float, float] | None = None,
        seed: int = 0,
    ) -> None:
        self.dir = Path(shard_dir)
        table_path = self.dir / CLIPS_TABLE
        if not table_path.is_file():
            raise MediaError(table_path, "no clip table: run crop_faces first")
        table = pd.read_parquet(table_path)
        keep = table["status"] == "ok"
        if split is not None:
            keep &= table["split"] == split
        if accepted is not None:
            keep &= table["clip_id"].isin(accepted)
        if task is not None:
            keep &= table["dataset"] == task.name
        self.table = table[keep].reset_index(drop=True)
        self.config = config
        self.task = task
        self.train = train
        self.sampling = sampling or ClipSampling()
        self.augment = augment
        self.fbank_stats = fbank_stats
        self.seed = seed
        self.epoch = 0
        self._readers: dict[str, ShardReader] = {}

    def __len__(self) -> int:
        return len(self.table)

    def set_epoch(self, epoch: int) -> None:
        """Training windows and augmentation depend on the epoch (deterministically)."""
        self.epoch = epoch

    def _reader(self, shard: str) -> ShardReader:
        if shard not in self._readers:
            self._readers[shard] = ShardReader(self.dir / shard)
        return self._readers[shard]

    def clip(self, index: int) -> _Clip:
        row = self.table.iloc[index]
        reader = self._reader(row["shard"])
        clip_id = row["clip_id"]
        return _Clip(
            meta=reader.meta(clip_id),
            audio=reader.audio(clip_id),
            frame=lambda i: reader.frame(clip_id, i),
        )

    def _target(self, row: pd.Series) -> tuple[torch.Tensor, int]:
        if self.task is None:
            return torch.zeros(0), -1
        if self.task.kind == "regression":
            return torch.tensor(json.loads(row["targets"]), dtype=torch.float32), -1
        label = self.task.labels.index(row["label"]) if row["label"] else -1
        target = torch.zeros(self.task.num_outputs)
        if label >= 0:
            target[label] = 1.0
        return target, label

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        clip = self.clip(index)
        frames, audio, _, _ = sample_clip(clip, self.config, self.sampling, self.train, rng)
        target, label = self._target(self.table.iloc[index])
        augment = self.augment if self.train else None
        if augment is not None and augment.mixup > 0 and rng.random() < augment.mixup:
            other = int(rng.integers(0, len(self)))
            o_frames, o_audio, _, _ = sample_clip(
                self.clip(other), self.config, self.sampling, self.train, rng
            )
            lam = float(rng.beta(10, 10))
            n = min(audio.size, o_audio.size)
            audio = lam * audio[:n] + (1 - lam) * o_audio[:n]
            frames = (lam * frames + (1 - lam) * o_frames).round().astype(np.uint8)
            target = lam * target + (1 - lam) * self._target(self.table.iloc[other])[0]
        feats, video = to_inputs(frames, audio, self.config, rng, augment, self.fbank_stats)
        return {
            "audio": feats,
            "video": video,
            "target": target,
            "label": label,
            "clip_id": self.table.iloc[index]["clip_id"],
            "index": index,
        }


def fbank_statistics(dataset: ShardDataset, max_clips: int | None = None) -> tuple[float, float]:
    """Mean and standard deviation of the raw fbank over a dataset's clips (unpadded frames)."""
    total = total_sq = count = 0.0
    n = len(dataset) if max_clips is None else min(len(dataset), max_clips)
    for index in range(n):
        clip = dataset.clip(index)
        frames = max(1, int(len(clip.audio) / SAMPLE_RATE * 100) - 2)
        feats = fbank(clip.audio, dataset.config.num_mel_bins, dataset.config.audio_length)
        feats = feats[: min(frames, feats.shape[0])].double()
        total += float(feats.sum())
        total_sq += float((feats**2).sum())
        count += feats.numel()
    if count == 0:
        raise ValueError("no clips to compute fbank statistics on")
    mean = total / count
    return mean, max(total_sq / count - mean**2, 1e-12) ** 0.5


def load_clip(
    path: str | os.PathLike[str],
    config: SocialMAEConfig | None = None,
    crop: CropParams | None = None,
    sampling: ClipSampling | None = None,
) -> ClipInputs:
    """Turn any video file into model inputs (evaluation window, the config's preprocessing).

    Faces are detected, tracked and cropped exactly as ``crop_faces`` does (JPEG round trip
    included, so inference sees what training saw). Raises :class:`MediaError` naming the
    file and the reason when the clip cannot be used.
    """
    config = config or get_preset("social-mae-base")
    crop = crop or CropParams(workers=1)
    sampling = sampling or ClipSampling()
    row = {
        "clip_id": Path(path).stem, "dataset": "", "speaker": "", "split": "", "label": "",
        "targets": [], "abs_path": str(path),
    }  # fmt: skip
    record, sample = process_clip(row, crop)
    if sample is None:
        raise MediaError(path, record.reason)
    clip = _Clip(sample.meta, sample.audio, lambda i: decode_jpeg(sample.frames[i]))
    rng = np.random.default_rng(0)
    frames, audio, times, index = sample_clip(clip, config, sampling, False, rng)
    feats, video = to_inputs(frames, audio, config)
    boxes = np.asarray(sample.meta["boxes"], dtype=np.float64)[index]
    return ClipInputs(audio=feats, video=video, times=times, boxes=boxes, clip_id=row["clip_id"])
