"""Registry: logging, registration, the promotion gate and the pyfunc model, against a sqlite
tracking URI and a real ``mlflow server`` process; serving through ``mlflow models serve``."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from media import write_clip
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from socialmae import registry
from socialmae.data.sampling import ClipSampling
from socialmae.inference import Predictor
from socialmae.registry import locks
from socialmae.tasks import EMOTIONS
from socialmae.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri, task_name
from socialmae.train.engine import fingerprint

BIN = Path(sys.executable).parent
IDS = [f"clip-{i:03d}" for i in range(12)]


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this test started (the server and its workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_URI")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DO_NOT_TRACK="true",
               MLFLOW_DISABLE_TELEMETRY="true", **extra)  # fmt: skip
    return env


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real ``mlflow server``: sqlite backend and proxied artifacts in a temporary folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = root / "server.log"
    cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log, timeout=90)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def sqlite_root(tmp_path_factory) -> Path:
    """Folder of the module's sqlite tracking database (and its ./mlruns artifacts)."""
    return tmp_path_factory.mktemp("mlflow-sqlite")


def _use(uri: str, monkeypatch) -> Iterator[str]:
    """Make ``uri`` the process default (as a CLI's environment would), then empty its registry."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        client = MlflowClient(uri)
        for model in client.search_registered_models():
            client.delete_registered_model(model.name)


@pytest.fixture
def sqlite_uri(sqlite_root, monkeypatch) -> Iterator[str]:
    monkeypatch.chdir(sqlite_root)  # sqlite artifacts land in ./mlruns
    yield from _use(f"sqlite:///{sqlite_root / 'mlflow.db'}", monkeypatch)


@pytest.fixture
def server_uri(mlflow_server, sqlite_root, monkeypatch) -> Iterator[str]:
    monkeypatch.chdir(sqlite_root)
    yield from _use(mlflow_server, monkeypatch)


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.integration)])
def tracking_uri(request, sqlite_root, monkeypatch) -> Iterator[str]:
    """A plain sqlite tracking URI, then a real ``mlflow server``."""
    monkeypatch.chdir(sqlite_root)
    if request.param == "sqlite":
        uri = f"sqlite:///{sqlite_root / 'mlflow.db'}"
    else:
        uri = request.getfixturevalue("mlflow_server")
    yield from _use(uri, monkeypatch)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(b"this is not a video" * 50)
    return {"face": write_clip(root / "face.mp4", seconds=2.0), "corrupt": corrupt}


def _log(classifier_dir: Path, uri: str, value: float, ids=IDS, task="demo", **kw):
    fp = registry.test_set_fingerprint(ids)
    return registry.log_model(classifier_dir, task, "accuracy", value, fp, tracking_uri=uri, **kw)


def _aliases(uri: str, task: str = "demo") -> dict[str, int]:
    model = MlflowClient(uri).get_registered_model(task_name(task))
    return {alias: int(version) for alias, version in model.aliases.items()}


# --------------------------------------------------------------------------- unit pieces


def test_tracking_uri_resolution(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_provenance_helpers(tmp_path):
    assert registry.test_set_fingerprint(["b", "a"]) == registry.test_set_fingerprint(["a", "b"])
    assert registry.test_set_fingerprint(["a"]) != registry.test_set_fingerprint(["a", "b"])
    assert registry.test_set_fingerprint(["b", "a"]) == fingerprint(["a", "b"])  # finetune's
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n"
        "  download:\n    cmd: x\n    outs:\n"
        "    - path: data/raw/demo\n      hash: md5\n      md5: aaa.dir\n"
        "  crop_faces:\n    cmd: y\n    outs:\n"
        "    - path: data/interim/faces\n      hash: md5\n      md5: bbb.dir\n"
        "  smoke:\n    cmd: z\n    outs:\n"
        "    - path: outputs/smoke/model\n      hash: md5\n      md5: ccc.dir\n"
    )
    assert registry.dvc_data_hashes(lock) == {"data/interim/faces": "bbb.dir",
                                              "data/raw/demo": "aaa.dir"}  # fmt: skip
    assert registry.dvc_data_hashes(tmp_path / "absent.lock") == {}
    assert registry.git_revision(tmp_path) == (None, False)  # not a repository
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "dvc.lock"], check=True)
    subprocess.run(
        ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
         "commit", "-qm", "lock"], check=True,
    )  # fmt: skip
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert registry.git_revision(tmp_path) == (head, False)
    lock.write_text("changed")
    assert registry.git_revision(tmp_path) == (head, True)


# --------------------------------------------------------------------------- registry


def test_the_same_model_and_test_set_are_registered_once(sqlite_uri, classifier_dir, tmp_path):
    first = _log(classifier_dir, sqlite_uri, 0.5)
    again = _log(classifier_dir, sqlite_uri, 0.5)
    assert again.reused and again.version == first.version and not first.reused
    other_test_set = _log(classifier_dir, sqlite_uri, 0.5, ids=["other-clip"])
    other = tmp_path / "other"
    shutil.copytree(classifier_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["config"]["fbank_mean"] += 0.5  # another preprocessing of the same weights
    (other / "config.json").write_text(json.dumps(config))
    changed = _log(other, sqlite_uri, 0.5)
    assert not other_test_set.reused and not changed.reused
    assert len({first.version, other_test_set.version, changed.version}) == 3


def test_registration_does_not_warn_about_its_own_example(sqlite_uri, classifier_dir, caplog):
    caplog.set_level("WARNING", logger="socialmae")
    _log(classifier_dir, sqlite_uri, 0.5)
    assert "skipping" not in caplog.text
    assert logging.getLogger("socialmae.inference").level == logging.NOTSET  # restored


def test_log_model_registers_with_tags_and_signature(tracking_uri, classifier_dir, tmp_path):
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  download:\n    cmd: x\n    outs:\n"
        "    - path: data/raw/demo\n      hash: md5\n      md5: 0123.dir\n"
    )
    sampling = ClipSampling(window_seconds=3.0)
    v = _log(classifier_dir, tracking_uri, 0.625, sampling=sampling, dvc_lock=tmp_path / "dvc.lock",
             repo_dir=Path(__file__).parent)  # fmt: skip
    assert (v.name, v.version, v.model_uri) == ("socialmae-demo", 1, "models:/socialmae-demo/1")
    client = MlflowClient(tracking_uri)
    tags = client.get_model_version("socialmae-demo", "1").tags
    assert tags["task"] == "demo"
    assert (tags["metric_name"], float(tags["metric_value"])) == ("accuracy", 0.625)
    assert tags["test_fingerprint"] == registry.test_set_fingerprint(reversed(IDS))
    assert json.loads(tags["dvc_data_md5"]) == {"data/raw/demo": "0123.dir"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert tags["git_revision"] == (head or "unknown")
    assert client.get_run(v.run_id).data.metrics["accuracy"] == 0.625

    info = mlflow.models.get_model_info("models:/socialmae-demo/1")
    assert info.signature.inputs.input_names() == ["path"]
    assert info.signature.outputs.input_names()[:3] == ["path", "label", "error"]
    assert {p.name for p in info.signature.params} == {"mode", "batch_size"}
    predictor = registry.load_registered("models:/socialmae-demo/1", tracking_uri)
    assert predictor.preprocessing.sampling == sampling  # stored with the model
    assert predictor.labels == EMOTIONS


def test_promotion_gate(tracking_uri, classifier_dir, tmp_path):
    fp = registry.test_set_fingerprint(IDS)

    def candidate(value: float) -> int:
        return _log(classifier_dir, tracking_uri, value).version

    first = registry.promote("demo", candidate(0.60), "accuracy", 0.60, fp, margin=0.01)
    assert first.promoted and first.champion == 1 and first.previous_champion is None
    assert "no champion" in first.reason
    assert _aliases(tracking_uri) == {"champion": 1, "challenger": 1}

    worse = registry.promote("demo", candidate(0.55), "accuracy", 0.55, fp, margin=0.01)
    assert not worse.promoted and worse.outcome == "kept" and worse.champion == 1
    assert worse.champion_score == 0.60 and not worse.champion_rescored
    assert _aliases(tracking_uri) == {"champion": 1, "challenger": 2}

    marginal = registry.promote("demo", candidate(0.605), "accuracy", 0.605, fp, margin=0.01)
    assert not marginal.promoted and "<= margin 0.01" in marginal.reason
    tags = MlflowClient(tracking_uri).get_model_version("socialmae-demo", "3").tags
    assert tags["promotion_outcome"] == "kept"
    assert json.loads(tags["promotion"]) == marginal.to_dict()

    better = registry.promote("demo", candidate(0.70), "accuracy", 0.70, fp, margin=0.01)
    assert better.promoted and (better.previous_champion, better.champion) == (1, 4)
    assert "> margin" in better.reason
    assert _aliases(tracking_uri) == {"champion": 4, "challenger": 4}

    again = registry.promote("demo", 4, "accuracy", 0.70, fp, margin=0.01)
    assert again.outcome == "kept" and again.champion == 4


def test_lower_is_better_metric(sqlite_uri, classifier_dir):
    fp = registry.test_set_fingerprint(IDS)
    v1 = registry.log_model(classifier_dir, "demo", "mae", 0.30, fp, tracking_uri=sqlite_uri)
    registry.promote("demo", v1.version, "mae", 0.30, fp, 0.01, greater_is_better=False)
    v2 = registry.log_model(classifier_dir, "demo", "mae", 0.25, fp, tracking_uri=sqlite_uri)
    d = registry.promote("demo", v2.version, "mae", 0.25, fp, 0.01, greater_is_better=False)
    assert d.promoted and d.champion == 2 and "lower is better" in d.reason


def test_other_test_set_rescores_the_champion(tracking_uri, classifier_dir, clips):
    old = _log(classifier_dir, tracking_uri, 0.90, ids=IDS[:6])
    registry.promote("demo", old.version, "accuracy", 0.90, old.test_fingerprint, 0.01)
    new = _log(classifier_dir, tracking_uri, 0.50, ids=IDS)
    assert new.test_fingerprint != old.test_fingerprint

    refused = registry.promote("demo", new.version, "accuracy", 0.50, new.test_fingerprint, 0.01)
    assert refused.outcome == "refused" and not refused.promoted
    assert "evaluate_champion" in refused.reason and refused.champion == old.version
    assert _aliases(tracking_uri) == {"champion": 1, "challenger": 2}

    seen: list[str] = []

    @functools.cache
    def score(model_uri: str) -> float:
        predictor = registry.load_registered(model_uri, tracking_uri)
        (prediction,) = predictor.predict([clips["face"]])
        return prediction.scores["happiness"]

    def evaluate(model_uri: str) -> float:
        """Re-score the champion for real: its probability of the clip's true label."""
        seen.append(model_uri)
        return score(model_uri)

    champion_score = evaluate("models:/socialmae-demo/1")
    seen.clear()
    kept = registry.promote("demo", new.version, "accuracy", champion_score + 0.005,
                            new.test_fingerprint, 0.01, evaluate_champion=evaluate)  # fmt: skip
    assert seen == ["models:/socialmae-demo/1"]
    assert kept.champion_rescored and kept.champion_score == pytest.approx(champion_score)
    assert kept.outcome == "kept" and kept.champion == 1
    won = registry.promote("demo", new.version, "accuracy", champion_score + 0.2,
                           new.test_fingerprint, 0.01, evaluate_champion=evaluate)  # fmt: skip
    assert won.promoted and won.champion == 2 and "re-evaluated" in won.reason


