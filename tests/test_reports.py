"""socialmae.reports: where the project is, the data-overview helpers, Fig. 2 for chosen clips,
and the paper's tables from MLflow runs (a throwaway sqlite store holding final runs, a tuning
trial, a failed run and a baseline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from socialmae import reports
from socialmae.data.manifest import ManifestRow, write_manifest
from socialmae.layout import RAW, VALIDATION
from socialmae.model import SocialMAE, get_preset
from socialmae.tasks import EMOTIONS, get_task
from socialmae.train import metrics, significance
from socialmae.train.evaluation import PREDICTIONS

DEMO = get_task("demo")


# --------------------------------------------------------------------------- the project


def test_project_root_from_the_environment_or_the_nearest_dvc_yaml(tmp_path, monkeypatch):
    monkeypatch.delenv(reports.PROJECT_ENV, raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "notebooks").mkdir()
    assert reports.project_root(tmp_path / "notebooks") == tmp_path.resolve()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert reports.project_root() == tmp_path.resolve()

    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.setenv(reports.PROJECT_ENV, str(other))
    assert reports.project_root() == other.resolve()
    monkeypatch.setenv(reports.PROJECT_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="SOCIALMAE_PROJECT"):
        reports.project_root()

    monkeypatch.delenv(reports.PROJECT_ENV)
    with pytest.raises(FileNotFoundError, match=r"no dvc\.yaml"):
        reports.project_root(other.parent.parent)


def test_tracking_uri_resolves_like_the_stages_relative_to_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert reports.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////abs/store.db")
    assert reports.tracking_uri(tmp_path) == "sqlite:////abs/store.db"
    (tmp_path / "params.yaml").write_text("mlflow: {tracking_uri: 'sqlite:///runs/m.db'}\n")
    assert reports.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'runs/m.db'}"
    (tmp_path / "params.yaml").write_text("mlflow: {tracking_uri: 'http://host:5000'}\n")
    assert reports.tracking_uri(tmp_path) == "http://host:5000"


def test_tasks_are_the_projects_then_the_papers(tmp_path):
    (tmp_path / "params.yaml").write_text("tasks: [demo, ndcme]\n")
    assert reports.tasks(tmp_path) == ("demo", "ndcme", "cremad", "firstimpressions")
    assert reports.tasks(tmp_path, include_paper=False) == ("demo", "ndcme")
    assert reports.tasks(tmp_path / "nowhere") == reports.PAPER_TASKS


# --------------------------------------------------------------------------- data overview


def _write_validation(root: Path) -> None:
    validation = root / VALIDATION
    validation.mkdir(parents=True)
    (validation / "metrics.json").write_text(json.dumps({"clips": 5, "quarantined": 2}))
    pd.DataFrame(
        {"clip_id": ["a", "b"], "path": ["a.mp4", "b.mp4"],
         "reason": ["too short: 0.2 s; silent audio", "silent audio"]}
    ).to_csv(validation / "quarantine.csv", index=False)  # fmt: skip
    balance = {"datasets": {"demo": {"counts": {"train": {"anger": 2, "fear": 1},
                                                "test": {"anger": 1}}}}}  # fmt: skip
    (validation / "balance.json").write_text(json.dumps(balance))


def test_data_overview_tables(tmp_path):
    rows = [
        ManifestRow(f"c{i}", f"c{i}.mp4", "demo", speaker, split, label)
        for i, (speaker, split, label) in enumerate(
            [("s1", "train", "anger"), ("s1", "train", "fear"), ("s2", "val", "anger"),
             ("s3", "test", "anger")]
        )
    ]  # fmt: skip
    write_manifest(rows, tmp_path / RAW / "demo")
    manifest = reports.read_manifests(tmp_path)
    summary = reports.split_summary(manifest)
    assert list(summary.index) == [("demo", "train"), ("demo", "val"), ("demo", "test")]
    assert summary.loc[("demo", "train")].tolist() == [2, 1, 2]
    assert reports.read_manifests(tmp_path / "empty").empty

    _write_validation(tmp_path)
    reasons = reports.quarantine_reasons(tmp_path)
    assert dict(zip(reasons["reason"], reasons["clips"], strict=True)) == {
        "silent audio": 2, "too short: 0.2 s": 1
    }  # fmt: skip
    balance = reports.class_balance(tmp_path)
    assert balance.loc[("demo", "train"), "fear"] == 1 and balance.loc[("demo", "test")].sum() == 1
    assert reports.read_validation(tmp_path)["quarantined"] == 2


def test_pick_clips_takes_one_clip_per_class_from_different_speakers_first():
    clips = pd.DataFrame(
        {"clip_id": ["a1", "a2", "a3", "b1", "b2", "q"],
         "dataset": ["demo"] * 6,
         "speaker": ["A", "A", "A", "B", "B", "A"],
         "split": ["train", "train", "val", "train", "val", "train"],
         "label": ["anger", "fear", "anger", "anger", "fear", "sadness"],
         "status": ["ok"] * 5 + ["quarantined"]}
    )  # fmt: skip
    picked = reports.pick_clips(clips, limit=3)
    assert picked["clip_id"].tolist() == ["a1", "b2", "b1"]  # anger (A), fear (B), then any
    assert reports.pick_clips(clips, split="val")["clip_id"].tolist() == ["a3", "b2"]
    assert "q" not in reports.pick_clips(clips, limit=10)["clip_id"].tolist()


def test_face_grid_and_reconstruction_figures_from_shards(demo_shards, tmp_path):
    from socialmae.data.dataset import ShardDataset

    clips = pd.read_parquet(demo_shards / "clips.parquet")
    sample = reports.pick_clips(clips, limit=2)
    fig = reports.plot_face_grid(demo_shards, sample, frames_per_clip=3)
    assert len(fig.axes) == 2 * 4
    fig.savefig(tmp_path / "grid.png")
    thresholds = {"duration": 0.5}
    assert len(reports.plot_clip_distributions(clips, thresholds).axes) == 3
    with pytest.raises(ValueError, match="no clips"):
        reports.plot_face_grid(demo_shards, sample.iloc[:0])

    model = SocialMAE(get_preset("tiny")).eval()
    data = ShardDataset(demo_shards, model.config, split="val")
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a notebook's inline backend
    try:
        paths = reports.reconstruction_figures(model, data, [0, 1], tmp_path / "fig2")
        assert matplotlib.get_backend() == "svg"  # restored after the Agg switch
    finally:
        matplotlib.use(backend)
    assert [p.name for p in paths] == [f"{n:02d}-{data.table['clip_id'][n]}.png" for n in (0, 1)]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_plot_curves_skips_absent_columns():
    history = pd.DataFrame({"step": [1, 2], "loss": [2.0, 1.0]})
    fig = reports.plot_curves(history, "step", {"a": ["loss", "absent"], "b": ["absent"]})
    assert [len(ax.lines) for ax in fig.axes] == [1, 0]


# --------------------------------------------------------------------------- MLflow runs


def _predictions(directory: Path, seed: int, ids: list[str], labels: np.ndarray) -> np.ndarray:
    """Write a classification ``predictions.parquet`` as fine-tuning does; return the logits."""
    logits = np.random.default_rng(seed).normal(size=(len(ids), len(EMOTIONS)))
    logits[np.arange(len(ids)) % 2 == 0, labels[::2]] += 3.0  # right on every other clip
    frame = pd.DataFrame({"clip_id": ids, "label": [EMOTIONS[i] for i in labels],
                          "predicted": [EMOTIONS[i] for i in logits.argmax(1)]})  # fmt: skip
    for k, name in enumerate(EMOTIONS):
        frame[f"logit/{name}"] = logits[:, k]
    directory.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(directory / PREDICTIONS, index=False)
    return logits


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store with socialmae-demo runs; returns (uri, root, facts)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("socialmae-demo", str(root / "artifacts"))
    ids = [f"clip-{i:02d}" for i in range(30)]
    labels = np.random.default_rng(0).integers(0, len(EMOTIONS), size=len(ids))
    # the baseline's predictions on the same clips, in another order
    base = _predictions(root / "outputs/baseline", 9, ids[::-1], labels[::-1])[::-1]
    facts = {"ids": ids, "labels": labels, "baseline": base}

    def run(start, mode="multimodal", status="FINISHED", test=True, seed=None, **params):
        tags = {"stage": "finetune", "task": "demo", "mode": mode}
        created = client.create_run(experiment, start_time=start, run_name=f"r{start}", tags=tags)
        run_id = created.info.run_id
        defaults = {"bootstrap_resamples": 100, "seed": 0, "baseline": None, "permutations": 200,
                    "clips_test": len(ids)}  # fmt: skip
        for key, value in {**defaults, **params}.items():
            client.log_param(run_id, key, str(value))
        client.log_metric(run_id, "val_f1_macro", 0.5)
        if test:
            for key, value in (("test_f1_macro", 0.3 + start / 1e4), ("test_f1_micro", 0.4)):
                client.log_metric(run_id, key, value)
        if seed is not None:
            out = root / "runs" / run_id
            facts[run_id] = _predictions(out, seed, ids, labels)
            client.log_artifact(run_id, str(out / PREDICTIONS))
        client.set_terminated(run_id, status)
        return run_id

    facts["old"] = run(1000, seed=1)
    facts["new"] = run(2000, seed=2, baseline="outputs/baseline")
    facts["trial"] = run(3000, test=False, seed=3)  # a tuning trial: no test metrics
    facts["failed"] = run(4000, status="FAILED", seed=4)
    facts["audio"] = run(1500, mode="audio")  # no predictions artifact
    return uri, root, facts


def test_latest_finetune_runs_skip_trials_failures_and_missing_tasks(store):
    uri, _, facts = store
    runs = reports.latest_finetune_runs(uri, ["demo", "cremad"])
    assert [(r.task, r.mode, r.run_id) for r in runs] == [
        ("demo", "audio", facts["audio"]), ("demo", "multimodal", facts["new"])
    ]  # fmt: skip
    new = runs[1]
    assert new.param("baseline") == "outputs/baseline" and new.param("seed") == 0
    assert new.start_time == pd.Timestamp(2000, unit="ms", tz="UTC")
    frame = reports.runs_frame(runs)
    assert frame["run_id"].tolist() == [facts["audio"], facts["new"]]
    assert frame["test_clips"].tolist() == [30, 30]
    assert reports.runs_frame([]).empty


def test_results_have_bootstrap_cis_and_the_baseline_p_value(store):
    uri, root, facts = store
    runs = reports.latest_finetune_runs(uri, ["demo"])
    results = reports.results_frame(runs, uri, root).set_index(["mode", "metric"])
    assert len(results) == 4
    logits, labels = facts[facts["new"]], facts["labels"]
    macro = results.loc[("multimodal", "f1_macro")]
    assert macro["value"] == pytest.approx(0.5) and macro["run_id"] == facts["new"]
    expected = significance.bootstrap_ci(metrics.metric_function(DEMO, "f1_macro"), labels, logits,
                                    100, seed=0)  # fmt: skip
    assert (macro["ci_low"], macro["ci_high"]) == pytest.approx(expected)
    test = significance.paired_permutation_test(metrics.metric_function(DEMO), labels, logits,
                                           facts["baseline"], 200, seed=0)  # fmt: skip
    assert macro["p_value"] == pytest.approx(test.p_value) and macro["p_min"] == test.p_min
    micro = results.loc[("multimodal", "f1_micro")]
    assert micro["ci_low"] <= micro["value"] <= micro["ci_high"] and math.isnan(micro["p_value"])
    audio = results.loc[("audio", "f1_macro")]  # no artifact: the value, no interval
    assert audio["value"] == pytest.approx(0.45) and math.isnan(audio["ci_low"])

    table = reports.paper_table(results.reset_index(), "demo")
    assert list(table.index) == [reports.OURS]
    assert list(table.columns) == [(m, h) for m in ("Audio", "Visual", "AV") for h in ("Mi", "Ma")]
    row = table.loc[reports.OURS]
    assert row[("AV", "Ma")].startswith(f"{macro['value']:.3f} [") and " p" in row[("AV", "Ma")]
    assert row[("Audio", "Mi")] == "0.400" and row[("Visual", "Mi")] == reports.MISSING


def test_baseline_p_value_falls_back_on_the_stages_metrics_json(store, tmp_path):
    uri, _, _ = store
    run = next(r for r in reports.latest_finetune_runs(uri, ["demo"]) if r.mode == "multimodal")
    report = {"mode": "multimodal", "test": {"f1_macro": run.metrics["test_f1_macro"],
              "baseline": {"p_value": 0.01, "p_min": 0.005}}}  # fmt: skip
    directory = tmp_path / "outputs/finetune/demo/modes/multimodal"
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps(report))
    results = reports.results_frame([run], uri, tmp_path)  # the baseline dir is not there
    macro = results.set_index("metric").loc["f1_macro"]
    assert (macro["p_value"], macro["p_min"]) == (0.01, 0.005)
    report["test"]["f1_macro"] += 0.1  # another run's numbers: no p-value
    (directory / "metrics.json").write_text(json.dumps(report))
    assert reports.results_frame([run], uri, tmp_path)["p_value"].isna().all()


def test_outcomes_of_a_task_without_outputs_are_missing(store, tmp_path):
    uri, _, _ = store
    assert reports.confusion_table(tmp_path, "demo") is None
    assert reports.promotion_decision(tmp_path, "demo") is None
    assert reports.registered_versions(uri, "demo").empty
    assert reports.latest_finetune_runs(uri, ["ndcme"]) == []


def test_confusion_table_rows_are_true_classes(tmp_path):
    ids = ["a", "b", "c"]
    directory = tmp_path / "outputs/finetune/demo/modes/audio"
    logits = _predictions(directory, 0, ids, np.array([0, 1, 1]))
    table = reports.confusion_table(tmp_path, "demo", "audio")
    assert list(table.index) == list(EMOTIONS) and table.values.sum() == 3
    assert table.loc["anger", EMOTIONS[logits[0].argmax()]] == 1
    assert reports.confusion_table(tmp_path, "demo") is None  # no multimodal model
    assert reports.confusion_table(tmp_path, "firstimpressions") is None


# --------------------------------------------------------------------------- tables


def _results(task: str, cells: dict[tuple[str, str], float]) -> pd.DataFrame:
    rows = [{"task": task, "mode": mode, "metric": metric, "value": value, "ci_low": value - 0.1,
             "ci_high": value + 0.1, "p_value": math.nan, "p_min": math.nan, "run_id": "r"}
            for (mode, metric), value in cells.items()]  # fmt: skip
    return pd.DataFrame(rows, columns=reports.RESULT_COLUMNS)


def test_format_cell():
    assert reports.format_cell(None) == reports.MISSING
    assert reports.format_cell({"value": math.nan}) == reports.MISSING
    assert reports.format_cell({"value": 0.5}) == "0.500"
    row = {"value": 0.5, "ci_low": 0.4, "ci_high": 0.61, "p_value": 0.02, "p_min": 0.001}
    assert reports.format_cell(row) == "0.500 [0.400, 0.610] p=0.02"
    assert reports.format_cell({**row, "p_value": 0.001}).endswith("p≤0.001")


def test_table_i_for_cremad_has_the_papers_rows_and_missing_modes():
    table = reports.paper_table(_results("cremad", {("video", "f1_micro"): 0.7}), "cremad")
    assert table.loc["Social-MAE (paper)", ("AV", "Ma")] == "0.842"
    assert table.loc["AuxFormer [16] (paper)", ("Audio", "Mi")] == "0.648"
    assert table.loc[reports.OURS, ("Visual", "Mi")] == "0.700 [0.600, 0.800]"
    assert table.loc[reports.OURS, ("Visual", "Ma")] == reports.MISSING
    assert reports.table_i(_results("cremad", {}), reference=False).index.tolist() == [reports.OURS]


def test_table_ii_per_trait_accuracy_and_mean():
    cells = {("multimodal", f"accuracy/{t}"): 0.9 for t in get_task("firstimpressions").labels}
    cells[("multimodal", "mean_accuracy")] = 0.9
    cells[("audio", "mean_accuracy")] = 0.8
    table = reports.paper_table(_results("firstimpressions", cells), "firstimpressions")
    assert list(table.columns) == ["Ope.", "Con.", "Ext.", "Agr.", "Neu.", "Avg."]
    assert table.loc["Social-MAE (paper)", "Avg."] == "0.903"
    assert table.loc[reports.OURS, "Neu."].startswith("0.900")
    audio_only = f"{reports.OURS}, Audio only"
    assert table.loc[audio_only, "Avg."].startswith("0.800")
    assert table.loc[audio_only, "Ope."] == reports.MISSING
    empty = reports.paper_table(_results("firstimpressions", {}), "firstimpressions")
    assert (empty.loc[reports.OURS] == reports.MISSING).all()


def test_table_iii_f1_per_modality():
    results = _results("ndcme", {("multimodal", "f1_macro"): 0.7, ("audio", "f1_micro"): 0.6})
    table = reports.paper_table(results, "ndcme")
    assert list(table.columns) == ["Pre-training", "Audio", "Visual", "Audiovisual"]
    assert table.loc["LSN-TCN [4] (paper)"].tolist() == ["Supervised", "0.438", "0.608", "0.590"]
    assert table.loc[reports.OURS, "Audiovisual"].startswith("0.700")
    assert table.loc[reports.OURS, "Audio"] == reports.MISSING  # micro is not the table's F1
    micro = reports.table_iii(results, metric="f1_micro", reference=False)
    assert micro.loc[reports.OURS, "Audio"].startswith("0.600")


def test_execute_notebook_runs_in_the_root_and_leaves_the_file(tmp_path):
    import nbformat
    from nbclient.exceptions import CellExecutionError

    path = tmp_path / "nb.ipynb"
    cells = [nbformat.v4.new_code_cell("import os\nos.getcwd()")]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    before = path.read_bytes()
    root = tmp_path / "project"
    root.mkdir()
    notebook = reports.execute_notebook(path, root, timeout=60)
    assert notebook.cells[0].outputs[0]["data"]["text/plain"] == repr(str(root))
    assert path.read_bytes() == before
    cells.append(nbformat.v4.new_code_cell("raise ValueError('boom')"))
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    with pytest.raises(CellExecutionError, match="boom"):
        reports.execute_notebook(path, root, timeout=60)
