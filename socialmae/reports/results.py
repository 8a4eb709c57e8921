"""The results tables (notebook 03): the paper's Tables I-III from the MLflow fine-tuning runs,
with bootstrap confidence intervals and paired p-values, the per-mode table of a project's
own fine-tuning, confusion tables, and the registry's versions and promotion decision.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from socialmae.layout import FINETUNE, REGISTER
from socialmae.model.config import MODES as MODEL_MODES
from socialmae.tasks import TaskSpec, get_task
from socialmae.train import metrics, significance
from socialmae.train.evaluation import PREDICTIONS, read_predictions
from socialmae.train.finetune import experiment_name, mode_dir

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)


MODE_HEADINGS = {"audio": "Audio", "video": "Visual", "multimodal": "AV"}  # Table I
MODES = tuple(sorted(MODEL_MODES, key=list(MODE_HEADINGS).index))  # in the paper's column order


MODE_NAMES = {"audio": "Audio", "video": "Visual", "multimodal": "Audiovisual"}  # Table III


TRAIT_HEADINGS = {"openness": "Ope.", "conscientiousness": "Con.", "extraversion": "Ext.",
                  "agreeableness": "Agr.", "neuroticism": "Neu."}  # fmt: skip


MISSING = "—"


OURS = "this project (latest MLflow runs)"


# The published numbers (Tables I-III of the paper); p < 1e-5 for every Social-MAE cell.
PAPER_TABLE_I = {  # CREMA-D, F1 micro / macro: audio, visual, audiovisual
    "AuxFormer [16]": (0.648, 0.593, 0.626, 0.560, 0.763, 0.698),
    "UAVM [19]": (0.554, 0.614, 0.672, 0.617, 0.769, 0.749),
    "VAVL [17]": (0.701, 0.628, 0.787, 0.738, 0.826, 0.779),
    "CAV-MAE": (0.694, 0.694, 0.630, 0.635, 0.766, 0.759),
    "Social-MAE": (0.601, 0.607, 0.749, 0.755, 0.837, 0.842),
}


PAPER_TABLE_II = {  # First Impressions, 1 - MAE: Ope., Con., Ext., Agr., Neu., Avg.
    "NJU-LAMDA [40]": (0.912, 0.916, 0.913, 0.913, 0.910, 0.913),
    "CAV-MAE": (0.899, 0.899, 0.899, 0.902, 0.896, 0.899),
    "Social-MAE": (0.908, 0.902, 0.895, 0.907, 0.905, 0.903),
}


PAPER_TABLE_III = {  # NDC-ME, F1: pre-training, audio, visual, audiovisual
    "LSN-TCN [4]": ("Supervised", 0.438, 0.608, 0.590),
    "CAV-MAE": ("Self-Supervised", 0.471, 0.629, 0.766),
    "Social-MAE": ("Self-Supervised", 0.546, 0.728, 0.776),
}


PAPER_TABLES: dict[str, Mapping[str, tuple[Any, ...]]] = {
    "cremad": PAPER_TABLE_I, "firstimpressions": PAPER_TABLE_II, "ndcme": PAPER_TABLE_III,
}  # fmt: skip


PAPER_TASKS = tuple(PAPER_TABLES)


@dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuning run that reached the test split (``stage=finetune`` with ``test_*``)."""

    task: str
    mode: str
    run_id: str
    run_name: str
    start_time: pd.Timestamp
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def param(self, name: str, default: Any = None) -> Any:
        """A logged parameter as a Python value (``"None"`` is None; numbers parsed)."""
        text = self.params.get(name)
        if text is None or text == "None":
            return default
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text


