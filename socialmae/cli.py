"""The `socialmae` command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import typer

from socialmae.data.errors import MediaError
from socialmae.model.config import Mode
from socialmae.tasks import TASKS

if TYPE_CHECKING:
    import pandas as pd

    from socialmae.inference import Embeddings, Predictor

app = typer.Typer(
    help="Social-MAE: audiovisual masked autoencoder for face and voice.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings reflow to the terminal; `code` shows as code
)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    if os.environ.get("DVC_STAGE"):  # a stage of `dvc repro`: stop when dvc is killed
        from socialmae.lifecycle import die_with_parent

        die_with_parent()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _stage(run, *args) -> None:
    """Run a stage and print its metrics; a user error (a bad param, a missing or unusable
    input file or checkpoint) ends with its one-line message and exit code 2."""
    from socialmae.params import ParamsError
    from socialmae.state_dicts import CheckpointError

    try:
        metrics = run(*args)
    except (ParamsError, MediaError, CheckpointError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    typer.echo(json.dumps(metrics, indent=2, sort_keys=True, default=str))


def _task(name: str) -> str:
    if name not in TASKS:
        _fail(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return name


@app.command()
def download(params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage `download`: raw clips + manifest per dataset under data/raw/."""
    from socialmae.data.stages import stage_download

    _stage(stage_download, params)


