import itertools
import json
import logging
import math

import numpy as np
import pytest
import sklearn.metrics as skm
import torch

from socialmae.tasks import TASKS, TaskSpec, get_task
from socialmae.train import metrics as M
from socialmae.train import significance as S

CREMAD = get_task("cremad")
FI = get_task("firstimpressions")


def _scores(rng: np.random.Generator, targets: np.ndarray, c: int, signal: float) -> np.ndarray:
    """Noisy logits ``[N, C]`` whose argmax is the target more often as ``signal`` grows."""
    logits = rng.normal(size=(len(targets), c))
    logits[np.arange(len(targets)), targets] += signal
    return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- classification against scikit-learn and by hand ----------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    c, n = 6, 400
    targets = rng.choice(c, size=n, p=[0.1, 0.1, 0.1, 0.15, 0.4, 0.15])  # imbalanced, like CREMA-D
    logits = _scores(rng, targets, c, signal=1.0)
    pred = logits.argmax(axis=1)
    labels = list(range(c))

    np.testing.assert_array_equal(
        M.confusion_matrix(targets, logits), skm.confusion_matrix(targets, pred, labels=labels)
    )
    assert M.accuracy(targets, logits) == pytest.approx(skm.accuracy_score(targets, pred))
    for average, fn in (("micro", M.f1_micro), ("macro", M.f1_macro)):
        expected = skm.f1_score(targets, pred, labels=labels, average=average, zero_division=0)
        assert fn(targets, logits) == pytest.approx(expected)
    np.testing.assert_allclose(
        M.f1_per_class(targets, logits),
        skm.f1_score(targets, pred, labels=labels, average=None, zero_division=0),
    )
    assert M.balanced_accuracy(targets, logits) == pytest.approx(
        skm.balanced_accuracy_score(targets, pred)
    )
    # logits, probabilities and predicted labels give the same metrics
    assert M.f1_macro(targets, _softmax(logits)) == M.f1_macro(targets, logits)
    assert M.f1_macro(targets, pred, num_classes=c) == M.f1_macro(targets, logits)


