"""The pyfunc model a fine-tuned model is logged as (``DataFrame[path]`` of video files in,
predictions out, through :class:`~socialmae.inference.Predictor`) and loading it back."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import socialmae
from socialmae.data.crop import CropParams
from socialmae.data.sampling import ClipSampling
from socialmae.inference import (
    ERROR_COLUMN,
    LABEL_COLUMN,
    PATH_COLUMN,
    Predictor,
    write_preprocessing,
)
from socialmae.registry.promotion import champion_uri
from socialmae.tracking import resolve_tracking_uri, using_tracking_uri

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # the pyfunc artifact holding the save_pretrained directory
MAX_REQUEST_PATHS = 10_000  # files per pyfunc call (a served request)
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


def pip_requirements() -> list[str]:
    """The installed package's pinned runtime dependencies (extras left out)."""
    try:
        requires = importlib.metadata.requires("socialmae") or []
    except importlib.metadata.PackageNotFoundError:
        logger.warning("socialmae is not installed; the model only lists mlflow as a requirement")
        return [f"mlflow=={mlflow.__version__}"]
    return [r for r in requires if "extra ==" not in r]


def signature(predictor: Predictor) -> ModelSignature:
    outputs = [
        ColSpec("string", PATH_COLUMN),
        ColSpec("string", LABEL_COLUMN, required=False),
        ColSpec("string", ERROR_COLUMN, required=False),
        *(ColSpec("double", column, required=False) for column in predictor.score_columns),
    ]
    params = ParamSchema(
        [ParamSpec("mode", "string", predictor.model.mode), ParamSpec("batch_size", "long", 8)]
    )
    return ModelSignature(Schema([ColSpec("string", PATH_COLUMN)]), Schema(outputs), params)


class SocialMAEPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc model: ``DataFrame[path]`` of video files -> predictions DataFrame.

    Output columns: ``path``, ``label`` (classification), ``error`` (the reason a file could
    not be used, else None) and ``prob_<class>`` / ``score_<trait>`` (NaN on error rows).
    Params: ``mode`` (multimodal, audio, video; default: the mode the model was fine-tuned in)
    and ``batch_size``. The device comes from the
    load-time ``model_config={"device": "cuda"}`` (default cpu).
    """

    def __init__(self) -> None:
        self.predictor: Predictor | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        device = (context.model_config or {}).get("device", "cpu")
        self.predictor = Predictor.load(context.artifacts[MODEL_ARTIFACT], device=device)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        if self.predictor is None:
            raise MlflowException("the model was not loaded (load_context was not called)")
        if not isinstance(model_input, pd.DataFrame) or PATH_COLUMN not in model_input.columns:
            raise MlflowException(
                f"expected a DataFrame with a {PATH_COLUMN!r} column of video files",
                error_code=INVALID_PARAMETER_VALUE,
            )
        params = params or {}
        paths = [str(p) for p in model_input[PATH_COLUMN].tolist()]
        if len(paths) > MAX_REQUEST_PATHS:
            raise MlflowException(
                f"{len(paths)} paths in one request; send at most {MAX_REQUEST_PATHS}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        longest = max((len(p) for p in paths), default=0)
        if longest > MAX_PATH_CHARS:  # not a file name: refuse it without echoing it back
            raise MlflowException(
                f"a path of {longest} characters; paths are at most {MAX_PATH_CHARS}",
                error_code=INVALID_PARAMETER_VALUE,
            )
        try:
            frame = self.predictor.predict_frame(
                paths, params.get("mode") or None, int(params.get("batch_size", 8))
            )
        except ValueError as exc:  # a bad mode or batch size
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        # Rows of files that failed hold NaN scores; JSON has no NaN (strict parsers reject the
        # whole response), so they travel as null next to the error string.
        return frame.astype(object).where(frame.notna(), None)


@contextlib.contextmanager
def model_artifact(
    model_dir: Path, crop: CropParams | None, sampling: ClipSampling | None
) -> Iterator[Path]:
    """The directory to log: ``model_dir`` itself, or a copy with ``preprocessing.json``."""
    if crop is None and sampling is None:
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="socialmae-model-") as tmp:
        copy = Path(tmp) / model_dir.name
        shutil.copytree(model_dir, copy)
        write_preprocessing(copy, crop, sampling)
        yield copy


@contextlib.contextmanager
def package_code() -> Iterator[Path]:
    """A copy of the ``socialmae`` package without caches, for ``code_paths``."""
    source = Path(socialmae.__file__).parent
    with tempfile.TemporaryDirectory(prefix="socialmae-code-") as tmp:
        target = Path(tmp) / "socialmae"
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield target


def load_champion(task: str, tracking_uri: str | None = None, device: str = "cpu") -> Predictor:
    """The :class:`Predictor` of ``models:/socialmae-<task>@champion``."""
    return load_registered(champion_uri(task), tracking_uri, device)


def load_registered(
    model_uri: str, tracking_uri: str | None = None, device: str = "cpu"
) -> Predictor:
    """The :class:`Predictor` of a logged model (``models:/name@alias``, ``models:/name/3``...)."""
    uri = resolve_tracking_uri(tracking_uri)
    with using_tracking_uri(uri):
        model = mlflow.pyfunc.load_model(model_uri, model_config={"device": device})
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, SocialMAEPyfunc) or python_model.predictor is None:
        raise MlflowException(f"{model_uri} is not a socialmae pyfunc model")
    return python_model.predictor
