"""Training-ready shards in the WebDataset format: uncompressed tar files in which each clip is
one sample, its members sharing one key (``000012``):

* ``<key>.json``: metadata (clip id, dataset, split, label, targets, frame times, boxes, ...),
* ``<key>.wav``: the voice, 16 kHz mono 16-bit PCM,
* ``<key>.fbank.npy``: the log-mel fbank of that stored voice, ``[frames, 128]`` float32 (what
  :func:`socialmae.data.features.log_mel` gives; the loader cuts model windows from it instead
  of recomputing it for every item),
* ``<key>.frames.mp``: the face crops, a MessagePack list of JPEG images in time order.

``webdataset.WebDataset(url)`` (or ``wids``) reads one sample per clip, and
:func:`decode_sample` turns its raw members into a :class:`ShardSample`. :class:`ShardReader`
gives random access by tar member offset (evaluation, index-based training) without unpacking.
A modest number of shard files keeps DVC fast.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import wave
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
import torchvision
from PIL import Image

from socialmae.data.decode import SAMPLE_RATE
from socialmae.data.errors import MediaError
from socialmae.data.features import log_mel, torch_threads
from socialmae.io import atomic_write

FBANK_MEL_BINS = 128  # mel bins of the stored fbank (every model preset's)


@dataclass
class ShardSample:
    """One clip as stored in a shard."""

    meta: dict[str, Any]  # clip_id, label, targets, times (s), boxes, ... (JSON-serialisable)
    audio: np.ndarray  # [N] float32 mono at 16 kHz
    frames: list[bytes]  # JPEG-encoded face crops, in time order
    fbank: np.ndarray | None = None  # [F, 128] log-mel of the stored audio (when read; always
    # written, computed from the 16-bit audio)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """``[H, W, 3]`` RGB uint8 -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> ``[H, W, 3]`` RGB uint8 (libjpeg-turbo through torchvision: the same pixels
    as Pillow's decoder, in about 0.6x the time)."""
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return (
        torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB)
        .permute(1, 2, 0)
        .numpy()
    )


def _pcm16(audio: np.ndarray) -> np.ndarray:
    """``[N]`` float -> ``[N]`` 16-bit samples (clipped to [-1, 1])."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")


def _from_pcm16(pcm: np.ndarray) -> np.ndarray:
    """``[N]`` 16-bit samples -> ``[N]`` float32."""
    return pcm.astype(np.float32) / 32767.0


def encode_wav(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """``[N]`` float mono -> 16-bit PCM WAV bytes (clipped to [-1, 1])."""
    pcm = _pcm16(audio)
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
    return _from_pcm16(pcm)


def stored_fbank(audio: np.ndarray) -> np.ndarray:
    """The fbank a shard stores for ``audio [N]``: ``log_mel`` of the audio as the shard keeps
    it (16-bit), so it equals ``log_mel`` of what :func:`decode_wav` returns; ``[F, 128]``.
    Computed on one thread: the same bytes whatever the machine or the engine."""
    with torch_threads(1):
        return log_mel(_from_pcm16(_pcm16(audio)), FBANK_MEL_BINS).numpy()


def encode_fbank(fbank: np.ndarray) -> bytes:
    """``[F, mel]`` -> ``.npy`` bytes (little-endian float32)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(fbank, dtype="<f4"), allow_pickle=False)
    return buffer.getvalue()


def decode_fbank(data: bytes) -> np.ndarray:
    """``.npy`` bytes -> ``[F, 128]`` float32 (ValueError when it is anything else)."""
    fbank = np.load(io.BytesIO(data), allow_pickle=False)
    if fbank.dtype != np.float32 or fbank.ndim != 2 or fbank.shape[1] != FBANK_MEL_BINS:
        raise ValueError(f"fbank is {fbank.dtype} {fbank.shape}, not float32 [F, {FBANK_MEL_BINS}]")
    return fbank


SHARD_FORMAT = 3  # 1: a directory per clip, a member per frame; 2: one sample; 3: + fbank
META, AUDIO, FBANK, FRAMES = "json", "wav", "fbank.npy", "frames.mp"  # members, by extension
MEMBERS = (META, AUDIO, FBANK, FRAMES)


def sample_key(position: int) -> str:
    """The key of the sample at ``position`` in its shard (no dot: WebDataset splits the key
    from the extension at the first dot of the member's base name)."""
    return f"{position:06d}"


