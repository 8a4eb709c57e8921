"""`dvc repro` end to end (small demo params): every stage runs, the model is registered and
the gate set `champion`, a second repro does nothing, and data/models go through a DVC remote."""

import json
import shutil
import subprocess

import mlflow
import pandas as pd
import pytest
from conftest import cli_env

pytestmark = pytest.mark.integration


def _run(root, *command):
    done = subprocess.run(command, cwd=root, env=cli_env(root), capture_output=True, text=True)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def test_repro_runs_every_stage_and_promotes_through_the_gate(demo_pipeline):
    root = demo_pipeline
    assert json.loads((root / "data/raw/demo/download_metrics.json").read_text())["clips"] == 24
    assert json.loads((root / "data/processed/validation/metrics.json").read_text())["success"]
    clips = pd.read_parquet(root / "data/interim/faces/clips.parquet")  # no checkout location
    assert all(p.startswith("data/raw/demo/clips/") for p in clips["path"])  # in tracked data
    assert json.loads((root / "outputs/pretrain/metrics.json").read_text())["steps"] == 9
    best = json.loads((root / "outputs/tune/demo/best_params.json").read_text())
    assert set(best["params"]) == {"optim.lr", "head_lr"} and best["n_trials"]["complete"] >= 1
    result = json.loads((root / "outputs/finetune/demo/metrics.json").read_text())
    assert result["primary_metric"] == "f1_macro" and result["modes"] == ["multimodal", "audio",
                                                                          "video"]  # fmt: skip
    assert all("f1_macro_ci95" in result[mode]["test"] for mode in result["modes"])
    effective = json.loads((root / "outputs/finetune/demo/params.json").read_text())
    assert effective["params"]["epochs"] == 3 and effective["params"]["preset"] == "demo"
    assert effective["params_video"]["batch"] == 4  # the demo's per-mode change
    assert set(result["comparisons"]) == {"multimodal_vs_audio", "multimodal_vs_video",
                                          "audio_vs_video"}  # fmt: skip
    decision = json.loads((root / "outputs/register/demo/decision.json").read_text())
    assert decision["promoted"] and decision["champion"] == decision["version"] == 1

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("socialmae-demo", "champion")
    assert int(champion.version) == 1 and champion.tags["test_fingerprint"] == result["test_set"]

    again = _run(root, "dvc", "repro")
    assert "Running stage" not in again and "up to date" in again, again
    status = _run(root, "dvc", "status")
    assert "up to date" in status, status


def test_registering_the_same_model_again_adds_no_version(demo_pipeline):
    """Same weights, preprocessing and test set: the existing version goes through the gate
    again (it is the champion already) and says it was not registered again."""
    root = demo_pipeline
    out = _run(root, "socialmae", "register", "demo")
    decision = json.loads(out[out.index("{") :])
    assert decision["version"] == 1 and not decision["registered_again"]
    assert decision["outcome"] == "kept" and decision["champion"] == 1
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert len(client.search_model_versions("name = 'socialmae-demo'")) == 1


def test_push_and_pull_through_a_local_remote(demo_pipeline, tmp_path):
    root = demo_pipeline
    _run(root, "dvc", "remote", "add", "-f", "-d", "local", str(tmp_path / "remote"))
    _run(root, "dvc", "push")
    model = root / "outputs/finetune/demo/modes/multimodal/model/model.safetensors"
    before = model.read_bytes()
    shutil.rmtree(root / "outputs/finetune/demo/modes")
    shutil.rmtree(root / "data/interim/faces")
    shutil.rmtree(root / ".dvc/cache")
    _run(root, "dvc", "pull")
    assert model.read_bytes() == before
    assert (root / "data/interim/faces/clips.parquet").is_file()
    status = _run(root, "dvc", "status")  # (decision.json changed in the test above)
    assert "data/interim" not in status and "outputs/finetune" not in status, status


@pytest.mark.slow  # 2 minutes: re-runs crop_faces and everything after it
def test_forcing_a_stage_on_unchanged_inputs_leaves_the_pipeline_up_to_date(demo_pipeline):
    """Nothing run-dependent (timings, timestamps, temporary names) sits in a tracked output
    that a later stage depends on: re-running any stage invalidates nothing."""
    root = demo_pipeline
    _run(root, "dvc", "repro")  # the tests above registered by hand: bring it up to date first
    assert "up to date" in _run(root, "dvc", "status")
    trials = root / "outputs/tune/demo/study/trials.csv"
    before = trials.read_bytes()
    leftovers = {  # what killed runs of the stages with persisted outputs leave
        "download": root / "data/raw/demo/clips/.c.mp4.x0y1z2w3.tmp",
        "crop_faces": root / "data/interim/faces/.shard-00000.tar.a1b2c3d4.tmp",
        "tune@demo": trials.with_name(".trials.csv.e5f6g7h8.tmp"),
    }
    for stage in ("download", "crop_faces", "validate", "pretrain", "tune@demo", "finetune@demo"):
        if stage in leftovers:
            leftovers[stage].write_text("half-written")
        _run(root, "dvc", "repro", "-f", "-s", stage)
        status = _run(root, "dvc", "status")
        assert "up to date" in status, f"after forcing {stage}: {status}"
    # the study was continued, not started again: its finished trials (and their durations)
    # are the same ones, and no trial ran
    assert trials.read_bytes() == before
    assert not [p for p in leftovers.values() if p.exists()]
