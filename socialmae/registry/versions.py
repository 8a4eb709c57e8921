"""Logging a fine-tuned model directory as a pyfunc model and registering it as
``socialmae-<task>`` with its provenance tags."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from socialmae.data.crop import CropParams
from socialmae.data.download import redact
from socialmae.data.sampling import ClipSampling
from socialmae.inference import (
    PATH_COLUMN,
    Predictor,
)
from socialmae.registry.provenance import (
    TAG_DVC,
    TAG_FINGERPRINT,
    TAG_GIT,
    TAG_GIT_DIRTY,
    TAG_METRIC_NAME,
    TAG_METRIC_VALUE,
    TAG_TASK,
    TAG_WEIGHTS,
    dvc_data_hashes,
    git_revision,
)
from socialmae.registry.pyfunc import (
    MODEL_ARTIFACT,
    SocialMAEPyfunc,
    model_artifact,
    package_code,
    pip_requirements,
    signature,
)
from socialmae.tracking import mlflow_client, using_tracking_uri
from socialmae.tracking import task_name as model_name

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "socialmae"


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Only errors from ``logger_name`` inside the block."""
    target = logging.getLogger(logger_name)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


@dataclass(frozen=True)
class RegisteredVersion:
    """A logged and registered model version."""

    name: str  # socialmae-<task>
    version: int
    model_uri: str  # models:/<name>/<version>
    run_id: str
    test_fingerprint: str
    tags: dict[str, str]
    reused: bool = False  # the same weights and test set were registered before: no new version


def _model_fingerprint(predictor: Predictor, model_dir: Path) -> str:
    """What makes two registrations the same model: its weights, its config and its
    preprocessing (``sha256``)."""
    digest = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        path = model_dir / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    pre = predictor.preprocessing
    digest.update(json.dumps([dataclasses.asdict(pre.crop), dataclasses.asdict(pre.sampling)],
                             sort_keys=True).encode())  # fmt: skip
    return digest.hexdigest()


def log_model(
    model_dir: str | os.PathLike[str],
    task: str,
    metric_name: str,
    metric_value: float,
    test_fingerprint: str,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    crop: CropParams | None = None,
    sampling: ClipSampling | None = None,
    dvc_lock: str | os.PathLike[str] = "dvc.lock",
    repo_dir: str | os.PathLike[str] = ".",
) -> RegisteredVersion:
    """Log a fine-tuned model directory as a pyfunc model and register it as
    ``socialmae-<task>``, with provenance tags on the new version. A model already registered
    with the same weights, config, preprocessing and test set is not registered again: its
    version comes back with ``reused=True``.

    Logs into the active MLflow run if there is one (it must live at the resolved tracking
    URI), else into a new run ``register-<task>`` of ``experiment``.

    Args:
        model_dir: a ``save_pretrained`` directory of a fine-tuned classifier/regressor.
        metric_name, metric_value: the primary test metric (higher is better by default in
            :func:`promote`).
        test_fingerprint: the test set the metric was computed on
            (:func:`test_set_fingerprint` of its clip ids).
        crop, sampling: preprocessing to store with the model (``preprocessing.json``);
            None keeps what ``model_dir`` holds (or the defaults).
        dvc_lock, repo_dir: where to read the data hashes and the git revision.
    """
    model_dir = Path(model_dir)
    predictor = Predictor.load(model_dir, crop=crop, sampling=sampling)  # fails early if broken
    name = model_name(task)
    client, uri = mlflow_client(tracking_uri)
    weights = _model_fingerprint(predictor, model_dir)
    with contextlib.suppress(MlflowException):  # no such registered model yet
        for found in client.search_model_versions(f"name = '{name}'"):
            identity = (found.tags.get(k) for k in (TAG_WEIGHTS, TAG_FINGERPRINT, TAG_METRIC_VALUE))
            if tuple(identity) == (weights, test_fingerprint, repr(float(metric_value))):
                logger.info("%s v%s holds the same model and test set: not registered again",
                            name, found.version)  # fmt: skip
                return RegisteredVersion(
                    name, int(found.version), f"models:/{name}/{found.version}", found.run_id,
                    test_fingerprint, dict(found.tags), reused=True,
                )  # fmt: skip
    revision, dirty = git_revision(repo_dir)
    tags = {
        TAG_TASK: task,
        TAG_METRIC_NAME: metric_name,
        TAG_METRIC_VALUE: repr(float(metric_value)),
        TAG_FINGERPRINT: test_fingerprint,
        TAG_DVC: json.dumps(dvc_data_hashes(dvc_lock), sort_keys=True),
        TAG_GIT: revision or "unknown",
        TAG_GIT_DIRTY: str(dirty).lower(),
        TAG_WEIGHTS: weights,
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(using_tracking_uri(uri))
        if mlflow.active_run() is None:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            stack.enter_context(
                mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{task}")
            )
        run = mlflow.active_run()
        assert run is not None
        mlflow.log_metric(metric_name, float(metric_value))
        mlflow.set_tags(tags)
        artifact = stack.enter_context(model_artifact(model_dir, crop, sampling))
        code = stack.enter_context(package_code())
        # MLflow checks the input example by predicting it; its path names no real file, and
        # that expected "skipping" warning would only alarm whoever reads the log.
        stack.enter_context(_quiet("socialmae.inference"))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=SocialMAEPyfunc(),
            artifacts={MODEL_ARTIFACT: str(artifact)},
            code_paths=[str(code)],
            signature=signature(predictor),
            input_example=pd.DataFrame({PATH_COLUMN: ["clips/example.mp4"]}),
            pip_requirements=pip_requirements(),
            registered_model_name=name,
            model_config={"device": "cpu"},
        )
        run_id = run.info.run_id
    version = int(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    logger.info("registered %s version %d (run %s) in %s", name, version, run_id, redact(uri))
    model_uri = f"models:/{name}/{version}"
    return RegisteredVersion(name, version, model_uri, run_id, test_fingerprint, tags)
