"""Everything that needs a GPU, in one run that prints one JSON document (under 8 minutes on an
H100/H200); ``--smoke`` runs the same code on the CPU with tiny shapes in seconds (the test
suite does, so the suite never rots).

Sections (each reports its own ``seconds``; a section that fails reports ``error`` and the
others still run):

- ``pretrain``: the paper preset, bf16 autocast, fused AdamW, with and without
  ``torch.compile``, at the largest batch that fits (doubling search): samples/s, step time,
  peak memory, MFU from the counted FLOPs;
- ``bf16_vs_fp32``: a few steps from the same weights and data in both precisions, the losses
  side by side and their largest relative gap;
- ``finetune``: the classifier's training step (multimodal) at the paper preset: samples/s;
- ``ddp``: one process per GPU with NCCL (world size 1 still runs the NCCL path; gloo on the
  CPU) training with the all-rank contrastive gather: steps/s and the gathered batch size;
- ``retinaface``: detector frames/s at batch 1, 32, 256;
- ``crop_and_loader``: the crop stage's clips/s on generated demo clips with the detector on
  the device, then the shard loader's clips/s per process against the pretraining step's
  demand (is the GPU starved?).

    python benchmarks/gpu_suite.py > gpu_suite.json     # on a CUDA machine
    python benchmarks/gpu_suite.py --smoke              # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from pretrain_step import PEAK_BF16, count_flops

from socialmae.losses import LossWeights
from socialmae.model import SocialMAE, SocialMAEClassifier, get_preset
from socialmae.train.engine import OptimizerStep, OptimParams, autocast

# Shapes per run kind: the paper's on a GPU, tiny ones for the CPU smoke run.
FULL = {"preset": "social-mae-base", "batches": [16, 32, 64, 128, 256, 512], "steps": 10,
        "agreement_steps": 20, "detector_batches": [1, 32, 256], "identities": 4,
        "repeats": 5}  # fmt: skip
SMOKE = {"preset": "tiny", "batches": [1, 2], "steps": 2, "agreement_steps": 3,
         "detector_batches": [1, 2], "identities": 2, "repeats": 1}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(config: Any, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    audio = torch.randn(batch, config.audio_length, config.num_mel_bins, generator=g)
    video = torch.randn(batch, 3, config.num_frames, config.image_size, config.image_size,
                        generator=g)  # fmt: skip
    return audio.to(device), video.to(device)


def _stepper(
    model: torch.nn.Module, dtype: torch.dtype | None, device: torch.device
) -> OptimizerStep:
    """The training loops' own optimizer step (AdamW, scaler, schedule) with default params."""
    return OptimizerStep.build(model, OptimParams(), dtype, device)


