"""Training-ready shards: uncompressed tar files holding, per clip, face frames (JPEG), 16 kHz
audio (16-bit WAV) and metadata (JSON), WebDataset-style (one directory-like key per clip).

A modest number of shard files keeps DVC fast; an uncompressed tar allows random access by
member offset, so a dataset can read any clip without unpacking.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import wave
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from socialmae.data.decode import SAMPLE_RATE
from socialmae.data.errors import MediaError


@dataclass
class ShardSample:
    """One clip as stored in a shard."""

    meta: dict[str, Any]  # clip_id, label, targets, times (s), boxes, ... (JSON-serialisable)
    audio: np.ndarray  # [N] float32 mono at 16 kHz
    frames: list[bytes]  # JPEG-encoded face crops, in time order


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """``[H, W, 3]`` RGB uint8 -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> ``[H, W, 3]`` RGB uint8."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def encode_wav(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """``[N]`` float mono -> 16-bit PCM WAV bytes (clipped to [-1, 1])."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def decode_wav(data: bytes) -> np.ndarray:
    """16-bit PCM mono WAV bytes -> ``[N]`` float32."""
    with wave.open(io.BytesIO(data), "rb") as src:
        pcm = np.frombuffer(src.readframes(src.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32767.0


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | os.PathLike[str], samples: Iterable[ShardSample]) -> int:
    """Write samples to a tar shard atomically; returns how many were written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    count = 0
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            for count, sample in enumerate(samples, start=1):
                key = f"{count - 1:06d}"
                meta = {**sample.meta, "frames": len(sample.frames)}
                _add(tar, f"{key}/meta.json", json.dumps(meta, sort_keys=True).encode())
                _add(tar, f"{key}/audio.wav", encode_wav(sample.audio))
                for i, jpeg in enumerate(sample.frames):
                    _add(tar, f"{key}/{i:05d}.jpg", jpeg)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


@dataclass(frozen=True)
class _Member:
    offset: int
    size: int


class ShardReader:
    """Random access to the clips of one shard (open one per worker process)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._members: dict[str, dict[str, _Member]] = {}
        try:
            with tarfile.open(self.path, mode="r:") as tar:
                for info in tar:
                    if not info.isfile() or "/" not in info.name:
                        raise MediaError(self.path, f"unexpected member {info.name!r}")
                    key, name = info.name.split("/", 1)
                    self._members.setdefault(key, {})[name] = _Member(info.offset_data, info.size)
        except (tarfile.TarError, OSError) as exc:
            raise MediaError(self.path, f"unreadable shard ({exc})") from exc
        self._file: io.BufferedReader | None = None
        self.index: dict[str, str] = {}  # clip_id -> key
        for key in self._members:
            meta = json.loads(self._read(key, "meta.json"))
            self.index[meta["clip_id"]] = key

    def _read(self, key: str, name: str) -> bytes:
        if self._file is None:
            self._file = self.path.open("rb")
        member = self._members[key][name]
        self._file.seek(member.offset)
        return self._file.read(member.size)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:  # file handles do not cross processes
        return {**self.__dict__, "_file": None}

    def meta(self, clip_id: str) -> dict[str, Any]:
        return json.loads(self._read(self.index[clip_id], "meta.json"))

    def audio(self, clip_id: str) -> np.ndarray:
        """``[N]`` float32 at 16 kHz."""
        return decode_wav(self._read(self.index[clip_id], "audio.wav"))

    def frame(self, clip_id: str, index: int) -> np.ndarray:
        """Face crop ``index`` as ``[H, W, 3]`` RGB uint8."""
        return decode_jpeg(self._read(self.index[clip_id], f"{index:05d}.jpg"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
