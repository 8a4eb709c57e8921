"""MLflow model logging, registration and the promotion gate.

Fine-tuned models are logged as MLflow pyfunc models (:class:`SocialMAEPyfunc`: a DataFrame
with a ``path`` column of video files in, a DataFrame of predictions out, through
:class:`~socialmae.inference.Predictor`) and registered as ``socialmae-<task>``. Each version
carries tags: the git revision, the md5 of the DVC data outputs, the task, the primary metric
and its value, and a fingerprint of the test set it was scored on.

Promotion uses registered-model aliases (MLflow 3; stages are deprecated): every new version
becomes the ``challenger``; ``champion`` moves to it only if there is no champion yet or it
beats the champion's score *on the same test set* by more than a margin. The decision is
recorded as tags on the version and returned as a JSON-serialisable :class:`PromotionDecision`.

Where the code comes from when a logged model is loaded: the ``socialmae`` package is copied
into the model (``code_paths``), so a fresh process (``mlflow models serve``, a batch job)
imports the code the model was logged with; a process that has already imported
``socialmae`` keeps its own. The pip requirements are the installed package's pinned
dependencies, for ``--env-manager virtualenv``.

The tracking URI is resolved by :func:`socialmae.tracking.resolve_tracking_uri` (explicit,
else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``); credentials come only from
MLflow's own environment variables and URIs are logged redacted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import socialmae
from socialmae.data.crop import CropParams
from socialmae.data.dataset import ClipSampling
from socialmae.data.download import redact
from socialmae.inference import (
    ERROR_COLUMN,
    LABEL_COLUMN,
    PATH_COLUMN,
    Predictor,
    write_preprocessing,
)
from socialmae.tracking import resolve_tracking_uri, using_tracking_uri
from socialmae.tracking import task_name as model_name
from socialmae.train.engine import test_set_fingerprint as test_set_fingerprint  # re-exported

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"  # the pyfunc artifact holding the save_pretrained directory
DEFAULT_EXPERIMENT = "socialmae"
DATA_PREFIXES = ("data/",)  # dvc.lock outs whose md5 identify the data

# Model-version tags.
TAG_TASK = "task"
TAG_GIT = "git_revision"
TAG_GIT_DIRTY = "git_dirty"
TAG_DVC = "dvc_data_md5"  # JSON {out path: md5}
TAG_METRIC_NAME = "metric_name"
TAG_METRIC_VALUE = "metric_value"
TAG_FINGERPRINT = "test_fingerprint"
TAG_WEIGHTS = "model_fingerprint"  # sha256 of the logged weights, config and preprocessing
TAG_DECISION = "promotion"  # JSON of the PromotionDecision
TAG_DECISION_OUTCOME = "promotion_outcome"  # promoted | kept | refused


def champion_uri(task: str) -> str:
    """``models:/socialmae-<task>@champion``."""
    return f"models:/{model_name(task)}@{CHAMPION}"


# --------------------------------------------------------------------------- provenance


def git_revision(repo_dir: str | os.PathLike[str] = ".") -> tuple[str | None, bool]:
    """``(HEAD commit, working tree has uncommitted changes)``; ``(None, False)`` outside git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=30,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return None, False
    return head, bool(git("status", "--porcelain", "--untracked-files=no"))


def dvc_data_hashes(
    lock_path: str | os.PathLike[str] = "dvc.lock", prefixes: tuple[str, ...] = DATA_PREFIXES
) -> dict[str, str]:
    """md5 of every DVC stage output under ``prefixes`` in ``dvc.lock`` (``{}`` if absent)."""
    path = Path(lock_path)
    if not path.is_file():
        return {}
    try:
        lock = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        logger.warning("%s is not valid YAML (%s); no data hashes recorded", path, exc)
        return {}
    hashes: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            out_path, md5 = str(out.get("path", "")), out.get("md5")
            if md5 and out_path.startswith(prefixes):
                hashes[out_path] = str(md5)
    return dict(sorted(hashes.items()))


