"""``socialmae.train.tune``: real Optuna studies on sqlite files and on a PostgreSQL server started
here, worker processes (one of them killed mid-trial), nested MLflow runs in a sqlite store.

The objectives live at module level so that worker subprocesses import them as ``test_tune:...``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from socialmae.params import ParamsError
from socialmae.train.tune import (
    STORAGE_ENV,
    IntRange,
    SearchSpace,
    TuneError,
    TuneParams,
    load_tune,
    open_storage,
    parse_tune,
    resolve_storage,
    run_study,
    suggest,
)

TESTS = Path(__file__).parent
ROOT = TESTS.parent
PG_BIN = Path("/usr/local/bin")
PASSWORD = "Tr1al-s3cret-9f"

SPACE = {
    "lr": {"low": 1.0e-5, "high": 1.0e-2, "log": True},
    "batch": {"low": 8, "high": 64, "step": 8},
    "pool": {"choices": ["mean", "cls"]},
}


def score(overrides: dict[str, Any]) -> float:
    """A smooth, seeded-free quadratic with its peak at lr = 10^-3.5, batch = 32, mean pooling."""
    lr_term = (math.log10(overrides["lr"]) + 3.5) ** 2 / 4
    batch_term = ((overrides["batch"] - 32) / 64) ** 2
    return 1.0 - lr_term - batch_term + (0.1 if overrides["pool"] == "mean" else 0.0)


def quadratic(overrides: dict[str, Any], report) -> float:
    """Four 'epochs' whose validation metric climbs towards the final score."""
    final = score(overrides)
    for epoch in range(4):
        report(epoch, final * (epoch + 1) / 4)
    return final


def sleepy(overrides: dict[str, Any], report) -> float:
    """``quadratic`` with ``$TUNE_TEST_SLEEP`` seconds per epoch.

    The first call made while ``$TUNE_TEST_HANG`` names a missing file writes its overrides there
    and hangs. With ``$TUNE_TEST_BARRIER`` (a directory), no trial goes on before two processes
    have started one.
    """
    barrier = os.environ.get("TUNE_TEST_BARRIER")
    if barrier:
        Path(barrier, str(os.getpid())).touch()
        deadline = time.monotonic() + 60
        while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    hang = os.environ.get("TUNE_TEST_HANG")
    if hang and not os.path.exists(hang):
        tmp = f"{hang}.{os.getpid()}.tmp"
        Path(tmp).write_text(json.dumps(overrides))
        os.replace(tmp, hang)
        time.sleep(600)
    final = score(overrides)
    for epoch in range(2):
        time.sleep(float(os.environ.get("TUNE_TEST_SLEEP", "0.2")))
        report(epoch, final * (epoch + 1) / 2)
    return final


def tune(**knobs: Any) -> tuple[TuneParams, SearchSpace]:
    return parse_tune({"random_trials": 3, "heartbeat_s": 1, **knobs, "space": SPACE})


def write_params(path: Path, **knobs: Any) -> Path:
    path.write_text(yaml.safe_dump({"tune": {"random_trials": 3, **knobs, "space": SPACE}}))
    return path


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def default_storage(out: Path) -> str:
    """The sqlite URL run_study uses by default for ``out`` (the study directory made)."""
    (out / "study").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'study' / 'optuna.db'}"


# --------------------------------------------------------------------------- params


def test_space_parses_infers_kinds_and_suggests():
    params, space = tune(trials=3, pruner={"kind": "hyperband", "max_resource": 4})
    assert params.trials == 3 and params.pruner.kind == "hyperband"
    assert isinstance(params.pruner.build(), optuna.pruners.HyperbandPruner)
    assert space.names == ("lr", "batch", "pool")
    assert space.dimensions[1][1] == IntRange(8, 64, 8)
    spec = space.to_dict()
    assert spec["lr"] == {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}
    assert spec["pool"] == {"type": "categorical", "choices": ["mean", "cls"]}
    explicit = SearchSpace.parse({"augment.mixup": {"type": "float", "low": 0, "high": 1}})
    assert explicit.to_dict()["augment.mixup"]["type"] == "float"  # 0 and 1 alone: int
    nested = SearchSpace.parse(
        {"optim": {"lr": {"low": 1.0e-5, "high": 1.0e-3}}, "batch": SPACE["batch"]}
    )
    assert nested.names == ("optim.lr", "batch")
    assert nested == SearchSpace.parse(
        {"optim.lr": {"low": 1.0e-5, "high": 1.0e-3}, "batch": SPACE["batch"]}
    )
    fixed = optuna.trial.FixedTrial({"lr": 3e-4, "batch": 16, "pool": "cls"})
    assert suggest(fixed, space) == {"lr": 3e-4, "batch": 16, "pool": "cls"}
    assert params.study_for("cremad") == "socialmae-cremad"


@pytest.mark.parametrize(
    "space, key, reason",
    [
        ({"lr": {"low": 1e-3, "high": 1e-4}}, "tune.space.lr.low", "must be < high"),
        ({"lr": {"low": 0.0, "high": 1e-2, "log": True}}, "tune.space.lr.low", "> 0 with log"),
        ({"lr": {"low": "1e-5", "high": 1e-2}}, "tune.space.lr.low", "write 1.0e-5"),
        ({"lr": {"low": 1e-5}}, "tune.space.lr.high", "missing"),
        ({"lr": {"low": 1e-5, "high": 1e-2, "lg": True}}, "tune.space.lr.lg", "unknown key"),
        ({"lr": {"low": 1e-5, "high": 1e-2, "log": "yes"}}, "tune.space.lr.log", "true or false"),
        ({"lr": [1e-5, 1e-2]}, "tune.space.lr", "expected a mapping"),
        ({"batch": {"low": 8, "high": 60, "step": 8}}, "tune.space.batch.high", "multiple"),
        ({"batch": {"low": 8, "high": 64, "step": 0}}, "tune.space.batch.step", ">= 1"),
        ({"batch": {"low": 8, "high": 64, "step": 8, "log": True}}, "tune.space.batch.step", "1"),
        ({"batch": {"type": "int", "low": 8.5, "high": 64}}, "tune.space.batch.low", "integer"),
        ({"batch": {"type": "integer", "low": 8, "high": 64}}, "tune.space.batch.type", "one of"),
        ({"pool": {"choices": []}}, "tune.space.pool.choices", "empty"),
        ({"pool": {"choices": ["a", "a"]}}, "tune.space.pool.choices", "duplicates"),
        ({"pool": {"choices": [[1, 2], [3]]}}, "tune.space.pool.choices", "only numbers"),
        ({"head-lr": {"low": 1e-5, "high": 1e-3}}, "tune.space.head-lr", "not a param name"),
        ({"optim": {"lr": {"low": 1e-5}}}, "tune.space.optim.lr.high", "missing"),
        (
            {"optim": {"lr": {"low": 1e-5, "high": 1e-3}, "wd": 0.1}},
            "tune.space.optim.wd",
            "mapping",
        ),
        ({}, "tune.space", "empty search space"),
        ([1, 2], "tune.space", "expected a mapping"),
    ],
)
def test_bad_search_spaces_name_the_key(space, key, reason):
    with pytest.raises(ParamsError, match=reason) as info:
        parse_tune({"space": space})
    assert info.value.key == key


@pytest.mark.parametrize(
    "knobs, key, reason",
    [
        ({"trials": 0}, "tune.trials", ">= 1"),
        ({"trails": 5}, "tune.trails", "unknown key"),
        ({"direction": "up"}, "tune.direction", "one of"),
        ({"pruner": {"kind": "asha"}}, "tune.pruner.kind", "one of"),
        ({"pruner": {"reduction_factor": 1}}, "tune.pruner.reduction_factor", ">= 2"),
        ({"heartbeat_s": 10, "grace_s": 5}, "tune.grace_s", "> heartbeat_s"),
        ({"heartbeat_s": None, "grace_s": 5}, "tune.grace_s", "needs heartbeat_s"),
        ({"study_name": "tune-{dataset}"}, "tune.study_name", "{task}"),
        ({"timeout_s": -1}, "tune.timeout_s", "> 0"),
    ],
)
def test_bad_tune_params_name_the_key(knobs, key, reason):
    with pytest.raises(ParamsError, match=reason) as info:
        parse_tune({**knobs, "space": SPACE})
    assert info.value.key == key


# --------------------------------------------------------------------------- single worker


def test_best_params_file_and_same_seed_same_trials(tmp_path):
    params, space = tune(trials=8, pruner={"kind": "none"})
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / name
        result = run_study(quadratic, space, replace(params, seed=seed), "s", out)
        assert result.ran == 8 and (out / "study/optuna.db").is_file()
        study = load(f"sqlite:///{out / 'study/optuna.db'}", "s")
        runs[name] = [(t.number, t.params, t.state) for t in study.trials]
        assert len(runs[name]) == 8

        best = json.loads((out / "best_params.json").read_text())
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        top = max(complete, key=lambda t: t.value)
        assert best["best_value"] == top.value == result.best_value
        assert best["best_trial"] == top.number == result.best_trial
        assert best["params"] == top.params == result.best_params
        assert set(best["params"]) == {"lr", "batch", "pool"}
        assert best["n_trials"]["complete"] == 8 and sum(best["n_trials"].values()) == 8
        assert best["direction"] == "maximize" and best["study"] == "s"

        table = pd.read_csv(out / "study/trials.csv")
        assert list(table["number"]) == list(range(8))
        assert {"state", "value", "params_lr", "params_batch", "params_pool"} <= set(table)
        assert table["value"].max() == pytest.approx(top.value)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    # TPE (after 3 random trials) moves towards the optimum at 10^-3.5.
    assert json.loads((tmp_path / "a" / "best_params.json").read_text())["best_value"] > 0.8


def test_median_pruner_prunes_bad_trials(tmp_path):
    params, space = tune(trials=12, pruner={"kind": "median", "startup_trials": 2})
    result = run_study(quadratic, space, params, "pruned", tmp_path)
    study = load(default_storage(tmp_path), "pruned")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and result.n_trials["pruned"] == len(pruned)
    assert result.n_trials["complete"] + result.n_trials["pruned"] == 12
    assert all(len(t.intermediate_values) < 4 for t in pruned)
    assert study.best_trial.state == TrialState.COMPLETE


def test_worker_waits_for_running_trials_and_stops_on_failures(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="socialmae")
    params, space = tune(trials=2, pruner={"kind": "none"})
    url = default_storage(tmp_path)
    study = optuna.create_study(storage=url, study_name="wait", direction="maximize")
    elsewhere = study.ask()  # a trial held by "another worker"
    elsewhere.suggest_float("lr", 1e-5, 1e-2, log=True)

    class FinishWhenWaitedFor(logging.Handler):
        """The other worker finishes its trial only once this worker says it waits for it
        (not after a fixed delay: a loaded machine could take longer over its own trial)."""

        def emit(self, record: logging.LogRecord) -> None:
            if "waits for 1 running trials" in record.getMessage():
                load(url, "wait").tell(elsewhere.number, 0.5)

    study_log = logging.getLogger("socialmae.train.tune.study")
    study_log.addHandler(finisher := FinishWhenWaitedFor())
    try:
        result = run_study(quadratic, space, params, "wait", tmp_path, poll_s=0.05)
    finally:
        study_log.removeHandler(finisher)
    assert result.ran == 1 and result.n_trials["complete"] == 2
    assert "waits for 1 running trials" in caplog.text
    assert load(url, "wait").trials[elsewhere.number].value == 0.5  # told while this one waited

    def broken(overrides, report):
        raise RuntimeError("CUDA out of memory (simulated)")

    failing = replace(params, trials=5, max_failures=2)
    with pytest.raises(TuneError, match=r"2 trials in a row failed.*out of memory"):
        run_study(broken, space, failing, "wait", tmp_path, poll_s=0.05)

    other = parse_tune({"space": {"lr": {"low": 1.0e-6, "high": 1.0e-2, "log": True}}})[1]
    with pytest.raises(TuneError, match=r"tune\.space differs"):
        run_study(quadratic, other, params, "wait", tmp_path)


def test_a_trial_started_past_the_target_is_released_unrun(tmp_path, monkeypatch):
    params, space = tune(trials=2, pruner={"kind": "none"})
    url = default_storage(tmp_path)
    study = optuna.create_study(storage=url, study_name="race", direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    study.add_trial(
        optuna.trial.create_trial(params={"lr": 1e-3}, distributions={"lr": lr}, value=0.1)
    )
    real, calls, ran = optuna.storages.fail_stale_trials, [], []

    def racing(study: optuna.Study) -> None:
        # Optuna calls this inside study.optimize just before it asks for the new trial: there,
        # after this worker saw a free slot, a rival worker takes it.
        calls.append(study)
        if len(calls) == 2:
            rival = load(url, "race").ask()
            threading.Timer(0.5, lambda: load(url, "race").tell(rival.number, 0.2)).start()
        real(study)

    def objective(overrides, report):
        ran.append(overrides)
        return quadratic(overrides, report)

    monkeypatch.setattr(optuna.storages, "fail_stale_trials", racing)
    result = run_study(objective, space, params, "race", tmp_path, poll_s=0.05)
    assert not ran and result.ran == 0
    assert result.n_trials == {
        "complete": 2, "pruned": 0, "fail": 0, "running": 0, "waiting": 0, "surplus": 1
    }  # fmt: skip
    assert result.best_value == 0.2  # the rival's


# --------------------------------------------------------------------------- MLflow


def tracked(overrides: dict[str, Any], report) -> float:
    """``quadratic`` logging like the fine-tuning loop does (``socialmae.tracking.Tracker``)."""
    from socialmae.tracking import Tracker

    with Tracker().run("not-used", "not-used", tags={"stage": "finetune"}) as tracker:
        tracker.log_params({"epochs": 4})
        tracker.log_metrics({"train_loss": 0.5}, step=0)
        return quadratic(overrides, report)


def test_trials_are_nested_mlflow_runs(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("tune", artifact_location=str(tmp_path / "artifacts"))
    params, space = tune(trials=4, pruner={"kind": "median", "startup_trials": 1})
    before = mlflow.get_tracking_uri()
    result = run_study(
        tracked, space, params, "tracked", tmp_path, tracking_uri=uri, experiment="tune"
    )
    assert mlflow.active_run() is None and mlflow.get_tracking_uri() == before

    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.info.experiment_id == exp
    assert parent.data.metrics["best_value"] == pytest.approx(result.best_value)
    assert parent.data.tags["best_trial"] == str(result.best_trial)
    assert parent.data.tags["best.batch"] == str(result.best_params["batch"])
    assert parent.data.params["tune.trials"] == "4"
    children = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    for child in children:
        # The objective's own logging went into its trial's run.
        assert set(child.data.params) == {"lr", "batch", "pool", "epochs"}
        assert child.data.metrics["train_loss"] == 0.5 and child.data.tags["stage"] == "finetune"
        assert child.info.status == "FINISHED"
        state = child.data.tags["optuna.state"]
        history = client.get_metric_history(child.info.run_id, "val_metric")
        assert [m.step for m in history] == list(range(len(history))) and history
        if state == "COMPLETE":
            assert len(history) == 4 and "value" in child.data.metrics
        else:
            assert state == "PRUNED" and len(history) < 4
    best = next(c for c in children if c.data.tags["optuna.trial"] == str(result.best_trial))
    assert best.data.metrics["value"] == pytest.approx(result.best_value)

    # A later worker of the same study (here: the target raised to 6) nests under the same run.
    more = run_study(
        quadratic, space, replace(params, trials=6), "tracked", tmp_path, tracking_uri=uri
    )
    assert more.mlflow_run_id == parent.info.run_id and more.ran == 2
    filter_string = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    assert len(client.search_runs([exp], filter_string=filter_string)) == 6

    # Under an active run (the stage's own), trials nest under it instead.
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=exp) as run:
            inner = run_study(tracked, space, params, "active", tmp_path / "active")
            assert mlflow.active_run().info.run_id == run.info.run_id
        assert inner.mlflow_run_id == run.info.run_id
        nested = client.search_runs(
            [exp], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        )
        assert len(nested) == 4 and all("epochs" in c.data.params for c in nested)
        outer = client.get_run(run.info.run_id)
        assert outer.data.metrics["best_value"] == pytest.approx(inner.best_value)
        assert outer.data.tags["tune.study"] == "active" and "epochs" not in outer.data.params
    finally:
        mlflow.set_tracking_uri(before)


# --------------------------------------------------------------------------- storage


def test_storage_resolution_keeps_passwords_out_of_logs(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="socialmae")
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert resolve_storage(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'study/optuna.db'}"
    with pytest.raises(TuneError, match=STORAGE_ENV):
        resolve_storage(None, None)

    secret = f"postgresql+psycopg://tuner:{PASSWORD}@127.0.0.1:1/optuna"
    monkeypatch.setenv(STORAGE_ENV, secret)
    assert resolve_storage(None, tmp_path) == secret
    assert resolve_storage("sqlite:///x.db", tmp_path) == "sqlite:///x.db"  # explicit wins
    assert "postgresql+psycopg://***@127.0.0.1:1/optuna" in caplog.text

    resolve_storage(secret, None)  # a password in params.yaml: warned about, not shown
    assert "put the URL in $SOCIALMAE_OPTUNA_STORAGE" in caplog.text
    # Nothing listens on port 1: the error names the (redacted) URL, never the password.
    params, _ = tune(heartbeat_s=None)
    with pytest.raises(TuneError) as info:
        open_storage(secret, params)
    assert "***@127.0.0.1" in str(info.value)
    assert PASSWORD not in str(info.value) and PASSWORD not in caplog.text


# --------------------------------------------------------------------------- PostgreSQL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory) -> Iterator[str]:
    """A throwaway PostgreSQL 15 server on 127.0.0.1 with password auth; yields its URL."""
    initdb, pg_ctl = PG_BIN / "initdb", PG_BIN / "pg_ctl"
    if not (initdb.exists() and pg_ctl.exists()):
        pytest.skip(f"PostgreSQL binaries (initdb, pg_ctl) not found in {PG_BIN}")
    run_as: dict[str, Any] = {}
    if os.geteuid() == 0:
        # initdb and postgres refuse to run as root: run them as nobody in a directory it owns
        # (pytest's tmp directories are private to root).
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no 'nobody' user to run PostgreSQL as")
        base = Path(tempfile.mkdtemp(prefix="socialmae-pg-"))
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid}
    else:
        base = tmp_path_factory.mktemp("pg")
    pwfile = base / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    data, port = base / "data", free_port()

    def pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, cwd=base, **run_as)

    try:
        init = pg(str(initdb), "-D", str(data), "-U", "tuner", "--pwfile", str(pwfile),
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")  # fmt: skip
        if init.returncode != 0:
            pytest.skip(f"initdb failed as uid {os.geteuid()}: {init.stderr.strip()[-300:]}")
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = pg(str(pg_ctl), "-D", str(data), "-l", str(base / "log"), "-w", "-o", options,
                   "start")  # fmt: skip
        if start.returncode != 0:
            log = (base / "log").read_text() if (base / "log").exists() else start.stderr
            pytest.skip(f"pg_ctl start failed: {log.strip()[-300:]}")
        import psycopg

        dsn = f"host=127.0.0.1 port={port} user=tuner password={PASSWORD} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE optuna")
        yield f"postgresql+psycopg://tuner:{PASSWORD}@127.0.0.1:{port}/optuna"
    finally:
        if (data / "postmaster.pid").exists():
            pg(str(pg_ctl), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


WORKER = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from socialmae.train.tune import run_worker
study, params, name, out = sys.argv[1:5]
result = run_worker("test_tune:sleepy", study, params, worker=name, out_dir=out or None, poll_s=0.2)
print(result.ran)
"""


