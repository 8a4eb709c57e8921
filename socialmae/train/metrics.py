"""Evaluation metrics for fine-tuning: the one home for the tuner, the promotion gate and notebooks.

Classification (CREMA-D, NDC-ME, demo): accuracy, F1 micro and macro (the paper's "Mi"/"Ma",
Tables I and III), balanced accuracy, per-class F1 and the confusion matrix (rows = true class).
Regression (First Impressions, Table II): per-trait accuracy ``1 - MAE`` with targets in [0, 1],
and its mean over traits. Uncertainty: percentile bootstrap intervals over test clips.
Significance: a paired approximate randomisation test against a baseline on the same clips.

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
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from socialmae.io import atomic_write
from socialmae.tasks import TaskSpec

logger = logging.getLogger(__name__)

Array = Any
"""A NumPy array, a nested sequence or a torch tensor (any device, any dtype)."""

MetricFn = Callable[[Array, Array], float]
"""``metric_fn(targets, outputs) -> float``: one metric of one set of clips."""

CONFUSION_MATRIX_KEY = "confusion_matrix"
"""Key of :func:`evaluate`'s only non-scalar entry (classification): counts, rows = true class."""

_PRIMARY = {"classification": "f1_macro", "regression": "mean_accuracy"}


# ---------------------------------------------------------------------------------------------
# Input checks


