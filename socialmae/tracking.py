"""MLflow tracking: where runs go, and a rank-aware logger the training loops share.

The tracking URI is an explicit value (params.yaml), else ``MLFLOW_TRACKING_URI``, else the
embedded ``sqlite:///mlflow.db``. Credentials for a tracking server stay in MLflow's own
environment variables (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``); nothing here
logs a URI without redacting it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def task_name(task: str) -> str:
    """``socialmae-<task>``: a task's MLflow experiment (tuning, fine-tuning, registration runs)
    and its registered model."""
    return f"socialmae-{task}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``explicit`` if given, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def mlflow_client(tracking_uri: str | None = None) -> tuple[MlflowClient, str]:
    """A client of the resolved tracking URI (:func:`resolve_tracking_uri`), and that URI."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri), uri


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block, then restore the previous setting
    (``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI``; that is restored too)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous, env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def ensure_experiment(experiment: str, tracking_uri: str | None = None) -> None:
    """Create the tracking store and ``experiment`` now, before several processes log to it at
    once (each would otherwise migrate a new sqlite store, or create the experiment, and all
    but one fail)."""
    from mlflow.exceptions import MlflowException

    client, _ = mlflow_client(tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        with contextlib.suppress(MlflowException):  # another process created it meanwhile
            client.create_experiment(experiment)


def flatten(values: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings/dataclasses -> ``{"a.b": value}`` with plain values (for log_params)."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = dataclasses.asdict(values)
    flat: dict[str, Any] = {}
    for key, value in dict(values).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (
            dataclasses.is_dataclass(value) and not isinstance(value, type)
        ):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


TAG_HOST = "socialmae.host"  # which process logs into a run: a RUNNING run whose process is
TAG_PID = "socialmae.pid"  # gone on this host was killed, and is marked so


def _run_exists(run_id: str, uri: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def reap_abandoned_runs(experiment_id: str, tracking_uri: str | None = None) -> list[str]:
    """Mark KILLED the RUNNING runs of ``experiment_id`` started on this host by processes that
    no longer exist (a kill -9 leaves them RUNNING forever); returns their ids."""
    client, _ = mlflow_client(tracking_uri)
    host = socket.gethostname()
    reaped = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        pid = tags.get(TAG_PID, "")
        if tags.get(TAG_HOST) == host and pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
            logger.warning("MLflow run %s: its process %s is gone; marked KILLED",
                           run.info.run_id, pid)  # fmt: skip
    return reaped


class Tracker:
    """Logs to one MLflow run from the main rank; every call is a no-op elsewhere.

    Inside an active MLflow run (an Optuna trial, a Prefect flow) it logs into that run
    instead of starting another one.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_id: str | None = None

    @contextlib.contextmanager
    def run(
        self,
        experiment: str,
        run_name: str,
        tracking_uri: str | None = None,
        tags: Mapping[str, str] | None = None,
        resume: str | None = None,
    ) -> Iterator[Tracker]:
        """Log into a new run of ``experiment`` (or into run ``resume``, the run a resumed
        training started, when it still exists). Runs this machine started from processes
        that are gone (killed) are marked KILLED first; a run left by an exception ends
        FAILED."""
        if not self.enabled:
            yield self
            return
        import mlflow

        active = mlflow.active_run()
        if active is not None:
            self.run_id = active.info.run_id
            if tags:
                mlflow.set_tags(dict(tags))
            yield self
            return
        from socialmae.data.download import redact

        uri = resolve_tracking_uri(tracking_uri)
        with using_tracking_uri(uri):
            found = mlflow.set_experiment(experiment)
            reap_abandoned_runs(found.experiment_id, uri)
            owner = {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}
            if resume is not None and _run_exists(resume, uri):
                start = mlflow.start_run(run_id=resume)
                mlflow.set_tags(owner)
                how = "resumed"
            else:
                start = mlflow.start_run(run_name=run_name, tags={**dict(tags or {}), **owner})
                how = f"in {experiment}"
            with start as run:
                self.run_id = run.info.run_id
                logger.info("MLflow run %s %s (%s)", self.run_id, how, redact(uri))
                yield self

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        if not self.enabled:
            return
        import mlflow

        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        mlflow.log_params(flat)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        import mlflow

        clean = {k: float(v) for k, v in metrics.items()}
        mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | os.PathLike[str], folder: str | None = None) -> None:
        if not self.enabled or not Path(path).exists():
            return
        import mlflow

        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=folder)
        else:
            mlflow.log_artifact(str(path), artifact_path=folder)
