"""Prefect flows over the DVC stages, against a real `prefect server start` process: the pipeline
flow on the reproduced demo project (no-op stages, one real re-run, GPU routing), its markdown
artifact read back from the API, retries of a failing download, prefect.yaml through
`prefect deploy`, and the retrain deployment served on a schedule until its scheduled run
completes. Stage order and argument lists are checked without a server."""

from __future__ import annotations

import datetime
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, cli_env

sys.path.insert(0, str(REPO))  # flows/ is a top-level package of the repository

from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
from tests_helpers import free_port, stop_group

from flows.pipeline import PIPELINE_ARTIFACT, pipeline
from flows.retrain import RETRAIN_ARTIFACT
from flows.serve import CRON, schedule
from socialmae import orchestration
from socialmae.orchestration import CommandError, pipeline_stages
from socialmae.params import ParamsError

BIN = Path(sys.executable).parent


def _wait_for(check: Callable[[], Any], timeout: float, what: str, alive=None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {alive.returncode}")
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not after {timeout:.0f} s")


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free 127.0.0.1 port with its own PREFECT_HOME (so its own
    SQLite database); this process talks to it while the fixture lives. Yields the environment
    for Prefect subprocesses."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}  # fmt: skip
    log = home / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        try:
            _wait_for(healthy, 120, "prefect server", alive=server)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_tail(log)}") from None
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: home}):
            yield env

            async def drain() -> None:  # flush logs and events before the server goes
                for result in (APILogWorker.instance().drain(), EventsWorker.drain_all()):
                    if inspect.isawaitable(result):
                        await result

            run_coro_as_sync(drain())
    finally:
        stop_group(server)


def _flow_run_id(state) -> uuid.UUID:
    return state.state_details.flow_run_id


def _artifact(flow_run_id: uuid.UUID, key: str) -> str:
    """The markdown of artifact ``key`` of this flow run, as the API returns it."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    found = [a for a in artifacts if a.key == key]
    assert len(found) == 1 and found[0].type == "markdown", artifacts
    return found[0].data


def _task_runs(flow_run_id: uuid.UUID) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def _dvc(root: Path, *args: str) -> str:
    done = subprocess.run(["dvc", *args], cwd=root, env=cli_env(root), capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, f"dvc {args}: {done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


# ----------------------------------------------------------------------------- no server


def test_stages_follow_dvc_yaml_and_commands_are_argument_lists():
    tasks = orchestration.project_tasks(REPO)
    stages = pipeline_stages(REPO, tasks)
    listed = _dvc(REPO, "stage", "list", "--name-only").split()
    assert sorted(stages) == sorted(listed)  # a stage added to dvc.yaml is a stage of the flow
    assert pipeline_stages(REPO, ["demo", "cremad"], pretrain=False) == [
        "download", "crop_faces", "validate", "tune@demo", "finetune@demo", "register@demo",
        "tune@cremad", "finetune@cremad", "register@cremad",
    ]  # fmt: skip
    assert orchestration.repro_args("register@demo", force=True) == [
        "dvc", "repro", "--single-item", "--force", "register@demo"]  # fmt: skip
    assert orchestration.torchrun_args(4) == [
        "torchrun", "--standalone", "--nproc_per_node", "4", "-m", "socialmae.cli", "pretrain",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        orchestration.torchrun_args(0)


def test_tasks_come_from_params_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("tasks: [demo, nope]\n")
    with pytest.raises(ParamsError, match="tasks: unknown task 'nope'"):
        orchestration.project_tasks(tmp_path)


def test_served_schedule_is_the_deployment_schedule():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    retrain = next(d for d in deployments if d["name"] == "retrain")
    assert retrain["entrypoint"] == "flows/retrain.py:retrain"
    assert [s["cron"] for s in retrain["schedules"]] == [CRON]
    assert schedule().cron == CRON
    every_hour = schedule(interval=3600)
    assert every_hour.interval == datetime.timedelta(hours=1)
    assert every_hour.anchor_date > datetime.datetime.now(datetime.UTC)  # first run is ahead


class _Interrupt(logging.Handler):
    """Raises KeyboardInterrupt at the first output line, as Ctrl-C (or a cancelled flow run)
    would while a stage runs."""

    def __init__(self) -> None:
        super().__init__()
        self.pids: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.isdigit():
            self.pids.append(int(message))
            raise KeyboardInterrupt


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(")")[-1].split()[0] != "Z"  # a zombie is gone
    except OSError:
        return False


def test_an_interrupted_stage_is_stopped_with_its_children():
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log = logging.getLogger("test_flows.interrupt")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = _Interrupt()
    log.addHandler(handler)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        orchestration.run([sys.executable, "-c", script], REPO, log)
    (grandchild,) = handler.pids
    _wait_for(lambda: not _alive(grandchild), 10, "the stage's child process")
    assert time.monotonic() - started < 30


def test_a_stage_command_gets_the_extra_environment_and_this_install_first():
    """How the pipeline flow sends crop_faces to a Ray cluster: the variable reaches the stage
    command, next to the PATH that finds this install's `socialmae`."""
    script = "import os; print(os.environ['SOCIALMAE_CROP_RAY_ADDRESS']); print(os.environ['PATH'])"
    env = {orchestration.RAY_ADDRESS_ENV: "ray://head:10001"}
    output = orchestration.run([sys.executable, "-c", script], REPO, env=env).splitlines()
    assert output[0] == "ray://head:10001"
    assert output[1].startswith(str(Path(sys.executable).parent))


