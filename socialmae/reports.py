"""Read-only views of a project's pipeline outputs for the numbered notebooks.

Where the project and its MLflow store are, the data overview (manifests, the per-clip table,
validation, class balance, face crops with their fbank), the paper's Fig. 2 for chosen clips,
and the paper's results tables (Tables I-III) built from the MLflow fine-tuning runs, with
bootstrap confidence intervals and, where a baseline was given, paired p-values.

Figures are ``matplotlib.figure.Figure`` objects made without pyplot (no global state); nothing
here writes into the project.
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

from socialmae.data.clips import CLIPS_TABLE
from socialmae.data.features import fbank
from socialmae.data.manifest import MANIFEST_NAME, SPLITS, read_manifest
from socialmae.data.shards import ShardReader
from socialmae.layout import FACES, FINETUNE, RAW, REGISTER, VALIDATION
from socialmae.params import load_yaml
from socialmae.tasks import TaskSpec, get_task
from socialmae.tracking import resolve_tracking_uri
from socialmae.train import metrics
from socialmae.train.finetune import PREDICTIONS, experiment_name, mode_dir, read_predictions

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from socialmae.data.dataset import ShardDataset
    from socialmae.model import SocialMAE

logger = logging.getLogger(__name__)

PROJECT_ENV = "SOCIALMAE_PROJECT"
"""Environment variable naming the project root the notebooks read (default: found from cwd)."""


MODES = ("audio", "video", "multimodal")
MODE_HEADINGS = {"audio": "Audio", "video": "Visual", "multimodal": "AV"}  # Table I
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


# ------------------------------------------------------------------------------ the project


def project_root(start: str | os.PathLike[str] | None = None) -> Path:
    """``$SOCIALMAE_PROJECT`` if set, else the first of ``start`` (default: the working
    directory) and its parents that holds ``dvc.yaml``."""
    named = os.environ.get(PROJECT_ENV)
    if named:
        root = Path(named).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"${PROJECT_ENV}={named} is not a directory")
        return root
    here = Path(start if start is not None else Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"no dvc.yaml in {here} or its parents: run from the project or set ${PROJECT_ENV}"
    )


def load_params(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The project's ``params.yaml`` (``{}`` when there is none)."""
    path = Path(root) / "params.yaml"
    return load_yaml(path) if path.is_file() else {}


def tracking_uri(root: str | os.PathLike[str]) -> str:
    """The MLflow store the stages logged to, as they resolve it: ``mlflow.tracking_uri`` in
    params.yaml, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; a relative sqlite
    path is taken relative to ``root`` (where ``dvc repro`` runs the stages)."""
    section = load_params(root).get("mlflow") or {}
    uri = resolve_tracking_uri(section.get("tracking_uri"))
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_absolute():
        uri = prefix + str(Path(root).resolve() / uri[len(prefix) :])
    return uri


def tasks(root: str | os.PathLike[str], include_paper: bool = True) -> tuple[str, ...]:
    """The project's ``tasks`` from params.yaml, then (optionally) the paper's other tasks."""
    own = tuple(load_params(root).get("tasks") or ())
    extra = tuple(t for t in PAPER_TASKS if t not in own) if include_paper else ()
    return own + extra


def execute_notebook(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    timeout: int = 600,
    kernel: str = "python3",
) -> Any:
    """Run a notebook top to bottom in a fresh kernel with ``root`` as working directory and
    return the executed ``nbformat.NotebookNode`` (the file itself is left as it is).

    ``python3`` is the kernel of the running interpreter. Raises
    ``nbclient.exceptions.CellExecutionError`` naming the first failing cell.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name=kernel,
                            resources={"metadata": {"path": str(root)}})  # fmt: skip
    client.execute()
    return notebook


# ------------------------------------------------------------------------------ data overview


def read_manifests(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Every ``data/raw/<dataset>/manifest.parquet`` of the project, concatenated."""
    paths = sorted((Path(root) / RAW).glob(f"*/{MANIFEST_NAME}"))
    frames = [read_manifest(p) for p in paths]
    if not frames:
        return pd.DataFrame(columns=["clip_id", "dataset", "speaker", "split", "label"])
    return pd.concat(frames, ignore_index=True)


