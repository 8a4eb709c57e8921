"""Self-supervised pretraining (the ``pretrain`` stage): masked reconstruction + contrastive.

Runs under plain ``python`` (one process) and under ``torchrun`` (DDP, one process per GPU,
one or many nodes) with the same code: each rank takes its slice of every global batch,
contrastive negatives are gathered from all ranks, and rank 0 logs and checkpoints. A run
killed at any point resumes from its last checkpoint and ends with the same weights as an
uninterrupted run (the data order, masks and augmentation depend only on seed, epoch and clip).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from socialmae.checkpoints import initialize_from
from socialmae.data.dataset import ShardDataset, fbank_statistics
from socialmae.data.manifest import SPLITS
from socialmae.data.sampling import ClipSampling
from socialmae.io import atomic_write_csv, atomic_write_text
from socialmae.losses import LossWeights, masked_reconstruction_loss, normalize_patches
from socialmae.model import SocialMAE, get_preset
from socialmae.model.config import ActivationCheckpointing
from socialmae.model.masking import AudioMaskMode
from socialmae.params import ParamsError, check_device, check_preset
from socialmae.tracking import Tracker
from socialmae.train import distributed
from socialmae.train.engine import (
    Checkpointer,
    GlobalBatchSampler,
    OptimizerStep,
    OptimParams,
    Position,
    Precision,
    autocast,
    autocast_dtype,
    resume_fingerprint,
    sample_generators,
)

logger = logging.getLogger(__name__)

EXPERIMENT = "socialmae-pretrain"
LOSS_KEYS = ("loss", "loss_mae_audio", "loss_mae_video", "loss_contrastive", "contrastive_accuracy")


@dataclass(frozen=True)
class PretrainParams:
    """``pretrain`` in params.yaml. Defaults are the paper's recipe for ``social-mae-base``."""

    preset: str = "social-mae-base"
    init: str | None = None  # official CAV-MAE/Social-MAE .pth or a saved model directory
    datasets: tuple[str, ...] | None = None  # e.g. [voxceleb2] as in the paper; null: all
    split: str | None = "train"  # clips used (null: every split)
    epochs: int = 25
    max_steps: int | None = None  # stop earlier, after this many optimizer steps
    batch: int = 8  # clips per process per micro-step
    accumulation: int = 1  # micro-steps per optimizer step
    optim: OptimParams = field(default_factory=OptimParams)
    mask_ratio_audio: float = 0.75
    mask_ratio_video: float = 0.75
    audio_mask_mode: AudioMaskMode = "unstructured"
    loss: LossWeights = field(default_factory=LossWeights)
    sampling: ClipSampling = field(default_factory=ClipSampling)
    fbank_stats: Literal["checkpoint", "train"] = "checkpoint"  # or measured on the clips used
    eval_split: str | None = "val"  # held-out clips scored before and after; null: none
    precision: Precision = "auto"
    compile: bool = False
    activation_checkpointing: ActivationCheckpointing | None = None  # none, decoder, encoder,
    # all: recompute those blocks' activations in backward (less memory); null: the preset's
    device: str = "auto"
    workers: int = 2  # DataLoader processes per rank
    checkpoint_every: int = 100  # optimizer steps
    keep_checkpoints: int = 2
    log_every: int = 10  # optimizer steps
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch", "accumulation", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        for name in ("mask_ratio_audio", "mask_ratio_video"):
            if not 0 <= getattr(self, name) < 1:
                raise ParamsError(name, f"expected a ratio in [0, 1), got {getattr(self, name)}")
        for name in ("split", "eval_split"):
            value = getattr(self, name)
            if value is not None and value not in SPLITS:
                raise ParamsError(name, f"expected one of {list(SPLITS)} or null, got {value!r}")
        if self.datasets is not None:
            from socialmae.data.sources.catalog import check_names

            check_names(self.datasets, "datasets")
        check_preset(self.preset)
        check_device(self.device)


