"""Benchmark frame sampling with keyframe seeking against decoding every frame; prints JSON.

Writes 8-second H.264 clips (the demo's encoder: 25 fps, crf 23) at 224x224 (VoxCeleb2's
face tracks) and 480x360 (CREMA-D's size) with keyframes every 12, 25 and 250 frames, samples
them at ``crop.frame_rate`` (4 per second) with ``iter_frames(seek=False)`` (the baseline: every
frame decoded) and with seeking, and reports the median milliseconds per clip of each, the
frames the decoder produced, and the speed-up. The two must yield identical frames; the run
fails otherwise.

    python benchmarks/decode.py
    python benchmarks/decode.py --rate 2 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

from socialmae.data.decode import iter_frames
from socialmae.data.sources.demo.writer import write_clip

SIZES = ((224, 224), (480, 360))  # width, height
KEYINTS = (12, 25, 250)
FPS = 25


def moving_frames(width: int, height: int, seconds: float) -> np.ndarray:
    """A drifting colour gradient with texture: ``[T, H, W, 3]`` uint8 that the encoder
    cannot reduce to nothing (every frame differs)."""
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 64, (height + 64, width + 64, 3), dtype=np.uint8)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(int(seconds * FPS)):
        dx, dy = int(20 + 20 * np.sin(t / 9)), int(20 + 20 * np.cos(t / 13))
        base = np.stack([(x + 3 * t) % 256, (y + 2 * t) % 256, (x + y) % 256], axis=-1)
        frames.append((base * 0.75).astype(np.uint8) + texture[dy : dy + height, dx : dx + width])
    return np.stack(frames)


class _Counts(logging.Handler):
    """Collects the 'decoded N frames' debug lines of ``iter_frames``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.decoded: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"decoded (\d+) frames", record.getMessage())
        if found:
            self.decoded.append(int(found.group(1)))


def measure(
    path: Path, rate: float, seek: bool, repeats: int, counts: _Counts
) -> tuple[dict[str, Any], list[tuple[float, np.ndarray]]]:
    """Median milliseconds per clip and frames decoded for one way of sampling ``path``, and
    the frames it yielded."""
    times, frames = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        frames = list(iter_frames(path, rate, seek=seek))
        times.append((time.perf_counter() - start) * 1000)
    figures = {
        "ms_per_clip": round(statistics.median(times), 2),
        "frames_decoded": counts.decoded[-1],
        "frames_yielded": len(frames),
    }
    return figures, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=4.0, help="frames sampled per second")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    counts = _Counts()
    logger = logging.getLogger("socialmae.data.decode")
    logger.addHandler(counts)
    logger.setLevel(logging.DEBUG)
    silence = np.zeros(int(args.seconds * 16_000), dtype=np.float32)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in SIZES:
            frames = moving_frames(width, height, args.seconds)
            for keyint in KEYINTS:
                path = write_clip(Path(tmp) / f"{width}x{height}-{keyint}.mp4", frames, silence,
                                  FPS, keyint=keyint)  # fmt: skip
                in_order, expected = measure(path, args.rate, False, args.repeats, counts)
                seeking, frames_seen = measure(path, args.rate, True, args.repeats, counts)
                same = len(expected) == len(frames_seen) and all(
                    np.array_equal(a, b)
                    for (_, a), (_, b) in zip(expected, frames_seen, strict=True)
                )
                if not same:
                    raise SystemExit(f"{path.name}: seeking yielded other frames")
                results.append({
                    "size": f"{width}x{height}", "keyint": keyint, "in_order": in_order,
                    "seeking": seeking,
                    "speedup": round(in_order["ms_per_clip"] / seeking["ms_per_clip"], 2),
                })  # fmt: skip
    report = {
        "seconds": args.seconds,
        "fps": FPS,
        "rate": args.rate,
        "pyav": av.__version__,
        "cpu": platform.processor() or platform.machine(),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