# ----------------------------------------------------------------------------- the server


@pytest.mark.integration
def test_pipeline_flow_runs_stages_through_dvc_and_summarises(
    prefect_server, demo_pipeline, monkeypatch
):
    """On the reproduced project every stage is up to date except register@demo, whose output
    is deleted: DVC re-runs that one, a new model version goes through the gate, dvc.lock
    records it, and the artifact shows the metrics. gpus=2 routes pretraining to torchrun,
    which DVC's status skips here."""
    root = demo_pipeline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cli_env(root)["MLFLOW_TRACKING_URI"])
    decision_path = root / "outputs/register/demo/decision.json"
    before = json.loads(decision_path.read_text())["version"]
    decision_path.unlink()

    state = pipeline(root=str(root), gpus=2, return_state=True)

    assert state.is_completed(), state.message
    runs = state.result()
    assert [r.stage for r in runs] == pipeline_stages(REPO, ["demo"])
    assert [r.stage for r in runs if r.ran] == ["register@demo"]
    decision = json.loads(decision_path.read_text())
    assert decision["model_name"] == "socialmae-demo"
    assert decision["version"] == before and not decision["registered_again"]  # same model
    assert "up to date" in _dvc(root, "status")

    flow_run = _flow_run_id(state)
    names = {t.name for t in _task_runs(flow_run)}
    assert {"download", "pretrain (torchrun x2)", "register@demo"} <= names, names
    markdown = _artifact(flow_run, PIPELINE_ARTIFACT)
    pretrain = json.loads((root / "outputs/pretrain/metrics.json").read_text())
    finetune = json.loads((root / "outputs/finetune/demo/metrics.json").read_text())
    assert f"Project `{root}`" in markdown
    assert "| download | up to date |" in markdown and "| register@demo | ran |" in markdown
    assert f"| final | {pretrain['steps']} |" in markdown
    for mode in ("multimodal", "audio", "video"):
        value = finetune[mode]["test"]["f1_macro"]
        assert f"| demo | {mode} | f1_macro | {value:.4g} |" in markdown
    assert f"| demo | socialmae-demo v{decision['version']} | yes | {decision['outcome']} |" in (
        markdown
    )


