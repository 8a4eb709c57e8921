"""Supervised fine-tuning per task (the ``finetune@task`` stage) in audio, video or
audiovisual mode, as in the paper's Tables I-III.

The encoder starts from a pretrained model (ours or an official .pth), a fresh LayerNorm +
Linear head is added, and encoder and head get their own learning rates (optionally with
layer-wise decay, or a frozen encoder for a linear probe). Each epoch is scored on the
validation split; the best epoch's weights are kept and scored once on the test split, with
bootstrap confidence intervals and, when a baseline run is given, a paired significance test.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from socialmae.checkpoints import initialize_from, load_checkpoint
from socialmae.data.dataset import Augment, ClipSampling, ShardDataset, fbank_statistics
from socialmae.io import atomic_write, atomic_write_csv, atomic_write_text
from socialmae.model import SocialMAEClassifier, get_preset
from socialmae.model.social_mae import Mode
from socialmae.params import from_mapping
from socialmae.tasks import TaskSpec, get_task
from socialmae.tracking import Tracker
from socialmae.train import distributed, metrics
from socialmae.train.engine import (
    Checkpointer,
    GlobalBatchSampler,
    OptimParams,
    Position,
    Precision,
    Report,
    autocast,
    autocast_dtype,
    build_optimizer,
    check_finite,
    fingerprint,
    grad_scaler,
    lr_multiplier,
    param_groups,
    set_lr,
    test_set_fingerprint,
)

logger = logging.getLogger(__name__)


def experiment_name(task: str) -> str:
    """The MLflow experiment of a task's fine-tuning, tuning and registration runs."""
    return f"socialmae-{task}"


PREDICTIONS = "predictions.parquet"