def test_f1_by_hand():
    targets = [0, 0, 1, 1, 2]
    pred = np.array([0, 1, 1, 1, 0])
    # confusion [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # F1 = 2TP / (2TP + FP + FN): class 0: 2/(2+1+1), class 1: 4/(4+1+0), class 2: 0/(0+0+1)
    np.testing.assert_array_equal(
        M.confusion_matrix(targets, pred, 3), [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    )
    np.testing.assert_allclose(M.f1_per_class(targets, pred, 3), [0.5, 0.8, 0.0])
    assert M.f1_macro(targets, pred, 3) == pytest.approx(1.3 / 3)
    assert M.f1_micro(targets, pred, 3) == pytest.approx(3 / 5)
    assert M.accuracy(targets, pred, 3) == pytest.approx(3 / 5)
    assert M.balanced_accuracy(targets, pred, 3) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_ties_go_to_the_first_class():
    np.testing.assert_array_equal(M.predicted_labels([[0.5, 0.5], [0.2, 0.8]]), [0, 1])


def test_absent_class_counts_in_macro_over_the_task_label_set(caplog):
    task = TaskSpec("three", "classification", ("neutral", "smile", "laughter"))
    targets = np.array([0, 0, 1, 1, 1])  # no laughter clip
    perfect = np.eye(3)[targets]  # [N, 3] one-hot scores, never predicts laughter
    with caplog.at_level(logging.WARNING, logger=M.__name__):
        result = M.evaluate(task, targets, perfect)
    assert "laughter" in caplog.text
    assert result["f1/laughter"] == 0.0
    assert result["f1_macro"] == pytest.approx(2 / 3)  # averaged over all 3 task classes
    assert result["f1_micro"] == result["accuracy"] == 1.0
    assert result["balanced_accuracy"] == 1.0  # recall only over the classes present
    assert result[M.CONFUSION_MATRIX_KEY] == [[2, 0, 0], [0, 3, 0], [0, 0, 0]]


@pytest.mark.parametrize("seed", range(3))
def test_absent_classes_match_sklearn_with_full_label_set(seed):
    rng = np.random.default_rng(seed)
    c = 6
    targets = rng.choice([0, 1, 4], size=60)  # classes 2, 3, 5 absent from the test set
    pred = rng.choice([0, 1, 2, 4], size=60)  # class 2 predicted though absent
    labels = list(range(c))
    assert M.f1_macro(targets, pred, c) == pytest.approx(
        skm.f1_score(targets, pred, labels=labels, average="macro", zero_division=0)
    )
    np.testing.assert_allclose(
        M.f1_per_class(targets, pred, c),
        skm.f1_score(targets, pred, labels=labels, average=None, zero_division=0),
    )
    with pytest.warns(UserWarning):  # sklearn also drops the class with no true clips
        expected = skm.balanced_accuracy_score(targets, pred)
    assert M.balanced_accuracy(targets, pred, c) == pytest.approx(expected)


def test_torch_tensors_are_accepted():
    targets = torch.tensor([0, 1, 2, 2])
    logits = torch.tensor([[2.0, 0, 0], [0, 2, 0], [0, 0, 2], [2, 0, 0]], dtype=torch.bfloat16)
    assert M.accuracy(targets, logits) == pytest.approx(0.75)
    assert M.mean_accuracy(torch.full((2, 5), 0.5), torch.full((2, 5), 0.25)) == 0.75


# --- regression ------------------------------------------------------------------------------


def test_regression_by_hand():
    targets = [[0.5, 1.0], [0.0, 0.2]]
    pred = [[0.7, 0.9], [0.1, 0.2]]
    # MAE per trait: (0.2 + 0.1) / 2 = 0.15, (0.1 + 0.0) / 2 = 0.05
    np.testing.assert_allclose(M.mean_absolute_error(targets, pred), [0.15, 0.05])
    np.testing.assert_allclose(M.regression_accuracy(targets, pred), [0.85, 0.95])
    assert M.mean_accuracy(targets, pred) == pytest.approx(0.9)


def test_regression_matches_sklearn_mae():
    rng = np.random.default_rng(0)
    targets = rng.uniform(size=(200, 5))
    pred = targets + rng.normal(0, 0.1, size=targets.shape)  # may leave [0, 1]: not clipped
    mae = skm.mean_absolute_error(targets, pred, multioutput="raw_values")
    result = M.evaluate(FI, targets, pred)
    for trait, value in zip(FI.labels, mae, strict=True):
        assert result[f"mae/{trait}"] == pytest.approx(value)
        assert result[f"accuracy/{trait}"] == pytest.approx(1 - value)
    assert result["mean_accuracy"] == pytest.approx(1 - mae.mean())
    assert result["mae"] == pytest.approx(mae.mean())


# --- dispatch --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_evaluate_is_flat_and_json_serialisable(name):
    task = TASKS[name]
    rng = np.random.default_rng(1)
    n = 50
    if task.kind == "classification":
        targets = rng.integers(0, task.num_outputs, n)
        outputs = _scores(rng, targets, task.num_outputs, 1.0)
    else:
        targets = rng.uniform(size=(n, task.num_outputs))
        outputs = rng.uniform(size=(n, task.num_outputs))
    result = M.evaluate(task, targets, outputs)
    assert json.loads(json.dumps(result)) == result
    scalars = M.scalar_metrics(result)
    assert tuple(scalars) == M.metric_names(task)
    assert all(isinstance(v, float) for v in scalars.values())
    assert M.primary_metric(task) in scalars
    assert M.metric_function(task)(targets, outputs) == scalars[M.primary_metric(task)]
    if task.kind == "classification":
        matrix = np.array(result[M.CONFUSION_MATRIX_KEY])
        assert matrix.shape == (task.num_outputs,) * 2 and matrix.sum() == n
        assert all(f"f1/{label}" in scalars for label in task.labels)
    else:
        assert M.CONFUSION_MATRIX_KEY not in result


def test_primary_metrics():
    assert M.primary_metric(CREMAD) == "f1_macro"
    assert M.primary_metric(get_task("ndcme")) == "f1_macro"
    assert M.primary_metric(FI) == "mean_accuracy"
    with pytest.raises(ValueError, match="unknown metric"):
        M.metric_function(CREMAD, "mean_accuracy")
    fn = M.metric_function(CREMAD, "f1/fear")
    assert fn([2, 2, 0], np.eye(6)[[2, 1, 0]]) == pytest.approx(2 / 3)
    assert repr(fn) == "TaskMetric(cremad.f1/fear)"  # as error messages name it


def test_evaluate_rejects_outputs_of_another_task():
    with pytest.raises(ValueError, match="expected 6"):
        M.evaluate(CREMAD, [0, 1], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="5 targets"):
        M.evaluate(FI, np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="unknown kind"):
        M.evaluate(TaskSpec("x", "ranking", ("a",)), [0], [[1.0]])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("targets", "outputs", "match"),
    [
        ([0, 1, 2], np.zeros((2, 3)), "same clips"),
        ([0.0, 1.0], np.zeros((2, 3)), "integer"),
        ([0, 3], np.zeros((2, 3)), r"\[0, 3\)"),
        ([0, -1], np.zeros((2, 3)), r"\[0, 3\)"),
        ([0, 1], [[0.0, np.nan, 1.0], [1.0, 0.0, 0.0]], "NaN"),
        ([0, 1], np.zeros((2, 3, 1)), "scores"),
        ([[0, 1]], np.zeros((2, 3)), r"labels \[N\]"),
        ([], np.zeros((0, 3)), "empty"),
    ],
)
def test_bad_classification_inputs_raise(targets, outputs, match):
    with pytest.raises(ValueError, match=match):
        M.f1_macro(targets, outputs)


