"""Evaluation metrics for fine-tuning: the one home for the tuner, the promotion gate and notebooks.

Classification (CREMA-D, NDC-ME, demo): accuracy, F1 micro and macro (the paper's "Mi"/"Ma",
Tables I and III), balanced accuracy, per-class F1 and the confusion matrix (rows = true class).
Regression (First Impressions, Table II): per-trait accuracy ``1 - MAE`` with targets in [0, 1],
and its mean over traits. Uncertainty (bootstrap intervals) and significance (paired
randomisation tests) live in :mod:`socialmae.train.significance`.

Inputs may be NumPy arrays, nested sequences or torch tensors (any device); all computation is
NumPy. Classification outputs are scores ``[N, C]`` (logits or probabilities: the prediction is
the argmax, the first class on ties) or integer predicted labels ``[N]``.

Classes absent from a test set: every class of the task's label set counts. Per-class F1 is
``2 TP / (2 TP + FP + FN)``; a class that is neither present nor predicted has ``0 / 0`` and scores
0, and ``f1_macro`` still averages over all ``C`` classes (the same as scikit-learn's
``f1_score(..., labels=range(C), average="macro", zero_division=0)``), so a perfect classifier
on a test set that lacks a class scores below 1. Balanced accuracy (mean recall) averages over the
classes present in the targets only, since recall is undefined without support (as scikit-learn's
``balanced_accuracy_score``). :func:`evaluate` logs a warning naming absent classes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from socialmae.io import atomic_write
from socialmae.tasks import TaskSpec

logger = logging.getLogger(__name__)

Array = Any
"""A NumPy array, a nested sequence or a torch tensor (any device, any dtype)."""

MetricFn = Callable[[Array, Array], float]
"""``metric_fn(targets, outputs) -> float``: one metric of one set of clips."""


@runtime_checkable
class StackedMetricFn(Protocol):
    """A :data:`MetricFn` that also scores many sets of outputs of the same clips in one call
    (the significance tests use it: thousands of permuted sets, one NumPy pass per chunk)."""

    def __call__(self, targets: Array, outputs: Array) -> float: ...

    def stacked(self, targets: Array, outputs: Array) -> NDArray[np.float64]:
        """``targets [N, ...]``, ``outputs [S, N, ...]`` (S sets) -> each set's metric ``[S]``."""
        ...


CONFUSION_MATRIX_KEY = "confusion_matrix"
"""Key of :func:`evaluate`'s only non-scalar entry (classification): counts, rows = true class."""

_PRIMARY = {"classification": "f1_macro", "regression": "mean_accuracy"}


# ---------------------------------------------------------------------------------------------
# Input checks


