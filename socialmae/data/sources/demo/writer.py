"""The demo set itself: which identity says which sentence in which emotion (``demo_specs``),
one clip written as an MP4 with AAC audio (``make_clip``), and the whole set with its
manifest and identity splits (``prepare_demo``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pandas as pd

from socialmae.data.manifest import ManifestRow, read_manifest, write_manifest
from socialmae.data.sources.demo.animation import render_frames
from socialmae.data.sources.demo.faces import face_layout, get_identity, identity_names, voice_kind
from socialmae.data.sources.demo.speech import (
    EMOTION_CODES,
    EMOTION_PROSODY,
    SAMPLE_RATE,
    SENTENCES,
    frame_loudness,
    synthesize_speech,
)
from socialmae.data.sources.splits import assign_speaker_splits
from socialmae.io import atomic_write
from socialmae.lifecycle import die_with_parent
from socialmae.tasks import EMOTIONS

log = logging.getLogger(__name__)


DATASET = "demo"


def write_clip(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    audio: np.ndarray,
    fps: int,
    sample_rate: int = SAMPLE_RATE,
    keyint: int | None = None,
) -> Path:
    """Write RGB uint8 ``frames`` ``[T, H, W, 3]`` and mono float32 ``audio`` ``[N]`` as an
    mp4 (H.264 yuv420p crf 23 veryfast + AAC), atomically (``socialmae.io.atomic_write``).
    ``keyint``: most frames between keyframes (None: x264's 250)."""
    path = Path(path)

    def encode(tmp: Path) -> None:
        with av.open(str(tmp), "w", format="mp4") as container:
            video = container.add_stream("libx264", rate=fps)
            video.width, video.height = frames.shape[2], frames.shape[1]
            video.pix_fmt = "yuv420p"
            # mbtree off: with it, this x264 build's output depends on uninitialised memory
            # (the first encode in a process differs from run to run); without, it does not.
            video.options = {
                "crf": "23",
                "preset": "veryfast",
                "threads": "1",
                "x264-params": "mbtree=0" if keyint is None else f"mbtree=0:keyint={keyint}",
            }
            sound = container.add_stream("aac", rate=sample_rate, layout="mono")
            sound.bit_rate = 64_000
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1, fps)
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
            step = 1024
            for start in range(0, audio.size, step):
                chunk = np.ascontiguousarray(audio[None, start : start + step], dtype=np.float32)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                frame.time_base = Fraction(1, sample_rate)
                container.mux(sound.encode(frame))
            container.mux(sound.encode(None))

    return atomic_write(path, encode)


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one demo clip."""

    clip_id: str
    identity: str
    label: str
    sentence: str  # CREMA-D code
    seed: tuple[int, ...]
    seconds: float
    fps: int
    size: int


def _clip_prosody(spec: ClipSpec, rng: np.random.Generator) -> dict[str, float]:
    base = EMOTION_PROSODY[spec.label]
    identity = get_identity(spec.identity)
    return {
        "pitch": float(np.clip(base.pitch + identity.pitch_offset + rng.normal(0, 3), 0, 100)),
        "range": float(np.clip(base.range + rng.normal(0, 4), 0, 100)),
        "rate": float(base.rate * rng.uniform(0.93, 1.07)),
        "volume": float(np.clip(base.volume * rng.uniform(0.92, 1.08), 0, 200)),
    }


def make_clip(spec: ClipSpec, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Synthesise, animate and encode one clip to ``out_dir/clips/<clip_id>.mp4``.

    Returns the clip's ``extra`` fields (sentence text and the espeak-ng settings used).
    """
    rng = np.random.default_rng(list(spec.seed))
    prosody = _clip_prosody(spec, rng)
    lead = float(rng.uniform(0.08, 0.3))
    identity = get_identity(spec.identity)
    text = SENTENCES[spec.sentence]
    audio = synthesize_speech(
        text,
        voice=identity.voice,
        pitch=round(prosody["pitch"]),
        range_=round(prosody["range"]),
        rate=round(prosody["rate"]),
        volume=round(prosody["volume"]),
        seconds=spec.seconds,
        lead=lead,
        seed=int(rng.integers(1, 2**31 - 1)),
    )
    frames_n = round(spec.seconds * spec.fps)
    loud = frame_loudness(audio, spec.fps, frames_n)
    frames = render_frames(face_layout(spec.identity, spec.size), loud, spec.label, spec.fps, rng)
    write_clip(Path(out_dir) / "clips" / f"{spec.clip_id}.mp4", frames, audio, spec.fps)
    return {
        "sentence": text,
        "sentence_code": spec.sentence,
        "pitch": round(prosody["pitch"]),
        "rate": round(prosody["rate"]),
        "range": round(prosody["range"]),
        "volume": round(prosody["volume"]),
        "voice": identity.voice,
    }