def test_labels_need_num_classes_and_must_be_in_range():
    with pytest.raises(ValueError, match="num_classes"):
        M.f1_macro([0, 1], [0, 1])
    with pytest.raises(ValueError, match="predicted labels"):
        M.f1_macro([0, 1], [0, 5], num_classes=3)


@pytest.mark.parametrize(
    ("targets", "pred", "match"),
    [
        (np.full((2, 5), 1.5), np.zeros((2, 5)), r"\[0, 1\]"),
        (np.zeros((2, 5)), np.zeros((3, 5)), "differ in shape"),
        (np.zeros(5), np.zeros(5), r"\[N, K\]"),
        (np.zeros((2, 5)), np.full((2, 5), np.inf), "NaN or infinite"),
    ],
)
def test_bad_regression_inputs_raise(targets, pred, match):
    with pytest.raises(ValueError, match=match):
        M.mean_accuracy(targets, pred)


# --- bootstrap -------------------------------------------------------------------------------


def test_bootstrap_ci_contains_estimate_narrows_and_is_seeded():
    rng = np.random.default_rng(3)
    widths = []
    for n in (100, 2000):
        targets = rng.integers(0, 6, n)
        logits = _scores(rng, targets, 6, signal=1.5)
        low, high = S.bootstrap_ci(M.f1_macro, targets, logits, n_resamples=500)
        assert low < M.f1_macro(targets, logits) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # width ~ 1/sqrt(N): sqrt(20) = 4.5 in expectation
    again = S.bootstrap_ci(M.f1_macro, targets, logits, n_resamples=500)
    assert again == (low, high)
    assert S.bootstrap_ci(M.f1_macro, targets, logits, n_resamples=500, seed=1) != (low, high)


def test_bootstrap_ci_of_accuracy_matches_the_binomial_interval():
    # Accuracy is a binomial proportion: its 95% interval is p +- 1.96 sqrt(p (1 - p) / n).
    n = 500
    rng = np.random.default_rng(4)
    targets = rng.integers(0, 3, n)
    correct = rng.random(n) < 0.7
    pred = np.where(correct, targets, (targets + 1) % 3)
    p = correct.mean()
    half = 1.959964 * math.sqrt(p * (1 - p) / n)  # 0.040; a 90% interval would be 0.006 narrower
    fn = M.metric_function(get_task("ndcme"), "accuracy")
    low, high = S.bootstrap_ci(fn, targets, pred, n_resamples=2000)
    assert low == pytest.approx(p - half, abs=0.003)
    assert high == pytest.approx(p + half, abs=0.003)
    # a wider confidence gives a wider interval on the same resamples
    low99, high99 = S.bootstrap_ci(M.accuracy, targets, np.eye(3)[pred], confidence=0.99)
    assert low99 < low and high < high99


def test_bootstrap_ci_bad_inputs():
    with pytest.raises(ValueError, match="same clips"):
        S.bootstrap_ci(M.f1_macro, [0, 1, 1], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="confidence"):
        S.bootstrap_ci(M.f1_macro, [0, 1], np.zeros((2, 3)), confidence=95)
    with pytest.raises(ValueError, match="n_resamples"):
        S.bootstrap_ci(M.f1_macro, [0, 1], np.zeros((2, 3)), n_resamples=0)
    with pytest.raises(ValueError, match="non-finite"):
        S.bootstrap_ci(lambda t, o: float("nan"), [0, 1], np.zeros((2, 3)))


# --- paired significance ---------------------------------------------------------------------