def _as_array(x: Any) -> np.ndarray:
    """A NumPy view of an array-like or a torch tensor (any device, any float dtype)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # bfloat16/float16 have no NumPy dtype
        x = x.numpy()
    return np.asarray(x)


def _integer_labels(x: Any, name: str) -> NDArray[np.int64]:
    labels = _as_array(x)
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
    out = _as_array(outputs)
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
    true = _as_array(targets).astype(np.float64, copy=False)
    pred = _as_array(predictions).astype(np.float64, copy=False)
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
    out = _as_array(outputs)
    if out.ndim == 1:
        return _integer_labels(out, "outputs")
    if out.ndim != 2 or out.shape[1] == 0:
        raise ValueError(f"outputs must be scores [N, C] or labels [N], got shape {out.shape}")
    return _argmax(out)


def _confusion(true: NDArray[np.int64], pred: NDArray[np.int64], c: int) -> NDArray[np.int64]:
    """``[C, C]`` counts, rows = true class, columns = predicted class."""
    return np.bincount(true * c + pred, minlength=c * c).reshape(c, c)


class _Scores(NamedTuple):
    f1: NDArray[np.float64]  # [C]
    f1_micro: float
    f1_macro: float
    balanced_accuracy: float
    accuracy: float


def _scores(matrix: NDArray[np.int64]) -> _Scores:
    """Every classification metric from one confusion matrix ``[C, C]`` (the only formulas)."""
    tp = np.diag(matrix).astype(np.float64)  # [C]
    support = matrix.sum(axis=1)  # [C] true clips per class
    predicted = matrix.sum(axis=0)  # [C] predicted clips per class
    denom = support + predicted  # = 2 TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)  # [C], 0/0 -> 0
    total = matrix.sum()
    # micro: 2 sum(TP) / (2 sum(TP) + sum(FP) + sum(FN)); single-label => equals accuracy
    micro = 2 * tp.sum() / (support.sum() + predicted.sum())
    present = support > 0
    recall = tp[present] / support[present]
    return _Scores(
        f1, float(micro), float(f1.mean()), float(recall.mean()), float(tp.sum() / total)
    )


def confusion_matrix(
    targets: Array, outputs: Array, num_classes: int | None = None
) -> NDArray[np.int64]:
    """Counts ``[C, C]``, rows = true class, from targets ``[N]`` and outputs ``[N, C]`` or ``[N]``.

    ``num_classes`` is required when outputs are labels; with scores it defaults to their width.
    """
    return _confusion(*_classification_inputs(targets, outputs, num_classes))


def accuracy(targets: Array, outputs: Array, num_classes: int | None = None) -> float:
    """Fraction of clips ``[N]`` whose predicted class is the true one."""
    return _scores(confusion_matrix(targets, outputs, num_classes)).accuracy


def f1_per_class(
    targets: Array, outputs: Array, num_classes: int | None = None
) -> NDArray[np.float64]:
    """F1 ``[C]`` of each class; 0 for a class neither present nor predicted (see module doc)."""
    return _scores(confusion_matrix(targets, outputs, num_classes)).f1


def f1_macro(targets: Array, outputs: Array, num_classes: int | None = None) -> float:
    """Unweighted mean of the ``C`` per-class F1 scores (the paper's "Ma")."""
    return _scores(confusion_matrix(targets, outputs, num_classes)).f1_macro


def f1_micro(targets: Array, outputs: Array, num_classes: int | None = None) -> float:
    """F1 from pooled TP/FP/FN (the paper's "Mi"); equals accuracy for single-label clips."""
    return _scores(confusion_matrix(targets, outputs, num_classes)).f1_micro


def balanced_accuracy(targets: Array, outputs: Array, num_classes: int | None = None) -> float:
    """Mean recall over the classes present in ``targets`` ``[N]``."""
    return _scores(confusion_matrix(targets, outputs, num_classes)).balanced_accuracy


# ---------------------------------------------------------------------------------------------
# Regression


def mean_absolute_error(targets: Array, predictions: Array) -> NDArray[np.float64]:
    """MAE ``[K]`` per target column of targets and predictions ``[N, K]``."""
    true, pred = _regression_inputs(targets, predictions)
    return np.abs(pred - true).mean(axis=0)


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


def _evaluate(
    task: TaskSpec, targets: Array, outputs: Array
) -> tuple[dict[str, float], NDArray[np.int64] | None]:
    """Scalar metrics keyed as :func:`metric_names`, and the confusion matrix (classification)."""
    if task.kind == "classification":
        matrix = confusion_matrix(targets, outputs, task.num_outputs)
        s = _scores(matrix)
        scalars = {
            "accuracy": s.accuracy,
            "f1_micro": s.f1_micro,
            "f1_macro": s.f1_macro,
            "balanced_accuracy": s.balanced_accuracy,
        }
        scalars.update({f"f1/{n}": float(v) for n, v in zip(task.labels, s.f1, strict=True)})
        return scalars, matrix
    if task.kind == "regression":
        true, pred = _regression_inputs(targets, outputs)
        if true.shape[1] != task.num_outputs:
            raise ValueError(
                f"task {task.name!r} has {task.num_outputs} targets {task.labels}, "
                f"got {true.shape[1]} columns"
            )
        mae = mean_absolute_error(true, pred)  # [K]
        scalars = {"mean_accuracy": float(1.0 - mae.mean()), "mae": float(mae.mean())}
        names = task.labels
        scalars.update({f"accuracy/{n}": float(1.0 - v) for n, v in zip(names, mae, strict=True)})
        scalars.update({f"mae/{n}": float(v) for n, v in zip(names, mae, strict=True)})
        return scalars, None
    raise ValueError(f"task {task.name!r} has unknown kind {task.kind!r}")


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


def metric_function(task: TaskSpec, name: str | None = None) -> MetricFn:
    """``fn(targets, outputs) -> float`` computing one :func:`evaluate` key (default: primary).

    Use it with :func:`bootstrap_ci` and :func:`paired_permutation_test`.
    """
    name = primary_metric(task) if name is None else name
    if name not in metric_names(task):
        raise ValueError(f"unknown metric {name!r} for task {task.name!r}: {metric_names(task)}")

    def fn(targets: Array, outputs: Array) -> float:
        return _evaluate(task, targets, outputs)[0][name]

    fn.__name__ = fn.__qualname__ = f"{task.name}:{name}"
    return fn


# ---------------------------------------------------------------------------------------------
# Uncertainty and significance


def _num_clips(targets: np.ndarray, *outputs: np.ndarray) -> int:
    if targets.ndim == 0 or len(targets) == 0:
        raise ValueError("targets are empty: no clips")
    for out in outputs:
        if out.ndim == 0 or len(out) != len(targets):
            length = "a scalar" if out.ndim == 0 else f"{len(out)} clips"
            raise ValueError(
                f"outputs have {length} but targets have {len(targets)}: must be the same clips"
            )
    return len(targets)


def bootstrap_ci(
    metric_fn: MetricFn,
    targets: Array,
    outputs: Array,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn`` over test clips (resampled with replacement).

    Args:
        metric_fn: ``fn(targets, outputs) -> float``, e.g. :func:`f1_macro` or
            :func:`metric_function`.
        targets, outputs: ``[N, ...]`` each, row ``i`` is clip ``i``.
        n_resamples: bootstrap resamples of ``N`` clips each.
        confidence: coverage of the two-sided interval, in (0, 1).
        seed: the resamples depend only on it (and ``N``).
    Returns:
        ``(low, high)``: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    true, out = _as_array(targets), _as_array(outputs)
    n = _num_clips(true, out)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)  # [R]
    for r in range(n_resamples):
        idx = rng.integers(0, n, size=n)  # [N] clip indices, with replacement
        stats[r] = metric_fn(true[idx], out[idx])
    if not np.all(np.isfinite(stats)):
        raise ValueError(f"{metric_fn!r} gave non-finite values on some resamples")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)


