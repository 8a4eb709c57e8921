"""Benchmark the real pretraining loop (shards -> DataLoader -> model -> optimizer, logging and
checkpoints included) against the bare model step on pre-loaded tensors; prints JSON.

The ratio ``loop / step`` says how much of the compute the full loop keeps (1.0 = the loader,
logging and checkpoints cost nothing). On CUDA both run bf16 at the paper preset and the loop's
model FLOPs utilisation is reported (FLOPs counted by torch's FLOP counter).

    python benchmarks/train_loop.py                          # tiny preset, CPU, demo shards
    python benchmarks/train_loop.py --preset social-mae-base --batch 32 --workers 8   # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_step import PEAK_BF16, count_flops

from socialmae.losses import LossWeights
from socialmae.model import SocialMAE, get_preset
from socialmae.params import from_mapping
from socialmae.train.engine import OptimizerStep, OptimParams, autocast, autocast_dtype
from socialmae.train.pretrain import PretrainParams, pretrain


def model_step_rate(preset: str, batch: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Samples/s of forward + backward + AdamW on random tensors (no data loading)."""
    torch.manual_seed(0)
    config = get_preset(preset)
    model = SocialMAE(config).to(device).train()
    audio = torch.randn(batch, config.audio_length, config.num_mel_bins, device=device)
    video = torch.randn(batch, 3, config.num_frames, config.image_size, config.image_size,
                        device=device)  # fmt: skip
    dtype = autocast_dtype("auto", device)
    flops = count_flops(model, audio, video)
    stepper = OptimizerStep.build(model, OptimParams(), dtype, device)  # the loops' own step

    def step() -> None:
        with autocast(dtype, device):
            out = model(audio, video, weights=LossWeights())
        stepper.backward(out.loss, 0, {})
        stepper.step(0)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"samples_per_second": batch / seconds, "flops_per_sample": flops / batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/interim/faces", help="crop_faces output")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of the loop")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else
        ("cpu" if args.device == "auto" else args.device)
    )  # fmt: skip
    step = model_step_rate(args.preset, args.batch, max(3, args.steps // 3), device)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        params = from_mapping(PretrainParams, {
            "preset": args.preset, "batch": args.batch, "epochs": 1000, "split": None,
            "max_steps": args.steps, "workers": args.workers, "log_every": args.steps,
            "checkpoint_every": args.steps, "device": str(device),
        }, "pretrain")  # fmt: skip
        metrics = pretrain(params, args.shards, Path(tmp) / "out")
    loop_rate = metrics["samples_per_second_run"]
    result: dict[str, Any] = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu x{torch.get_num_threads()}",
        "dtype": "bf16-autocast" if device.type == "cuda" else "fp32",
        "batch": args.batch,
        "loader_workers": args.workers,
        "loop_steps": metrics["steps"],
        "loop_samples_per_second": round(loop_rate, 3),
        "loop_steps_per_second": round(loop_rate / args.batch, 3),
        "model_step_samples_per_second": round(step["samples_per_second"], 3),
        "loop_over_model_step": round(loop_rate / step["samples_per_second"], 3),
        "model_gflops_per_sample": round(step["flops_per_sample"] / 1e9, 2),
    }  # fmt: skip
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak:
            result["loop_mfu"] = round(loop_rate * step["flops_per_sample"] / peak, 4)
            result["model_step_mfu"] = round(
                step["samples_per_second"] * step["flops_per_sample"] / peak, 4
            )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
