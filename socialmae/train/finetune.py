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
import multiprocessing
import os
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from socialmae.checkpoints import initialize_from, load_checkpoint, read_init_source
from socialmae.data.dataset import ShardDataset, fbank_statistics
from socialmae.data.sampling import Augment, ClipSampling
from socialmae.io import atomic_write, atomic_write_csv, atomic_write_text
from socialmae.lifecycle import die_with_parent
from socialmae.model import SocialMAEClassifier, get_preset
from socialmae.model.config import ActivationCheckpointing
from socialmae.model.social_mae import MODES, Mode
from socialmae.params import ParamsError, check_device, check_preset, deep_merge, from_mapping
from socialmae.tasks import TaskSpec, get_task
from socialmae.tracking import Tracker, ensure_experiment
from socialmae.tracking import task_name as experiment_name
from socialmae.train import distributed, metrics
from socialmae.train.engine import (
    Checkpointer,
    GlobalBatchSampler,
    OptimizerStep,
    OptimParams,
    Position,
    Precision,
    Report,
    autocast,
    autocast_dtype,
    resume_fingerprint,
    test_set_fingerprint,
)
from socialmae.train.evaluation import (
    PREDICTIONS,
    compare_modes,
    predict_dataset,
    read_predictions,
    save_predictions,
    test_report,
)

logger = logging.getLogger(__name__)


MODES_DIR = "modes"  # finetune_modes: one directory per mode


def mode_dir(out: str | os.PathLike[str], mode: str) -> Path:
    """Where :func:`finetune_modes` writing into ``out`` puts the ``mode`` model's outputs."""
    return Path(out) / MODES_DIR / mode