def latest_finetune_runs(uri: str, task_names: Iterable[str]) -> list[FinetuneRun]:
    """The latest finished fine-tuning run per (task, mode) in ``socialmae-<task>``.

    Tuning trials are logged with ``stage=finetune`` too but never see the test split; only
    runs with the task's ``test_<primary metric>`` count. Tasks without an experiment or runs
    are left out.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found: list[FinetuneRun] = []
    for task in task_names:
        spec = get_task(task)
        experiment = client.get_experiment_by_name(experiment_name(task))
        if experiment is None:
            continue
        key = f"test_{metrics.primary_metric(spec)}"
        latest: dict[str, FinetuneRun] = {}
        token = None
        while True:
            page = client.search_runs(
                [experiment.experiment_id],
                filter_string="tags.stage = 'finetune' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"], max_results=1000, page_token=token,
            )  # fmt: skip
            for run in page:
                mode = run.data.tags.get("mode", "multimodal")
                if key not in run.data.metrics or mode in latest:
                    continue
                latest[mode] = FinetuneRun(
                    task=task, mode=mode, run_id=run.info.run_id,
                    run_name=run.info.run_name or "",
                    start_time=pd.Timestamp(run.info.start_time, unit="ms", tz="UTC"),
                    metrics=dict(run.data.metrics), params=dict(run.data.params),
                )  # fmt: skip
            token = page.token
            if not token:
                break
        found.extend(latest[m] for m in sorted(latest, key=_mode_order))
    return found


def _mode_order(mode: str) -> tuple[int, str]:
    return (MODES.index(mode) if mode in MODES else len(MODES), mode)


def runs_frame(runs: Sequence[FinetuneRun]) -> pd.DataFrame:
    """Which run each table cell comes from: task, mode, run id and name, start, test clips."""
    columns = ["task", "mode", "run_id", "run_name", "start_time", "test_clips"]
    rows = [
        (r.task, r.mode, r.run_id, r.run_name, r.start_time, r.param("clips_test")) for r in runs
    ]
    return pd.DataFrame(rows, columns=columns)


def run_predictions(run: FinetuneRun, uri: str) -> tuple[list[str], Any, Any] | None:
    """A run's test predictions (its ``predictions.parquet`` artifact) as
    ``(clip ids, targets, outputs)``, or None when the artifact cannot be read."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            download_artifacts(run_id=run.run_id, artifact_path=PREDICTIONS, dst_path=tmp,
                               tracking_uri=uri)  # fmt: skip
            return read_predictions(tmp, get_task(run.task))
        except (MlflowException, OSError, KeyError, ValueError) as exc:
            logger.warning("run %s: no readable %s (%s)", run.run_id, PREDICTIONS, exc)
            return None


def table_metrics(task: TaskSpec) -> tuple[str, ...]:
    """The test metrics the paper reports for a task: F1 micro and macro (classification),
    accuracy 1 - MAE per trait and their mean (regression)."""
    if task.kind == "classification":
        return ("f1_micro", "f1_macro")
    return (*(f"accuracy/{name}" for name in task.labels), "mean_accuracy")


RESULT_COLUMNS = ["task", "mode", "metric", "value", "ci_low", "ci_high", "p_value", "p_min",
                  "run_id"]  # fmt: skip