@dataclass
class _Interval:
    """Running sums of the logged quantities between two log points."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_KEYS, 0.0))
    count: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, values: dict[str, float], samples: int) -> None:
        for key in LOSS_KEYS:
            self.sums[key] += values[key]
        self.count += 1
        self.samples += samples

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def _resume_fingerprint(
    params: PretrainParams, dataset_size: int, world_size: int, model: SocialMAE
) -> str:
    """Everything that changes the trajectory (not logging or checkpoint cadence), with the
    untrained ``model`` and the code (:func:`~socialmae.train.engine.resume_fingerprint`)."""
    values = asdict(params)
    for key in ("checkpoint_every", "keep_checkpoints", "log_every", "workers", "max_steps",
                "device", "activation_checkpointing"):  # fmt: skip
        values.pop(key)
    return resume_fingerprint({**values, "clips": dataset_size, "world_size": world_size}, model)


def pretrain(
    params: PretrainParams,
    shards: str | os.PathLike[str],
    out: str | os.PathLike[str],
    accepted: set[str] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Pretrain on the clips of ``shards`` (``crop_faces`` output); write into ``out``:

    ``model/`` (safetensors + config), ``metrics.json``, ``history.csv`` (per log step, for DVC
    plots), ``reconstruction.png`` (Fig. 2), and ``checkpoints/`` (resumable state). Returns
    the metrics. ``accepted`` restricts the clips (the validation stage's accepted ids);
    runs are logged to ``tracking_uri`` (see :func:`socialmae.tracking.resolve_tracking_uri`).
    """
    out = Path(out)
    ctx = distributed.setup(params.device)
    try:
        return _pretrain(params, Path(shards), out, accepted, tracking_uri, ctx)
    finally:
        distributed.teardown()


