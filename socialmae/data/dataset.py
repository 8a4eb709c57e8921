"""The loader: the clips of the shards written by ``crop_faces`` as model inputs (what a clip
becomes: :mod:`socialmae.data.sampling`). Randomness comes from a per-item generator seeded by
(seed, epoch, index), so runs and resumed runs see the same samples.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from socialmae.data.clips import CLIPS_TABLE
from socialmae.data.errors import MediaError
from socialmae.data.features import (
    log_mel,
)
from socialmae.data.sampling import Augment, ClipSampling, StoredClip, sample_clip, to_inputs
from socialmae.data.shards import ShardReader
from socialmae.model.config import SocialMAEConfig
from socialmae.tasks import TaskSpec


class ShardDataset(torch.utils.data.Dataset):
    """Clips of the shards written by ``crop_faces`` as model inputs.

    Items are dicts: ``audio [L, 128]``, ``video [3, T, S, S]`` (``L = config.audio_length``,
    ``S = config.image_size``; larger crops are resized), ``target [C]`` (one-hot,
    possibly mixed, for classification; trait scores for regression; empty when unlabelled),
    ``label`` (class index, -1 when none), ``clip_id`` and ``index`` (position in the dataset).
    With ``faces`` False (audio-only models) ``video`` is an empty ``[0]`` tensor: the frames
    are not prepared, and every other value is the same.
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
        faces: bool = True,
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
        # per-item columns as lists: indexing a DataFrame row costs more than the JPEGs
        self._clip_ids: list[str] = self.table["clip_id"].tolist()
        self._shards: list[str] = self.table["shard"].tolist()
        self._targets = [self._target(row) for row in self.table.itertuples(index=False)]
        self.train = train
        self.sampling = sampling or ClipSampling()
        self.augment = augment
        self.fbank_stats = fbank_stats
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self.faces = faces
        self._readers: dict[str, ShardReader] = {}
        self._clips: dict[int, StoredClip] = {}
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

    def clip(self, index: int) -> StoredClip:
        """Clip ``index`` as stored; with ``cache`` decoded frames stay in memory (per process)."""
        if index in self._clips:
            return self._clips[index]
        reader = self._reader(self._shards[index])
        clip_id = self._clip_ids[index]

        def frame(i: int) -> np.ndarray:
            return reader.frame(clip_id, i)

        def fbank() -> np.ndarray:
            return reader.fbank(clip_id)

        clip = StoredClip(
            meta=reader.meta(clip_id),
            audio=reader.audio(clip_id),
            frame=functools.cache(frame) if self.cache else frame,
            fbank=functools.cache(fbank) if self.cache else fbank,
        )
        if self.cache:
            self._clips[index] = clip
        return clip

    def _target(self, row: Any) -> tuple[torch.Tensor, int]:
        """``(target [C], label)`` of a clip table row (see the class docstring)."""
        if self.task is None:
            return torch.zeros(0), -1
        if self.task.kind == "regression":
            return torch.tensor(json.loads(row.targets), dtype=torch.float32), -1
        label = self.task.labels.index(row.label) if row.label else -1
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
        target, label = self._targets[index]
        target = target.clone()  # the item is the caller's
        augment = self.augment if self.train else None
        feats = window.fbank  # cut from the stored fbank where the window allows
        if augment is not None and augment.mixup > 0 and rng.random() < augment.mixup:
            other = int(rng.integers(0, len(self)))
            mate = sample_clip(self.clip(other), self.config, self.sampling, self.train, rng)
            lam = float(rng.beta(10, 10))
            n = min(audio.size, mate.audio.size)
            audio = lam * audio[:n] + (1 - lam) * mate.audio[:n]
            frames = (lam * frames + (1 - lam) * mate.frames).round().astype(np.uint8)
            target = lam * target + (1 - lam) * self._targets[other][0]
            feats = None  # the mixed audio's own
        elif feats is None and self.cache:
            key = (index, window.start)
            if key not in self._log_mel:
                self._log_mel[key] = log_mel(audio, self.config.num_mel_bins)
            feats = self._log_mel[key]
        feats, video = to_inputs(
            frames, audio, self.config, rng, augment, self.fbank_stats, feats, self.faces
        )
        return {
            "audio": feats,
            "video": video,
            "target": target,
            "label": label,
            "clip_id": self._clip_ids[index],
            "index": index,
        }


def fbank_statistics(dataset: ShardDataset, max_clips: int | None = None) -> tuple[float, float]:
    """Mean and standard deviation of the raw fbank over a dataset's clips (unpadded frames)."""
    total = total_sq = count = 0.0
    n = len(dataset) if max_clips is None else min(len(dataset), max_clips)
    for index in range(n):
        clip = dataset.clip(index)
        stored = clip.fbank() if clip.fbank is not None else None
        if stored is not None and stored.shape[1] == dataset.config.num_mel_bins:
            feats = torch.from_numpy(stored).double()  # log_mel of the clip's audio, stored
        else:
            feats = log_mel(clip.audio, dataset.config.num_mel_bins).double()
        total += float(feats.sum())
        total_sq += float((feats**2).sum())
        count += feats.numel()
    if count == 0:
        raise ValueError("no clips to compute fbank statistics on")
    mean = total / count
    return mean, max(total_sq / count - mean**2, 1e-12) ** 0.5