def demo_specs(
    identities: int = 24,
    sentences: int = 1,
    seconds: float = 3.0,
    fps: int = 25,
    size: int = 224,
    seed: int = 0,
) -> list[ClipSpec]:
    """The clips of a demo set (deterministic): as in CREMA-D, every identity speaks each of
    its ``sentences`` sentences in all six emotions, so neither the sentence nor the speaker
    says anything about the label. Identity ``i`` takes the sentences after identity
    ``i - 1``'s (cycling through the 12)."""
    names = identity_names(identities)
    codes = list(SENTENCES)
    if not 1 <= sentences <= len(codes):
        raise ValueError(f"sentences: expected 1..{len(codes)}, got {sentences}")
    specs = []
    for i, identity in enumerate(names):
        for j in range(sentences):
            sentence = codes[(i * sentences + j) % len(codes)]
            for li, label in enumerate(EMOTIONS):
                clip_id = f"{identity}_{sentence}_{EMOTION_CODES[label]}"
                spec = ClipSpec(
                    clip_id, identity, label, sentence, (seed, i, j, li), seconds, fps, size
                )
                specs.append(spec)
    return specs


def _logged(results: Iterable[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """The results in order, with a progress line every tenth (logs, not a terminal bar:
    `make demo` is often piped)."""
    out = []
    step = max(1, total // 10)
    for done, result in enumerate(results, 1):
        out.append(result)
        if done % step == 0 or done == total:
            log.info("demo: %d/%d clips generated", done, total)
    return out


def _make_clip_task(args: tuple[ClipSpec, str]) -> dict[str, Any]:
    return make_clip(*args)


def prepare_demo(
    out_dir: Path,
    identities: int = 24,
    sentences: int = 1,
    seconds: float = 3.0,
    fps: int = 25,
    size: int = 224,
    seed: int = 0,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
    workers: int = 1,
) -> pd.DataFrame:
    """Generate the demo set under ``out_dir`` (``clips/*.mp4`` + ``manifest.parquet``).

    ``identities x sentences x 6`` clips of ``seconds`` at ``fps`` (``size x size`` video,
    16 kHz mono audio; see :func:`demo_specs`); splits are by identity (``splits`` fractions,
    seeded), with both voice kinds on every side when there are enough identities. Same seed,
    same clips; generated clips of other settings are removed. ``workers > 1`` renders clips
    in a spawned process pool. Returns the manifest as :func:`read_manifest` gives it.
    """
    if seconds <= 0 or fps <= 0 or size < 32 or size % 2:
        raise ValueError(
            f"need seconds > 0, fps > 0, even size >= 32; got {seconds}, {fps}, {size}"
        )
    out_dir = Path(out_dir)
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    specs = demo_specs(identities, sentences, seconds, fps, size, seed)
    jobs = [(s, str(out_dir)) for s in specs]
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            min(workers, len(jobs)), mp_context=context, initializer=die_with_parent
        ) as pool:
            extras = _logged(pool.map(_make_clip_task, jobs), len(jobs))
    else:
        extras = _logged(map(_make_clip_task, jobs), len(jobs))
    names = identity_names(identities)
    speaker_split = assign_speaker_splits(names, splits, seed, {n: voice_kind(n) for n in names})
    rows = [
        ManifestRow(
            clip_id=s.clip_id,
            path=f"clips/{s.clip_id}.mp4",
            dataset=DATASET,
            speaker=s.identity,
            split=speaker_split[s.identity],
            label=s.label,
            extra=extra,
        )
        for s, extra in zip(specs, extras, strict=True)
    ]
    write_manifest(rows, out_dir)
    wanted = {f"{s.clip_id}.mp4" for s in specs}
    for stale in (out_dir / "clips").glob("*.mp4"):  # clips of an earlier, other demo set
        if stale.name not in wanted:
            stale.unlink()
    log.info("demo: %d clips of %d identities in %s", len(rows), identities, out_dir)
    return read_manifest(out_dir)
