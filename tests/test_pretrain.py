"""Pretraining on the demo shards: the loss falls, a killed run resumes to the same weights,
and a 2-process gloo DDP run matches one process with the same global batch."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from socialmae.data.dataset import ShardDataset
from socialmae.model import SocialMAE, get_preset
from socialmae.params import ParamsError, from_mapping
from socialmae.train.engine import Checkpointer, Position, model_fingerprint
from socialmae.train.pretrain import PretrainParams, pretrain
from socialmae.train.stages import stage_pretrain

WORKER = Path(__file__).with_name("pretrain_worker.py")
TINY = {
    "preset": "tiny",
    "batch": 2,
    "workers": 0,
    "optim": {"lr": 1e-3, "schedule": "constant"},
    "log_every": 1,
}


@pytest.fixture(autouse=True)
def _tracking(tmp_path, monkeypatch):
    """Runs (and subprocesses) log to a fresh sqlite store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


def _params(tmp_path: Path, **changes) -> tuple[PretrainParams, Path]:
    values = {**TINY, **changes}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"pretrain": values}))
    return from_mapping(PretrainParams, values, "pretrain"), path


def _eval_loss(model: SocialMAE, shards: Path) -> float:
    """Reconstruction loss on every clip with fixed masks (independent of training noise)."""
    data = ShardDataset(shards, model.config, train=False)
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        out = model(batch["audio"], batch["video"], generator=torch.Generator().manual_seed(0))
    return float(out.loss_mae_audio + out.loss_mae_video)


def test_pretraining_lowers_the_reconstruction_loss(demo_shards, tmp_path):
    params, _ = _params(tmp_path, epochs=8, split="train")
    torch.manual_seed(params.seed)
    before = _eval_loss(SocialMAE(get_preset("tiny")), demo_shards)
    metrics = pretrain(params, demo_shards, tmp_path / "out")
    after = _eval_loss(SocialMAE.from_pretrained(tmp_path / "out" / "model"), demo_shards)
    assert metrics["steps"] == 8 * 6  # 12 training clips, batch 2
    assert after < 0.8 * before, (before, after)
    # the held-out (val) clips, scored before and after with the same masks
    heldout = metrics["heldout"]
    assert heldout["split"] == "val" and heldout["clips"] == 6
    first, last = heldout["before"], heldout["after"]
    for name in ("audio", "video"):
        assert last[f"mae_{name}"] < 0.9 * first[f"mae_{name}"], (name, first, last)
        assert last[f"mae_{name}_mean_baseline"] == pytest.approx(
            first[f"mae_{name}_mean_baseline"]
        )
    assert last["retrieval_chance"] == pytest.approx(1 / 6)
    assert all(0 <= last[k] <= 1 for k in ("retrieval_v2a", "retrieval_a2v"))
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 48 and history[0].startswith("step,epoch,lr,loss")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 48
    assert (tmp_path / "out" / "reconstruction.png").stat().st_size > 10_000

    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["socialmae-pretrain"])
    assert len(runs) == 1 and runs.loc[0, "params.preset"] == "tiny"
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(runs.loc[0, "run_id"], "loss")) == 48
    artifacts = {a.path for a in client.list_artifacts(runs.loc[0, "run_id"])}
    assert {"reconstruction.png", "history.csv", "model"} <= artifacts


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.slow  # 30 s: three training processes, one killed
def test_a_killed_run_resumes_to_the_same_weights(demo_shards, tmp_path):
    params, path = _params(tmp_path, epochs=1, checkpoint_every=1)
    reference = tmp_path / "reference"
    pretrain(params, demo_shards, reference)

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, WORKER, path, demo_shards, killed])
    checkpoint = killed / "checkpoints" / "step-00000004"
    deadline = time.monotonic() + 120
    while not checkpoint.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # no clean shutdown: whatever is on disk is all there is
    process.wait()
    assert checkpoint.is_dir() and not (killed / "model").exists()

    subprocess.run([sys.executable, WORKER, path, demo_shards, killed], check=True)
    expected, resumed = _weights(reference), _weights(killed)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert json.loads((killed / "metrics.json").read_text())["steps"] == 6

    # the resumed run logged into the killed run's MLflow run: one run per training, all ended
    import mlflow

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("socialmae-pretrain").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert len(set(steps)) == 6  # steps before the kill and after the resume, in one run


