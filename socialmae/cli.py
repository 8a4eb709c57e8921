"""The `socialmae` command."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import typer

from socialmae import layout
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


# Stage commands: dvc.yaml gives every input and output path, so it reads as the data flow;
# the defaults are the same paths.
ParamsOption = Annotated[Path, typer.Option(help="the params file")]
RawOption = Annotated[Path, typer.Option(help="download's output: data/raw/<dataset>/")]
FacesOption = Annotated[Path, typer.Option(help="crop_faces's output: shards + clips.parquet")]
ValidationOption = Annotated[Path, typer.Option(help="validate's output: accepted.csv, reports")]
TaskOutOption = Annotated[
    Path | None, typer.Option(help="output directory [default: outputs/STAGE/TASK]")
]


@app.command()
def download(params: ParamsOption = Path("params.yaml"), out: RawOption = layout.RAW) -> None:
    """Stage `download`: raw clips + manifest per dataset under OUT/<dataset>/."""
    from socialmae.data.stages import stage_download

    _stage(stage_download, params, out)


@app.command("crop-faces")
def crop_faces_command(
    params: ParamsOption = Path("params.yaml"),
    raw: RawOption = layout.RAW,
    out: FacesOption = layout.FACES,
) -> None:
    """Stage `crop_faces`: face crops and audio into shards under OUT (counts and timings in
    crop_metrics.json beside it)."""
    from socialmae.data.stages import stage_crop_faces

    _stage(stage_crop_faces, params, raw, out)


@app.command()
def validate(
    params: ParamsOption = Path("params.yaml"),
    raw: RawOption = layout.RAW,
    faces: FacesOption = layout.FACES,
    out: ValidationOption = layout.VALIDATION,
) -> None:
    """Stage `validate`: Great Expectations checks, accepted and quarantine lists, Data Docs."""
    from socialmae.data.stages import stage_validate
    from socialmae.data.validate import ValidationFailed

    try:
        _stage(stage_validate, params, raw, faces, out)
    except ValidationFailed as exc:
        _fail(str(exc))


@app.command()
def pretrain(
    params: ParamsOption = Path("params.yaml"),
    shards: FacesOption = layout.FACES,
    validation: ValidationOption = layout.VALIDATION,
    out: Annotated[Path, typer.Option(help="output directory")] = layout.PRETRAIN,
) -> None:
    """Stage `pretrain`: masked reconstruction + contrastive pretraining -> OUT.

    Multi-GPU: `torchrun --nproc_per_node N -m socialmae.cli pretrain` (same outputs).
    """
    from socialmae.train.stages import stage_pretrain

    _stage(stage_pretrain, params, shards, validation, out)


@app.command()
def tune(
    task: str,
    params: ParamsOption = Path("params.yaml"),
    shards: FacesOption = layout.FACES,
    validation: ValidationOption = layout.VALIDATION,
    out: TaskOutOption = None,
) -> None:
    """Stage `tune@TASK`: Optuna search over fine-tuning params -> OUT/best_params.json."""
    from socialmae.train.stages import stage_tune

    _stage(stage_tune, params, _task(task), shards, validation, out)


@app.command("tune-worker")
def tune_worker(
    task: str,
    params: ParamsOption = Path("params.yaml"),
    shards: FacesOption = layout.FACES,
    validation: ValidationOption = layout.VALIDATION,
) -> None:
    """Join TASK's Optuna study as an extra worker (shared storage, e.g. PostgreSQL, from
    tune.storage or $SOCIALMAE_OPTUNA_STORAGE); run on as many machines as you like."""
    from socialmae.train.stages import stage_tune_worker

    _stage(stage_tune_worker, params, _task(task), shards, validation)


TunedOption = Annotated[
    Path | None,
    typer.Option(help="tune@TASK's best_params.json [default: outputs/tune/TASK/...]"),
]


@app.command()
def finetune(
    task: str,
    params: ParamsOption = Path("params.yaml"),
    shards: FacesOption = layout.FACES,
    validation: ValidationOption = layout.VALIDATION,
    tuned: TunedOption = None,
    out: TaskOutOption = None,
) -> None:
    """Stage `finetune@TASK`: fine-tune every mode, select on val, score test -> OUT."""
    from socialmae.train.stages import stage_finetune

    _stage(stage_finetune, params, _task(task), shards, validation, out, tuned)


@app.command()
def register(
    task: str,
    params: ParamsOption = Path("params.yaml"),
    finetuned: Annotated[
        Path | None, typer.Option(help="finetune@TASK's output [default: outputs/finetune/TASK]")
    ] = None,
    tuned: TunedOption = None,
    shards: FacesOption = layout.FACES,
    validation: ValidationOption = layout.VALIDATION,
    out: TaskOutOption = None,
) -> None:
    """Stage `register@TASK`: log to MLflow as socialmae-TASK, promote through the gate; the
    decision goes to OUT/decision.json."""
    from socialmae.registration import stage_register
    from socialmae.registry import PromotionBusyError

    try:
        _stage(stage_register, params, _task(task), finetuned, tuned, shards, validation, out)
    except PromotionBusyError as exc:  # another promotion is running: retry later
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None


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


def _load_predictor(
    model: str | None,
    task: str | None,
    labels: str | None,
    tracking_uri: str | None,
    device: str,
) -> Predictor:
    """:func:`socialmae.model_source.load_predictor` of `--model` (default: the champion of
    `--task`, else of the project's first task); exits 2 when it cannot."""
    from socialmae.model_source import ModelSourceError, default_source, load_predictor

    if task is not None:
        _task(task)
    names = tuple(name.strip() for name in labels.split(",")) if labels else None
    try:
        if model is None:
            model, task = default_source(task)
            typer.echo(f"using {model}", err=True)
        return load_predictor(model, task, names, tracking_uri, device)
    except ModelSourceError as exc:
        _fail(str(exc))


def _check_device(device: str) -> None:
    from socialmae.model_source import ModelSourceError, check_device

    try:
        check_device(device)
    except ModelSourceError as exc:
        _fail(str(exc))


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
    from socialmae.model_source import ModelSourceError
    from socialmae.serving import serve as run_server

    try:
        code = run_server(model, host, port, workers, timeout, tracking_uri)
    except ModelSourceError as exc:
        _fail(str(exc))
    if code != 0:
        typer.echo(f"error: the server exited with code {code}", err=True)
        raise typer.Exit(code=1)


if __name__ == "__main__":
    app()
