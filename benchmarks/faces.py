"""Benchmark the RetinaFace MobileNet-0.25 face detector; prints JSON.

Times ``FaceDetector.detect`` end to end (preprocessing, forward pass, decoding, NMS) on
224x224 and 640x480 RGB images (the astronaut photo resized) at batch 1, 8 and 64, and reports
the median milliseconds per image over ``--repeats`` calls after ``--warmup`` calls.

    python benchmarks/faces.py                    # CPU, all torch threads
    python benchmarks/faces.py --threads 1 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch
from PIL import Image
from skimage import data

from socialmae.data.faces import FaceDetector

SIZES = ((224, 224), (640, 480))  # width, height
BATCHES = (1, 8, 64)


def measure(
    detector: FaceDetector, images: list[np.ndarray], warmup: int, repeats: int
) -> dict[str, float]:
    """Median and best milliseconds per image of ``detector.detect(images)``."""
    cuda = detector.device.type == "cuda"
    for _ in range(warmup):
        detector.detect(images)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        detector.detect(images)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000 / len(images))
    return {"ms_per_image": round(statistics.median(times), 2), "best_ms": round(min(times), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    detector = FaceDetector(backbone="mobilenet0.25", device=args.device, batch_size=max(BATCHES))
    photo = Image.fromarray(data.astronaut())
    results: list[dict[str, Any]] = []
    for width, height in SIZES:
        image = np.asarray(photo.resize((width, height), Image.BILINEAR))
        faces = len(detector.detect([image])[0])
        for batch in BATCHES:
            timing = measure(detector, [image] * batch, args.warmup, args.repeats)
            results.append({"size": f"{width}x{height}", "batch": batch, "faces": faces, **timing})
    report = {
        "backbone": "mobilenet0.25",
        "device": str(detector.device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
