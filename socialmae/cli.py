"""The ``socialmae`` command."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from socialmae.checkpoints import CheckpointError, load_checkpoint
from socialmae.data.errors import MediaError
from socialmae.model import SocialMAEClassifier

app = typer.Typer(
    help="Social-MAE: audiovisual masked autoencoder for face and voice.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _stage(run, *args) -> None:
    from socialmae.params import ParamsError

    try:
        metrics = run(*args)
    except (ParamsError, MediaError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    typer.echo(json.dumps(metrics, indent=2, sort_keys=True, default=str))


def _task(name: str) -> str:
    from socialmae.tasks import TASKS

    if name not in TASKS:
        _fail(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return name


@app.command()
def download(params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage ``download``: raw clips + manifest per dataset under data/raw/."""
    from socialmae.pipeline import stage_download

    _stage(stage_download, params)


@app.command("crop-faces")
def crop_faces_command(params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage ``crop_faces``: face crops and audio into shards under data/interim/faces/."""
    from socialmae.pipeline import stage_crop_faces

    _stage(stage_crop_faces, params)


@app.command()
def validate(params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage ``validate``: Great Expectations checks, quarantine list, Data Docs."""
    from socialmae.data.validate import ValidationFailed
    from socialmae.pipeline import stage_validate

    try:
        _stage(stage_validate, params)
    except ValidationFailed as exc:
        _fail(str(exc))


@app.command()
def pretrain(params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage ``pretrain``: masked reconstruction + contrastive pretraining -> outputs/pretrain/.

    Multi-GPU: ``torchrun --nproc_per_node N -m socialmae.cli pretrain`` (same outputs).
    """
    from socialmae.train.stages import stage_pretrain

    _stage(stage_pretrain, params)


@app.command()
def tune(task: str, params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage ``tune@TASK``: Optuna search over fine-tuning params -> outputs/tune/TASK/."""
    from socialmae.train.stages import stage_tune

    _stage(stage_tune, params, _task(task))


@app.command()
def finetune(task: str, params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage ``finetune@TASK``: fine-tune, select on val, score test -> outputs/finetune/TASK/."""
    from socialmae.train.stages import stage_finetune

    _stage(stage_finetune, params, _task(task))


@app.command()
def register(task: str, params: Annotated[Path, typer.Option()] = Path("params.yaml")) -> None:
    """Stage ``register@TASK``: log to MLflow as socialmae-TASK, promote through the gate."""
    from socialmae.train.stages import stage_register

    _stage(stage_register, params, _task(task))


@app.command()
def info(path: Path) -> None:
    """Describe a checkpoint (official .pth or saved directory) as JSON."""
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


if __name__ == "__main__":
    app()