def as_array(x: Any) -> np.ndarray:
    """A NumPy view of an array-like or a torch tensor (any device, any float dtype)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # bfloat16/float16 have no NumPy dtype
        x = x.numpy()
    return np.asarray(x)


def _integer_labels(x: Any, name: str) -> NDArray[np.int64]:
    labels = as_array(x)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be class labels [N], got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError(f"{name} is empty: no clips to evaluate")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integer class labels, got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


def _check_finite(x: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")


def _classification_inputs(
    targets: Array, outputs: Array, num_classes: int | None
) -> tuple[NDArray[np.int64], NDArray[np.int64], int]:
    """Validated ``(targets [N], predicted labels [N], C)``."""
    true = _integer_labels(targets, "targets")
    out = as_array(outputs)
    if out.ndim == 2:
        if num_classes is not None and out.shape[1] != num_classes:
            raise ValueError(f"outputs have {out.shape[1]} class scores, expected {num_classes}")
        if out.shape[1] == 0:
            raise ValueError("outputs have 0 class scores")
        num_classes = out.shape[1]
        pred = _argmax(out)
    elif out.ndim == 1:
        if num_classes is None:
            raise ValueError("num_classes is required when outputs are labels [N], not scores")
        pred = _integer_labels(out, "outputs")
    else:
        raise ValueError(f"outputs must be scores [N, C] or labels [N], got shape {out.shape}")
    if len(pred) != len(true):
        raise ValueError(
            f"{len(true)} targets but {len(pred)} outputs: they must be the same clips"
        )
    for name, labels in (("targets", true), ("predicted labels", pred)):
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
            )
    return true, pred.astype(np.int64, copy=False), num_classes


def _regression_inputs(targets: Array, predictions: Array) -> tuple[np.ndarray, np.ndarray]:
    """Validated float ``(targets [N, K], predictions [N, K])``; targets must lie in [0, 1]."""
    true = as_array(targets).astype(np.float64, copy=False)
    pred = as_array(predictions).astype(np.float64, copy=False)
    if true.ndim != 2 or pred.ndim != 2:
        raise ValueError(
            f"targets and predictions must be [N, K], got {true.shape} and {pred.shape}"
        )
    if true.shape != pred.shape:
        raise ValueError(f"targets {true.shape} and predictions {pred.shape} differ in shape")
    if true.size == 0:
        raise ValueError(f"no values to evaluate: shape {true.shape}")
    _check_finite(true, "targets")
    _check_finite(pred, "predictions")
    if true.min() < 0 or true.max() > 1:
        raise ValueError(
            f"targets must lie in [0, 1] for accuracy = 1 - MAE, got [{true.min()}, {true.max()}]"
        )
    return true, pred


# ---------------------------------------------------------------------------------------------
# Classification


def _argmax(scores: np.ndarray) -> NDArray[np.int64]:
    """Predicted classes ``[N]`` of finite scores ``[N, C]``; the first class on ties."""
    _check_finite(scores, "outputs")
    return scores.argmax(axis=1).astype(np.int64, copy=False)


def predicted_labels(outputs: Array) -> NDArray[np.int64]:
    """Predicted classes ``[N]``: argmax (first on ties) of scores ``[N, C]``, or labels ``[N]``."""
    out = as_array(outputs)
    if out.ndim == 1:
        return _integer_labels(out, "outputs")
    if out.ndim != 2 or out.shape[1] == 0:
        raise ValueError(f"outputs must be scores [N, C] or labels [N], got shape {out.shape}")
    return _argmax(out)


def _confusion(true: NDArray[np.int64], pred: NDArray[np.int64], c: int) -> NDArray[np.int64]:
    """Counts ``[..., C, C]`` of targets ``[N]`` and predicted labels ``[..., N]`` (one matrix per
    set of predictions), rows = true class, columns = predicted class."""
    sets = pred.shape[:-1]
    offsets = np.arange(int(np.prod(sets)), dtype=np.int64).reshape(*sets, 1) * (c * c)
    counts = np.bincount((offsets + true * c + pred).ravel(), minlength=offsets.size * c * c)
    return counts.reshape(*sets, c, c)


class _Scores(NamedTuple):
    """Each field has the matrices' leading shape ``[...]``; ``f1`` adds the class axis."""

    f1: NDArray[np.float64]  # [..., C]
    f1_micro: NDArray[np.float64]
    f1_macro: NDArray[np.float64]
    balanced_accuracy: NDArray[np.float64]
    accuracy: NDArray[np.float64]


def _scores(matrix: NDArray[np.int64]) -> _Scores:
    """Every classification metric from confusion matrices ``[..., C, C]`` (the only formulas)."""
    tp = np.diagonal(matrix, axis1=-2, axis2=-1).astype(np.float64)  # [..., C]
    support = matrix.sum(axis=-1)  # [..., C] true clips per class
    predicted = matrix.sum(axis=-2)  # [..., C] predicted clips per class
    denom = support + predicted  # = 2 TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)  # [..., C], 0/0 -> 0
    total = matrix.sum(axis=(-2, -1))
    # micro: 2 sum(TP) / (2 sum(TP) + sum(FP) + sum(FN)); single-label => equals accuracy
    micro = 2 * tp.sum(axis=-1) / (support.sum(axis=-1) + predicted.sum(axis=-1))
    present = support > 0  # recall is averaged over the classes present in the targets
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    balanced = recall.sum(axis=-1) / present.sum(axis=-1)
    return _Scores(f1, micro, f1.mean(axis=-1), balanced, tp.sum(axis=-1) / total)


