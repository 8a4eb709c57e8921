"""The loader: shards -> model inputs, and ``load_clip`` for any video file.

Per clip it takes 8 face frames spread over a 4 s window (about 2 fps; a random window in
training, the centred one in evaluation; clips shorter than the window are tiled), the audio
of the same window by default (``audio_window="clip"`` keeps the reference's first 10.24 s of
the file), the Kaldi fbank padded to 1024 frames and normalised, and ImageNet-normalised
frames in RGB (or the reference's BGR). Randomness comes from a per-item generator seeded by
(seed, epoch, index), so runs and resumed runs see the same samples.
"""

from __future__ import annotations

import functools
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
from socialmae.data.crop import CropParams, build_detector, face_track
from socialmae.data.decode import SAMPLE_RATE, decode_audio, probe
from socialmae.data.errors import MediaError
from socialmae.data.faces import FaceDetector
from socialmae.data.features import (
    frames_to_video,
    log_mel,
    normalize_fbank,
    pad_frames,
)
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
class ClipInputs:
    """Model inputs for one clip."""

    audio: torch.Tensor  # [1024, 128] normalised fbank
    video: torch.Tensor | None  # [3, T, S, S] normalised frames (None: the voice only)
    times: np.ndarray  # [T] seconds of the sampled frames
    boxes: np.ndarray  # [T, 3] face square (centre x, centre y, side) in source pixels
    clip_id: str


@dataclass
class _Clip:
    """A stored clip: metadata, audio and lazy frame access."""

    meta: dict[str, Any]
    audio: np.ndarray  # [N] at 16 kHz
    frame: Callable[[int], np.ndarray]  # index -> [H, W, 3] uint8


def _window(duration: float, window: float, train: bool, rng: np.random.Generator | None) -> float:
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


@dataclass
class ClipWindow:
    """The part of a clip the model sees."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    audio: np.ndarray  # [N] at 16 kHz
    times: np.ndarray  # [T] seconds of the frames in the clip
    frame_index: np.ndarray  # [T] positions of the frames among the stored ones
    start: float  # seconds


def sample_clip(
    clip: _Clip,
    config: SocialMAEConfig,
    sampling: ClipSampling,
    train: bool,
    rng: np.random.Generator,
) -> ClipWindow:
    """Pick the window: ``config.num_frames`` frames spread over it and its audio."""
    meta = clip.meta
    duration = float(meta["duration"])
    times_stored = np.asarray(meta["times"], dtype=np.float64)
    start = _window(duration, sampling.window_seconds, train, rng)
    step = sampling.window_seconds / config.num_frames
    wanted = start + (np.arange(config.num_frames) + 0.5) * step
    wanted = np.mod(wanted, max(duration, 1e-6))  # tiles clips shorter than the window
    index = np.abs(times_stored[None, :] - wanted[:, None]).argmin(axis=1)
    frames = np.stack([clip.frame(int(i)) for i in index])  # [T, H, W, 3]
    audio = _audio_window(clip.audio, start, sampling)
    return ClipWindow(frames, audio, times_stored[index], index, start)


def _audio_window(audio: np.ndarray, start: float, sampling: ClipSampling) -> np.ndarray:
    """The audio the model hears ``[N]``: the window from ``start`` (``aligned``), or the
    reference's first 10.24 s."""
    if sampling.audio_window == "aligned":
        return _tile(audio, start, sampling.window_seconds)
    return audio[: int(REFERENCE_AUDIO_SECONDS * SAMPLE_RATE)]