def test_champion_pyfunc_predicts_good_and_bad_files(tracking_uri, classifier_dir, clips):
    v = _log(classifier_dir, tracking_uri, 0.5)
    registry.promote("demo", v.version, "accuracy", 0.5, v.test_fingerprint, 0.0)
    model = mlflow.pyfunc.load_model("models:/socialmae-demo@champion")
    out = model.predict(pd.DataFrame({"path": [str(clips["face"]), str(clips["corrupt"])]}))
    assert list(out["path"]) == [str(clips["face"]), str(clips["corrupt"])]
    assert out.loc[0, "label"] in EMOTIONS and out["error"].tolist()[0] is None
    probs = out.loc[0, [f"prob_{e}" for e in EMOTIONS]].astype(float)
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert "not a readable media file" in out.loc[1, "error"]
    assert out.loc[1, [f"prob_{e}" for e in EMOTIONS]].isna().all()
    json.dumps(out.to_dict(orient="records"), allow_nan=False)  # what `serve` sends: strict JSON
    local = Predictor.load(classifier_dir).predict([clips["face"]])[0]
    assert probs.tolist() == pytest.approx([local.scores[e] for e in EMOTIONS], abs=1e-6)

    audio = model.predict(pd.DataFrame({"path": [str(clips["face"])]}), params={"mode": "audio"})
    assert audio.loc[0, "prob_anger"] != pytest.approx(out.loc[0, "prob_anger"])
    with pytest.raises(mlflow.exceptions.MlflowException, match="path"):
        model.predict(pd.DataFrame({"file": ["x.mp4"]}))
    with pytest.raises(mlflow.exceptions.MlflowException, match="paths are at most 4096") as info:
        model.predict(pd.DataFrame({"path": ["x" * 100_000]}))
    assert len(str(info.value)) < 200  # the path is not echoed back
    with pytest.raises(mlflow.exceptions.MlflowException, match="at most 10000"):
        model.predict(pd.DataFrame({"path": ["x.mp4"] * 10_001}))
    assert registry.load_champion("demo", tracking_uri).labels == EMOTIONS