def _pretrain(
    params: PretrainParams,
    shards: Path,
    out: Path,
    accepted: set[str] | None,
    tracking_uri: str | None,
    ctx: distributed.DistributedContext,
) -> dict[str, Any]:
    torch.manual_seed(params.seed)
    config = get_preset(params.preset)
    if params.fbank_stats == "train":
        probe = ShardDataset(shards, config, split=params.split, accepted=accepted)
        if len(probe):
            mean, std = fbank_statistics(probe)
            config = config.replace(fbank_mean=mean, fbank_std=std)
            logger.info(
                "fbank statistics of the %d clips: mean %.4f std %.4f", len(probe), mean, std
            )
    if params.activation_checkpointing is not None:
        config = config.replace(activation_checkpointing=params.activation_checkpointing)
    model = SocialMAE(config)
    init_report = initialize_from(model, params.init).summary() if params.init else "scratch"
    model.to(ctx.device)
    dataset = ShardDataset(
        shards, config, split=params.split, train=True, sampling=params.sampling,
        accepted=accepted, seed=params.seed,
    )  # fmt: skip
    heldout = None
    if params.eval_split is not None and ctx.is_main:
        heldout = ShardDataset(
            shards, config, split=params.eval_split, sampling=params.sampling, accepted=accepted
        )
        heldout = heldout if len(heldout) > 1 else None
    global_batch = params.batch * ctx.world_size
    if len(dataset) < global_batch * params.accumulation:
        raise ValueError(
            f"{len(dataset)} clips in {shards} (split {params.split!r}) cannot fill one step of "
            f"{global_batch * params.accumulation} clips; lower pretrain.batch or accumulation"
        )
    sampler = GlobalBatchSampler(
        len(dataset), params.batch, ctx.rank, ctx.world_size, params.seed, with_epoch=True
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=params.workers,
        pin_memory=ctx.device.type == "cuda", persistent_workers=params.workers > 0,
    )  # fmt: skip
    steps_per_epoch = len(sampler) // params.accumulation
    total_steps = params.epochs * steps_per_epoch
    if params.max_steps is not None:
        total_steps = min(total_steps, params.max_steps)

    dtype = autocast_dtype(params.precision, ctx.device)
    stepper = OptimizerStep.build(
        model, params.optim, dtype, ctx.device, steps_per_epoch, total_steps
    )
    optimizer, scaler = stepper.optimizer, stepper.scaler
    checkpointer = Checkpointer(
        out / "checkpoints",
        _resume_fingerprint(params, len(dataset), ctx.world_size, model),
        params.keep_checkpoints,
    )
    position, history = Position(), []
    latest = checkpointer.latest()
    before: dict[str, float] | None = None
    resume_run: str | None = None  # the MLflow run of the run being resumed
    if latest is not None:
        position, extra = checkpointer.load(latest, model, optimizer, scaler)
        history, before = extra.get("history", []), extra.get("heldout_before")
        resume_run = extra.get("mlflow_run_id")
    elif heldout is not None:
        before = evaluate_pretraining(model, heldout, params, ctx.device)
    saved_step = position.step

    unused = params.loss.mae == 0 or params.loss.contrastive == 0
    net: torch.nn.Module = model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)
    if params.compile:
        net = torch.compile(net)
    gather = distributed.gather_with_grad if ctx.distributed else None

    tracker = Tracker(enabled=ctx.is_main)
    run_name = f"pretrain-{params.preset}"
    with tracker.run(EXPERIMENT, run_name, tracking_uri, {"stage": "pretrain"}, resume_run):
        tracker.log_params({**asdict(params), "init_report": init_report,
                            "world_size": ctx.world_size, "clips": len(dataset)})  # fmt: skip
        logger.info(
            "pretraining %s on %d clips: %d steps (%d per epoch), global batch %d x %d",
            params.preset, len(dataset), total_steps, steps_per_epoch, global_batch,
            params.accumulation,
        )  # fmt: skip
        model.train()
        interval = _Interval()
        run_start, run_samples = time.perf_counter(), 0
        done = position.step >= total_steps

        def save_checkpoint(pos: Position) -> int:
            if ctx.is_main:
                extra = {"history": history, "heldout_before": before,
                         "mlflow_run_id": tracker.run_id}  # fmt: skip
                checkpointer.save(model, optimizer, scaler, pos, extra)
            distributed.barrier(ctx)
            return pos.step

        epoch = position.epoch
        while not done and epoch < params.epochs:
            start_batch = position.batch_in_epoch if epoch == position.epoch else 0
            sampler.set_epoch(epoch, start_batch)
            dataset.set_epoch(epoch)
            micro, batch_index = 0, start_batch
            for batch in loader:
                if batch_index >= steps_per_epoch * params.accumulation:
                    break  # micro-batches that cannot complete an optimizer step
                gens = sample_generators(params.seed, epoch, batch["index"].tolist(), ctx.device)
                audio = batch["audio"].to(ctx.device, non_blocking=True)
                video = batch["video"].to(ctx.device, non_blocking=True)
                last_micro = micro == params.accumulation - 1
                with distributed.maybe_no_sync(net, not last_micro), autocast(dtype, ctx.device):
                    result = net(
                        audio, video, params.mask_ratio_audio, params.mask_ratio_video,
                        params.loss, params.audio_mask_mode, generator=gens, gather=gather,
                    )  # fmt: skip
                    parts = {k: getattr(result, k).detach().float() for k in LOSS_KEYS}
                    stepper.backward(result.loss, position.step, parts, params.accumulation)
                interval.add({k: float(v) for k, v in parts.items()}, global_batch)
                micro += 1
                batch_index += 1
                if not last_micro:
                    continue
                micro = 0
                lr = stepper.step(position.step)
                position = Position(position.step + 1, epoch, batch_index)
                if position.step % params.log_every == 0 or position.step == total_steps:
                    means = dict(
                        zip(LOSS_KEYS, distributed.all_reduce_mean(
                            list(interval.means().values()), ctx), strict=True)
                    )  # fmt: skip
                    seconds = time.perf_counter() - interval.started
                    row = {"step": position.step, "epoch": epoch, "lr": lr, **means,
                           "samples_per_second": interval.samples / max(seconds, 1e-9)}  # fmt: skip
                    history.append(row)
                    tracker.log_metrics({k: v for k, v in row.items() if k != "step"},
                                        position.step)  # fmt: skip
                    logger.info(
                        "step %d/%d epoch %d loss %.4f (audio %.4f video %.4f contrastive %.4f "
                        "acc %.2f) lr %.2e %.1f clips/s", position.step, total_steps, epoch,
                        means["loss"], means["loss_mae_audio"], means["loss_mae_video"],
                        means["loss_contrastive"], means["contrastive_accuracy"], lr,
                        row["samples_per_second"],
                    )  # fmt: skip
                    run_samples += interval.samples
                    interval = _Interval()
                if position.step % params.checkpoint_every == 0:
                    saved_step = save_checkpoint(position)
                if position.step >= total_steps:
                    done = True
                    break
            epoch += 1
            if not done:
                position = Position(position.step, epoch, 0)
        if position.step != saved_step:
            save_checkpoint(position)
        seconds = time.perf_counter() - run_start
        metrics = _finish(params, model, dataset, out, history, position, ctx, tracker)
        if heldout is not None:
            metrics["heldout"] = {
                "clips": len(heldout), "split": params.eval_split, "before": before,
                "after": evaluate_pretraining(model, heldout, params, ctx.device),
            }  # fmt: skip
            tracker.log_metrics({f"heldout_{k}": v for k, v in metrics["heldout"]["after"].items()})
        metrics["epochs"] = round(position.step / steps_per_epoch, 3)
        metrics["seconds"] = round(seconds, 2)
        metrics["samples_per_second_run"] = run_samples / max(seconds, 1e-9)
        if ctx.is_main:
            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _finish(
    params: PretrainParams,
    model: SocialMAE,
    dataset: ShardDataset,
    out: Path,
    history: list[dict[str, float]],
    position: Position,
    ctx: distributed.DistributedContext,
    tracker: Tracker,
) -> dict[str, Any]:
    """Rank 0: save the model, the history, the reconstruction figure; return the metrics."""
    from socialmae.figures import save_reconstruction_figure

    first, last = (history[0], history[-1]) if history else ({}, {})
    metrics: dict[str, Any] = {
        "steps": position.step,
        "clips": len(dataset),
        "world_size": ctx.world_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        **{k: last.get(k) for k in LOSS_KEYS},
        **{f"initial_{k}": first.get(k) for k in LOSS_KEYS},
    }
    if not ctx.is_main:
        return metrics
    model.eval()
    model.save_pretrained(out / "model")
    atomic_write_csv(out / "history.csv", history)
    accepted = set(dataset.table["clip_id"])
    view = ShardDataset(dataset.dir, model.config, train=False, sampling=params.sampling,
                        accepted=accepted)  # fmt: skip
    item = view[0]
    save_reconstruction_figure(
        model, item["audio"][None], item["video"][None], out / "reconstruction.png",
        seed=params.seed, mask_ratio=params.mask_ratio_video,
        title=f"{item['clip_id']}: original / masked / reconstructed",
    )  # fmt: skip
    tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, float)})
    tracker.log_artifact(out / "reconstruction.png")
    tracker.log_artifact(out / "history.csv")
    tracker.log_artifact(out / "model", "model")
    return metrics


