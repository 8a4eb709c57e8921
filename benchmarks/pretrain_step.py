"""Benchmark one Social-MAE pretraining step (forward + backward + optimizer); prints JSON.

Each variant runs in its own process so that peak memory is its own:

- ``baseline``: the published implementation's recipe on our module tree: attention through
  materialised ``softmax(q k^T) v`` (timm 0.4 style) and ``torch.optim.Adam`` (foreach).
- ``socialmae``: ``scaled_dot_product_attention``, the MLP's GELU recomputed in backward,
  fused AdamW with weight decay on matrices only.
- ``preset`` (the goal's measurement, as a user gets it): ``SocialMAE.from_preset`` with the
  preset's defaults and a plain ``torch.optim.Adam``; ``preset-none``, ``preset-decoder``,
  ``preset-encoder`` and ``preset-all`` set ``activation_checkpointing`` to compare its
  choices.

On CPU both run fp32 at ``--batch`` (default 2). With CUDA the ``socialmae`` variant also runs
bf16 autocast at ``--gpu-batch`` and reports samples/s and model FLOPs utilisation.

    python benchmarks/pretrain_step.py                # paper preset, CPU, batch 2
    python benchmarks/pretrain_step.py --preset tiny --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from socialmae import LossWeights, SocialMAE
from socialmae.model.config import get_preset
from socialmae.model.layers import Mlp

# Dense bf16 tensor-core peak per device name fragment, in FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


class AutogradMlp(Mlp):
    """The published MLP: autograd keeps both the GELU input and output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def as_published(model: SocialMAE) -> SocialMAE:
    """Give the baseline the published implementation's MLP memory behaviour."""
    for module in model.modules():
        if type(module) is Mlp:
            module.__class__ = AutogradMlp
    return model


def optimizer_for(model: SocialMAE, variant: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if variant.startswith("baseline"):
        return torch.optim.Adam(params, lr=1e-4, weight_decay=5e-7, betas=(0.95, 0.999))
    if variant.startswith("preset"):
        return torch.optim.Adam(params, lr=1e-4)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)


def count_flops(model: SocialMAE, audio: torch.Tensor, video: torch.Tensor) -> int:
    """Matmul FLOPs of one forward + backward pass (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(audio, video, generator=torch.Generator(audio.device).manual_seed(0)).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    published = args.variant.startswith("baseline")
    overrides: dict[str, Any] = (
        {} if args.variant.startswith("preset") else {"use_sdpa": not published}
    )
    if args.variant.startswith("preset-"):
        overrides["activation_checkpointing"] = args.variant.removeprefix("preset-")
    config = get_preset(args.preset, **overrides)
    model = SocialMAE(config).to(device).train()
    if published:
        as_published(model)
    optimizer = optimizer_for(model, args.variant)
    batch = args.gpu_batch if cuda else args.batch
    g = torch.Generator(device).manual_seed(0)
    audio = torch.randn(batch, config.audio_length, config.num_mel_bins, device=device, generator=g)
    video = torch.randn(
        batch,
        3,
        config.num_frames,
        config.image_size,
        config.image_size,
        device=device,
        generator=g,
    )
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda and args.bf16 else nullcontext()
    flops = count_flops(model, audio, video) if cuda else None

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            out = model(audio, video, weights=LossWeights(), generator=g)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=args.variant != "baseline")
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    seconds = statistics.median(times)
    result: dict[str, Any] = {
        "variant": args.variant,
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()}",
        "dtype": "bf16-autocast" if cuda and args.bf16 else "fp32",
        "batch": batch,
        "seconds_per_step": round(seconds, 4),
        "seconds_per_step_all": [round(t, 4) for t in times],
        "samples_per_second": round(batch / seconds, 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    if cuda:
        result["peak_cuda_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        result["model_tflops_per_step"] = round(flops / 1e12, 3)
        if peak:
            result["mfu"] = round(flops / seconds / peak, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="social-mae-base")
    parser.add_argument("--batch", type=int, default=2, help="CPU batch size")
    parser.add_argument("--gpu-batch", type=int, default=64, help="CUDA batch size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--variants",
        default="baseline,baseline-torch2,socialmae,preset,preset-none,preset-decoder,preset-all",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: both if present)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_worker(args)))
        return
    devices = (
        [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    runs = []
    for device in devices:
        for variant in args.variants.split(","):
            if device == "cuda" and variant.startswith("baseline") and args.preset != "tiny":
                continue  # the materialised-attention baseline is a CPU reference point
            cmd = [sys.executable, __file__, "--variant", variant, "--device", device,
                   "--preset", args.preset, "--batch", str(args.batch),
                   "--gpu-batch", str(args.gpu_batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)] + ([] if args.bf16 else ["--no-bf16"])  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report: dict[str, Any] = {"benchmark": "pretrain_step", "runs": runs}
    cpu = {r["variant"]: r for r in runs if r["device"].startswith("cpu")}
    if (ours := cpu.get("preset")) and (base := cpu.get("baseline")):  # the goal: >= 1.5, <= 0.6
        report["goal_speedup_vs_baseline"] = round(
            base["seconds_per_step"] / ours["seconds_per_step"], 3
        )
        report["goal_peak_rss_ratio_vs_baseline"] = round(
            ours["peak_rss_gb"] / base["peak_rss_gb"], 3
        )
    if ours := cpu.get("socialmae"):
        for name, base in cpu.items():
            if name != "socialmae":
                report[f"cpu_speedup_vs_{name}"] = round(
                    base["seconds_per_step"] / ours["seconds_per_step"], 3
                )
                report[f"cpu_peak_rss_ratio_vs_{name}"] = round(
                    ours["peak_rss_gb"] / base["peak_rss_gb"], 3
                )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
