"""Where a model for inference comes from: a ``models:/`` (or ``runs:/``, ``s3://``...) URI
resolved through MLflow, a saved model directory, or an official fine-tuned ``.pth``.

:func:`load_predictor` turns any of them into a :class:`~socialmae.inference.Predictor`;
every reason it cannot is a :class:`ModelSourceError` with a one-line message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from socialmae.inference import Predictor

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # models:/, runs:/, s3://... (not C:\)


class ModelSourceError(ValueError):
    """A model source that cannot be used (unknown, missing, unusable, bad device)."""


def is_uri(source: str) -> bool:
    """``models:/...``, ``runs:/...``, ``s3://...``: for MLflow, not a local path."""
    return bool(_URI.match(source))


def check_device(device: str) -> None:
    """Raise unless ``device`` is cpu or an available cuda device."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ModelSourceError(f"--device must be cpu or cuda[:N], got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError(f"--device {device}: CUDA is not available")


def project_task(params: Path = Path("params.yaml")) -> str | None:
    """The first of ``tasks`` in the project's params file (in the working directory), so that
    ``socialmae predict clip.mp4`` after ``make demo`` uses that task's champion; None outside
    a project."""
    from socialmae.params import ParamsError, load_yaml

    try:
        tasks = load_yaml(params).get("tasks") if params.is_file() else None
    except ParamsError:
        return None
    return str(tasks[0]) if isinstance(tasks, list) and tasks else None


def default_source(task: str | None) -> tuple[str, str]:
    """``(source, task)`` when no model is given: the champion of ``task``, else of the
    project's first task (:func:`project_task`)."""
    from socialmae.registry import champion_uri

    task = task or project_task()
    if task is None:
        raise ModelSourceError("give --model (a models:/ URI, a model directory or a .pth) "
                               "or --task")  # fmt: skip
    return champion_uri(task), task


def load_predictor(
    source: str,
    task: str | None = None,
    labels: tuple[str, ...] | None = None,
    tracking_uri: str | None = None,
    device: str = "cpu",
) -> Predictor:
    """The :class:`Predictor` of ``source``: a URI (:func:`socialmae.registry.load_registered`),
    a saved directory or an official ``.pth`` (:meth:`Predictor.load`; its kind and labels come
    from ``labels``, else from ``task``)."""
    from mlflow.exceptions import MlflowException

    from socialmae.inference import Predictor
    from socialmae.registry import load_registered
    from socialmae.state_dicts import CheckpointError
    from socialmae.tasks import get_task

    try:
        spec = get_task(task) if task is not None else None
    except KeyError as exc:
        raise ModelSourceError(exc.args[0]) from exc
    check_device(device)
    path, uri = Path(source), is_uri(source)
    is_pth = not uri and not path.is_dir()
    if labels is not None and not is_pth:
        raise ModelSourceError("--labels only applies to official .pth checkpoints; saved "
                               "models record theirs")  # fmt: skip
    if uri:
        try:
            return load_registered(source, tracking_uri, device)
        except (MlflowException, OSError) as exc:
            raise ModelSourceError(f"cannot load {source}: {exc}") from exc
    if not path.exists():
        raise ModelSourceError(f"{path}: no such file or directory")
    if is_pth and spec is not None:
        labels = labels or spec.labels
    try:
        return Predictor.load(path, spec.kind if spec else None, labels, device)
    except (CheckpointError, ValueError) as exc:
        raise ModelSourceError(str(exc)) from exc