def confusion_matrix(
    targets: Array, outputs: Array, num_classes: int | None = None
) -> NDArray[np.int64]:
    """Counts ``[C, C]``, rows = true class, from targets ``[N]`` and outputs ``[N, C]`` or ``[N]``.

    ``num_classes`` is required when outputs are labels; with scores it defaults to their width.
    """
    return _confusion(*_classification_inputs(targets, outputs, num_classes))


def accuracy(targets: Array, outputs: Array, num_classes: int | None = None) -> float:
    """Fraction of clips ``[N]`` whose predicted class is the true one."""
    return float(_scores(confusion_matrix(targets, outputs, num_classes)).accuracy)


def f1_per_class(
    targets: Array, outputs: Array, num_classes: int | None = None
) -> NDArray[np.float64]:
    """F1 ``[C]`` of each class; 0 for a class neither present nor predicted (see module doc)."""
    return _scores(confusion_matrix(targets, outputs, num_classes)).f1


def f1_macro(targets: Array, outputs: Array, num_classes: int | None = None) -> float:
    """Unweighted mean of the ``C`` per-class F1 scores (the paper's "Ma")."""
    return float(_scores(confusion_matrix(targets, outputs, num_classes)).f1_macro)


def f1_micro(targets: Array, outputs: Array, num_classes: int | None = None) -> float:
    """F1 from pooled TP/FP/FN (the paper's "Mi"); equals accuracy for single-label clips."""
    return float(_scores(confusion_matrix(targets, outputs, num_classes)).f1_micro)


def balanced_accuracy(targets: Array, outputs: Array, num_classes: int | None = None) -> float:
    """Mean recall over the classes present in ``targets`` ``[N]``."""
    return float(_scores(confusion_matrix(targets, outputs, num_classes)).balanced_accuracy)


# ---------------------------------------------------------------------------------------------
# Regression


def _mae(true: np.ndarray, pred: np.ndarray) -> NDArray[np.float64]:
    """MAE ``[..., K]`` of targets ``[N, K]`` and predictions ``[..., N, K]`` (the only formula)."""
    return np.abs(pred - true).mean(axis=-2)


def mean_absolute_error(targets: Array, predictions: Array) -> NDArray[np.float64]:
    """MAE ``[K]`` per target column of targets and predictions ``[N, K]``."""
    return _mae(*_regression_inputs(targets, predictions))


def regression_accuracy(targets: Array, predictions: Array) -> NDArray[np.float64]:
    """Per-trait accuracy ``1 - MAE`` ``[K]`` (the paper's metric; targets ``[N, K]`` in [0, 1])."""
    return 1.0 - mean_absolute_error(targets, predictions)


def mean_accuracy(targets: Array, predictions: Array) -> float:
    """Mean over the ``K`` traits of ``1 - MAE`` (Table II's "Avg.")."""
    return float(regression_accuracy(targets, predictions).mean())


# ---------------------------------------------------------------------------------------------
# Dispatch by task


def primary_metric(task: TaskSpec) -> str:
    """The metric for model selection, pruning and the promotion gate; higher is always better.

    ``f1_macro`` for classification, ``mean_accuracy`` for regression.
    """
    if task.kind not in _PRIMARY:
        raise ValueError(f"task {task.name!r} has unknown kind {task.kind!r}")
    return _PRIMARY[task.kind]


