"""How the data path's cost grows with the data set; prints JSON.

Generates the demo set at growing sizes (``--sizes``, clips: identities x sentences x 6
emotions, at most 24 identities; ``--seconds`` per clip, 8 s by default: VoxCeleb2's mean
length), runs the crop stage on each in a fresh process (``crop.workers`` processes, 224-pixel
crops: the paper's input) and the loader over the result (one process, one thread: the
per-core figure, training items at the paper preset: 8 frames of 224x224 and a 1024x128 fbank
of a 4 s window per clip), and reports per size: seconds per clip and per video-second, clips/s
per core, peak memory of the stage (its process and its workers), shards and shard bytes per
video-second. The loader is also measured recomputing each window's fbank from the audio (as
before shards stored it), in passes interleaved with the other's: ``speedup`` is the median of
the back-to-back ratios, the figure a noisy shared machine leaves stable. ``growth`` divides the
largest size's per-clip figures by the smallest's: flat cost is 1.0.

``projection`` turns the largest size's figures into VoxCeleb2's (1,128,246 clips, 2,442
hours: the paper's pretraining set) on CPUs: core-hours for the crop stage, terabytes of
shards, and loader cores per clip/s of training. GPU detection and training rates are not
measured here (no GPU on this machine); ``benchmarks/gpu_suite.py`` measures them where one is.

    python benchmarks/data_pipeline.py [--sizes 48 192 768] [--seconds 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

VOXCELEB2_CLIPS = 1_128_246
VOXCELEB2_HOURS = 2442.0

_CROP = """
import json, resource, sys, time
from socialmae.data.crop import CropParams
from socialmae.data.crop_stage import crop_faces
from socialmae.data.manifest import read_manifest
if __name__ == "__main__":
    raw, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start = time.perf_counter()
    metrics = crop_faces(read_manifest(raw), out, CropParams(image_size=224, workers=workers))
    metrics["wall_seconds"] = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    metrics["peak_rss_mb"] = round(max(own, children) / 1024, 1)
    print(json.dumps(metrics))
"""


def _crop(raw: Path, out: Path, workers: int) -> dict[str, Any]:
    """The crop stage in a fresh process (its own peak memory)."""
    done = subprocess.run([sys.executable, "-c", _CROP, str(raw), str(out), str(workers)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _clips_per_second(sets: dict[str, Any], limit: int, rounds: int = 5) -> dict[str, list[float]]:
    """Clips/s of passes over ``limit`` training items of each data set, spread evenly over it
    (the clips are sorted by face, and faces decode at rates up to 22% apart: every size reads
    the same mix), ``rounds`` passes each, interleaved (each round times every set, in
    alternating order) so that a slow spell of a shared machine falls on all of them alike."""
    rates: dict[str, list[float]] = {name: [] for name in sets}
    for data in sets.values():
        for index in range(min(8, len(data))):  # warm: open the shards, first allocations
            data[index]
    for epoch in range(rounds):
        names = list(sets) if epoch % 2 == 0 else list(reversed(sets))
        for name in names:
            data = sets[name]
            n = min(len(data), limit)
            indices = [i * len(data) // n for i in range(n)]
            start = time.perf_counter()
            for index in indices:
                data[(epoch, index)]
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def _loader(shards: Path, limit: int) -> dict[str, float]:
    """Clips/s of one loader process with one thread, training items at the paper preset: as
    it runs (windows cut from the stored fbank) and recomputing each window's fbank, the
    baseline. Rates are the best pass (the least disturbed); the speedup is the median of the
    rounds' ratios, each measured back to back."""
    from socialmae.data.dataset import ShardDataset
    from socialmae.model import get_preset

    class ComputedFbank(ShardDataset):
        def clip(self, index: int) -> Any:
            return dataclasses.replace(super().clip(index), fbank=None)

    config = get_preset("social-mae-base")
    data = ShardDataset(shards, config, train=True)
    rates = _clips_per_second(
        {"stored": data, "computed": ComputedFbank(shards, config, train=True)}, limit
    )
    ratios = [s / c for s, c in zip(rates["stored"], rates["computed"], strict=True)]
    return {
        "clips": min(limit, len(data)),
        "clips_per_second_per_core": round(max(rates["stored"]), 2),
        "computing_the_fbank": round(max(rates["computed"]), 2),
        "speedup": round(statistics.median(ratios), 2),
        "passes_clips_per_second": [round(r, 1) for r in rates["stored"]],
    }


