"""Scoring fine-tuned models: outputs of every clip of a split, the test predictions file,
the test report (metrics, bootstrap CI, significance against a baseline) and the paired
comparison of modes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from socialmae.data.dataset import ShardDataset
from socialmae.io import atomic_write
from socialmae.model import SocialMAEClassifier
from socialmae.model.social_mae import Mode
from socialmae.tasks import TaskSpec
from socialmae.train import metrics, significance
from socialmae.train.engine import autocast

PREDICTIONS = "predictions.parquet"


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


def save_predictions(path: Path, task: TaskSpec, ids: list[str], targets, outputs) -> None:
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


def test_report(
    task: TaskSpec,
    ids: list[str],
    targets: np.ndarray,
    outputs: np.ndarray,
    out: Path,
    title: str,
    resamples: int,
    permutations: int,
    seed: int,
    baseline: str | None = None,
) -> dict[str, Any]:
    """The test metrics of ``outputs`` ``[N, C]`` against ``targets`` (``[N]`` labels or
    ``[N, C]``), the bootstrap CI of the primary metric, ``out/confusion_matrix.png``
    (classification) and, given the ``baseline`` run directory, a paired permutation test
    against its predictions on the same clips."""
    scores = metrics.evaluate(task, targets, outputs)
    primary = metrics.primary_metric(task)
    low, high = significance.bootstrap_ci(
        metrics.metric_function(task), targets, outputs, resamples,
        seed=seed,
    )  # fmt: skip
    report: dict[str, Any] = {**metrics.scalar_metrics(scores), f"{primary}_ci95": [low, high]}
    if metrics.CONFUSION_MATRIX_KEY in scores:
        metrics.save_confusion_matrix(
            scores[metrics.CONFUSION_MATRIX_KEY], task.labels, out / "confusion_matrix.png",
            title=title,
        )  # fmt: skip
    if baseline:
        base_ids, _, base_outputs = read_predictions(baseline, task)
        order = {clip: i for i, clip in enumerate(base_ids)}
        missing = sorted(set(ids) - set(order))
        if missing or len(base_ids) != len(ids):
            raise ValueError(
                f"baseline {baseline} was tested on other clips ({len(missing)} of ours "
                "missing): a significance test needs the same test set"
            )
        base_outputs = base_outputs[[order[c] for c in ids]]
        test = significance.paired_permutation_test(
            metrics.metric_function(task), targets, outputs, base_outputs,
            permutations, seed=seed,
        )  # fmt: skip
        report["baseline"] = {"run": baseline, f"{primary}": test.metric_b,
                              "difference": test.difference, "p_value": test.p_value,
                              "p_min": test.p_min}  # fmt: skip
    return report


def compare_modes(
    task: TaskSpec,
    predictions: dict[str, tuple[list[str], np.ndarray, np.ndarray]],
    permutations: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Paired permutation test of the primary metric for every pair of modes (same clips);
    ``predictions[mode]`` is ``(ids, targets, outputs)`` as :func:`read_predictions` gives."""
    comparisons = {}
    modes = list(predictions)
    for i, first in enumerate(modes):
        for second in modes[i + 1 :]:
            ids_a, targets, outputs_a = predictions[first]
            ids_b, _, outputs_b = predictions[second]
            test = significance.paired_permutation_test(
                metrics.metric_function(task), targets, outputs_a, outputs_b,
                permutations, seed=seed, clip_ids_a=ids_a, clip_ids_b=ids_b,
            )  # fmt: skip
            comparisons[f"{first}_vs_{second}"] = {
                "difference": test.difference, "p_value": test.p_value, "p_min": test.p_min,
            }  # fmt: skip
    return comparisons