# --------------------------------------------------------------------------- MLflow plumbing


def _client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri), uri


def _pip_requirements() -> list[str]:
    """The installed package's pinned runtime dependencies (extras left out)."""
    try:
        requires = importlib.metadata.requires("socialmae") or []
    except importlib.metadata.PackageNotFoundError:
        logger.warning("socialmae is not installed; the model only lists mlflow as a requirement")
        return [f"mlflow=={mlflow.__version__}"]
    return [r for r in requires if "extra ==" not in r]


def _signature(predictor: Predictor) -> ModelSignature:
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


MAX_REQUEST_PATHS = 10_000  # files per pyfunc call (a served request)
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


@contextlib.contextmanager
def _model_artifact(
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
def _package_code() -> Iterator[Path]:
    """A copy of the ``socialmae`` package without caches, for ``code_paths``."""
    source = Path(socialmae.__file__).parent
    with tempfile.TemporaryDirectory(prefix="socialmae-code-") as tmp:
        target = Path(tmp) / "socialmae"
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield target


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
    client, uri = _client(tracking_uri)
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
        artifact = stack.enter_context(_model_artifact(model_dir, crop, sampling))
        code = stack.enter_context(_package_code())
        # MLflow checks the input example by predicting it; its path names no real file, and
        # that expected "skipping" warning would only alarm whoever reads the log.
        stack.enter_context(_quiet("socialmae.inference"))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=SocialMAEPyfunc(),
            artifacts={MODEL_ARTIFACT: str(artifact)},
            code_paths=[str(code)],
            signature=_signature(predictor),
            input_example=pd.DataFrame({PATH_COLUMN: ["clips/example.mp4"]}),
            pip_requirements=_pip_requirements(),
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


# --------------------------------------------------------------------------- promotion

Outcome = Literal["promoted", "kept", "refused"]  # kept: champion unchanged; refused: no comparison


@dataclass(frozen=True)
class PromotionDecision:
    """What :func:`promote` decided and why (JSON-serialisable via :meth:`to_dict`)."""

    model_name: str
    version: int  # the candidate (now the challenger)
    outcome: Outcome
    promoted: bool
    reason: str
    metric_name: str
    challenger_score: float
    champion_score: float | None  # on the candidate's test set; None without a champion
    champion_rescored: bool  # the champion was re-evaluated on the candidate's test set
    margin: float
    greater_is_better: bool
    previous_champion: int | None
    champion: int | None  # the champion after the decision
    test_fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    """The model version holding ``alias``, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def promote(
    task: str,
    version: int | str,
    metric_name: str,
    value: float,
    test_fingerprint: str,
    margin: float,
    evaluate_champion: Callable[[str], float] | None = None,
    greater_is_better: bool = True,
    tracking_uri: str | None = None,
) -> PromotionDecision:
    """Make ``version`` the challenger, and the champion if it earns it.

    The champion moves only if there is none yet, or the candidate beats the champion's
    score on the same test set by more than ``margin``. The champion's score is its recorded
    ``metric_value`` tag when its ``test_fingerprint`` and ``metric_name`` match the
    candidate's; otherwise ``evaluate_champion(model_uri)`` re-scores it on the current test
    set; without that callback the promotion is refused.

    Returns:
        the decision, also stored as tags on ``version`` (``promotion``, ``promotion_outcome``).
    """
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    client, uri = _client(tracking_uri)
    name, version = model_name(task), int(version)
    value = float(value)
    client.get_model_version(name, str(version))  # raises if it does not exist
    for key, tag in ((TAG_METRIC_NAME, metric_name), (TAG_METRIC_VALUE, repr(value)),
                     (TAG_FINGERPRINT, test_fingerprint)):  # fmt: skip
        client.set_model_version_tag(name, str(version), key, tag)
    with _promotion_lock(client, uri, name):  # read the champion, decide and move it as one step
        client.set_registered_model_alias(name, CHALLENGER, str(version))
        decision = _decide(
            client, name, version, metric_name, value, test_fingerprint, margin,
            evaluate_champion, greater_is_better,
        )  # fmt: skip
    client.set_model_version_tag(name, str(version), TAG_DECISION, json.dumps(decision.to_dict()))
    client.set_model_version_tag(name, str(version), TAG_DECISION_OUTCOME, decision.outcome)
    logger.info("%s v%d: %s (%s) [%s]", name, version, decision.outcome, decision.reason,
                redact(uri))  # fmt: skip
    return decision


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


PROMOTION_LEASE_STALE_S = 900.0  # a lease unchanged this long was left by a dead promoter
PROMOTION_LEASE_WAIT_S = 1200.0  # give up waiting for another promotion after this long
LEASE_SUFFIX = ".promotion-lease"  # the registered model that is the lease of ``<name>``


class PromotionBusyError(RuntimeError):
    """Another promotion of the same model held the lease longer than we could wait."""


@contextlib.contextmanager
def _promotion_lock(
    client: MlflowClient, uri: str, name: str, wait_s: float = PROMOTION_LEASE_WAIT_S
) -> Iterator[None]:
    """Serialise the promotions of model ``name``, so two processes cannot both read the old
    champion and the worse candidate win by writing last.

    On a sqlite store: an exclusive lock on a file beside the database (released by the OS
    if the holder dies). On any other store (a tracking server, a database URI): a lease
    taken through the registry itself, see :func:`_registry_lease`.

    Raises:
        PromotionBusyError: another promotion held the lock or lease for more than ``wait_s``.
    """
    if not uri.startswith("sqlite:///"):
        with _registry_lease(client, name, wait_s=wait_s):
            yield
        return
    import fcntl
    import time

    database = Path(uri.removeprefix("sqlite:///"))
    lock = database.with_name(f"{database.name}.{name}.promotion.lock")
    deadline = time.monotonic() + wait_s
    with open(lock, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PromotionBusyError(
                        f"another promotion of {name} held {lock} for more than {wait_s:.0f} s"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _registry_lease(
    client: MlflowClient,
    name: str,
    stale_after_s: float = PROMOTION_LEASE_STALE_S,
    wait_s: float = PROMOTION_LEASE_WAIT_S,
) -> Iterator[None]:
    """Hold the lease of ``name``: the registered model ``<name>.promotion-lease``.

    Creating a registered model is atomic on every MLflow store (the name is the store's
    primary key), so exactly one of several concurrent creators succeeds: that is the
    compare-and-set the registry API offers. The holder deletes it when done. A lease whose
    holder died is broken once the same holder has been seen for ``stale_after_s`` (measured
    on this machine's clock, so clock skew between hosts does not matter).

    Raises:
        PromotionBusyError: the lease stayed with live holders for more than ``wait_s``.
    """
    import random
    import socket
    import time
    import uuid

    lease = f"{name}{LEASE_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    seen: tuple[str, float] | None = None  # (holder, when we first saw it)
    while True:
        try:
            client.create_registered_model(
                lease, tags={"holder": holder},
                description=f"held while {holder} promotes {name}; delete it if that process died",
            )  # fmt: skip
            break
        except MlflowException as exc:
            # taken; or, from a server that looks the lease up after the failed insert, just
            # released by its holder: either way try again
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        other = _lease_holder(client, lease)
        now = time.monotonic()
        if other is not None:
            if seen is None or seen[0] != other:
                seen = (other, now)
            elif now - seen[1] > stale_after_s:
                logger.warning("breaking the promotion lease of %s left by %s (held > %.0f s)",
                               name, other, stale_after_s)  # fmt: skip
                if _lease_holder(client, lease) == other:
                    _delete_lease(client, lease)
                seen = None
                continue
        if now - start > wait_s:
            raise PromotionBusyError(
                f"{name}: another promotion ({other}) held the lease {lease!r} for more than "
                f"{wait_s:.0f} s; if that process died, delete the registered model {lease!r}"
            )
        time.sleep(0.05 + 0.1 * random.random())
    try:
        yield
    finally:
        _delete_lease(client, lease)


def _lease_holder(client: MlflowClient, lease: str) -> str | None:
    """The holder recorded on the lease, or None if it is gone."""
    try:
        return (client.get_registered_model(lease).tags or {}).get("holder", "?")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise


def _delete_lease(client: MlflowClient, lease: str) -> None:
    try:
        client.delete_registered_model(lease)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise


def _decide(
    client: MlflowClient,
    name: str,
    version: int,
    metric_name: str,
    value: float,
    test_fingerprint: str,
    margin: float,
    evaluate_champion: Callable[[str], float] | None,
    greater_is_better: bool,
) -> PromotionDecision:
    """The gate: compare ``version`` with the current champion and move the alias if it wins."""
    outcome: Outcome
    current = _alias_version(client, name, CHAMPION)
    previous = int(current.version) if current is not None else None
    champion_score: float | None = None
    rescored = False
    if not math.isfinite(value):
        outcome, reason = "refused", f"the candidate's {metric_name} is {value}"
    elif current is None:
        outcome, reason = "promoted", "there was no champion yet"
    elif previous == version:
        outcome, reason = "kept", f"version {version} is already the champion"
        champion_score = value
    else:
        champion_score, why = _champion_score(
            current, metric_name, test_fingerprint, evaluate_champion, name
        )
        rescored = why == "rescored"
        if champion_score is None:
            outcome, reason = "refused", why
        else:
            gain = value - champion_score if greater_is_better else champion_score - value
            direction = "higher" if greater_is_better else "lower"
            compared = (
                f"{metric_name} {value:.6g} vs champion v{previous} {champion_score:.6g}"
                f"{' (re-evaluated on this test set)' if rescored else ''}; "
                f"improvement {gain:.6g} ({direction} is better)"
            )
            if gain > margin:
                outcome, reason = "promoted", f"{compared} > margin {margin:g}"
            else:
                outcome, reason = "kept", f"{compared} <= margin {margin:g}"
    if outcome == "promoted":
        client.set_registered_model_alias(name, CHAMPION, str(version))
    decision = PromotionDecision(
        model_name=name, version=version, outcome=outcome, promoted=outcome == "promoted",
        reason=reason, metric_name=metric_name, challenger_score=value,
        champion_score=champion_score, champion_rescored=rescored, margin=float(margin),
        greater_is_better=greater_is_better, previous_champion=previous,
        champion=version if outcome == "promoted" else previous,
        test_fingerprint=test_fingerprint,
    )  # fmt: skip
    return decision


def _champion_score(
    champion: Any,
    metric_name: str,
    test_set: str,
    evaluate_champion: Callable[[str], float] | None,
    name: str,
) -> tuple[float | None, str]:
    """The champion's score on the candidate's test set and how it was obtained
    (``recorded`` / ``rescored``), or ``(None, why not)``."""
    tags = champion.tags or {}
    recorded = tags.get(TAG_METRIC_VALUE)
    same_set = tags.get(TAG_FINGERPRINT) == test_set
    same_metric = tags.get(TAG_METRIC_NAME) == metric_name
    if same_set and same_metric and recorded is not None:
        return float(recorded), "recorded"
    differs = "test set" if not same_set else f"metric ({tags.get(TAG_METRIC_NAME)!r})"
    if evaluate_champion is None:
        return None, (
            f"champion v{champion.version} was scored on another {differs} and no "
            "evaluate_champion callback was given to re-score it; champion unchanged"
        )
    uri = f"models:/{name}/{champion.version}"
    score = float(evaluate_champion(uri))
    if not math.isfinite(score):
        return None, f"re-evaluating champion v{champion.version} gave {score}; champion unchanged"
    logger.info("re-scored champion %s on this test set: %s %.6g", uri, metric_name, score)
    return score, "rescored"


# --------------------------------------------------------------------------- loading


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
