"""Where the project and its MLflow store are (for the notebooks), its tasks, and running a
notebook against it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from socialmae.params import load_yaml
from socialmae.tracking import resolve_tracking_uri

if TYPE_CHECKING:
    pass

from socialmae.reports.results import PAPER_TASKS

logger = logging.getLogger(__name__)


PROJECT_ENV = "SOCIALMAE_PROJECT"
"""Environment variable naming the project root the notebooks read (default: found from cwd)."""


def project_root(start: str | os.PathLike[str] | None = None) -> Path:
    """``$SOCIALMAE_PROJECT`` if set, else the first of ``start`` (default: the working
    directory) and its parents that holds ``dvc.yaml``."""
    named = os.environ.get(PROJECT_ENV)
    if named:
        root = Path(named).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"${PROJECT_ENV}={named} is not a directory")
        return root
    here = Path(start if start is not None else Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"no dvc.yaml in {here} or its parents: run from the project or set ${PROJECT_ENV}"
    )


def load_params(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The project's ``params.yaml`` (``{}`` when there is none)."""
    path = Path(root) / "params.yaml"
    return load_yaml(path) if path.is_file() else {}


def tracking_uri(root: str | os.PathLike[str]) -> str:
    """The MLflow store the stages logged to, as they resolve it: ``mlflow.tracking_uri`` in
    params.yaml, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; a relative sqlite
    path is taken relative to ``root`` (where ``dvc repro`` runs the stages)."""
    section = load_params(root).get("mlflow") or {}
    uri = resolve_tracking_uri(section.get("tracking_uri"))
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_absolute():
        uri = prefix + str(Path(root).resolve() / uri[len(prefix) :])
    return uri


def tasks(root: str | os.PathLike[str], include_paper: bool = True) -> tuple[str, ...]:
    """The project's ``tasks`` from params.yaml, then (optionally) the paper's other tasks."""
    own = tuple(load_params(root).get("tasks") or ())
    extra = tuple(t for t in PAPER_TASKS if t not in own) if include_paper else ()
    return own + extra


def execute_notebook(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    timeout: int = 600,
    kernel: str = "python3",
) -> Any:
    """Run a notebook top to bottom in a fresh kernel with ``root`` as working directory and
    return the executed ``nbformat.NotebookNode`` (the file itself is left as it is).

    ``python3`` is the kernel of the running interpreter. Raises
    ``nbclient.exceptions.CellExecutionError`` naming the first failing cell.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name=kernel,
                            resources={"metadata": {"path": str(root)}})  # fmt: skip
    client.execute()
    return notebook