@dataclass(frozen=True)
class FinetuneParams:
    """``finetune`` in params.yaml (per-task overrides under ``finetune_tasks.<task>``)."""

    preset: str = "social-mae-base"  # used only without ``init``
    init: str | None = None  # pretrained model directory or official .pth; null: from scratch
    modes: tuple[Mode, ...] = ("multimodal",)  # each is fine-tuned and scored; the first is tuned
    by_mode: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-mode changes, e.g.
    # {"video": {"batch": 4, "optim": {"lr": 5e-4}}}: modalities learn at different speeds
    epochs: int = 20
    batch: int = 8  # clips per process
    optim: OptimParams = field(default_factory=lambda: OptimParams(lr=1e-4, schedule="constant"))
    head_lr: float = 1e-5  # learning rate of the new head (the paper: 1e-5 CREMA-D/FI, 1e-4 NDC-ME)
    layer_decay: float | None = None  # e.g. 0.75: lr x decay^(depth from the top)
    freeze_encoder: bool = False  # linear probe: only the head trains
    label_smoothing: float = 0.0  # classification
    modality_dropout: float = 0.0  # multimodal mode: the share of steps trained on one stream
    # alone (half audio, half video), so that neither stream can lean on the other
    eval_every: int = 1  # epochs between validations (and checkpoints); the last is always scored
    patience: int | None = None  # stop after this many epochs without a better validation score
    augment: Augment = field(default_factory=Augment)
    sampling: ClipSampling = field(default_factory=ClipSampling)
    fbank_stats: Literal["checkpoint", "train"] = "checkpoint"  # or recompute on the train split
    baseline: str | None = None  # another finetune output directory to test against
    bootstrap_resamples: int = 1000
    permutations: int = 10000
    precision: Precision = "auto"
    activation_checkpointing: ActivationCheckpointing | None = None  # as in pretraining; null:
    # the init checkpoint's (or preset's) setting
    device: str = "auto"
    workers: int = 2
    cache: bool = False  # keep decoded clips in memory in each loader process (small sets)
    parallel_modes: int = 1  # modes fine-tuned at once in separate processes (CPU, one process
    # per group of cores); on GPUs and under torchrun the modes run one after the other
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.by_mode, dict) or not all(
            isinstance(v, dict) for v in self.by_mode.values()
        ):
            raise ValueError(f"by_mode must map modes to mappings, got {self.by_mode!r}")
        unknown = sorted(set(self.by_mode) - set(MODES))
        if unknown:
            raise ValueError(f"by_mode: {unknown[0]!r} is not one of {list(MODES)}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct and not empty, got {list(self.modes)}")
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"modes: {mode!r} is not one of {list(MODES)}")
        for name in ("epochs", "batch", "eval_every", "parallel_modes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or null, got {self.patience}")
        if self.head_lr <= 0:
            raise ValueError(f"head_lr must be positive, got {self.head_lr}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.modality_dropout < 1:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_preset(self.preset)
        check_device(self.device)


def with_overrides(params: FinetuneParams, overrides: Mapping[str, Any]) -> FinetuneParams:
    """``params`` with dotted-key overrides (``optim.lr``, ``augment.mixup``, ``head_lr``),
    validated like params.yaml (an unknown key names itself)."""
    values = asdict(params)
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ParamsError(f"finetune.{dotted}", "no such parameter")
            node = node[key]
        if leaf not in node:
            raise ParamsError(f"finetune.{dotted}", "no such parameter")
        node[leaf] = value
    return from_mapping(FinetuneParams, _lists_to_tuples(values), "finetune")


def params_for_mode(params: FinetuneParams, mode: Mode) -> FinetuneParams:
    """``params`` with ``params.by_mode[mode]`` deep-merged on top (validated like params.yaml;
    the result has no ``by_mode`` of its own)."""
    values = asdict(params)
    values["by_mode"] = {}
    merged = deep_merge(values, params.by_mode.get(mode, {}))
    return from_mapping(FinetuneParams, _lists_to_tuples(merged), f"finetune.by_mode.{mode}")


def _lists_to_tuples(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _lists_to_tuples(v) for k, v in values.items()}
    return list(values) if isinstance(values, tuple) else values


# ----------------------------------------------------------------------------- model


def build_classifier(
    params: FinetuneParams, task: TaskSpec, mode: Mode = "multimodal"
) -> SocialMAEClassifier:
    """A ``mode`` classifier for ``task``: the init checkpoint's architecture and
    preprocessing (or the preset's), its encoder weights, and a fresh head."""
    source = read_init_source(params.init) if params.init else None  # read once
    config = source.config if source is not None else get_preset(params.preset)
    if params.activation_checkpointing is not None:
        config = config.replace(activation_checkpointing=params.activation_checkpointing)
    model = SocialMAEClassifier(config, task.num_outputs, task.kind, task.labels, mode)
    if source is not None:
        report = initialize_from(model, source)
        fresh = [k for k in report.fresh if not k.startswith("mlp_head.")]
        if fresh:
            logger.warning("%d encoder tensors not in %s: %s", len(fresh), params.init, fresh)
    if params.freeze_encoder:
        for name, param in model.named_parameters():
            if not name.startswith("mlp_head."):
                param.requires_grad_(False)
    return model


def step_mode(params: FinetuneParams, mode: Mode, step: int) -> Mode:
    """The streams optimizer step ``step`` trains on: ``mode``, except that a multimodal model
    with ``modality_dropout`` p trains a share p/2 of its steps on the audio alone and p/2 on
    the video alone (the same on every rank and on a resumed run: seeded by step)."""
    if mode != "multimodal" or params.modality_dropout == 0:
        return mode
    draw = float(np.random.default_rng([params.seed, step]).random())
    if draw >= params.modality_dropout:
        return mode
    return "audio" if draw < params.modality_dropout / 2 else "video"


def loss_fn(task: TaskSpec, outputs: torch.Tensor, target: torch.Tensor, smoothing: float):
    """Cross-entropy on (possibly mixed) one-hot targets, or L1 for regression (the paper)."""
    if task.kind == "regression":
        return F.l1_loss(outputs.float(), target.float())
    return F.cross_entropy(outputs.float(), target.float(), label_smoothing=smoothing)


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
    mode: Mode | None = None,
    checkpoints: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Fine-tune a ``mode`` model (default: the first of ``params.modes``; with its
    ``by_mode`` changes) on ``task``'s train split, select on val, score on test; write into
    ``out``:

    ``model/`` (best epoch), ``metrics.json`` (val and test, CIs, significance), ``history.csv``
    (per epoch), ``predictions.parquet`` (test), ``confusion_matrix.png`` (classification),
    and per-epoch resumable state in ``checkpoints`` (default ``out/checkpoints``).
    ``report(epoch, value)`` receives each epoch's validation primary metric (Optuna pruning
    raises from inside it). The run is logged to the MLflow experiment ``socialmae-<task>``
    at ``tracking_uri``. Tuning trials pass ``evaluate_test=False``: they never see the test
    split.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    mode = mode or params.modes[0]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    params = params_for_mode(params, mode)
    out = Path(out)
    checkpoints = Path(checkpoints) if checkpoints is not None else out / "checkpoints"
    ctx = distributed.setup(params.device)
    try:
        return _finetune(
            params, spec, mode, Path(shards), out, checkpoints, accepted, report, tracking_uri,
            evaluate_test, ctx,
        )  # fmt: skip
    finally:
        distributed.teardown()