def _time_steps(step: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Median seconds of ``step`` after one warm-up call."""
    step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _pretrain_at(
    config: Any, batch: int, device: torch.device, compile_: bool, steps: int
) -> dict[str, Any]:
    """One batch size: seconds per step, samples/s, peak memory and MFU (CUDA)."""
    torch.manual_seed(0)
    model = SocialMAE(config).to(device).train()
    net = torch.compile(model) if compile_ else model
    audio, video = _inputs(config, batch, device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    stepper = _stepper(model, dtype, device)

    def step() -> None:
        with autocast(dtype, device):
            out = net(audio, video, weights=LossWeights())
        stepper.backward(out.loss, 0, {})
        stepper.step(0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = _time_steps(step, steps, device)
    result = {"batch": batch, "seconds_per_step": round(seconds, 4),
              "samples_per_second": round(batch / seconds, 2),
              "peak_memory_gb": _peak_gb(device),
              "dtype": "bf16-autocast" if dtype else "fp32"}  # fmt: skip
    if device.type == "cuda":
        flops = count_flops(model, audio, video)
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        result["tflops_per_step"] = round(flops / 1e12, 3)
        result["mfu"] = round(flops / seconds / peak, 4) if peak else None
    return result


def pretrain_section(shapes: dict[str, Any], device: torch.device, compile_: bool) -> dict:
    """The largest batch of ``shapes["batches"]`` that fits (doubling until out of memory),
    with its figures."""
    config = get_preset(shapes["preset"])
    best: dict[str, Any] = {}
    for batch in shapes["batches"]:
        try:
            best = _pretrain_at(config, batch, device, compile_, shapes["steps"])
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"largest_batch": best.get("batch"), **best, "compile": compile_}


def agreement_section(shapes: dict[str, Any], device: torch.device) -> dict:
    """The same few steps in fp32 and in bf16 autocast: do the losses agree?"""
    config = get_preset(shapes["preset"])
    audio, video = _inputs(config, shapes["batches"][0], device)
    curves = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = SocialMAE(config).to(device).train()
        stepper = _stepper(model, dtype, device)
        losses = []
        for step in range(shapes["agreement_steps"]):
            with autocast(dtype, device):
                out = model(audio, video, weights=LossWeights(),
                            generator=torch.Generator(device).manual_seed(step))  # fmt: skip
            stepper.backward(out.loss, step, {})
            stepper.step(step)
            losses.append(float(out.loss.detach()))
        curves[name] = losses
    gaps = [
        abs(a - b) / max(abs(a), 1e-8) for a, b in zip(curves["fp32"], curves["bf16"], strict=True)
    ]
    return {"losses": curves, "max_relative_gap": round(max(gaps), 5),
            "within_5_percent": max(gaps) < 0.05}  # fmt: skip


def finetune_section(shapes: dict[str, Any], device: torch.device) -> dict:
    config = get_preset(shapes["preset"])
    batch = shapes["batches"][min(2, len(shapes["batches"]) - 1)]
    torch.manual_seed(0)
    model = SocialMAEClassifier(config, 6).to(device).train()
    audio, video = _inputs(config, batch, device)
    target = torch.randint(0, 6, (batch,), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    stepper = _stepper(model, dtype, device)

    def step() -> None:
        with autocast(dtype, device):
            loss = torch.nn.functional.cross_entropy(model(audio, video).float(), target)
        stepper.backward(loss, 0, {})
        stepper.step(0)

    seconds = _time_steps(step, shapes["steps"], device)
    return {"batch": batch, "samples_per_second": round(batch / seconds, 2),
            "peak_memory_gb": _peak_gb(device)}  # fmt: skip


def _ddp_worker(rank: int, world: int, port: int, shapes: dict, device_type: str, out: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from socialmae.train.distributed import gather_with_grad

    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        config = get_preset(shapes["preset"])
        batch = shapes["batches"][0]
        torch.manual_seed(0)
        model = SocialMAE(config).to(device).train()
        net = DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
        audio, video = _inputs(config, batch, device, seed=rank)
        gathered = gather_with_grad(torch.ones(batch, 1, device=device))
        dtype = torch.bfloat16 if device.type == "cuda" else None
        stepper = _stepper(model, dtype, device)

        def step() -> None:
            with autocast(dtype, device):
                result = net(audio, video, weights=LossWeights(), gather=gather_with_grad)
            stepper.backward(result.loss, 0, {})
            stepper.step(0)

        seconds = _time_steps(step, shapes["steps"], device)
        if rank == 0:
            Path(out).write_text(json.dumps({
                "backend": backend, "world_size": world, "gathered_batch": gathered.shape[0],
                "steps_per_second": round(1 / seconds, 3),
                "samples_per_second": round(world * batch / seconds, 2),
            }))  # fmt: skip
    finally:
        dist.destroy_process_group()


def ddp_section(shapes: dict[str, Any], device: torch.device) -> dict:
    import torch.multiprocessing as mp

    world = torch.cuda.device_count() if device.type == "cuda" else 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ddp.json")
        mp.spawn(_ddp_worker, args=(world, port, shapes, device.type, out), nprocs=world)
        result = json.loads(Path(out).read_text())
    result["gather_ok"] = result["gathered_batch"] == world * shapes["batches"][0]
    return result


def retinaface_section(shapes: dict[str, Any], device: torch.device) -> dict:
    from skimage import data

    from socialmae.data.faces import FaceDetector

    detector = FaceDetector(device=device)
    image = np.ascontiguousarray(data.astronaut()[:480, :480])
    rates = {}
    for batch in shapes["detector_batches"]:
        images = [image] * batch
        seconds = _time_steps(lambda images=images: detector.detect(images), shapes["repeats"],
                              device)  # fmt: skip
        rates[f"batch_{batch}"] = round(batch / seconds, 1)
    return {"frames_per_second": rates, "image": list(image.shape)}


def crop_and_loader_section(
    shapes: dict[str, Any], device: torch.device, demand: float | None
) -> dict[str, Any]:
    """Crop generated demo clips on the device, then read the shards back as training does."""
    from socialmae.data.crop import CropParams
    from socialmae.data.crop_stage import crop_faces
    from socialmae.data.dataset import ShardDataset
    from socialmae.data.sources.demo import prepare_demo

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = prepare_demo(root / "raw", identities=shapes["identities"], sentences=1)
        crop: dict[str, Any] = {}
        for clips in (1, 8):  # the detector's batches within each clip, then across 8 clips
            params = CropParams(workers=1, device=str(device), detector_batch=32 * clips,
                                detector_clips=clips)  # fmt: skip
            metrics = crop_faces(manifest, root / f"faces-{clips}", params)
            frames_per_second = metrics["frames"] / max(metrics["seconds"], 1e-9)
            crop[f"detector_clips_{clips}"] = {
                "clips": metrics["clips"], "clips_per_second": metrics["clips_per_second"],
                "frames_per_second": round(frames_per_second, 1),
                "detector_batch": params.detector_batch,
            }  # fmt: skip
        crop["across_clips_speedup"] = round(
            crop["detector_clips_8"]["frames_per_second"]
            / max(crop["detector_clips_1"]["frames_per_second"], 1e-9), 2,
        )  # fmt: skip
        dataset = ShardDataset(root / "faces-8", get_preset(shapes["preset"]), train=True)
        start = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        per_process = len(dataset) / (time.perf_counter() - start)
    loader = {"clips_per_second_per_process": round(per_process, 1),
              "step_demand_clips_per_second": demand}  # fmt: skip
    if demand:
        loader["processes_needed"] = int(np.ceil(demand / per_process))
        loader["starved_with_cpu_count_workers"] = per_process * (os.cpu_count() or 1) < demand
    return {"crop": crop, "loader": loader}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, seconds")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    shapes = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    report: dict[str, Any] = {
        "benchmark": "gpu_suite", "smoke": args.smoke, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "devices": torch.cuda.device_count() if device.type == "cuda" else 0,
        "preset": shapes["preset"], "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip

    def section(name: str, run: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            value = run()
        except Exception as exc:  # one broken section must not cost the others' figures
            value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        if isinstance(value, dict):
            value["seconds"] = round(time.perf_counter() - start, 1)
        report[name] = value
        print(f"{name}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return value

    eager = section("pretrain", lambda: pretrain_section(shapes, device, compile_=False))
    if args.compile and not args.smoke:
        section("pretrain_compiled", lambda: pretrain_section(shapes, device, compile_=True))
    else:
        report["pretrain_compiled"] = {"skipped": "smoke run" if args.smoke else "--no-compile"}
    section("bf16_vs_fp32", lambda: agreement_section(shapes, device))
    section("finetune", lambda: finetune_section(shapes, device))
    section("ddp", lambda: ddp_section(shapes, device))
    section("retinaface", lambda: retinaface_section(shapes, device))
    demand = eager.get("samples_per_second") if isinstance(eager, dict) else None
    section("crop_and_loader", lambda: crop_and_loader_section(shapes, device, demand))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
