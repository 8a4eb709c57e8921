"""Uncertainty and significance of test metrics: percentile bootstrap intervals over test clips
and a paired approximate randomisation test of two systems on the same clips."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from socialmae.train.metrics import Array, MetricFn, StackedMetricFn, as_array

PERMUTATION_CHUNK_VALUES = 1 << 22
"""Output values swapped per step of a stacked permutation test (about 32 MiB per copy)."""


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
        metric_fn: ``fn(targets, outputs) -> float``, e.g. ``metrics.f1_macro`` or
            ``metrics.metric_function``.
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
    true, out = as_array(targets), as_array(outputs)
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
        metric_fn: ``fn(targets, outputs) -> float``, e.g. ``metrics.metric_function``.
        targets: ``[N, ...]`` the test clips' labels or targets.
        outputs_a, outputs_b: ``[N, ...]`` the two systems' outputs, same shape, same clip order
            (turn scores and labels into one form with ``metrics.predicted_labels`` first).
        n_permutations: random swaps; sets the resolution ``1 / (n_permutations + 1)``. A
            :class:`~socialmae.train.metrics.StackedMetricFn` (what ``metric_function`` gives)
            scores them in chunks, with the same swaps and the same p-value as one by one.
        seed: the swaps depend only on it (and ``N``).
        clip_ids_a, clip_ids_b: optional clip ids ``[N]`` of each system's rows; a mismatch
            (different clips or order) raises ``ValueError``.
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    true, a, b = as_array(targets), as_array(outputs_a), as_array(outputs_b)
    n = _num_clips(true, a, b)
    if a.shape != b.shape:
        raise ValueError(f"outputs_a {a.shape} and outputs_b {b.shape} differ in shape")
    _check_same_clips(clip_ids_a, clip_ids_b, n)
    metric_a, metric_b = float(metric_fn(true, a)), float(metric_fn(true, b))
    observed = abs(metric_a - metric_b)
    rng = np.random.default_rng(seed)
    per_clip = (n,) + (1,) * (a.ndim - 1)
    stacked = isinstance(metric_fn, StackedMetricFn)
    chunk = max(1, PERMUTATION_CHUNK_VALUES // a.size) if stacked else 1
    extreme = 0
    for start in range(0, n_permutations, chunk):
        size = min(chunk, n_permutations - start)
        # [S, N, 1, ...] True: exchange A and B on that clip; row by row the same draws as S
        # calls of rng.random(n)
        swap = (rng.random((size, n)) < 0.5).reshape((size, *per_clip))
        first, second = np.where(swap, b, a), np.where(swap, a, b)  # [S, N, ...]
        if stacked:
            diff = metric_fn.stacked(true, first) - metric_fn.stacked(true, second)  # [S]
        else:
            pairs = zip(first, second, strict=True)
            diff = np.array([metric_fn(true, x) - metric_fn(true, y) for x, y in pairs])
        # tolerance: equal metrics reached through other sums
        extreme += int(np.count_nonzero(np.abs(diff) >= observed - 1e-12))
    p_value = (1 + extreme) / (n_permutations + 1)
    return PairedTestResult(metric_a, metric_b, metric_a - metric_b, p_value, n_permutations)