@dataclass(frozen=True)
class FinetuneParams:
    """``finetune`` in params.yaml (per-task overrides under ``finetune_tasks.<task>``)."""

    preset: str = "social-mae-base"  # used only without ``init``
    init: str | None = None  # pretrained model directory or official .pth; null: from scratch
    mode: Mode = "multimodal"  # multimodal, audio or video
    epochs: int = 20
    batch: int = 8  # clips per process
    optim: OptimParams = field(default_factory=lambda: OptimParams(lr=1e-4, schedule="constant"))
    head_lr: float = 1e-5  # learning rate of the new head (the paper: 1e-5 CREMA-D/FI, 1e-4 NDC-ME)
    layer_decay: float | None = None  # e.g. 0.75: lr x decay^(depth from the top)
    freeze_encoder: bool = False  # linear probe: only the head trains
    label_smoothing: float = 0.0  # classification
    augment: Augment = field(default_factory=Augment)
    sampling: ClipSampling = field(default_factory=ClipSampling)
    fbank_stats: Literal["checkpoint", "train"] = "checkpoint"  # or recompute on the train split
    baseline: str | None = None  # another finetune output directory to test against
    bootstrap_resamples: int = 1000
    permutations: int = 10000
    precision: Precision = "auto"
    device: str = "auto"
    workers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_lr <= 0:
            raise ValueError(f"head_lr must be positive, got {self.head_lr}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        get_preset(self.preset)


def with_overrides(params: FinetuneParams, overrides: Mapping[str, Any]) -> FinetuneParams:
    """``params`` with dotted-key overrides (``optim.lr``, ``augment.mixup``, ``head_lr``),
    validated like params.yaml (an unknown key names itself)."""
    values = asdict(params)
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise KeyError(f"finetune.{dotted}: no such parameter")
            node = node[key]
        if leaf not in node:
            raise KeyError(f"finetune.{dotted}: no such parameter")
        node[leaf] = value
    return from_mapping(FinetuneParams, _lists_to_tuples(values), "finetune")


def _lists_to_tuples(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _lists_to_tuples(v) for k, v in values.items()}
    return list(values) if isinstance(values, tuple) else values


# ----------------------------------------------------------------------------- model


def build_classifier(params: FinetuneParams, task: TaskSpec) -> SocialMAEClassifier:
    """A classifier for ``task``: the init checkpoint's architecture and preprocessing
    (or the preset's), its encoder weights, and a fresh head."""
    config = get_preset(params.preset)
    if params.init:
        config = load_checkpoint(params.init).config
    model = SocialMAEClassifier(config, task.num_outputs, task.kind, task.labels)
    if params.init:
        report = initialize_from(model, params.init)
        fresh = [k for k in report.fresh if not k.startswith("mlp_head.")]
        if fresh:
            logger.warning("%d encoder tensors not in %s: %s", len(fresh), params.init, fresh)
    if params.freeze_encoder:
        for name, param in model.named_parameters():
            if not name.startswith("mlp_head."):
                param.requires_grad_(False)
    return model


def loss_fn(task: TaskSpec, outputs: torch.Tensor, target: torch.Tensor, smoothing: float):
    """Cross-entropy on (possibly mixed) one-hot targets, or L1 for regression (the paper)."""
    if task.kind == "regression":
        return F.l1_loss(outputs.float(), target.float())
    return F.cross_entropy(outputs.float(), target.float(), label_smoothing=smoothing)


@torch.inference_mode()
def predict_dataset(
    model: SocialMAEClassifier,
    dataset: ShardDataset,
    mode: Mode,
    batch: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    workers: int = 0,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Outputs of every clip: ids, targets ``[N, C]`` (or labels ``[N]``) and outputs
    ``[N, C]`` (logits or trait scores)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    was_training = model.training
    model.eval()
    ids, targets, outputs = [], [], []
    for item in loader:
        with autocast(dtype, device):
            out = model(item["audio"].to(device), item["video"].to(device), mode)
        ids.extend(item["clip_id"])
        targets.append(item["label"] if model.task == "classification" else item["target"])
        outputs.append(out.float().cpu())
    model.train(was_training)
    return ids, torch.cat(targets).numpy(), torch.cat(outputs).numpy()


# ----------------------------------------------------------------------------- outputs


def _save_predictions(path: Path, task: TaskSpec, ids: list[str], targets, outputs) -> None:
    frame = pd.DataFrame({"clip_id": ids})
    if task.kind == "classification":
        frame["label"] = [task.labels[i] for i in targets]
        frame["predicted"] = [task.labels[i] for i in outputs.argmax(axis=1)]
        prefix = "logit"
    else:
        for k, name in enumerate(task.labels):
            frame[f"target/{name}"] = targets[:, k]
        prefix = "score"
    for k, name in enumerate(task.labels):
        frame[f"{prefix}/{name}"] = outputs[:, k]
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_predictions(run_dir: str | os.PathLike[str], task: TaskSpec):
    """A finetune output's test predictions: ids, targets, outputs (as in predict_dataset)."""
    frame = pd.read_parquet(Path(run_dir) / PREDICTIONS)
    if task.kind == "classification":
        targets = frame["label"].map(task.labels.index).to_numpy()
        outputs = frame[[f"logit/{n}" for n in task.labels]].to_numpy()
    else:
        targets = frame[[f"target/{n}" for n in task.labels]].to_numpy()
        outputs = frame[[f"score/{n}" for n in task.labels]].to_numpy()
    return frame["clip_id"].tolist(), targets, outputs


def _test_report(
    task: TaskSpec, ids: list[str], targets, outputs, params: FinetuneParams, out: Path
) -> dict[str, Any]:
    scores = metrics.evaluate(task, targets, outputs)
    primary = metrics.primary_metric(task)
    low, high = metrics.bootstrap_ci(
        metrics.metric_function(task), targets, outputs, params.bootstrap_resamples,
        seed=params.seed,
    )  # fmt: skip
    report: dict[str, Any] = {**metrics.scalar_metrics(scores), f"{primary}_ci95": [low, high]}
    if metrics.CONFUSION_MATRIX_KEY in scores:
        metrics.save_confusion_matrix(
            scores[metrics.CONFUSION_MATRIX_KEY], task.labels, out / "confusion_matrix.png",
            title=f"{task.name} test ({params.mode})",
        )  # fmt: skip
    if params.baseline:
        base_ids, _, base_outputs = read_predictions(params.baseline, task)
        order = {clip: i for i, clip in enumerate(base_ids)}
        missing = sorted(set(ids) - set(order))
        if missing or len(base_ids) != len(ids):
            raise ValueError(
                f"baseline {params.baseline} was tested on other clips ({len(missing)} of ours "
                "missing): a significance test needs the same test set"
            )
        base_outputs = base_outputs[[order[c] for c in ids]]
        test = metrics.paired_permutation_test(
            metrics.metric_function(task), targets, outputs, base_outputs,
            params.permutations, seed=params.seed,
        )  # fmt: skip
        report["baseline"] = {"run": params.baseline, f"{primary}": test.metric_b,
                              "difference": test.difference, "p_value": test.p_value,
                              "p_min": test.p_min}  # fmt: skip
    return report


# ----------------------------------------------------------------------------- the loop


def finetune(
    params: FinetuneParams,
    task: str | TaskSpec,
    shards: str | os.PathLike[str],
    out: str | os.PathLike[str],
    accepted: set[str] | None = None,
    report: Report | None = None,
    tracking_uri: str | None = None,
    evaluate_test: bool = True,
) -> dict[str, Any]:
    """Fine-tune on ``task``'s train split, select on val, score on test; write into ``out``:

    ``model/`` (best epoch), ``metrics.json`` (val and test, CIs, significance), ``history.csv``
    (per epoch), ``predictions.parquet`` (test), ``confusion_matrix.png`` (classification),
    and ``checkpoints/`` (per-epoch resumable state). ``report(epoch, value)`` receives each
    epoch's validation primary metric (Optuna pruning raises from inside it). The run is logged
    to the MLflow experiment ``socialmae-<task>`` at ``tracking_uri``. Tuning trials pass
    ``evaluate_test=False``: they never see the test split.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    ctx = distributed.setup(params.device)
    try:
        return _finetune(
            params,
            spec,
            Path(shards),
            Path(out),
            accepted,
            report,
            tracking_uri,
            evaluate_test,
            ctx,
        )
    finally:
        distributed.teardown()


def _finetune(
    params: FinetuneParams,
    task: TaskSpec,
    shards: Path,
    out: Path,
    accepted: set[str] | None,
    report: Report | None,
    tracking_uri: str | None,
    evaluate_test: bool,
    ctx: distributed.DistributedContext,
) -> dict[str, Any]:
    torch.manual_seed(params.seed)
    model = build_classifier(params, task)

    def split(name: str, train: bool = False) -> ShardDataset:
        return ShardDataset(
            shards, model.config, split=name, task=task, train=train, sampling=params.sampling,
            augment=params.augment if train else None, accepted=accepted, seed=params.seed,
        )  # fmt: skip

    train_set = split("train", train=True)
    if params.fbank_stats == "train":
        stats = fbank_statistics(split("train"))
        model.config = model.config.replace(fbank_mean=stats[0], fbank_std=stats[1])
        train_set = split("train", train=True)
    val_set, test_set = split("val"), split("test")
    for name, data in (("train", train_set), ("val", val_set), ("test", test_set)):
        if len(data) == 0:
            raise ValueError(f"no accepted {task.name} clips in the {name} split of {shards}")
    model.to(ctx.device)
    sampler = GlobalBatchSampler(
        len(train_set), params.batch, ctx.rank, ctx.world_size, params.seed,
        drop_last=len(train_set) >= params.batch * ctx.world_size,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, num_workers=params.workers,
        pin_memory=ctx.device.type == "cuda",
    )  # fmt: skip
    steps_per_epoch = len(sampler)
    total_steps = params.epochs * steps_per_epoch
    groups = param_groups(
        model, params.optim.lr, params.optim.weight_decay, head_prefix="mlp_head.",
        head_lr=params.head_lr, layer_decay=params.layer_decay,
    )  # fmt: skip
    optimizer = build_optimizer(groups, params.optim)
    dtype = autocast_dtype(params.precision, ctx.device)
    scaler = grad_scaler(dtype, ctx.device)
    resume_key = {k: v for k, v in asdict(params).items() if k not in ("workers", "device")}
    resume_key = {**resume_key, "task": task.name, "clips": len(train_set),
                  "world_size": ctx.world_size}  # fmt: skip
    checkpointer = Checkpointer(out / "checkpoints", fingerprint(resume_key), keep=1)
    position, history, best = Position(), [], {"epoch": -1, "value": -np.inf}
    best_dir = out / "checkpoints" / "best"  # the best epoch's weights, kept on disk only
    latest = checkpointer.latest()
    if latest is not None:
        position, extra = checkpointer.load(latest, model, optimizer, scaler)
        history, best = extra["history"], extra["best"]

    net: torch.nn.Module = model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
    primary = metrics.primary_metric(task)
    experiment = experiment_name(task.name)
    tracker = Tracker(enabled=ctx.is_main)
    tags = {"stage": "finetune", "task": task.name, "mode": params.mode}
    with tracker.run(experiment, f"finetune-{task.name}-{params.mode}", tracking_uri, tags):
        tracker.log_params({**asdict(params), "task": task.name, "world_size": ctx.world_size,
                            "clips_train": len(train_set), "clips_val": len(val_set),
                            "clips_test": len(test_set)})  # fmt: skip
        logger.info(
            "fine-tuning %s (%s) on %d/%d/%d clips, %d epochs of %d steps", task.name,
            params.mode, len(train_set), len(val_set), len(test_set), params.epochs,
            steps_per_epoch,
        )  # fmt: skip
        model.train()
        for epoch in range(position.epoch, params.epochs):
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            started, losses = time.perf_counter(), []
            for batch in loader:
                lr = set_lr(
                    optimizer,
                    lr_multiplier(position.step, steps_per_epoch, total_steps, params.optim),
                )
                audio = batch["audio"].to(ctx.device, non_blocking=True)
                video = batch["video"].to(ctx.device, non_blocking=True)
                target = batch["target"].to(ctx.device, non_blocking=True)
                with autocast(dtype, ctx.device):
                    outputs = net(audio, video, params.mode)
                    loss = loss_fn(task, outputs, target, params.label_smoothing)
                check_finite(loss, position.step, {"loss": loss.detach()})
                scaler.scale(loss).backward()
                if params.optim.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), params.optim.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                position = Position(position.step + 1, epoch, 0)
                losses.append(float(loss.detach()))
            train_loss = distributed.all_reduce_mean([float(np.mean(losses))], ctx)[0]
            seconds = time.perf_counter() - started
            value = float("nan")
            if ctx.is_main:
                ids, targets, outputs = predict_dataset(
                    model, val_set, params.mode, params.batch, ctx.device, dtype
                )
                val = metrics.scalar_metrics(metrics.evaluate(task, targets, outputs))
                value = val[primary]
                row = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
                       "samples_per_second": len(train_set) / max(seconds, 1e-9),
                       **{f"val_{k}": v for k, v in val.items()}}  # fmt: skip
                history.append(row)
                tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
                logger.info(
                    "epoch %d train loss %.4f val %s %.4f", epoch, train_loss, primary, value
                )
                if value > best["value"]:
                    best = {"epoch": epoch, "value": value}
                    model.save_pretrained(best_dir)
                position = Position(position.step, epoch + 1, 0)
                checkpointer.save(
                    model, optimizer, scaler, position, {"history": history, "best": best}
                )
            distributed.barrier(ctx)
            position = Position(position.step, epoch + 1, 0)
            if report is not None and ctx.is_main:
                report(epoch, value)

        result: dict[str, Any] = {"task": task.name, "mode": params.mode,
                                  "primary_metric": primary, "best_epoch": best["epoch"],
                                  "steps": position.step}  # fmt: skip
        if ctx.is_main:
            chosen = history[-1]
            if best["epoch"] >= 0:  # else every validation score was NaN: keep the last epoch
                model.load_state_dict(load_checkpoint(best_dir).state_dict())
                chosen = next(row for row in history if row["epoch"] == best["epoch"])
            model.eval()
            model.save_pretrained(out / "model")
            atomic_write_csv(out / "history.csv", history)
            result["val"] = {k[len("val_") :]: v for k, v in chosen.items() if k.startswith("val_")}
        if ctx.is_main and evaluate_test:
            ids, targets, outputs = predict_dataset(
                model, test_set, params.mode, params.batch, ctx.device, dtype
            )
            _save_predictions(out / PREDICTIONS, task, ids, targets, outputs)
            result["test"] = _test_report(task, ids, targets, outputs, params, out)
            result["test_set"] = test_set_fingerprint(ids)
            tracker.log_metrics({f"test_{k}": v for k, v in result["test"].items()
                                 if isinstance(v, float)})  # fmt: skip
        if ctx.is_main:
            for name in ("history.csv", PREDICTIONS, "confusion_matrix.png"):
                tracker.log_artifact(out / name)
            atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result