def results_frame(
    runs: Sequence[FinetuneRun],
    uri: str,
    root: str | os.PathLike[str] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """One row per (task, mode, metric): the logged test value, a percentile bootstrap CI
    recomputed from the run's predictions (the run's resamples and seed, so the primary
    metric's CI is the one in its metrics.json), and for the primary metric the paired p-value
    against the run's ``baseline`` when it had one (NaN otherwise).

    ``root`` resolves a relative baseline directory (default: the working directory).
    """
    rows: list[dict[str, Any]] = []
    for run in runs:
        spec = get_task(run.task)
        primary = metrics.primary_metric(spec)
        predictions = run_predictions(run, uri)
        resamples = int(run.param("bootstrap_resamples", 1000))
        seed = int(run.param("seed", 0))
        test = _baseline_test(run, spec, predictions, Path(root or "."))
        for name in table_metrics(spec):
            low = high = math.nan
            if predictions is not None:
                _, targets, outputs = predictions
                low, high = significance.bootstrap_ci(metrics.metric_function(spec, name), targets,
                                                 outputs, resamples, confidence, seed)  # fmt: skip
            p_value, p_min = test if name == primary and test else (math.nan, math.nan)
            rows.append({"task": run.task, "mode": run.mode, "metric": name,
                         "value": run.metrics.get(f"test_{name}", math.nan), "ci_low": low,
                         "ci_high": high, "p_value": p_value, "p_min": p_min,
                         "run_id": run.run_id})  # fmt: skip
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def _baseline_test(
    run: FinetuneRun,
    task: TaskSpec,
    predictions: tuple[list[str], Any, Any] | None,
    root: Path,
) -> tuple[float, float] | None:
    """``(p_value, p_min)`` of the run against its baseline, as fine-tuning computed it: from
    both systems' predictions, else from the stage's metrics.json when it records this run."""
    baseline = run.param("baseline")
    if not baseline:
        return None
    base_dir = Path(baseline) if Path(baseline).is_absolute() else root / baseline
    if predictions is not None and (base_dir / PREDICTIONS).is_file():
        ids, targets, outputs = predictions
        base_ids, _, base_outputs = read_predictions(base_dir, task)
        order = {clip: i for i, clip in enumerate(base_ids)}
        if len(base_ids) == len(ids) and set(order) == set(ids):
            result = significance.paired_permutation_test(
                metrics.metric_function(task), targets, outputs,
                base_outputs[[order[c] for c in ids]],
                int(run.param("permutations", 10_000)), seed=int(run.param("seed", 0)),
            )  # fmt: skip
            return result.p_value, result.p_min
        logger.warning("run %s: baseline %s was tested on other clips", run.run_id, baseline)
    recorded = mode_dir(root / FINETUNE / run.task, run.mode) / "metrics.json"
    if recorded.is_file():
        report = json.loads(recorded.read_text())
        primary = metrics.primary_metric(task)
        test = report.get("test") or {}
        same = (report.get("mode") == run.mode and "baseline" in test
                and test.get(primary) == run.metrics.get(f"test_{primary}"))  # fmt: skip
        if same:
            return float(test["baseline"]["p_value"]), float(test["baseline"]["p_min"])
    logger.warning("run %s: baseline %s has no predictions to test against", run.run_id, baseline)
    return None


def format_cell(row: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``value [ci_low, ci_high] p=...`` of one results row; ``—`` when it is missing."""
    if row is None or not np.isfinite(row.get("value", math.nan)):
        return MISSING
    text = f"{row['value']:.{digits}f}"
    low, high = row.get("ci_low", math.nan), row.get("ci_high", math.nan)
    if np.isfinite(low) and np.isfinite(high):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    p_value = row.get("p_value", math.nan)
    if np.isfinite(p_value):
        at_floor = np.isfinite(row.get("p_min", math.nan)) and p_value <= row["p_min"]
        text += f" p{'≤' if at_floor else '='}{p_value:.2g}"
    return text


def _lookup(results: pd.DataFrame, task: str) -> dict[tuple[str, str], dict[str, Any]]:
    own = results[results["task"] == task]
    return {(r["mode"], r["metric"]): r for r in own.to_dict("records")}


def _paper(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table_i(results: pd.DataFrame, task: str = "cremad", reference: bool = True) -> pd.DataFrame:
    """Table I's layout: F1 micro ("Mi") and macro ("Ma") per modality (Audio, Visual, AV);
    the paper's rows (for CREMA-D) above this project's. p-values sit on the primary metric."""
    columns = pd.MultiIndex.from_tuples(
        [(MODE_HEADINGS[m], h) for m in MODES for h in ("Mi", "Ma")]
    )
    cells = _lookup(results, task)
    rows: dict[str, list[str]] = {}
    if reference and task == "cremad":
        for name, values in PAPER_TABLE_I.items():
            rows[f"{name} (paper)"] = [_paper(v) for v in values]
    rows[OURS] = [format_cell(cells.get((m, k))) for m in MODES for k in ("f1_micro", "f1_macro")]
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns)


def table_ii(
    results: pd.DataFrame, task: str = "firstimpressions", reference: bool = True
) -> pd.DataFrame:
    """Table II's layout: accuracy (1 - MAE) per Big-Five trait and their mean ("Avg."); one
    row of this project's per mode with runs (audiovisual always shown)."""
    spec = get_task(task)
    names = [f"accuracy/{t}" for t in spec.labels] + ["mean_accuracy"]
    headings = [TRAIT_HEADINGS.get(t, t) for t in spec.labels] + ["Avg."]
    cells = _lookup(results, task)
    rows: dict[str, list[str]] = {}
    if reference and task == "firstimpressions":
        for name, values in PAPER_TABLE_II.items():
            rows[f"{name} (paper)"] = [_paper(v) for v in values]
    modes = {m for m, _ in cells} | {"multimodal"}
    for mode in sorted(modes, key=_mode_order):
        label = OURS if mode == "multimodal" else f"{OURS}, {MODE_NAMES.get(mode, mode)} only"
        rows[label] = [format_cell(cells.get((mode, n))) for n in names]
    return pd.DataFrame.from_dict(rows, orient="index", columns=headings)


def table_iii(
    results: pd.DataFrame, task: str = "ndcme", metric: str = "f1_macro", reference: bool = True
) -> pd.DataFrame:
    """Table III's layout: pre-training and one F1 per modality (``metric``: the paper does not
    say which average; macro, the selection metric, by default)."""
    headings = ["Pre-training", *(MODE_NAMES[m] for m in MODES)]
    cells = _lookup(results, task)
    rows: dict[str, list[str]] = {}
    if reference and task == "ndcme":
        for name, values in PAPER_TABLE_III.items():
            rows[f"{name} (paper)"] = [_paper(v) for v in values]
    rows[OURS] = ["Self-Supervised", *(format_cell(cells.get((m, metric))) for m in MODES)]
    return pd.DataFrame.from_dict(rows, orient="index", columns=headings)


def paper_table(results: pd.DataFrame, task: str, reference: bool = True) -> pd.DataFrame:
    """The paper's table for ``task``: II for First Impressions (regression), III for NDC-ME,
    I for CREMA-D and any other classification task (the demo)."""
    spec = get_task(task)
    if spec.kind == "regression":
        return table_ii(results, task, reference)
    if task == "ndcme":
        return table_iii(results, task, reference=reference)
    return table_i(results, task, reference)


def confusion_table(
    root: str | os.PathLike[str], task: str, mode: str = "multimodal"
) -> pd.DataFrame | None:
    """Test-set confusion counts of the ``mode`` model of ``outputs/finetune/<task>`` (rows =
    true class), or None for a regression task or when the stage has not run."""
    spec = get_task(task)
    directory = mode_dir(Path(root) / FINETUNE / task, mode)
    if spec.kind != "classification" or not (directory / PREDICTIONS).is_file():
        return None
    _, targets, outputs = read_predictions(directory, spec)
    matrix = metrics.confusion_matrix(targets, outputs, spec.num_outputs)
    labels = list(spec.labels)
    frame = pd.DataFrame(matrix, index=pd.Index(labels, name="true"),
                         columns=pd.Index(labels, name="predicted"))  # fmt: skip
    return frame


def mode_table(root: str | os.PathLike[str], task: str) -> pd.DataFrame | None:
    """The stage's own Table I for ``task`` (``outputs/finetune/<task>/metrics.json``): per
    mode, the primary metric on val and on test with its 95% bootstrap CI, and the paired
    permutation p-value against every other mode on the same test clips; None before the stage
    has run."""
    path = Path(root) / FINETUNE / task / "metrics.json"
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    primary, modes = table["primary_metric"], table["modes"]
    rows = {}
    for mode in modes:
        test = table[mode]["test"]
        low, high = test[f"{primary}_ci95"]
        row = {
            "best epoch": table[mode]["best_epoch"],
            f"val {primary}": f"{table[mode]['val'][primary]:.3f}",
            f"test {primary} [95% CI]": f"{test[primary]:.3f} [{low:.3f}, {high:.3f}]",
        }
        for other in modes:
            if other == mode:
                continue
            pair = table["comparisons"].get(f"{mode}_vs_{other}") or table["comparisons"].get(
                f"{other}_vs_{mode}"
            )
            row[f"p vs {other}"] = f"{pair['p_value']:.3g}"
        rows[MODE_NAMES.get(mode, mode)] = row
    return pd.DataFrame.from_dict(rows, orient="index").fillna("")


def promotion_decision(root: str | os.PathLike[str], task: str) -> dict[str, Any] | None:
    """``outputs/register/<task>/decision.json`` (what the promotion gate decided), or None."""
    path = Path(root) / REGISTER / task / "decision.json"
    return json.loads(path.read_text()) if path.is_file() else None


def registered_versions(uri: str, task: str) -> pd.DataFrame:
    """Versions of the registered model ``socialmae-<task>``: aliases, scores, gate outcome."""
    from mlflow.exceptions import MlflowException

    from socialmae.registry.provenance import (
        TAG_DECISION_OUTCOME,
        TAG_METRIC_NAME,
        TAG_METRIC_VALUE,
    )
    from socialmae.tracking import mlflow_client, task_name

    columns = ["version", "aliases", "metric", "value", "outcome", "run_id"]
    client, _ = mlflow_client(uri)
    name = task_name(task)
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return pd.DataFrame(columns=columns)
    by_version: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(int(version), []).append(alias)
    rows = []
    for v in client.search_model_versions(f"name = '{name}'"):
        rows.append({"version": int(v.version),
                     "aliases": ", ".join(sorted(by_version.get(int(v.version), []))),
                     "metric": v.tags.get(TAG_METRIC_NAME), "value": v.tags.get(TAG_METRIC_VALUE),
                     "outcome": v.tags.get(TAG_DECISION_OUTCOME), "run_id": v.run_id})  # fmt: skip
    return pd.DataFrame(rows, columns=columns).sort_values("version", ignore_index=True)