def test_clearly_better_system_gets_the_smallest_p():
    rng = np.random.default_rng(5)
    targets = rng.integers(0, 6, 300)
    good = _scores(rng, targets, 6, signal=3.0)
    poor = _scores(rng, targets, 6, signal=0.3)
    fn = M.metric_function(CREMAD)
    result = S.paired_permutation_test(fn, targets, good, poor, n_permutations=500)
    assert result.metric_a == fn(targets, good) and result.metric_b == fn(targets, poor)
    assert result.difference == pytest.approx(result.metric_a - result.metric_b)
    assert result.difference > 0.3
    assert result.p_min == pytest.approx(1 / 501)
    assert result.p_value == result.p_min  # no random swap reached the observed gap
    # two-sided: swapping the systems changes the sign, not the p-value
    flipped = S.paired_permutation_test(fn, targets, poor, good, n_permutations=500)
    assert flipped.difference == pytest.approx(-result.difference)
    assert flipped.p_value == result.p_value


def test_identical_and_equally_good_systems_get_large_p():
    rng = np.random.default_rng(6)
    targets = rng.integers(0, 6, 300)
    a = _scores(rng, targets, 6, signal=1.0)
    same = S.paired_permutation_test(M.f1_macro, targets, a, a.copy(), n_permutations=200)
    assert same.difference == 0.0 and same.p_value == 1.0
    b = _scores(rng, targets, 6, signal=1.0)  # same quality, independent errors
    equal = S.paired_permutation_test(M.f1_macro, targets, a, b, n_permutations=500)
    assert equal.p_value > 0.2


def test_permutation_p_value_approaches_the_exact_two_sided_one():
    # With 12 clips all 2**12 swap patterns can be enumerated: the exact two-sided p-value.
    rng = np.random.default_rng(10)
    n = 12
    targets = rng.integers(0, 2, n)
    pred_a = np.where(rng.random(n) < 0.85, targets, 1 - targets)
    pred_b = np.where(rng.random(n) < 0.45, targets, 1 - targets)
    hit_a, hit_b = pred_a == targets, pred_b == targets
    observed = abs(hit_a.mean() - hit_b.mean())
    swaps = np.array(list(itertools.product([False, True], repeat=n)))  # [4096, 12]
    diffs = np.where(swaps, hit_b, hit_a).mean(1) - np.where(swaps, hit_a, hit_b).mean(1)
    exact = np.mean(np.abs(diffs) >= observed - 1e-12)
    one_sided = np.mean(diffs >= observed - 1e-12)
    assert 0.05 < exact < 0.5 and exact - one_sided > 0.05  # neither trivial nor saturated
    fn = M.metric_function(TaskSpec("binary", "classification", ("no", "yes")), "accuracy")
    result = S.paired_permutation_test(fn, targets, pred_a, pred_b, n_permutations=20_000)
    assert result.p_value == pytest.approx(exact, abs=0.01)


def _outputs(task: TaskSpec, rng: np.random.Generator, n: int, sets: int | None, labels: bool):
    """Targets and ``sets`` sets of outputs of one task (or one set for ``sets`` None); the
    classification targets leave out the last class (an absent class changes F1 and recall)."""
    lead = () if sets is None else (sets,)
    if task.kind == "regression":
        return rng.uniform(size=(n, task.num_outputs)), rng.uniform(
            size=(*lead, n, task.num_outputs)
        )
    targets = rng.integers(0, task.num_outputs - 1, n)
    if labels:
        return targets, rng.integers(0, task.num_outputs, (*lead, n))
    return targets, rng.normal(size=(*lead, n, task.num_outputs))


@pytest.mark.parametrize("labels", [False, True], ids=["scores", "labels"])
@pytest.mark.parametrize("name", sorted(TASKS))
def test_stacked_metrics_equal_one_set_at_a_time(name, labels):
    task = TASKS[name]
    targets, stack = _outputs(task, np.random.default_rng(3), 40, sets=25, labels=labels)
    for metric in M.metric_names(task):
        fn = M.metric_function(task, metric)
        assert isinstance(fn, M.StackedMetricFn)
        stacked = fn.stacked(targets, stack)
        assert stacked.shape == (25,)
        assert stacked.tolist() == [fn(targets, outputs) for outputs in stack]  # bit for bit