def start_worker(study: str, params: Path, name: str, out: str = "", **env: str):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), **env}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, study, str(params), name, out],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.integration
def test_postgres_study_shared_by_two_worker_processes(postgres, tmp_path):
    params = write_params(
        tmp_path / "params.yaml", trials=6, heartbeat_s=2, pruner={"kind": "none"}
    )
    (tmp_path / "barrier").mkdir()
    env = {
        STORAGE_ENV: postgres,
        "TUNE_TEST_SLEEP": "0.1",
        "TUNE_TEST_BARRIER": str(tmp_path / "barrier"),  # both workers get a trial
    }
    workers = [
        start_worker("shared", params, "w1", str(tmp_path / "out"), **env),
        start_worker("shared", params, "w2", **env),
    ]
    outputs = [w.communicate(timeout=120) for w in workers]
    for w, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, stderr[-3000:]
        assert PASSWORD not in stdout + stderr
        assert "postgresql+psycopg://***@127.0.0.1" in stderr

    study = load(postgres, "shared")
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6
    ran = [int(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert all(n >= 1 for n in ran) and sum(ran) == 6
    assert {t.user_attrs["worker"] for t in finished} == {"w1", "w2"}
    best = json.loads((tmp_path / "out" / "best_params.json").read_text())
    assert best["best_value"] == study.best_value
    assert best["n_trials"]["complete"] == 6


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_trial_of_a_killed_worker_is_retried(backend, tmp_path, request, monkeypatch):
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
    else:
        url = request.getfixturevalue("postgres")
    study_name = f"killed-{backend}"
    params = write_params(
        tmp_path / "params.yaml", trials=2, heartbeat_s=1, grace_s=2, pruner={"kind": "none"}
    )
    hang = tmp_path / "hang.json"
    env = {STORAGE_ENV: url, "TUNE_TEST_HANG": str(hang), "TUNE_TEST_SLEEP": "0.05"}
    victim = start_worker(study_name, params, "victim", **env)
    deadline = time.monotonic() + 90
    while not hang.exists():
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the worker never started its trial"
        time.sleep(0.1)
    time.sleep(0.5)  # its first heartbeat is on record
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    hung_params = json.loads(hang.read_text())

    # A second worker (this process) fails the silent trial and runs it again.
    monkeypatch.setenv(STORAGE_ENV, url)
    monkeypatch.setenv("TUNE_TEST_SLEEP", "0.05")
    trials, space = load_tune(params)
    trials = replace(trials, timeout_s=60.0)  # fail, not hang, if the trial never goes stale
    result = run_study(
        sleepy, space, trials, study_name, tmp_path / "out", worker="rescuer", poll_s=0.2
    )

    study = load(url, study_name)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["worker"] == "victim"
    assert failed[0].params == hung_params
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert (
        retry[0].params == failed[0].params and retry[0].user_attrs["retry_of"] == failed[0].number
    )
    assert retry[0].user_attrs["worker"] == "rescuer"
    assert result.n_trials["complete"] == 2 and result.n_trials["fail"] == 1