def finetune_modes(
    params: FinetuneParams,
    task: str | TaskSpec,
    shards: str | os.PathLike[str],
    out: str | os.PathLike[str],
    accepted: set[str] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Fine-tune and score every mode of ``params.modes`` (the rows of the paper's tables).

    Writes ``out/modes/<mode>/`` (see :func:`finetune`; resumable state in
    ``out/checkpoints/<mode>/``), ``out/metrics.json`` (per mode: best epoch, val and test
    metrics with the bootstrap CI; per pair of modes: the paired permutation test on the same
    test clips) and ``out/history.csv`` (per epoch, a column per mode and quantity). Returns
    the ``metrics.json`` content.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    out = Path(out)
    jobs = [
        (params, spec, Path(shards), mode_dir(out, mode), accepted, tracking_uri, mode,
         out / "checkpoints" / mode)
        for mode in params.modes
    ]  # fmt: skip
    processes = min(params.parallel_modes, len(jobs))
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if processes > 1 and single and distributed.resolve_device(params.device).type == "cpu":
        threads = max(1, torch.get_num_threads() // processes)
        logger.info("fine-tuning %d modes in %d processes of %d threads", len(jobs), processes,
                    threads)  # fmt: skip
        ensure_experiment(experiment_name(spec.name), tracking_uri)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            processes, mp_context=context, initializer=_mode_worker_init,
            initargs=(threads, logging.getLogger().getEffectiveLevel()),
        ) as pool:  # fmt: skip
            results = dict(zip(params.modes, pool.map(_finetune_job, jobs), strict=True))
    else:
        results = {job[6]: _finetune_job(job) for job in jobs}
    if not all("test" in r for r in results.values()):  # not the main process
        return {}
    table: dict[str, Any] = {"task": spec.name, "primary_metric": metrics.primary_metric(spec),
                             "modes": list(params.modes), "test_set": None}  # fmt: skip
    predictions = {}
    for mode, result in results.items():
        table[mode] = {k: result[k] for k in ("best_epoch", "val", "test")}
        table["test_set"] = result["test_set"]
        predictions[mode] = read_predictions(mode_dir(out, mode), spec)
    table["comparisons"] = compare_modes(spec, predictions, params.permutations, params.seed)
    histories = {m: pd.read_csv(mode_dir(out, m) / "history.csv") for m in params.modes}
    wide = pd.concat(
        [h.set_index("epoch").add_prefix(f"{m}_") for m, h in histories.items()], axis=1
    ).reset_index()
    atomic_write(out / "history.csv", lambda tmp: wide.to_csv(tmp, index=False))
    atomic_write_text(out / "metrics.json", json.dumps(table, indent=2) + "\n")
    return table


def _mode_worker_init(threads: int, level: int) -> None:
    """A mode process: its share of the cores, and the parent's log level; it dies with the
    stage's process."""
    die_with_parent()
    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _finetune_job(job: tuple[Any, ...]) -> dict[str, Any]:
    params, spec, shards, out, accepted, tracking_uri, mode, checkpoints = job
    return finetune(
        params, spec, shards, out, accepted, tracking_uri=tracking_uri, mode=mode,
        checkpoints=checkpoints,
    )  # fmt: skip


def _finetune(
    params: FinetuneParams,
    task: TaskSpec,
    mode: Mode,
    shards: Path,
    out: Path,
    checkpoints: Path,
    accepted: set[str] | None,
    report: Report | None,
    tracking_uri: str | None,
    evaluate_test: bool,
    ctx: distributed.DistributedContext,
) -> dict[str, Any]:
    torch.manual_seed(params.seed)
    model = build_classifier(params, task, mode)

    def split(name: str, train: bool = False) -> ShardDataset:
        return ShardDataset(
            shards, model.config, split=name, task=task, train=train, sampling=params.sampling,
            augment=params.augment if train else None, accepted=accepted, seed=params.seed,
            cache=params.cache, faces=mode != "audio",
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
        drop_last=len(train_set) >= params.batch * ctx.world_size, with_epoch=True,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, num_workers=params.workers,
        pin_memory=ctx.device.type == "cuda", persistent_workers=params.workers > 0,
    )  # fmt: skip
    steps_per_epoch = len(sampler)
    total_steps = params.epochs * steps_per_epoch
    dtype = autocast_dtype(params.precision, ctx.device)
    stepper = OptimizerStep.build(
        model, params.optim, dtype, ctx.device, steps_per_epoch, total_steps,
        head_prefix="mlp_head.", head_lr=params.head_lr, layer_decay=params.layer_decay,
    )  # fmt: skip
    optimizer, scaler = stepper.optimizer, stepper.scaler
    ignored = ("workers", "device", "cache", "modes", "activation_checkpointing")  # they do not
    # change the trajectory
    resume_key = {k: v for k, v in asdict(params).items() if k not in ignored}
    resume_key = {**resume_key, "task": task.name, "mode": mode, "clips": len(train_set),
                  "world_size": ctx.world_size}  # fmt: skip
    # before the first step: the key names the starting weights (init, preset, seed)
    checkpointer = Checkpointer(checkpoints, resume_fingerprint(resume_key, model), keep=1)
    position, history, best = Position(), [], {"epoch": -1, "value": -np.inf}
    best_dir = checkpoints / "best"  # the best epoch's weights, kept on disk only
    latest = checkpointer.latest()
    resume_run: str | None = None  # the MLflow run of the run being resumed
    if latest is not None:
        position, extra = checkpointer.load(latest, model, optimizer, scaler)
        history, best = extra["history"], extra["best"]
        resume_run = extra.get("mlflow_run_id")

    net: torch.nn.Module = model
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        dropout = mode == "multimodal" and params.modality_dropout > 0  # steps on one stream
        net = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=dropout)
    primary = metrics.primary_metric(task)
    experiment = experiment_name(task.name)
    tracker = Tracker(enabled=ctx.is_main)
    tags = {"stage": "finetune", "task": task.name, "mode": mode}
    with tracker.run(experiment, f"finetune-{task.name}-{mode}", tracking_uri, tags, resume_run):
        tracker.log_params({**asdict(params), "task": task.name, "world_size": ctx.world_size,
                            "clips_train": len(train_set), "clips_val": len(val_set),
                            "clips_test": len(test_set)})  # fmt: skip
        logger.info(
            "fine-tuning %s (%s) on %d/%d/%d clips, %d epochs of %d steps", task.name,
            mode, len(train_set), len(val_set), len(test_set), params.epochs,
            steps_per_epoch,
        )  # fmt: skip
        model.train()
        for epoch in range(position.epoch, params.epochs):
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            started, losses = time.perf_counter(), []
            for batch in loader:
                audio = batch["audio"].to(ctx.device, non_blocking=True)
                video = batch["video"].to(ctx.device, non_blocking=True)
                target = batch["target"].to(ctx.device, non_blocking=True)
                with autocast(dtype, ctx.device):
                    outputs = net(audio, video, step_mode(params, mode, position.step))
                    loss = loss_fn(task, outputs, target, params.label_smoothing)
                stepper.backward(loss, position.step, {"loss": loss.detach()})
                lr = stepper.step(position.step)
                position = Position(position.step + 1, epoch, 0)
                losses.append(float(loss.detach()))
            train_loss = distributed.all_reduce_mean([float(np.mean(losses))], ctx)[0]
            seconds = time.perf_counter() - started
            value = float("nan")
            last = epoch == params.epochs - 1
            if (epoch + 1) % params.eval_every and not last:
                position = Position(position.step, epoch + 1, 0)
                continue
            if ctx.is_main:
                ids, targets, outputs = predict_dataset(
                    model, val_set, mode, params.batch, ctx.device, dtype
                )
                val = metrics.scalar_metrics(metrics.evaluate(task, targets, outputs))
                value = val[primary]
                row = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
                       **{f"val_{k}": v for k, v in val.items()}}  # fmt: skip
                history.append(row)  # no timings: the history is part of a tracked output
                speed = {"samples_per_second": len(train_set) / max(seconds, 1e-9)}
                tracker.log_metrics({**{k: v for k, v in row.items() if k != "epoch"}, **speed},
                                    epoch)  # fmt: skip
                logger.info(
                    "epoch %d train loss %.4f val %s %.4f", epoch, train_loss, primary, value
                )
                if value > best["value"]:
                    best = {"epoch": epoch, "value": value}
                    model.save_pretrained(best_dir)
                position = Position(position.step, epoch + 1, 0)
                checkpointer.save(model, optimizer, scaler, position,
                                  {"history": history, "best": best,
                                   "mlflow_run_id": tracker.run_id})  # fmt: skip
            distributed.barrier(ctx)
            position = Position(position.step, epoch + 1, 0)
            if report is not None and ctx.is_main:
                report(epoch, value)
            stale = (
                ctx.is_main
                and params.patience is not None
                and (epoch - best["epoch"] >= params.patience)
            )
            if distributed.all_reduce_mean([float(stale)], ctx)[0] > 0:
                logger.info("no better %s for %d epochs: stopping", primary, params.patience)
                break

        result: dict[str, Any] = {"task": task.name, "mode": mode,
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
                model, test_set, mode, params.batch, ctx.device, dtype
            )
            save_predictions(out / PREDICTIONS, task, ids, targets, outputs)
            result["test"] = test_report(
                task, ids, targets, outputs, out, f"{task.name} test ({mode})",
                params.bootstrap_resamples, params.permutations, params.seed, params.baseline,
            )  # fmt: skip
            result["test_set"] = test_set_fingerprint(ids)
            tracker.log_metrics({f"test_{k}": v for k, v in result["test"].items()
                                 if isinstance(v, float)})  # fmt: skip
        if ctx.is_main:
            for name in ("history.csv", PREDICTIONS, "confusion_matrix.png"):
                tracker.log_artifact(out / name)
            atomic_write_text(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return result