def metric_names(task: TaskSpec) -> tuple[str, ...]:
    """The scalar keys :func:`evaluate` returns for ``task``, in order."""
    if task.kind == "classification":
        head = ("accuracy", "f1_micro", "f1_macro", "balanced_accuracy")
        return head + tuple(f"f1/{name}" for name in task.labels)
    if task.kind == "regression":
        return (
            "mean_accuracy",
            "mae",
            *(f"accuracy/{name}" for name in task.labels),
            *(f"mae/{name}" for name in task.labels),
        )
    raise ValueError(f"task {task.name!r} has unknown kind {task.kind!r}")


def _stacked_metrics(
    task: TaskSpec, true: np.ndarray, pred: np.ndarray
) -> tuple[dict[str, NDArray[np.float64]], NDArray[np.int64] | None]:
    """Every metric of :func:`metric_names`, each ``[S]``, of ``S`` sets of validated outputs of
    the same clips, and the confusion matrices ``[S, C, C]`` (classification).

    classification: ``true [N]`` labels, ``pred [S, N]`` predicted labels;
    regression: ``true [N, K]``, ``pred [S, N, K]``.
    """
    if task.kind == "classification":
        matrix = _confusion(true, pred, task.num_outputs)
        s = _scores(matrix)
        scalars = {
            "accuracy": s.accuracy,
            "f1_micro": s.f1_micro,
            "f1_macro": s.f1_macro,
            "balanced_accuracy": s.balanced_accuracy,
        }
        scalars.update({f"f1/{name}": s.f1[..., i] for i, name in enumerate(task.labels)})
        return scalars, matrix
    if task.kind == "regression":
        if true.shape[1] != task.num_outputs:
            raise ValueError(
                f"task {task.name!r} has {task.num_outputs} targets {task.labels}, "
                f"got {true.shape[1]} columns"
            )
        mae = _mae(true, pred)  # [S, K]
        scalars = {"mean_accuracy": 1.0 - mae.mean(axis=-1), "mae": mae.mean(axis=-1)}
        scalars.update(
            {f"accuracy/{name}": 1.0 - mae[..., i] for i, name in enumerate(task.labels)}
        )
        scalars.update({f"mae/{name}": mae[..., i] for i, name in enumerate(task.labels)})
        return scalars, None
    raise ValueError(f"task {task.name!r} has unknown kind {task.kind!r}")