def _split_name(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member name, as WebDataset splits it."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not stem or not dot:
        return "", ""
    return (f"{directory}/{stem}" if directory else stem), extension


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def encode_sample(sample: ShardSample) -> dict[str, bytes]:
    """A clip's members: extension -> bytes (see the module docstring; the fbank is computed
    from ``sample.audio``)."""
    meta = {**sample.meta, "frames": len(sample.frames)}
    return {
        META: json.dumps(meta, sort_keys=True).encode(),
        AUDIO: encode_wav(sample.audio),
        FBANK: encode_fbank(stored_fbank(sample.audio)),
        FRAMES: msgpack.packb(list(sample.frames), use_bin_type=True),
    }


def decode_sample(members: Mapping[str, bytes], source: str | os.PathLike[str] = "") -> ShardSample:
    """A :class:`ShardSample` from a sample's raw members (extension -> bytes), as
    :class:`ShardReader` reads them or ``webdataset.WebDataset(url)`` yields them.

    Raises:
        MediaError: a member is missing or cannot be decoded (naming ``source``).
    """
    missing = [m for m in MEMBERS if m not in members]
    if missing:
        raise MediaError(source, f"sample without {', '.join(missing)}")
    try:
        frames = msgpack.unpackb(members[FRAMES], raw=False)
        return ShardSample(
            json.loads(members[META]), decode_wav(members[AUDIO]), list(frames),
            decode_fbank(members[FBANK]),
        )  # fmt: skip
    except (ValueError, TypeError, EOFError, wave.Error, msgpack.UnpackException) as exc:
        raise MediaError(source, f"undecodable sample ({exc})") from exc


def write_shard(path: str | os.PathLike[str], samples: Iterable[ShardSample]) -> int:
    """Write samples to a tar shard atomically, one WebDataset sample per clip; returns how
    many were written."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with tarfile.open(tmp, mode="w") as tar:
            for count, sample in enumerate(samples, start=1):
                key = sample_key(count - 1)
                for extension, data in encode_sample(sample).items():
                    _add(tar, f"{key}.{extension}", data)

    atomic_write(path, write)
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
                    key, extension = _split_name(info.name)
                    if not info.isfile() or extension not in MEMBERS:
                        raise MediaError(self.path, f"unexpected member {info.name!r}")
                    self._members.setdefault(key, {})[extension] = _Member(
                        info.offset_data, info.size
                    )
        except (tarfile.TarError, OSError) as exc:
            raise MediaError(self.path, f"unreadable shard ({exc})") from exc
        for key, found in self._members.items():
            if len(found) != len(MEMBERS):
                lacking = sorted(set(MEMBERS) - set(found))
                raise MediaError(self.path, f"sample {key!r} lacks {', '.join(lacking)}")
        self._file: io.BufferedReader | None = None
        self._frames: tuple[str, list[bytes]] | None = None  # the last clip's JPEGs
        self.index: dict[str, str] = {}  # clip_id -> key
        for key in self._members:
            self.index[json.loads(self._read(key, META))["clip_id"]] = key

    def _read(self, key: str, extension: str) -> bytes:
        if self._file is None:
            self._file = self.path.open("rb")
        member = self._members[key][extension]
        self._file.seek(member.offset)
        return self._file.read(member.size)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:  # file handles do not cross processes
        return {**self.__dict__, "_file": None, "_frames": None}

    def sample(self, clip_id: str) -> ShardSample:
        """The whole stored clip (the same as :func:`decode_sample` of its WebDataset sample)."""
        key = self.index[clip_id]
        return decode_sample({m: self._read(key, m) for m in MEMBERS}, self.path)

    def meta(self, clip_id: str) -> dict[str, Any]:
        return json.loads(self._read(self.index[clip_id], META))

    def audio(self, clip_id: str) -> np.ndarray:
        """``[N]`` float32 at 16 kHz."""
        return decode_wav(self._read(self.index[clip_id], AUDIO))

    def fbank(self, clip_id: str) -> np.ndarray:
        """``[F, 128]`` float32: the log-mel of :meth:`audio`."""
        data = self._read(self.index[clip_id], FBANK)
        try:
            return decode_fbank(data)
        except (ValueError, EOFError) as exc:
            raise MediaError(self.path, f"undecodable fbank of {clip_id!r} ({exc})") from exc

    def frame(self, clip_id: str, index: int) -> np.ndarray:
        """Face crop ``index`` as ``[H, W, 3]`` RGB uint8."""
        if self._frames is None or self._frames[0] != clip_id:
            packed = self._read(self.index[clip_id], FRAMES)
            self._frames = (clip_id, msgpack.unpackb(packed, raw=False))
        return decode_jpeg(self._frames[1][index])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