def split_summary(manifest: pd.DataFrame) -> pd.DataFrame:
    """Clips, speakers and labels per (dataset, split), splits in train/val/test order."""
    summary = manifest.groupby(["dataset", "split"]).agg(
        clips=("clip_id", "size"),
        speakers=("speaker", "nunique"),
        labels=("label", lambda labels: labels[labels != ""].nunique()),
    )
    order = {name: i for i, name in enumerate(SPLITS)}
    return summary.sort_index(key=lambda idx: idx.map(lambda v: order.get(v, v)))


def read_clips(root: str | os.PathLike[str]) -> pd.DataFrame:
    """The per-clip table ``crop_faces`` wrote (``data/interim/faces/clips.parquet``)."""
    return pd.read_parquet(Path(root) / FACES / CLIPS_TABLE)


def read_validation(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``validate`` stage's ``metrics.json``: counts, reasons and the checks' outcomes."""
    return json.loads((Path(root) / VALIDATION / "metrics.json").read_text())


def quarantine_reasons(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Quarantined clips per reason (a clip with several reasons counts under each)."""
    table = pd.read_csv(Path(root) / VALIDATION / "quarantine.csv", dtype=str).fillna("")
    reasons = table["reason"].str.split("; ").explode()
    reasons = reasons[reasons.fillna("") != ""]
    counts = reasons.value_counts().rename_axis("reason").rename("clips")
    return counts.reset_index()


def class_balance(root: str | os.PathLike[str]) -> pd.DataFrame:
    """Accepted clips per class: rows (dataset, split), one column per class."""
    balance = json.loads((Path(root) / VALIDATION / "balance.json").read_text())
    rows = {
        (dataset, split): counts
        for dataset, block in (balance.get("datasets") or {}).items()
        for split, counts in (block.get("counts") or {}).items()
    }
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame.from_dict(rows, orient="index").fillna(0).astype(int)
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["dataset", "split"])
    return frame.sort_index()


def pick_clips(clips: pd.DataFrame, limit: int = 6, split: str | None = None) -> pd.DataFrame:
    """Up to ``limit`` clips in shards: one per (dataset, label) first, each from the speaker
    shown least so far, so that the picks show different people; deterministic."""
    table = clips[clips["status"] == "ok"]
    if split is not None:
        table = table[table["split"] == split]
    table = table.sort_values("clip_id", kind="stable")
    turn = table.groupby("speaker", sort=False).cumcount()  # n-th clip of its speaker
    table = table.assign(_turn=turn).sort_values(["_turn", "speaker"], kind="stable")
    table = table.drop(columns="_turn").reset_index(drop=True)
    shown: dict[str, int] = {}
    first: list[int] = []
    for _, group in table.groupby(["dataset", "label"], sort=False):
        index = int(group["speaker"].map(lambda s: shown.get(s, 0)).idxmin())
        first.append(index)
        speaker = table.at[index, "speaker"]
        shown[speaker] = shown.get(speaker, 0) + 1
    rest = [i for i in table.index if i not in set(first)]
    return table.loc[first + rest].head(limit).reset_index(drop=True)


