"""Serving a model over HTTP: ``mlflow models serve`` in this environment, for a
``models:/`` URI, an MLflow model directory or a saved (``save_pretrained``) model directory.

A saved directory is first logged into a throwaway tracking store; the server runs in its own
process group, SIGINT/SIGTERM/SIGHUP are passed on to the whole group, and no worker is left
behind when it stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from socialmae.model_source import ModelSourceError, is_uri


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 5001,
    workers: int = 1,
    timeout: int = 60,
    tracking_uri: str | None = None,
) -> int:
    """Serve ``model`` until a signal stops the server; 0 when a passed-on signal stopped it,
    else the server's exit code. Raises :class:`ModelSourceError` before starting anything
    when ``model`` cannot be served."""
    from socialmae.tracking import resolve_tracking_uri

    with contextlib.ExitStack() as stack:
        target, uri = servable(model, resolve_tracking_uri(tracking_uri), stack)
        command = [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", target,
            "--env-manager", "local", "--host", host, "--port", str(port),
            "--workers", str(workers), "--timeout", str(timeout),
        ]  # fmt: skip
        bin_dir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
        return run_forwarding_signals(command, env)


def servable(model: str, tracking_uri: str, stack: contextlib.ExitStack) -> tuple[str, str]:
    """What ``mlflow models serve -m`` gets, and the tracking URI it resolves that with; a
    throwaway store for a saved directory lives until ``stack`` closes."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from socialmae.state_dicts import CheckpointError

    if is_uri(model):
        if model.startswith("models:/"):  # fail here, not deep inside the server's start
            from mlflow.store.artifact.utils.models import get_model_name_and_version

            try:
                get_model_name_and_version(MlflowClient(tracking_uri), model)
            except MlflowException as exc:
                raise ModelSourceError(f"cannot serve {model}: {exc}") from exc
        return model, tracking_uri
    path = Path(model)
    if not path.is_dir():
        raise ModelSourceError(f"{path}: not a directory; serve takes a models:/ URI or a "
                               "model directory")  # fmt: skip
    if (path / "MLmodel").is_file():
        return str(path.resolve()), tracking_uri
    from socialmae.registry import DEFAULT_EXPERIMENT, log_model

    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="socialmae-serve-")))
    local = f"sqlite:///{tmp / 'mlflow.db'}"
    MlflowClient(local).create_experiment(
        DEFAULT_EXPERIMENT, artifact_location=(tmp / "artifacts").as_uri()
    )
    try:
        version = log_model(path, "local", "unscored", float("nan"), "none", tracking_uri=local)
    except CheckpointError as exc:
        raise ModelSourceError(str(exc)) from exc
    return version.model_uri, local


def run_forwarding_signals(command: list[str], env: dict[str, str]) -> int:
    """Run ``command`` in its own process group, passing SIGINT/SIGTERM/SIGHUP on to the whole
    group; its exit code, or 0 when a passed-on signal stopped it."""
    process = subprocess.Popen(command, env=env, process_group=0)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        code = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process.poll() is None:  # leaving on an exception: do not leave the server behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    wait_for_group(process.pid)
    return 0 if received else code


def wait_for_group(group: int, timeout: float = 20.0) -> None:
    """Wait until no process of ``group`` (the server's workers) is left; SIGKILL what is
    still there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