@app.command("crop-faces")
def crop_faces_command(params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage `crop_faces`: face crops and audio into shards under data/interim/faces/."""
    from socialmae.data.stages import stage_crop_faces

    _stage(stage_crop_faces, params)


@app.command()
def validate(params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage `validate`: Great Expectations checks, quarantine list, Data Docs."""
    from socialmae.data.stages import stage_validate
    from socialmae.data.validate import ValidationFailed

    try:
        _stage(stage_validate, params)
    except ValidationFailed as exc:
        _fail(str(exc))


@app.command()
def pretrain(params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage `pretrain`: masked reconstruction + contrastive pretraining -> outputs/pretrain/.

    Multi-GPU: `torchrun --nproc_per_node N -m socialmae.cli pretrain` (same outputs).
    """
    from socialmae.train.stages import stage_pretrain

    _stage(stage_pretrain, params)


@app.command()
def tune(task: str, params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage `tune@TASK`: Optuna search over fine-tuning params -> outputs/tune/TASK/."""
    from socialmae.train.stages import stage_tune

    _stage(stage_tune, params, _task(task))


@app.command("tune-worker")
def tune_worker(task: str, params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Join TASK's Optuna study as an extra worker (shared storage, e.g. PostgreSQL, from
    tune.storage or $SOCIALMAE_OPTUNA_STORAGE); run on as many machines as you like."""
    from socialmae.train.stages import stage_tune_worker

    _stage(stage_tune_worker, params, _task(task))


@app.command()
def finetune(task: str, params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage `finetune@TASK`: fine-tune, select on val, score test -> outputs/finetune/TASK/."""
    from socialmae.train.stages import stage_finetune

    _stage(stage_finetune, params, _task(task))


@app.command()
def register(task: str, params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage `register@TASK`: log to MLflow as socialmae-TASK, promote through the gate."""
    from socialmae.train.stages import stage_register

    _stage(stage_register, params, _task(task))


@app.command()
def info(path: Path) -> None:
    """Describe a checkpoint (official .pth or saved directory) as JSON."""
    from socialmae.checkpoints import CheckpointError, load_checkpoint

    try:
        model = load_checkpoint(path)
    except CheckpointError as exc:
        _fail(str(exc))
        return
    description = {
        "path": str(path),
        **model.architecture(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": model.config.to_dict(),
    }
    typer.echo(json.dumps(description, indent=2))


@app.command()
def convert(
    source: Path,
    out: Path,
    task: Annotated[str, typer.Option(help="classification or regression (fine-tuned)")] = (
        "classification"
    ),
    labels: Annotated[str | None, typer.Option(help="comma-separated class names")] = None,
) -> None:
    """Convert an official Social-MAE / CAV-MAE .pth into a safetensors directory."""
    from socialmae.checkpoints import CheckpointError, load_checkpoint
    from socialmae.model import SocialMAEClassifier

    if task not in ("classification", "regression"):
        _fail(f"--task must be classification or regression, got {task!r}")
    names = tuple(labels.split(",")) if labels else None
    try:
        model = load_checkpoint(source, task=task, labels=names)  # type: ignore[arg-type]
    except (CheckpointError, ValueError) as exc:
        _fail(str(exc))
        return
    if names is not None and not isinstance(model, SocialMAEClassifier):
        _fail("--labels only applies to fine-tuned checkpoints")
    model.save_pretrained(out)
    typer.echo(f"wrote {out}")


# --------------------------------------------------------------------------- using models

Format = Literal["table", "json", "csv"]
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # models:/, runs:/, s3://... (not C:\)

VideosArgument = Annotated[list[Path], typer.Argument(help="video files", show_default=False)]
_MODEL_HELP = "models:/NAME@ALIAS (or /VERSION) URI, a saved model directory or an official .pth"
ModelOption = Annotated[str, typer.Option("--model", "-m", show_default=False, help=_MODEL_HELP)]
ModeOption = Annotated[
    Mode | None,
    typer.Option(help="which inputs the model sees (default: the mode it was fine-tuned in)"),
]
DeviceOption = Annotated[str, typer.Option(help="cpu or cuda[:N]")]
BatchOption = Annotated[int, typer.Option(min=1, help="clips per forward pass")]
TrackingOption = Annotated[
    str | None,
    typer.Option(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    ),
]


def _is_uri(model: str) -> bool:
    """`models:/...`, `runs:/...`, `s3://...`: for MLflow, not a local path."""
    return bool(_URI.match(model))


def _check_device(device: str) -> None:
    """Exit 2 unless `device` is cpu or an available cuda device."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        _fail(f"--device must be cpu or cuda[:N], got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        _fail(f"--device {device}: CUDA is not available")


def _load_predictor(
    model: str | None,
    task: str | None,
    labels: str | None,
    tracking_uri: str | None,
    device: str,
) -> Predictor:
    """The :class:`Predictor` of a `models:/` URI (:func:`registry.load_registered`), a saved
    directory or an official `.pth` (:meth:`Predictor.load`); exits 2 when it cannot."""
    from mlflow.exceptions import MlflowException

    from socialmae.checkpoints import CheckpointError
    from socialmae.inference import Predictor
    from socialmae.registry import champion_uri, load_registered
    from socialmae.tasks import get_task

    if model is None and task is None:
        task = _project_task()
        if task is None:
            _fail("give --model (a models:/ URI, a model directory or a .pth) or --task")
    spec = get_task(_task(task)) if task is not None else None
    if model is None:
        model = champion_uri(spec.name)
        typer.echo(f"using {model}", err=True)
    names = tuple(name.strip() for name in labels.split(",")) if labels else None
    _check_device(device)
    path = Path(model)
    is_pth = not _is_uri(model) and not path.is_dir()
    if names is not None and not is_pth:
        _fail("--labels only applies to official .pth checkpoints; saved models record theirs")
    if _is_uri(model):
        try:
            return load_registered(model, tracking_uri, device)
        except (MlflowException, OSError) as exc:
            _fail(f"cannot load {model}: {exc}")
    if not path.exists():
        _fail(f"{path}: no such file or directory")
    if is_pth and spec is not None:
        names = names or spec.labels
    try:
        return Predictor.load(path, spec.kind if spec else None, names, device)
    except (CheckpointError, ValueError) as exc:
        _fail(str(exc))


def _project_task(params: Path = Path("params.yaml")) -> str | None:
    """The first of `tasks` in the project's params file (in the working directory), so that
    `socialmae predict clip.mp4` after `make demo` uses that task's champion; None outside
    a project."""
    from socialmae.params import ParamsError, load_yaml

    try:
        tasks = load_yaml(params).get("tasks") if params.is_file() else None
    except ParamsError:
        return None
    return str(tasks[0]) if isinstance(tasks, list) and tasks else None


def _output_format(output_format: Format | None, out: Path | None) -> Format:
    """`--format`, else the suffix of `--out`, else the table."""
    if out is None:
        return output_format or "table"
    if output_format == "table":
        _fail("--out writes json or csv; the table is for the terminal")
    if output_format is not None:
        return output_format
    suffix = out.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix == ".csv":
        return "csv"
    _fail(f"--out {out}: name a .json or .csv file, or give --format json|csv")


def _records(frame: pd.DataFrame) -> list[dict[str, object]]:
    """Rows as dicts, missing values as None (JSON null)."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def _print_table(frame: pd.DataFrame, predictor: Predictor) -> None:
    """:meth:`Predictor.to_frame` rows as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from socialmae.inference import ERROR_COLUMN, LABEL_COLUMN, PATH_COLUMN

    classification = predictor.task == "classification"
    table = Table(title="class probabilities" if classification else "scores")
    table.add_column("path", overflow="fold")
    if classification:
        table.add_column("label")
    for name in predictor.labels:
        table.add_column(name, justify="right")
    table.add_column("error", overflow="fold", style="red")
    for row in _records(frame):
        cells = [row[PATH_COLUMN], *([row[LABEL_COLUMN]] if classification else [])]
        cells += [f"{row[c]:.3f}" if row[c] is not None else "" for c in predictor.score_columns]
        table.add_row(*(Text(str(c)) if c is not None else Text("") for c in cells),
                      Text(str(row[ERROR_COLUMN] or "")))  # fmt: skip
    Console().print(table)


def _exit_for(errors: list[str | None], done: str) -> None:
    """Report how many files were used; exit 1 if any was not."""
    failed = sum(error is not None for error in errors)
    typer.echo(f"{len(errors) - failed} of {len(errors)} files {done}, {failed} failed", err=True)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def predict(
    videos: VideosArgument,
    model: Annotated[str | None, typer.Option("--model", "-m", help=_MODEL_HELP)] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help=f"{', '.join(TASKS)}: without --model, use models:/socialmae-TASK@champion; "
            "for a .pth, its kind and labels"
        ),
    ] = None,
    labels: Annotated[
        str | None, typer.Option(help="comma-separated output names of a .pth")
    ] = None,
    mode: ModeOption = None,
    output_format: Annotated[
        Format | None,
        typer.Option(
            "--format",
            "-f",
            show_default=False,
            help="table, json or csv (default: from --out's suffix, else table)",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="write the json/csv here, not to stdout")
    ] = None,
    device: DeviceOption = "cpu",
    batch_size: BatchOption = 8,
    tracking_uri: TrackingOption = None,
) -> None:
    """Predict emotions, traits or laughter for video files.

    One row per file, in order: the label and one probability per class (classification) or
    one score per trait (regression). A file that cannot be used (missing, unreadable, no
    face) gets a row whose error says why; the other files are still predicted.

    Exit codes: 0 every file was predicted; 1 some files could not be used; 2 bad arguments
    or a model that cannot be loaded.
    """
    from socialmae.inference import ERROR_COLUMN
    from socialmae.io import atomic_write_text

    fmt = _output_format(output_format, out)
    predictor = _load_predictor(model, task, labels, tracking_uri, device)
    frame = predictor.predict_frame(videos, mode, batch_size, progress=True)
    if fmt == "table":
        _print_table(frame, predictor)
    else:
        if fmt == "json":
            text = json.dumps(_records(frame), indent=2) + "\n"
        else:
            text = frame.to_csv(index=False)
        if out is None:
            typer.echo(text, nl=False)
        else:
            atomic_write_text(out, text)
            typer.echo(f"wrote {out}", err=True)
    _exit_for(frame[ERROR_COLUMN].tolist(), "predicted")


@app.command()
def embed(
    videos: VideosArgument,
    model: ModelOption,
    out: Annotated[
        Path, typer.Option("--out", "-o", show_default=False, help="NAME.npy or NAME.parquet")
    ],
    mode: ModeOption = None,
    device: DeviceOption = "cpu",
    batch_size: BatchOption = 8,
    tracking_uri: TrackingOption = None,
) -> None:
    """Pooled encoder embeddings of video files, one row per file in input order.

    NAME.npy: an [N, D] float32 array (NaN rows for files that could not be used) and
    NAME.paths.csv beside it with each row's path and error. NAME.parquet: columns path,
    error and vector (D float32 values; null where the file could not be used).

    Exit codes: 0 every file was embedded; 1 some files could not be used; 2 bad arguments
    or a model that cannot be loaded.
    """
    if out.suffix.lower() not in (".npy", ".parquet"):
        _fail(f"--out {out}: name a .npy or .parquet file")
    predictor = _load_predictor(model, None, None, tracking_uri, device)
    result = predictor.embed(videos, mode, batch_size, progress=True)
    written = _write_embeddings(result, out)
    n, dim = result.vectors.shape
    typer.echo(f"wrote {', '.join(map(str, written))} ({n} x {dim})", err=True)
    _exit_for(result.errors, "embedded")


def _write_embeddings(result: Embeddings, out: Path) -> list[Path]:
    """Write `result` as `.npy` + `.paths.csv` or as `.parquet`; the files written."""
    import numpy as np

    from socialmae.io import atomic_write, atomic_write_csv

    if out.suffix.lower() == ".npy":

        def write_array(tmp: Path) -> None:
            with tmp.open("wb") as f:
                np.save(f, result.vectors)

        rows = [{"path": p, "error": e} for p, e in zip(result.paths, result.errors, strict=True)]
        sidecar = atomic_write_csv(out.with_suffix(".paths.csv"), rows)
        return [atomic_write(out, write_array), sidecar]
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = [v.tolist() if ok else None for v, ok in zip(result.vectors, result.ok, strict=True)]
    table = pa.table({
        "path": pa.array(result.paths, pa.string()),
        "error": pa.array(result.errors, pa.string()),
        # a list, not a fixed-size list: pyarrow 25 cannot read those back with nulls in them
        "vector": pa.array(vectors, pa.list_(pa.float32())),
    })  # fmt: skip
    return [atomic_write(out, lambda tmp: pq.write_table(table, str(tmp)))]


@app.command()
def reconstruct(
    video: Annotated[Path, typer.Argument(help="a video file", show_default=False)],
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            "-m",
            show_default=False,
            help="pretraining checkpoint: a saved SocialMAE directory or official .pth",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", show_default=False, help="NAME.png")],
    mask_ratio: Annotated[
        float, typer.Option(help="fraction of audio and video patches removed, in [0, 1)")
    ] = 0.75,
    seed: Annotated[int, typer.Option(help="seed of the random mask")] = 0,
    device: DeviceOption = "cpu",
) -> None:
    """The paper's Fig. 2 for one clip: original, masked and reconstructed face frames beside
    the spectrogram.

    Exit codes: 0 written; 1 the clip could not be used; 2 bad arguments or a model that
    cannot be loaded.
    """
    from socialmae.checkpoints import CheckpointError, load_checkpoint
    from socialmae.data import load_clip
    from socialmae.figures import save_reconstruction_figure
    from socialmae.model import SocialMAE

    if not 0.0 <= mask_ratio < 1.0:
        _fail(f"--mask-ratio must be in [0, 1), got {mask_ratio}")
    if out.suffix.lower() != ".png":
        _fail(f"--out {out}: name a .png file")
    _check_device(device)
    try:
        net = load_checkpoint(model)
    except CheckpointError as exc:
        _fail(str(exc))
    if not isinstance(net, SocialMAE):
        _fail(f"{model} is a fine-tuned model; reconstruct needs a pretraining checkpoint "
              "(SocialMAE, with its decoder)")  # fmt: skip
    try:
        clip = load_clip(video, net.config)
    except MediaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    path = save_reconstruction_figure(
        net.to(device), clip.audio[None], clip.video[None], out, seed, mask_ratio, video.name
    )
    typer.echo(f"wrote {path}")


@app.command()
def serve(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            show_default=False,
            help="models:/NAME@ALIAS (or /VERSION) URI, an MLflow model directory or a "
            "saved model directory",
        ),
    ],
    host: Annotated[str, typer.Option(help="interface to bind (0.0.0.0: all)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5001,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes")] = 1,
    timeout: Annotated[int, typer.Option(min=1, help="seconds allowed per request")] = 60,
    tracking_uri: TrackingOption = None,
) -> None:
    """Serve predictions over HTTP: 'mlflow models serve' in this environment.

    A saved (save_pretrained) model directory is first logged into a throwaway tracking
    store. Ctrl-C or SIGTERM stops the server (the signal is passed on to it).

    Request (POST /invocations; the paths are read on the server's machine):

        {"dataframe_split": {"columns": ["path"], "data": [["/path/clip.mp4"]]},
         "params": {"mode": "multimodal", "batch_size": 8}}

    with Content-Type: application/json; "params" is optional. Response: {"predictions":
    [{"path": ..., "label": ..., "error": null, "prob_CLASS" or "score_TRAIT": ...}]}, one row
    per path; a file that cannot be used gets its error and no scores. GET /health answers 200
    once the model is loaded.

    Exit codes: 0 stopped by a signal; 1 the server failed; 2 bad arguments or an unknown
    model.
    """
    from socialmae.tracking import resolve_tracking_uri

    with contextlib.ExitStack() as stack:
        target, uri = _servable(model, resolve_tracking_uri(tracking_uri), stack)
        command = [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", target,
            "--env-manager", "local", "--host", host, "--port", str(port),
            "--workers", str(workers), "--timeout", str(timeout),
        ]  # fmt: skip
        bin_dir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
        code = _run_forwarding_signals(command, env)
    if code != 0:
        typer.echo(f"error: the server exited with code {code}", err=True)
        raise typer.Exit(code=1)


def _servable(model: str, tracking_uri: str, stack: contextlib.ExitStack) -> tuple[str, str]:
    """What `mlflow models serve -m` gets, and the tracking URI it resolves that with."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from socialmae.checkpoints import CheckpointError

    if _is_uri(model):
        if model.startswith("models:/"):  # fail here, not deep inside the server's start
            from mlflow.store.artifact.utils.models import get_model_name_and_version

            try:
                get_model_name_and_version(MlflowClient(tracking_uri), model)
            except MlflowException as exc:
                _fail(f"cannot serve {model}: {exc}")
        return model, tracking_uri
    path = Path(model)
    if not path.is_dir():
        _fail(f"{path}: not a directory; serve takes a models:/ URI or a model directory")
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
        _fail(str(exc))
    return version.model_uri, local


def _run_forwarding_signals(command: list[str], env: dict[str, str]) -> int:
    """Run `command` in its own process group, passing SIGINT/SIGTERM/SIGHUP on to the whole
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
    _wait_for_group(process.pid)
    return 0 if received else code


def _wait_for_group(group: int, timeout: float = 20.0) -> None:
    """Wait until no process of `group` (the server's workers) is left; SIGKILL what is
    still there after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


if __name__ == "__main__":
    app()
