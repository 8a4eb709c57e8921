"""``load_clip``: any media file -> model inputs, preprocessed exactly as in training (the
crop stage's face track, the evaluation window, the config's features)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from socialmae.data.crop import CropParams, build_detector, face_track
from socialmae.data.decode import SAMPLE_RATE, decode_audio, probe
from socialmae.data.errors import MediaError
from socialmae.data.faces import FaceDetector
from socialmae.data.features import (
    log_mel,
    normalize_fbank,
    pad_frames,
)
from socialmae.data.sampling import (
    ClipSampling,
    StoredClip,
    audio_window,
    sample_clip,
    to_inputs,
    window_start,
)
from socialmae.data.shards import decode_jpeg
from socialmae.model.config import SocialMAEConfig, get_preset


@dataclass
class ClipInputs:
    """Model inputs for one clip."""

    audio: torch.Tensor  # [1024, 128] normalised fbank
    video: torch.Tensor | None  # [3, T, S, S] normalised frames (None: the voice only)
    times: np.ndarray  # [T] seconds of the sampled frames
    boxes: np.ndarray  # [T, 3] face square (centre x, centre y, side) in source pixels
    clip_id: str


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
    clip = StoredClip(track.meta(), track.audio, lambda i: decode_jpeg(track.crops[i]))
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
    start = window_start(audio.size / SAMPLE_RATE, sampling.window_seconds, False, None)
    audio = audio_window(audio, start, sampling)
    feats = pad_frames(log_mel(audio, config.num_mel_bins), config.audio_length)
    return ClipInputs(
        audio=normalize_fbank(feats, config.fbank_mean, config.fbank_std), video=None,
        times=np.zeros(0), boxes=np.zeros((0, 3)), clip_id=Path(path).stem,
    )  # fmt: skip