def test_stacked_metrics_check_every_set():
    fn = M.metric_function(CREMAD)
    targets, stack = _outputs(CREMAD, np.random.default_rng(4), 10, sets=3, labels=False)
    with pytest.raises(ValueError, match="10 targets but stacked outputs of 9 clips"):
        fn.stacked(targets, stack[:, :9])
    with pytest.raises(ValueError, match=r"must be \[S, N, ...\]"):
        fn.stacked(targets, stack[0, 0])
    with pytest.raises(ValueError, match="expected 6"):
        fn.stacked(targets, stack[..., :3])
    stack[2, 4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fn.stacked(targets, stack)
    labels = np.zeros((3, 10), dtype=np.int64)
    labels[1, 2] = 6
    with pytest.raises(ValueError, match=r"predicted labels must lie in \[0, 6\)"):
        fn.stacked(targets, labels)


@pytest.mark.parametrize("chunk_values", [1, 7 * 40, 1 << 22], ids=["one", "remainder", "one-step"])
@pytest.mark.parametrize("name", ["cremad", "firstimpressions"])
def test_stacked_permutation_test_equals_one_permutation_at_a_time(name, chunk_values, monkeypatch):
    # The same swaps in chunks of stacked outputs (the last one shorter) as one by one: the
    # same p-value, which stays comparable with results computed before the stacked path.
    task = TASKS[name]
    rng = np.random.default_rng(8)
    targets, (a, b) = _outputs(task, rng, 40, sets=2, labels=False)
    fn = M.metric_function(task)
    monkeypatch.setattr(S, "PERMUTATION_CHUNK_VALUES", chunk_values * task.num_outputs)
    stacked = S.paired_permutation_test(fn, targets, a, b, n_permutations=1003, seed=2)
    one_by_one = S.paired_permutation_test(
        lambda t, o: fn(t, o), targets, a, b, n_permutations=1003, seed=2
    )
    assert stacked == one_by_one
    assert 1 / 1004 < stacked.p_value < 1  # some swaps reach the observed gap, some do not


def test_paired_test_checks_the_clips():
    targets = np.array([0, 1, 2])
    a, b = np.eye(3), np.eye(3)[[0, 0, 2]]
    with pytest.raises(ValueError, match="same clips"):
        S.paired_permutation_test(M.f1_macro, targets, a, b[:2])
    with pytest.raises(ValueError, match="differ in shape"):
        S.paired_permutation_test(M.f1_macro, targets, a, np.array([0, 0, 2]))
    with pytest.raises(ValueError, match="both systems or for neither"):
        S.paired_permutation_test(M.f1_macro, targets, a, b, clip_ids_a=["x", "y", "z"])
    with pytest.raises(ValueError, match="different order"):
        S.paired_permutation_test(
            M.f1_macro, targets, a, b, clip_ids_a=["x", "y", "z"], clip_ids_b=["x", "z", "y"]
        )
    with pytest.raises(ValueError, match="different clips"):
        S.paired_permutation_test(
            M.f1_macro, targets, a, b, clip_ids_a=["x", "y", "z"], clip_ids_b=["x", "y", "w"]
        )
    with pytest.raises(ValueError, match="repeats"):
        S.paired_permutation_test(
            M.f1_macro, targets, a, b, clip_ids_a=["x", "x", "z"], clip_ids_b=["x", "x", "z"]
        )
    with pytest.raises(ValueError, match="n_permutations"):
        S.paired_permutation_test(M.f1_macro, targets, a, b, n_permutations=0)
    ids = ["x", "y", "z"]
    ok = S.paired_permutation_test(
        M.f1_macro, targets, a, b, n_permutations=10, clip_ids_a=ids, clip_ids_b=list(ids)
    )
    assert ok.metric_a == 1.0


# --- figure ----------------------------------------------------------------------------------


def test_save_confusion_matrix_writes_a_readable_png(tmp_path):
    from PIL import Image

    matrix = [[5, 1, 0], [2, 7, 1], [0, 0, 0]]  # last class absent: a zero row must not crash
    path = M.save_confusion_matrix(matrix, ["neutral", "smile", "laughter"], tmp_path / "cm.png")
    assert path == tmp_path / "cm.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width > 100 and height > 100
    assert pixels.std() > 0  # not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("matrix", "names", "match"),
    [
        ([[1, 2, 3]], ["a"], "square"),
        ([[1, 0], [0, 1]], ["a", "b", "c"], "class names"),
        ([[1, -1], [0, 1]], ["a", "b"], "non-negative integer"),
        ([[1, 0.5], [0, 1]], ["a", "b"], "non-negative integer"),
    ],
)
def test_save_confusion_matrix_rejects_bad_input(tmp_path, matrix, names, match):
    with pytest.raises(ValueError, match=match):
        M.save_confusion_matrix(matrix, names, tmp_path / "cm.png")
    assert not list(tmp_path.iterdir())
