"""Fine-tuning on the demo shards: outputs, model selection, lr groups, linear probe,
regression, and the significance test against a baseline run."""

import csv
import json
import os
import shutil

import mlflow
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tests_helpers import free_port

from socialmae.model import SocialMAE, SocialMAEClassifier, get_preset
from socialmae.params import ParamsError, from_mapping
from socialmae.tasks import TRAITS, TaskSpec, get_task
from socialmae.train.engine import param_groups
from socialmae.train.evaluation import read_predictions
from socialmae.train.finetune import (
    FinetuneParams,
    finetune,
    finetune_modes,
    params_for_mode,
    step_mode,
    with_overrides,
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A (randomly initialised) tiny pretraining model saved as the init checkpoint."""
    path = tmp_path_factory.mktemp("init") / "model"
    torch.manual_seed(3)
    SocialMAE(get_preset("tiny")).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def _params(tmp_path, init, **changes) -> FinetuneParams:
    values = {
        "init": str(init), "epochs": 4, "batch": 2, "workers": 0,
        "optim": {"lr": 1e-3, "schedule": "constant"}, "head_lr": 3e-3,
        "bootstrap_resamples": 200, "permutations": 200, **changes,
    }  # fmt: skip
    return from_mapping(FinetuneParams, values, "finetune")


def test_finetune_selects_on_val_and_scores_test(demo_shards, pretrained, tmp_path):
    reports = []
    params = _params(tmp_path, pretrained)
    out = tmp_path / "out"
    result = finetune(params, "demo", demo_shards, out, report=lambda e, v: reports.append((e, v)))

    with (out / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in history] == [0, 1, 2, 3]
    val = [float(r["val_f1_macro"]) for r in history]
    assert reports == [(e, pytest.approx(v)) for e, v in enumerate(val)]
    assert result["best_epoch"] == max(range(4), key=lambda e: (val[e], -e))
    assert result["val"]["f1_macro"] == pytest.approx(val[result["best_epoch"]])
    losses = [float(r["train_loss"]) for r in history]
    assert losses[-1] < losses[0]

    test = result["test"]
    low, high = test["f1_macro_ci95"]
    assert low <= test["f1_macro"] <= high
    assert json.loads((out / "metrics.json").read_text()) == result
    ids, _, outputs = read_predictions(out, get_task("demo"))
    assert len(ids) == len(set(ids)) == 6 and outputs.shape == (6, 6)
    assert (out / "confusion_matrix.png").stat().st_size > 5_000

    init = load_file(str(pretrained / "model.safetensors"))
    tuned = load_file(str(out / "model" / "model.safetensors"))
    assert not torch.equal(init["blocks_u.0.attn.qkv.weight"], tuned["blocks_u.0.attn.qkv.weight"])
    assert "mlp_head.1.weight" in tuned and "decoder_embed.weight" not in tuned
    model = SocialMAEClassifier.from_pretrained(out / "model")
    assert model.labels is not None and model.labels[0] == "anger"

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["socialmae-demo"])
    assert len(runs) == 1
    assert runs.loc[0, "metrics.test_f1_macro"] == pytest.approx(test["f1_macro"])
    assert runs.loc[0, "tags.mode"] == "multimodal"


def test_head_lr_group_holds_exactly_the_head(pretrained):
    model = SocialMAEClassifier(get_preset("tiny"), 6)
    groups = param_groups(model, 1e-4, 0.05, head_prefix="mlp_head.", head_lr=1e-2)
    head = [g for g in groups if g["group"] == "head"]
    assert {n for g in head for n in g["names"]} == {
        "mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias"
    }  # fmt: skip
    assert all(g["lr"] == 1e-2 for g in head)
    names = [n for g in groups for n in g["names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)  # each exactly once
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "pos_embed_a" in no_decay and "blocks_a.0.norm1.weight" in no_decay
    assert "blocks_a.0.attn.qkv.weight" not in no_decay

    decayed = param_groups(model, 1e-4, 0.0, "mlp_head.", 1e-2, layer_decay=0.5)
    lr_of = {n: g["lr"] for g in decayed for n in g["names"]}
    assert lr_of["patch_embed_a.proj.weight"] < lr_of["blocks_a.0.mlp.fc1.weight"]
    assert lr_of["blocks_a.1.mlp.fc1.weight"] < lr_of["blocks_u.0.mlp.fc1.weight"]
    assert lr_of["norm.weight"] == 1e-4 and lr_of["mlp_head.1.weight"] == 1e-2
    with pytest.raises(ValueError, match="empty head group"):
        param_groups(model, 1e-4, 0.0, head_prefix="head.")


def test_linear_probe_leaves_the_encoder_untouched(demo_shards, pretrained, tmp_path):
    params = _params(tmp_path, pretrained, epochs=1, freeze_encoder=True, modes=["video"])
    finetune(params, "demo", demo_shards, tmp_path / "probe")
    init = load_file(str(pretrained / "model.safetensors"))
    tuned = load_file(str(tmp_path / "probe" / "model" / "model.safetensors"))
    for key, value in tuned.items():
        if not key.startswith("mlp_head."):
            assert torch.equal(value, init[key]), key
    assert not torch.allclose(tuned["mlp_head.1.weight"], torch.zeros(6, 64))


def test_regression_task_with_l1_and_baseline_significance(demo_shards, pretrained, tmp_path):
    """A 5-trait regression view of the demo clips (targets derived from the emotion)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for tar in demo_shards.glob("*.tar"):
        (shards / tar.name).symlink_to(tar)
    table = pd.read_parquet(demo_shards / "clips.parquet")
    emotions = sorted(set(table["label"]))
    table["targets"] = [
        json.dumps([(emotions.index(label) + k) % 6 / 5 for k in range(5)])
        for label in table["label"]
    ]
    table.to_parquet(shards / "clips.parquet")
    task = TaskSpec("demo", "regression", TRAITS)

    first = finetune(_params(tmp_path, pretrained, epochs=2), task, shards, tmp_path / "a")
    assert first["primary_metric"] == "mean_accuracy"
    assert set(first["test"]) >= {"mean_accuracy", "mae", "accuracy/openness"}
    assert 0 < first["test"]["mean_accuracy"] <= 1
    assert not (tmp_path / "a" / "confusion_matrix.png").exists()

    second = finetune(
        _params(tmp_path, pretrained, epochs=1, modes=["audio"], baseline=str(tmp_path / "a")),
        task, shards, tmp_path / "b",
    )  # fmt: skip
    baseline = second["test"]["baseline"]
    assert baseline["mean_accuracy"] == pytest.approx(first["test"]["mean_accuracy"])
    assert baseline["p_min"] <= baseline["p_value"] <= 1

    shutil.copytree(tmp_path / "a", tmp_path / "other")
    frame = pd.read_parquet(tmp_path / "other" / "predictions.parquet")
    frame.iloc[:2].to_parquet(tmp_path / "other" / "predictions.parquet")
    with pytest.raises(ValueError, match="same test set"):
        finetune(
            _params(tmp_path, pretrained, epochs=1, baseline=str(tmp_path / "other")),
            task, shards, tmp_path / "c",
        )  # fmt: skip


def test_overrides_and_bad_params_name_the_key():
    params = from_mapping(FinetuneParams, {}, "finetune")
    tuned = with_overrides(params, {"optim.lr": 3e-4, "head_lr": 1e-3, "augment.mixup": 0.5})
    assert (tuned.optim.lr, tuned.head_lr, tuned.augment.mixup) == (3e-4, 1e-3, 0.5)
    with pytest.raises(ParamsError, match=r"finetune\.optim\.learning_rate: no such parameter"):
        with_overrides(params, {"optim.learning_rate": 1e-3})
    with pytest.raises(ParamsError, match=r"finetune\.epochs"):
        with_overrides(params, {"epochs": "many"})
    with pytest.raises(ParamsError, match="layer_decay"):
        from_mapping(FinetuneParams, {"layer_decay": 1.5}, "finetune")


def test_every_mode_is_scored_on_the_same_clips(demo_shards, pretrained, tmp_path):
    """The paper's Table I rows: one model per mode (two at a time in processes), a table with
    val/test per mode, and a paired permutation test for every pair of modes."""
    params = _params(
        tmp_path, pretrained, epochs=2, modes=["multimodal", "audio", "video"], parallel_modes=2,
        by_mode={"video": {"batch": 3, "epochs": 1}},
    )  # fmt: skip
    out = tmp_path / "out"
    table = finetune_modes(params, "demo", demo_shards, out)

    assert table["modes"] == ["multimodal", "audio", "video"]
    assert json.loads((out / "metrics.json").read_text()) == table
    for mode in table["modes"]:
        single = json.loads((out / "modes" / mode / "metrics.json").read_text())
        assert single["mode"] == mode and single["test_set"] == table["test_set"]
        assert table[mode]["test"] == single["test"]
        assert SocialMAEClassifier.from_pretrained(out / "modes" / mode / "model").mode == mode
    assert json.loads((out / "modes/video/metrics.json").read_text())["steps"] == 12 // 3
    assert set(table["comparisons"]) == {"multimodal_vs_audio", "multimodal_vs_video",
                                         "audio_vs_video"}  # fmt: skip
    first = table["comparisons"]["multimodal_vs_audio"]
    assert first["difference"] == pytest.approx(
        table["multimodal"]["test"]["f1_macro"] - table["audio"]["test"]["f1_macro"]
    )
    assert 0 < first["p_min"] <= first["p_value"] <= 1
    history = pd.read_csv(out / "history.csv")
    assert {"multimodal_train_loss", "audio_val_f1_macro", "video_lr"} <= set(history.columns)
    assert history["epoch"].tolist() == [0, 1]


def test_per_mode_changes_and_early_stopping(demo_shards, pretrained, tmp_path):
    params = _params(tmp_path, pretrained, by_mode={"video": {"optim": {"lr": 5e-4}}})
    assert params_for_mode(params, "video").optim.lr == 5e-4
    assert params_for_mode(params, "audio").optim == params.optim
    with pytest.raises(ParamsError, match=r"by_mode\.video\.optim\.rate"):
        params_for_mode(_params(tmp_path, pretrained, by_mode={"video": {"optim": {"rate": 1}}}),
                        "video")  # fmt: skip
    with pytest.raises(ParamsError, match="by_mode"):
        _params(tmp_path, pretrained, by_mode={"smell": {}})

    # a learning rate of ~0 never improves on the first validation: stop after `patience`
    frozen = _params(tmp_path, pretrained, epochs=10, patience=2, head_lr=1e-12,
                     optim={"lr": 1e-12, "schedule": "constant"})  # fmt: skip
    result = finetune(frozen, "demo", demo_shards, tmp_path / "stopped")
    history = pd.read_csv(tmp_path / "stopped" / "history.csv")
    assert result["best_epoch"] == 0 and history["epoch"].tolist() == [0, 1, 2]


def test_modality_dropout_trains_some_steps_on_one_stream():
    """A share p of a multimodal model's steps see one stream (half audio, half video),
    the same steps on every rank and rerun; other modes are never changed."""
    params = from_mapping(FinetuneParams, {"modality_dropout": 0.4, "seed": 1}, "finetune")
    steps = [step_mode(params, "multimodal", step) for step in range(4000)]
    assert steps == [step_mode(params, "multimodal", step) for step in range(4000)]
    share = {mode: steps.count(mode) / len(steps) for mode in ("multimodal", "audio", "video")}
    assert share["multimodal"] == pytest.approx(0.6, abs=0.03)
    assert share["audio"] == pytest.approx(0.2, abs=0.03)
    assert share["video"] == pytest.approx(0.2, abs=0.03)
    assert {step_mode(params, "audio", s) for s in range(100)} == {"audio"}
    off = from_mapping(FinetuneParams, {}, "finetune")
    assert {step_mode(off, "multimodal", s) for s in range(100)} == {"multimodal"}
    with pytest.raises(ParamsError, match="modality_dropout"):
        from_mapping(FinetuneParams, {"modality_dropout": 1.0}, "finetune")


def test_checkpoints_resume_only_onto_the_same_init_weights(demo_shards, tmp_path):
    """The init path is the same but its weights changed (pretrain ran again): the old
    per-epoch checkpoints are not resumed; the run equals a fresh one from the new weights."""
    init = tmp_path / "init"
    models = []
    for seed, out in ((3, "out"), (4, "out"), (4, "fresh")):
        torch.manual_seed(seed)
        shutil.rmtree(init, ignore_errors=True)
        SocialMAE(get_preset("tiny")).save_pretrained(init)
        finetune(_params(tmp_path, init, epochs=2), "demo", demo_shards, tmp_path / out)
        models.append(load_file(tmp_path / out / "model" / "model.safetensors"))
    first, again, fresh = models
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)
    assert not torch.equal(again["mlp_head.1.weight"], first["mlp_head.1.weight"])