class PairedTestResult(NamedTuple):
    """A paired two-sided significance test of system A against system B on the same clips."""

    metric_a: float
    metric_b: float
    difference: float  # metric_a - metric_b
    p_value: float  # two-sided; never below p_min
    n_permutations: int

    @property
    def p_min(self) -> float:
        """Resolution limit: ``1 / (n_permutations + 1)``; ``p_value == p_min`` means "<= p_min"."""
        return 1.0 / (self.n_permutations + 1)


def _check_same_clips(ids_a: Sequence[Any] | None, ids_b: Sequence[Any] | None, n: int) -> None:
    if ids_a is None and ids_b is None:
        return
    if ids_a is None or ids_b is None:
        raise ValueError("give clip ids for both systems or for neither")
    ids_a, ids_b = list(ids_a), list(ids_b)
    for name, ids in (("clip_ids_a", ids_a), ("clip_ids_b", ids_b)):
        if len(ids) != n:
            raise ValueError(f"{name} has {len(ids)} ids for {n} clips")
        if len(set(ids)) != n:
            raise ValueError(f"{name} repeats clip ids")
    if ids_a == ids_b:
        return
    only_a, only_b = set(ids_a) - set(ids_b), set(ids_b) - set(ids_a)
    if not only_a and not only_b:
        first = next(i for i, (a, b) in enumerate(zip(ids_a, ids_b, strict=True)) if a != b)
        raise ValueError(
            f"both systems scored the same clips in a different order (first at row {first}: "
            f"{ids_a[first]!r} vs {ids_b[first]!r}); reorder outputs_b to clip_ids_a"
        )
    raise ValueError(
        f"the systems were scored on different clips: {len(only_a)} only in A "
        f"(e.g. {sorted(map(str, only_a))[:3]}), {len(only_b)} only in B "
        f"(e.g. {sorted(map(str, only_b))[:3]})"
    )


def paired_permutation_test(
    metric_fn: MetricFn,
    targets: Array,
    outputs_a: Array,
    outputs_b: Array,
    n_permutations: int = 10_000,
    seed: int = 0,
    clip_ids_a: Sequence[Any] | None = None,
    clip_ids_b: Sequence[Any] | None = None,
) -> PairedTestResult:
    """Two-sided paired approximate randomisation test of ``metric(A) - metric(B)``.

    Null hypothesis: per clip, A's and B's outputs are exchangeable. Each permutation swaps
    the two systems' outputs on every clip independently with probability 1/2 and recomputes the
    difference; ``p = (1 + #{|d_perm| >= |d_obs|}) / (n_permutations + 1)`` (Noreen 1989,
    Yeh 2000), so ``p >= 1 / (n_permutations + 1)``: claiming the paper's p < 1e-5 needs
    ``n_permutations >= 1e5``. Valid for non-additive metrics such as macro F1.

    Args:
        metric_fn: ``fn(targets, outputs) -> float``, e.g. :func:`metric_function`.
        targets: ``[N, ...]`` the test clips' labels or targets.
        outputs_a, outputs_b: ``[N, ...]`` the two systems' outputs, same shape, same clip order
            (turn scores and labels into one form with :func:`predicted_labels` first).
        n_permutations: random swaps; sets the resolution ``1 / (n_permutations + 1)``.
        seed: the swaps depend only on it (and ``N``).
        clip_ids_a, clip_ids_b: optional clip ids ``[N]`` of each system's rows; a mismatch
            (different clips or order) raises ``ValueError``.
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    true, a, b = _as_array(targets), _as_array(outputs_a), _as_array(outputs_b)
    n = _num_clips(true, a, b)
    if a.shape != b.shape:
        raise ValueError(f"outputs_a {a.shape} and outputs_b {b.shape} differ in shape")
    _check_same_clips(clip_ids_a, clip_ids_b, n)
    metric_a, metric_b = float(metric_fn(true, a)), float(metric_fn(true, b))
    observed = abs(metric_a - metric_b)
    rng = np.random.default_rng(seed)
    per_clip = (n,) + (1,) * (a.ndim - 1)
    extreme = 0
    for _ in range(n_permutations):
        swap = (rng.random(n) < 0.5).reshape(per_clip)  # [N, 1, ...] True: exchange A and B
        diff = metric_fn(true, np.where(swap, b, a)) - metric_fn(true, np.where(swap, a, b))
        extreme += abs(diff) >= observed - 1e-12  # tolerance: equal metrics via other sums
    p_value = (1 + extreme) / (n_permutations + 1)
    return PairedTestResult(metric_a, metric_b, metric_a - metric_b, p_value, n_permutations)


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
    counts = _as_array(matrix)
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
