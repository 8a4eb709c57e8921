"""Benchmark the data path on the generated demo set; prints JSON.

Figures: crop_faces clips/s and frames/s with 1 and 2 worker processes (per-core figures
are the 1-worker ones; the 2-worker ratio is the scaling), loader clips/s for one process
reading shards, fbank milliseconds per 4 s window.

    python benchmarks/data_pipeline.py [--clips-per-label 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from socialmae.data.crop import CropParams, crop_faces
from socialmae.data.dataset import ShardDataset
from socialmae.data.features import fbank
from socialmae.data.sources.demo import prepare_demo
from socialmae.model import get_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=8, help="demo identities (6 clips each)")
    args = parser.parse_args()
    report: dict = {"benchmark": "data_pipeline", "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = prepare_demo(root / "raw", identities=args.identities, sentences=1)
        for workers in (1, 2):
            params = CropParams(workers=workers, clips_per_shard=64)
            metrics = crop_faces(manifest, root / f"faces-{workers}", params)
            report[f"crop_faces_workers_{workers}"] = {
                "clips": metrics["clips"],
                "seconds": metrics["seconds"],
                "clips_per_second": metrics["clips_per_second"],
                "frames_per_second": round(metrics["frames"] / metrics["seconds"], 2),
            }
        one = report["crop_faces_workers_1"]["clips_per_second"]
        two = report["crop_faces_workers_2"]["clips_per_second"]
        report["crop_faces_speedup_2_vs_1_workers"] = round(two / one, 3)

        data = ShardDataset(root / "faces-1", get_preset("social-mae-base"), train=True)
        start = time.perf_counter()
        for index in range(len(data)):
            data[index]
        seconds = time.perf_counter() - start
        report["loader_clips_per_second_one_process"] = round(len(data) / seconds, 2)

        audio = np.random.default_rng(0).uniform(-0.3, 0.3, 64_000).astype(np.float32)
        fbank(audio)
        start = time.perf_counter()
        for _ in range(50):
            fbank(audio)
        report["fbank_ms_per_4s_window"] = round((time.perf_counter() - start) / 50 * 1e3, 2)
    # Assumed, not measured (no GPU here): the paper preset at ~3 steps/s x batch 48 on one
    # H100 consumes ~150 clips/s;
    # the loader workers that takes follow from the per-process figure.
    per_worker = report["loader_clips_per_second_one_process"]
    report["loader_workers_for_150_clips_per_second"] = int(np.ceil(150 / per_worker))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