def to_inputs(
    frames: np.ndarray,
    audio: np.ndarray,
    config: SocialMAEConfig,
    rng: np.random.Generator | None = None,
    augment: Augment | None = None,
    fbank_stats: tuple[float, float] | None = None,
    feats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``[T, H, W, 3]`` uint8 and audio ``[N]`` -> fbank ``[L, mel]`` (``L`` the config's
    ``audio_length``), video ``[3, T, S, S]`` (``S`` its ``image_size``; other frame sizes are
    resized), normalised with ``fbank_stats`` or the config's statistics. ``feats`` is the
    raw log-mel of ``audio`` when the caller already has it."""
    if frames.shape[1] != frames.shape[2]:
        raise ValueError(f"face frames must be square, got {frames.shape[1:3]}")
    feats = log_mel(audio, config.num_mel_bins) if feats is None else feats
    real = feats.shape[0]
    feats = pad_frames(feats, config.audio_length)  # [L, mel]
    stats = fbank_stats or (config.fbank_mean, config.fbank_std)
    if augment is not None and rng is not None:
        feats = augment_fbank(feats, real, augment, rng, stats)
        region, flip = crop_region(frames.shape[1], augment, rng)
    else:
        feats, region, flip = normalize_fbank(feats, *stats), None, False
    video = frames_to_video(frames, config.channel_order, config.image_size, region, flip)
    return feats, video


class ShardDataset(torch.utils.data.Dataset):
    """Clips of the shards written by ``crop_faces`` as model inputs.

    Items are dicts: ``audio [L, 128]``, ``video [3, T, S, S]`` (``L = config.audio_length``,
    ``S = config.image_size``; larger crops are resized), ``target [C]`` (one-hot,
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
        cache: bool = False,
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
        self.cache = cache
        self._readers: dict[str, ShardReader] = {}
        self._clips: dict[int, _Clip] = {}
        self._log_mel: dict[tuple[int, float], torch.Tensor] = {}
        if len(self.table):
            size = min(self.clip(0).frame(0).shape[:2])
            self._readers.clear()  # no open files shared with forked loader workers
            self._clips.clear()
            if size < config.image_size:
                raise MediaError(
                    self.dir,
                    f"face crops are {size} px, smaller than the model's image_size "
                    f"{config.image_size}: crop again with crop.image_size >= {config.image_size}",
                )

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
        """Clip ``index`` as stored; with ``cache`` decoded frames stay in memory (per process)."""
        if index in self._clips:
            return self._clips[index]
        row = self.table.iloc[index]
        reader = self._reader(row["shard"])
        clip_id = row["clip_id"]

        def frame(i: int) -> np.ndarray:
            return reader.frame(clip_id, i)

        clip = _Clip(
            meta=reader.meta(clip_id),
            audio=reader.audio(clip_id),
            frame=functools.cache(frame) if self.cache else frame,
        )
        if self.cache:
            self._clips[index] = clip
        return clip

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

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``key``: an index (at the epoch of :meth:`set_epoch`) or ``(epoch, index)``."""
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        rng = np.random.default_rng((self.seed, epoch, index))
        window = sample_clip(self.clip(index), self.config, self.sampling, self.train, rng)
        frames, audio = window.frames, window.audio
        target, label = self._target(self.table.iloc[index])
        augment = self.augment if self.train else None
        feats = None
        if augment is not None and augment.mixup > 0 and rng.random() < augment.mixup:
            other = int(rng.integers(0, len(self)))
            mate = sample_clip(self.clip(other), self.config, self.sampling, self.train, rng)
            lam = float(rng.beta(10, 10))
            n = min(audio.size, mate.audio.size)
            audio = lam * audio[:n] + (1 - lam) * mate.audio[:n]
            frames = (lam * frames + (1 - lam) * mate.frames).round().astype(np.uint8)
            target = lam * target + (1 - lam) * self._target(self.table.iloc[other])[0]
        elif self.cache:
            key = (index, window.start)
            if key not in self._log_mel:
                self._log_mel[key] = log_mel(audio, self.config.num_mel_bins)
            feats = self._log_mel[key]
        feats, video = to_inputs(
            frames, audio, self.config, rng, augment, self.fbank_stats, feats=feats
        )
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
        feats = log_mel(dataset.clip(index).audio, dataset.config.num_mel_bins).double()
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
    need: Literal["both", "audio", "video"] = "both",
    detector: FaceDetector | None = None,
) -> ClipInputs:
    """Turn any media file into model inputs (evaluation window, the config's preprocessing).

    Faces are detected, tracked and cropped by the crop stage's own :func:`face_track` (JPEG
    round trip included, so inference sees what training saw). ``need`` says which streams
    the caller uses: ``audio`` reads only the voice (an audio file will do; ``video`` is then
    None), ``video`` accepts a file without a voice. ``detector``: pass one to reuse it over
    many files (else one is built from ``crop`` for this call).

    Raises:
        MediaError: the file cannot be used (naming it and the reason); anything else is a
            bug or a resource error and propagates.
    """
    config = config or get_preset("social-mae-base")
    crop = crop or CropParams(workers=1)
    sampling = sampling or ClipSampling()
    if need == "audio":
        return _load_voice(path, config, sampling, crop.max_seconds)
    track = face_track(path, crop, detector or build_detector(crop), need_audio=need == "both")
    clip = _Clip(track.meta(), track.audio, lambda i: decode_jpeg(track.crops[i]))
    rng = np.random.default_rng(0)
    window = sample_clip(clip, config, sampling, False, rng)
    feats, video = to_inputs(window.frames, window.audio, config)
    boxes = np.asarray(clip.meta["boxes"], dtype=np.float64)[window.frame_index]
    return ClipInputs(
        audio=feats, video=video, times=window.times, boxes=boxes, clip_id=Path(path).stem
    )


def _load_voice(
    path: str | os.PathLike[str], config: SocialMAEConfig, sampling: ClipSampling, seconds: float
) -> ClipInputs:
    """The audio-only inputs of any file with a sound track (no face needed)."""
    info = probe(path)
    if not info.has_audio:
        raise MediaError(path, "no audio stream")
    audio = decode_audio(path, SAMPLE_RATE, seconds)
    if audio.size < SAMPLE_RATE // 10:
        raise MediaError(path, f"too short: {audio.size / SAMPLE_RATE:.2f} s of audio")
    start = _window(audio.size / SAMPLE_RATE, sampling.window_seconds, False, None)
    audio = _audio_window(audio, start, sampling)
    feats = pad_frames(log_mel(audio, config.num_mel_bins), config.audio_length)
    return ClipInputs(
        audio=normalize_fbank(feats, config.fbank_mean, config.fbank_std), video=None,
        times=np.zeros(0), boxes=np.zeros((0, 3)), clip_id=Path(path).stem,
    )  # fmt: skip