@pytest.mark.integration
def test_credentials_stay_out_of_logs(server_uri, classifier_dir, caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    uri = server_uri.replace("http://", "http://alice:s3cret-pw@")
    caplog.set_level("DEBUG", logger="socialmae")
    fp = registry.test_set_fingerprint(IDS)
    v = registry.log_model(classifier_dir, "demo", "accuracy", 0.5, fp, tracking_uri=uri)
    registry.promote("demo", v.version, "accuracy", 0.5, v.test_fingerprint, 0.0,
                     tracking_uri=uri)  # fmt: skip
    assert "s3cret-pw" not in caplog.text and "registered socialmae-demo" in caplog.text


def _no_nan(constant: str):
    raise ValueError(f"not JSON: {constant}")


@pytest.mark.integration
@pytest.mark.slow  # 20-35 s: a second Python process imports torch and mlflow, then serves
def test_mlflow_models_serve_answers_invocations(server_uri, classifier_dir, clips, tmp_path):
    v = _log(classifier_dir, server_uri, 0.5)
    registry.promote("demo", v.version, "accuracy", 0.5, v.test_fingerprint, 0.0)
    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/socialmae-demo@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env=_env(MLFLOW_TRACKING_URI=server_uri))  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log, timeout=120)
        body = {"dataframe_split": {"columns": ["path"],
                                    "data": [[str(clips["face"])], [str(clips["corrupt"])]]},
                "params": {"mode": "multimodal", "batch_size": 2}}  # fmt: skip
        request = urllib.request.Request(
            f"{url}/invocations", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            rows = json.loads(response.read(), parse_constant=_no_nan)["predictions"]
    finally:
        _stop(proc)
    assert rows[0]["label"] in EMOTIONS and rows[0]["error"] is None
    assert sum(rows[0][f"prob_{e}"] for e in EMOTIONS) == pytest.approx(1.0, abs=1e-5)
    assert rows[1]["label"] is None and "not a readable media file" in rows[1]["error"]
    assert rows[1]["prob_anger"] is None


@pytest.mark.integration
def test_concurrent_promotions_crown_the_best_model(tracking_uri):
    """Four processes promote four versions at once, three rounds, on a sqlite store (file
    lock) and through a real ``mlflow server`` (the registry lease): the champion is always
    the best, and no lease is left behind."""
    import multiprocessing

    fp = registry.test_set_fingerprint(IDS)
    context = multiprocessing.get_context("fork")
    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment(f"race-{time.time_ns()}")).info.run_id
    for round_ in range(3):
        scores = [0.30, 0.50, 0.40, 0.45]
        task = f"race{round_}"
        name = task_name(task)
        client.create_registered_model(name)  # versions only: the gate never loads the model
        source = f"runs:/{run}/model"
        versions = [int(client.create_model_version(name, source, run).version) for _ in scores]
        barrier = context.Barrier(len(scores))
        workers = [
            context.Process(target=_promote_race, args=(barrier, tracking_uri, task, v, s, fp))
            for v, s in zip(versions, scores, strict=True)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
            assert worker.exitcode == 0
        champion = _aliases(tracking_uri, task)["champion"]
        assert champion == versions[scores.index(max(scores))], (round_, champion, versions)
    left = [m.name for m in client.search_registered_models() if locks.LEASE_SUFFIX in m.name]
    assert left == []


def _promote_race(barrier, uri: str, task: str, version: int, value: float, fp: str) -> None:
    barrier.wait()  # every process reads the champion at the same moment
    registry.promote(task, version, "accuracy", value, fp, 0.0, tracking_uri=uri)


@pytest.mark.integration
def test_promotion_lease_waits_breaks_stale_and_gives_up(server_uri):
    """The server lease: a live holder makes others wait and then give up with a message
    naming the lease; a holder that stays unchanged past the stale limit is broken."""
    client = MlflowClient(server_uri)
    name = task_name("lease")
    lease = name + locks.LEASE_SUFFIX
    with locks.registry_lease(client, name):
        assert client.get_registered_model(lease).tags["holder"].endswith(tuple("0123456789abcdef"))
        busy = pytest.raises(registry.PromotionBusyError, match=re.escape(lease))
        with busy, locks.registry_lease(client, name, stale_after_s=60, wait_s=0.5):
            pass
    with pytest.raises(MlflowException):  # released
        client.get_registered_model(lease)
    client.create_registered_model(lease, tags={"holder": "dead-host:1:0"})  # a dead promoter
    with locks.registry_lease(client, name, stale_after_s=0.3, wait_s=30):
        assert client.get_registered_model(lease).tags["holder"] != "dead-host:1:0"


def test_sqlite_promotion_lock_gives_up_after_its_wait(tmp_path):
    """The sqlite store's file lock: a second promotion waits while the first holds it,
    gives up with PromotionBusyError naming the lock file after ``wait_s``, and gets it once
    the first has finished."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    name = task_name("lock")
    with locks.promotion_lock(client, uri, name):
        busy = pytest.raises(registry.PromotionBusyError, match=re.escape(".promotion.lock"))
        started = time.monotonic()
        with busy, locks.promotion_lock(client, uri, name, wait_s=0.5):
            pass
        assert 0.5 <= time.monotonic() - started < 5
    with locks.promotion_lock(client, uri, name, wait_s=0.5):  # released
        pass