def plot_clip_distributions(
    clips: pd.DataFrame, thresholds: Mapping[str, float] | None = None
) -> Figure:
    """Histograms of duration, face detection rate and audio RMS, ok vs quarantined clips;
    ``thresholds`` (column -> value, e.g. the ``validate`` minimums) are drawn as lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3), layout="constrained")
    axes = fig.subplots(1, 3)
    columns = (("duration", "duration (s)"), ("detection_rate", "face detection rate"),
               ("audio_rms_db", "audio RMS (dBFS)"))  # fmt: skip
    for ax, (column, label) in zip(axes, columns, strict=True):
        groups = []
        for status in ("ok", "quarantined"):
            values = clips.loc[clips["status"] == status, column].astype(float)
            groups.append((status, values[np.isfinite(values)].to_numpy()))
        present = [(s, v) for s, v in groups if v.size]
        if present:
            ax.hist([v for _, v in present], bins=20, stacked=True,
                    label=[f"{s} ({v.size})" for s, v in present])  # fmt: skip
            ax.legend(fontsize=8)
        if thresholds and column in thresholds:
            ax.axvline(thresholds[column], color="red", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("clips")
    return fig


def plot_face_grid(
    shard_dir: str | os.PathLike[str], clips: pd.DataFrame, frames_per_clip: int = 4
) -> Figure:
    """One row per clip: ``frames_per_clip`` face crops spread over the clip (from its shard)
    and the log-mel fbank of its audio (the model's audio input, before padding)."""
    from matplotlib.figure import Figure

    if clips.empty:
        raise ValueError("no clips to show")
    k = frames_per_clip
    fig = Figure(figsize=(1.7 * k + 3.5, 1.9 * len(clips)), layout="constrained")
    axes = fig.subplots(len(clips), k + 1, squeeze=False, width_ratios=[1] * k + [2])
    readers: dict[str, ShardReader] = {}
    try:
        for r, row in enumerate(clips.itertuples(index=False)):
            if row.shard not in readers:
                readers[row.shard] = ShardReader(Path(shard_dir) / row.shard)
            reader = readers[row.shard]
            meta = reader.meta(row.clip_id)
            count = int(meta["frames"])
            for c, i in enumerate(np.linspace(0, count - 1, k).round().astype(int)):
                ax = axes[r, c]
                ax.imshow(reader.frame(row.clip_id, int(i)))
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlabel(f"{float(meta['times'][i]):.1f} s", fontsize=7)
            axes[r, 0].set_ylabel(f"{row.label or row.dataset}\n{row.split}", fontsize=8)
            axes[r, 0].set_title(row.clip_id, loc="left", fontsize=8)
            audio = reader.audio(row.clip_id)  # [N] at 16 kHz
            feats = fbank(audio)[: max(1, min(audio.size // 160, 1024))]  # [T, 128]
            ax = axes[r, k]
            ax.imshow(feats.T.numpy(), aspect="auto", origin="lower", cmap="magma")
            ax.set_xlabel("frame (10 ms)", fontsize=7)
            ax.set_ylabel("mel bin", fontsize=7)
            ax.tick_params(labelsize=6)
    finally:
        for reader in readers.values():
            reader.close()
    return fig


def plot_curves(
    frame: pd.DataFrame, x: str, panels: Mapping[str, Sequence[str]], title: str | None = None
) -> Figure:
    """One panel per entry of ``panels`` (title -> columns of ``frame``) against ``x``;
    columns ``frame`` lacks are skipped."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, columns) in zip(axes, panels.items(), strict=True):
        for column in columns:
            if column in frame:
                ax.plot(frame[x], frame[column], marker=".", label=column)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


# ------------------------------------------------------------------------------ Fig. 2


def reconstruction_figures(
    model: SocialMAE,
    dataset: ShardDataset,
    indices: Iterable[int],
    directory: str | os.PathLike[str],
    seed: int = 0,
    mask_ratio: float = 0.75,
) -> list[Path]:
    """The paper's Fig. 2 (original / masked / reconstructed frames, fbank beside them) for
    clips ``indices`` of ``dataset``, one PNG each in ``directory`` (the pretrain stage's
    figure code, so the notebook shows what ``reconstruction.png`` shows)."""
    from socialmae.figures import save_reconstruction_figure

    paths = []
    for n, index in enumerate(indices):
        item = dataset[index]
        row = dataset.table.iloc[index]
        label = f", {row['label']}" if row["label"] else ""
        path = Path(directory) / f"{n:02d}-{item['clip_id']}.png"
        save_reconstruction_figure(
            model, item["audio"][None], item["video"][None], path, seed=seed,
            mask_ratio=mask_ratio,
            title=f"{item['clip_id']} ({row['split']}{label}): original / masked / "
            "reconstructed",
        )  # fmt: skip
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ MLflow runs


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
                low, high = metrics.bootstrap_ci(metrics.metric_function(spec, name), targets,
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
            result = metrics.paired_permutation_test(
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


# ------------------------------------------------------------------------------ tables


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


# ------------------------------------------------------------------------------ outcomes


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
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from socialmae.registry import (
        TAG_DECISION_OUTCOME,
        TAG_METRIC_NAME,
        TAG_METRIC_VALUE,
        model_name,
    )

    columns = ["version", "aliases", "metric", "value", "outcome", "run_id"]
    client = MlflowClient(tracking_uri=uri)
    name = model_name(task)
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