def measure(
    root: Path, clips: int, seconds: float, workers: int, loader_clips: int
) -> dict[str, Any]:
    from socialmae.data.sources.demo import prepare_demo

    raw = root / f"raw-{clips}"
    if clips % 6:
        raise ValueError(f"--sizes: {clips} is not a multiple of 6 (one clip per emotion)")
    identities = max(d for d in range(1, 25) if (clips // 6) % d == 0)  # 24 faces ship
    sentences = clips // 6 // identities
    prepare_demo(raw, identities=identities, sentences=sentences, seconds=seconds, workers=workers)
    faces = root / f"faces-{clips}"
    crop = _crop(raw, faces, workers)
    video_seconds = float(pd.read_parquet(faces / "clips.parquet")["duration"].sum())
    shard_bytes = sum(p.stat().st_size for p in faces.glob("shard-*.tar"))
    result = {
        "clips": crop["clips"],
        "video_seconds": round(video_seconds, 1),
        "crop_seconds": round(crop["wall_seconds"], 2),
        "crop_seconds_per_clip": round(crop["wall_seconds"] / crop["clips"], 4),
        "crop_core_seconds_per_video_second": round(
            crop["wall_seconds"] * workers / video_seconds, 4
        ),
        "crop_clips_per_second_per_core": round(crop["clips"] / crop["wall_seconds"] / workers, 3),
        "crop_peak_rss_mb": crop["peak_rss_mb"],
        "shards": crop["shards"],
        "shard_bytes_per_video_second": round(shard_bytes / video_seconds),
        "loader": _loader(root / f"faces-{clips}", loader_clips),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[48, 192, 768])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each clip")
    parser.add_argument("--workers", type=int, default=2, help="crop processes")
    parser.add_argument("--loader-clips", type=int, default=192, help="clips the loader reads")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict[str, Any] = {
        "benchmark": "data_pipeline", "workers": args.workers, "clip_seconds": args.seconds,
        "sizes": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for clips in args.sizes:
            report["sizes"][str(clips)] = measure(
                Path(tmp), clips, args.seconds, args.workers, args.loader_clips
            )
            print(json.dumps({str(clips): report["sizes"][str(clips)]}), file=sys.stderr)
    small, large = (report["sizes"][str(n)] for n in (min(args.sizes), max(args.sizes)))
    keys = ("crop_seconds_per_clip", "crop_peak_rss_mb", "shard_bytes_per_video_second")
    report["growth"] = {k: round(large[k] / small[k], 3) for k in keys}
    report["growth"]["loader_clips_per_second_per_core"] = round(
        large["loader"]["clips_per_second_per_core"] / small["loader"]["clips_per_second_per_core"],
        3,
    )
    seconds = VOXCELEB2_HOURS * 3600
    per_core = large["loader"]["clips_per_second_per_core"]
    report["projection"] = {
        "dataset": f"VoxCeleb2: {VOXCELEB2_CLIPS} clips, {VOXCELEB2_HOURS:g} hours",
        "crop_cpu_core_hours": round(large["crop_core_seconds_per_video_second"] * seconds / 3600),
        "shards_terabytes": round(large["shard_bytes_per_video_second"] * seconds / 1e12, 2),
        "loader_cores_per_100_clips_per_second": round(100 / per_core, 2),
        "measured_at": f"{max(args.sizes)} clips",
    }
    report["peak_rss_mb_this_process"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