def test_runs_of_killed_processes_are_marked_killed(tmp_path):
    import mlflow

    from socialmae.tracking import TAG_HOST, TAG_PID, reap_abandoned_runs

    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("abandoned")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = client.create_run(experiment, tags={TAG_HOST: socket.gethostname(),
                                               TAG_PID: str(gone.pid)})  # fmt: skip
    alive = client.create_run(experiment, tags={TAG_HOST: socket.gethostname(),
                                                TAG_PID: str(os.getpid())})  # fmt: skip
    elsewhere = client.create_run(experiment, tags={TAG_HOST: "another-host", TAG_PID: "1"})
    assert reap_abandoned_runs(experiment, uri) == [dead.info.run_id]
    status = {r: client.get_run(r).info.status for r in
              (dead.info.run_id, alive.info.run_id, elsewhere.info.run_id)}  # fmt: skip
    assert list(status.values()) == ["KILLED", "RUNNING", "RUNNING"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 25 s: torchrun with two gloo ranks, then one process
@pytest.mark.integration
def test_two_process_gloo_ddp_matches_one_process(demo_shards, tmp_path):
    single, _ = _params(tmp_path / "single", epochs=1, batch=4)
    _, ddp_path = _params(tmp_path / "ddp", epochs=1, batch=2)
    pretrain(single, demo_shards, tmp_path / "single" / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        WORKER, ddp_path, demo_shards, tmp_path / "ddp" / "out",
    ]  # fmt: skip
    subprocess.run([str(c) for c in command], check=True, env=env, timeout=300)
    one, two = _weights(tmp_path / "single" / "out"), _weights(tmp_path / "ddp" / "out")
    torch.manual_seed(single.seed)
    start = SocialMAE(get_preset("tiny")).state_dict()
    trained = 0
    for key in one:
        update = (one[key] - start[key]).norm()
        if update == 0:  # frozen modality norms
            continue
        trained += 1
        # Summation order differs between the runs, so compare against the training update:
        # a missed gather or a different mask would give a gap of the update's own size.
        assert (two[key] - one[key]).norm() < 1e-2 * update, key
    assert trained > 100
    metrics = json.loads((tmp_path / "ddp" / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3  # 12 clips, global batch 4


def test_non_finite_loss_stops_with_a_clear_message(demo_shards, tmp_path):
    params, _ = _params(tmp_path, epochs=1, optim={"lr": 1e30, "schedule": "constant"})
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at optimizer step"):
        pretrain(params, demo_shards, tmp_path / "out")


def test_bad_params_name_the_key():
    with pytest.raises(ParamsError, match=r"pretrain\.optim\.lr"):
        from_mapping(PretrainParams, {"optim": {"lr": "fast"}}, "pretrain")
    with pytest.raises(ParamsError, match=r"pretrain\.batchsize"):
        from_mapping(PretrainParams, {"batchsize": 8}, "pretrain")
    with pytest.raises(ParamsError, match="batch must be >= 1"):
        from_mapping(PretrainParams, {"batch": 0}, "pretrain")


@pytest.mark.parametrize(
    "values, key, reason",
    [
        ({"preset": "nosuch"}, "pretrain.preset", "unknown preset"),
        ({"device": "tpu"}, "pretrain.device", "expected auto, cpu"),
        ({"datasets": ["nosuch"]}, r"pretrain.datasets\[0\]", "unknown dataset"),
        ({"split": "bogus"}, "pretrain.split", "expected one of"),
        ({"mask_ratio_audio": 1.5}, "pretrain.mask_ratio_audio", r"ratio in \[0, 1\)"),
        ({"activation_checkpointing": "some"}, "pretrain.activation_checkpointing", "one of"),
    ],
)  # fmt: skip
def test_values_that_parse_but_are_invalid_stop_before_any_work(values, key, reason, tmp_path):
    """Checked when params are read: nothing in the output (resume checkpoints) is touched."""
    out = tmp_path / "out"
    kept = out / "checkpoints" / "step-00000003"
    kept.mkdir(parents=True)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"pretrain": {**TINY, **values}}))
    with pytest.raises(ParamsError, match=reason) as info:
        stage_pretrain(path, tmp_path / "no-shards", tmp_path / "no-validation", out)
    assert re.fullmatch(key, info.value.key) and kept.is_dir()


def test_a_misspelt_section_is_an_error_not_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"pretrian": {"epochs": 1}}))
    with pytest.raises(ParamsError, match="unknown section") as info:
        stage_pretrain(path, tmp_path / "no-shards", tmp_path / "no-validation", tmp_path / "o")
    assert info.value.key == "pretrian"


def test_checkpoints_of_other_settings_are_set_aside_until_the_new_run_saves(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    Checkpointer(tmp_path, "first").save(model, optimizer, scaler, Position(3, 0, 0))
    (tmp_path / ".step-00000004.qz81v0sd.tmp").mkdir()  # a save killed half-way
    other = Checkpointer(tmp_path, "second")
    assert other.latest() is None  # other settings: start from scratch...
    assert (tmp_path / "aside-first" / "step-00000003").is_dir()  # ...but nothing is lost
    assert not list(tmp_path.glob(".*"))
    back = Checkpointer(tmp_path, "first").latest()  # the earlier settings again: resume
    assert back is not None and back.name == "step-00000003"
    assert other.latest() is None
    other.save(model, optimizer, scaler, Position(1, 0, 0))
    assert not list(tmp_path.glob("aside-*")) and other.latest().name == "step-00000001"


def test_model_fingerprint_names_the_starting_point():
    """Same preset and seed: the same fingerprint; other weights or another input transform
    (the same weights, video_centering_gain set): another; runtime switches: the same."""

    def build(seed: int, **changes) -> SocialMAE:
        torch.manual_seed(seed)
        return SocialMAE(get_preset("tiny", **changes))

    base = model_fingerprint(build(0))
    assert model_fingerprint(build(0)) == base
    assert model_fingerprint(build(1)) != base
    assert model_fingerprint(build(0, video_centering_gain=4.0)) != base
    assert model_fingerprint(build(0, use_sdpa=False, activation_checkpointing="all")) == base


def test_code_fingerprint_changes_with_the_code_only(tmp_path):
    """Resume keys carry the code's hash: editing a module changes it, other files do not."""
    from socialmae.train.engine import code_fingerprint

    fresh = code_fingerprint.__wrapped__  # uncached, to see edits in one process
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    before = fresh(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert fresh(tmp_path) == before
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert fresh(tmp_path) != before
    assert code_fingerprint() == code_fingerprint()  # the package's, computed once