def _stacked_inputs(
    task: TaskSpec, targets: Array, outputs: Array, sets: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(true, pred)`` for :func:`_stacked_metrics` from targets and one set of outputs
    (``sets`` None) or ``sets`` sets stacked on a leading axis (each checked as one set is)."""
    out = as_array(outputs)
    if sets is not None:
        true = as_array(targets)
        if out.ndim < 2 or out.shape[0] != sets:
            raise ValueError(f"stacked outputs must be [S, N, ...], got shape {out.shape}")
        n = out.shape[1]
        if n != len(true):
            raise ValueError(f"{len(true)} targets but stacked outputs of {n} clips")
        targets = np.tile(true, (sets,) + (1,) * (true.ndim - 1))  # [S * N, ...] as one set
        out = out.reshape(sets * n, *out.shape[2:])
    if task.kind == "classification":
        true, pred = _classification_inputs(targets, out, task.num_outputs)[:2]
    elif task.kind == "regression":
        true, pred = _regression_inputs(targets, out)
    else:
        raise ValueError(f"task {task.name!r} has unknown kind {task.kind!r}")
    count = 1 if sets is None else sets
    return true[: len(true) // count], pred.reshape(count, len(true) // count, *pred.shape[1:])


def _evaluate(
    task: TaskSpec, targets: Array, outputs: Array
) -> tuple[dict[str, float], NDArray[np.int64] | None]:
    """Scalar metrics keyed as :func:`metric_names`, and the confusion matrix (classification)."""
    scalars, matrix = _stacked_metrics(task, *_stacked_inputs(task, targets, outputs, None))
    return (
        {name: float(value[0]) for name, value in scalars.items()},
        None if matrix is None else matrix[0],
    )


def evaluate(task: TaskSpec, targets: Array, outputs: Array) -> dict[str, float | list[list[int]]]:
    """All metrics of one test set as a flat, JSON-serialisable dict.

    Args:
        task: what the labels mean (kind and label names).
        targets: classification: integer labels ``[N]``; regression: ``[N, K]`` in [0, 1].
        outputs: classification: scores/logits/probabilities ``[N, C]`` or labels ``[N]``;
            regression: predictions ``[N, K]``.
    Returns:
        the scalar metrics of :func:`metric_names` (floats), and for classification the
        confusion matrix under :data:`CONFUSION_MATRIX_KEY` as ``[C][C]`` int lists, rows = true
        class. :func:`scalar_metrics` drops it (for MLflow ``log_metrics``).
    """
    scalars, matrix = _evaluate(task, targets, outputs)
    result: dict[str, float | list[list[int]]] = dict(scalars)
    if matrix is not None:
        absent = [name for name, n in zip(task.labels, matrix.sum(axis=1), strict=True) if n == 0]
        if absent:
            logger.warning(
                "task %s: classes %s have no clips in this evaluation set; their F1 counts "
                "as %s in f1_macro and they are left out of balanced_accuracy",
                task.name,
                absent,
                [scalars[f"f1/{name}"] for name in absent],
            )
        result[CONFUSION_MATRIX_KEY] = matrix.tolist()
    return result


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of an :func:`evaluate` result (what MLflow and the gate compare)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


@dataclass(frozen=True)
class TaskMetric:
    """One :func:`evaluate` key of a task as a :class:`StackedMetricFn`."""

    task: TaskSpec
    name: str

    def __repr__(self) -> str:  # the task's whole spec is noise in error messages
        return f"TaskMetric({self.task.name}.{self.name})"

    def __call__(self, targets: Array, outputs: Array) -> float:
        """The metric of targets and outputs of ``N`` clips (as :func:`evaluate` takes them)."""
        return _evaluate(self.task, targets, outputs)[0][self.name]

    def stacked(self, targets: Array, outputs: Array) -> NDArray[np.float64]:
        """The metric ``[S]`` of ``S`` sets of outputs ``[S, N, ...]`` of the clips ``targets``."""
        out = as_array(outputs)
        sets = out.shape[0] if out.ndim else 0
        scalars, _ = _stacked_metrics(self.task, *_stacked_inputs(self.task, targets, out, sets))
        return scalars[self.name]


def metric_function(task: TaskSpec, name: str | None = None) -> TaskMetric:
    """``fn(targets, outputs) -> float`` computing one :func:`evaluate` key (default: primary),
    with ``fn.stacked`` for many sets of outputs at once.

    Use it with :func:`bootstrap_ci` and :func:`paired_permutation_test`.
    """
    name = primary_metric(task) if name is None else name
    if name not in metric_names(task):
        raise ValueError(f"unknown metric {name!r} for task {task.name!r}: {metric_names(task)}")
    return TaskMetric(task, name)


# ---------------------------------------------------------------------------------------------
# Figures


def save_confusion_matrix(
    matrix: Array,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Write a PNG of a confusion matrix ``[C, C]`` (rows = true class) atomically.

    Cells show the counts; their colour is the fraction of the true class (row-normalised),
    so rare classes stay readable.
    """
    counts = as_array(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {counts.shape}")
    if counts.shape[0] != len(class_names):
        raise ValueError(f"{len(class_names)} class names for a {counts.shape[0]}-class matrix")
    if counts.size == 0 or np.any(counts < 0) or np.any(counts != np.round(counts)):
        raise ValueError("confusion matrix must hold non-negative integer counts")
    counts = counts.astype(np.int64)
    rows = counts.sum(axis=1, keepdims=True)  # [C, 1]
    fraction = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)  # [C, C]

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = len(class_names)
    side = 2.0 + 0.7 * c
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)  # no pyplot: no global state, no backend selection
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    ax.set_xticks(range(c), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(c), labels=list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title)
    for i in range(c):
        for j in range(c):
            colour = "white" if fraction[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