def _unreachable_download_project(root: Path) -> Path:
    """A project whose download stage fails: CREMA-D from a local port nobody listens on."""
    root.mkdir()
    shutil.copytree(REPO / "socialmae", root / "socialmae",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "names.txt").write_text("1001_DFA_ANG_XX\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["datasets"] = ["cremad"]
    params["download"]["cremad"].update(
        source=f"http://127.0.0.1:{free_port()}/cremad", names="names.txt", retries=0,
        timeout=2.0,
    )  # fmt: skip
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    _dvc(root, "init", "--no-scm", "-q")
    return root


@pytest.mark.integration
def test_failing_download_is_retried_then_the_flow_fails(prefect_server, tmp_path):
    root = _unreachable_download_project(tmp_path / "project")

    state = pipeline(root=str(root), download_retries=2, retry_delay_seconds=0, return_state=True)

    assert state.is_failed()
    with pytest.raises(CommandError) as failed:
        state.result()
    message = str(failed.value)
    assert "dvc repro --single-item download" in message
    assert "no clips (1 listed but missing)" in message and "Connection refused" in message
    (download,) = _task_runs(_flow_run_id(state))  # no later stage started
    assert download.name == "download" and download.state.is_failed()
    assert download.run_count == 3  # the first try and 2 retries


@pytest.mark.slow  # 30 s: a work pool, a worker process and a flow run
@pytest.mark.integration
def test_prefect_yaml_deploys_to_a_work_pool_and_a_worker_runs_it(
    prefect_server, demo_pipeline, tmp_path
):
    """`prefect deploy --all` creates both deployments of prefect.yaml on the `socialmae`
    process pool; `prefect worker start --run-once` executes a run of the pipeline deployment
    (pointed at the demo project, where every stage is up to date)."""
    root = demo_pipeline
    env = {**prefect_server, **cli_env(root)}
    for command in (["work-pool", "create", "socialmae", "--type", "process"],
                    ["--no-prompt", "deploy", "--all"]):  # fmt: skip
        done = subprocess.run([BIN / "prefect", *command], cwd=REPO, env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    with get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name("socialmae-retrain/retrain")
        whole = client.read_deployment_by_name("socialmae-pipeline/pipeline")
        flow_run = client.create_flow_run_from_deployment(whole.id, parameters={"root": str(root)})
        log = tmp_path / "worker.log"
        with log.open("w") as out:
            worker = subprocess.Popen(
                [BIN / "prefect", "worker", "start", "--pool", "socialmae", "--run-once"],
                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            worker.wait(timeout=240)
        finally:
            stop_group(worker)
        flow_run = client.read_flow_run(flow_run.id)
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{_tail(log)}"
    markdown = _artifact(flow_run.id, PIPELINE_ARTIFACT)
    assert "| register@demo | up to date |" in markdown, markdown
    assert retrain.entrypoint == "flows/retrain.py:retrain"
    assert retrain.work_pool_name == "socialmae"
    assert [s.schedule.cron for s in retrain.schedules] == [CRON]
    assert retrain.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]  # fmt: skip
    assert retrain.global_concurrency_limit.limit == 1
    assert whole.entrypoint == "flows/pipeline.py:pipeline" and not whole.schedules


@pytest.mark.slow  # 45 s: a served deployment waits for its scheduled run
@pytest.mark.integration
def test_served_retrain_deployment_runs_on_schedule(prefect_server, demo_pipeline, tmp_path):
    """`python -m flows.serve --interval` (the cron's stand-in, first slot 10 s ahead) creates
    the deployment; the server schedules a run, the runner executes it: download is forced,
    the regenerated demo data is identical, so DVC finds every later stage up to date."""
    root = demo_pipeline
    env = {**prefect_server, **cli_env(root), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--interval", "3600", "--root", str(root),
             "--name", "served"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        with get_client(sync_client=True) as client:

            def deployment():
                try:
                    return client.read_deployment_by_name("socialmae-retrain/served")
                except ObjectNotFound:
                    return None

            def finished_run():
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[served.id])))  # fmt: skip
                return next((r for r in runs if r.state and r.state.is_final()), None)

            try:
                served = _wait_for(deployment, 60, "deployment", alive=serve)
                run = _wait_for(finished_run, 240, "scheduled run", alive=serve)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{_tail(log)}") from None
            run = client.read_flow_run(run.id)
        assert run.state.is_completed(), f"{run.state}\n{_tail(log)}"
        assert run.auto_scheduled and run.parameters["root"] == str(root)
        assert [s.schedule.interval for s in served.schedules] == [datetime.timedelta(hours=1)]

        markdown = _artifact(run.id, RETRAIN_ARTIFACT)
        assert "# Social-MAE retraining" in markdown
        assert "| download | ran |" in markdown and "| crop_faces | up to date |" in markdown
        assert "| pretrain |" not in markdown  # retraining fine-tunes from the recorded model
        assert "- `demo`: not registered again (its inputs did not change)." in markdown
    finally:
        stop_group(serve)
    assert "up to date" in _dvc(root, "status")


@pytest.mark.slow
@pytest.mark.integration
def test_multi_process_pretraining_is_committed_to_dvc(demo_pipeline, tmp_path, monkeypatch):
    """torchrun with 2 CPU processes (gloo) writes the pretrain outputs; `dvc commit` records
    them so `dvc status pretrain` is clean (the downstream stages are then out of date)."""
    root = tmp_path / "project"
    shutil.copytree(demo_pipeline, root, symlinks=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    run = orchestration.pretrain_torchrun(root, 2, force=True)

    assert run.ran
    assert json.loads((root / "outputs/pretrain/metrics.json").read_text())["world_size"] == 2
    assert orchestration.up_to_date(root, "pretrain")
    assert not orchestration.up_to_date(root, "tune@demo")