@torch.no_grad()
def evaluate_pretraining(
    model: SocialMAE,
    dataset: ShardDataset,
    params: PretrainParams,
    device: torch.device,
    batch: int = 16,
) -> dict[str, float]:
    """Held-out checks of a pretraining model on ``dataset`` (evaluation windows, masks fixed
    by ``params.seed``):

    * ``mae_audio`` / ``mae_video``: the masked reconstruction loss, next to
      ``*_mean_baseline``, the loss of predicting every removed patch as the mean of the
      clip's visible patches (a model that learned nothing does no better);
    * ``retrieval_v2a`` / ``retrieval_a2v``: top-1 accuracy of finding a clip's own audio
      among all clips' audio from its video (unmasked pooled unimodal embeddings, centred,
      cosine), and the reverse, next to ``retrieval_chance`` (1 / clips).
    """
    was_training = model.training
    model.eval()
    norm_pix = model.config.norm_pix_loss
    sums = dict.fromkeys(("mae_audio", "mae_video", "mae_audio_mean_baseline",
                          "mae_video_mean_baseline"), 0.0)  # fmt: skip
    pooled_a, pooled_v = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    for item in loader:
        audio, video = item["audio"].to(device), item["video"].to(device)
        gens = sample_generators(params.seed, 0, item["index"].tolist(), device)
        out = model(
            audio, video, params.mask_ratio_audio, params.mask_ratio_video,
            LossWeights(contrastive=0.0), params.audio_mask_mode, generator=gens,
        )  # fmt: skip
        n = audio.shape[0]
        targets = (
            ("audio", model.audio_target(audio), out.mask_audio, out.loss_mae_audio),
            ("video", model.video_target(video), out.mask_video, out.loss_mae_video),
        )
        for name, target, mask, loss in targets:
            target = normalize_patches(target) if norm_pix else target  # [B, L, P]
            visible = (1 - mask).unsqueeze(-1)  # [B, L, 1]
            mean = (target * visible).sum(1, keepdim=True) / visible.sum(1, keepdim=True)
            baseline = masked_reconstruction_loss(mean.expand_as(target), target, mask)
            sums[f"mae_{name}"] += float(loss) * n
            sums[f"mae_{name}_mean_baseline"] += float(baseline) * n
        pooled_a.append(model.features(audio, None, "audio").pooled.float())  # [B, D]
        pooled_v.append(model.features(None, video, "video").pooled.float())
    model.train(was_training)
    clips = len(dataset)
    # Centred before the cosine: the pooled embeddings share a large common component that
    # otherwise makes every video pick the same few audio clips (hubness).
    a, v = torch.cat(pooled_a), torch.cat(pooled_v)  # [N, D]
    a = F.normalize(a - a.mean(0), dim=-1)
    v = F.normalize(v - v.mean(0), dim=-1)
    sim = v @ a.T  # [N video, N audio]
    own = torch.arange(clips, device=sim.device)
    return {
        **{k: v / clips for k, v in sums.items()},
        "retrieval_v2a": float((sim.argmax(dim=1) == own).float().mean()),
        "retrieval_a2v": float((sim.argmax(dim=0) == own).float().mean()),
        "retrieval_chance": 1.0 / clips,
    }