@pytest.mark.slow  # 25 s: torchrun with two gloo ranks
@pytest.mark.integration
def test_two_process_gloo_ddp_with_modality_dropout(demo_shards, pretrained, tmp_path):
    """torchrun with 2 CPU processes (gloo): a multimodal model trained partly on one stream
    (some parameters unused on those steps) finishes, with the global batch over both ranks."""
    import subprocess
    import sys

    import yaml

    values = {"init": str(pretrained), "epochs": 2, "batch": 2, "workers": 0,
              "modality_dropout": 0.5, "optim": {"lr": 1e-3, "schedule": "constant"},
              "bootstrap_resamples": 50, "permutations": 50}  # fmt: skip
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"finetune": values}))
    port = free_port()
    worker = os.path.join(os.path.dirname(__file__), "finetune_worker.py")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        worker, str(params), str(demo_shards), str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # fmt: skip
    subprocess.run(command, check=True, env=env, timeout=300)
    single = finetune(from_mapping(FinetuneParams, values, "finetune"), "demo", demo_shards,
                      tmp_path / "single")  # fmt: skip
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["steps"] * 2 == single["steps"]  # each step took a batch from both ranks
    assert 0 <= result["test"]["f1_macro"] <= 1
    assert SocialMAEClassifier.from_pretrained(tmp_path / "out" / "model").mode == "multimodal"
