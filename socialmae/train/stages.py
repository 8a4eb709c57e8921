"""Training stage entry points (``pretrain``, ``tune@task``, ``finetune@task``), shared by the
CLI (and so dvc.yaml) and the Prefect flows. Each reads exactly its params.yaml keys, calls
the library and returns its metrics; outputs are written atomically by the library.

Per-task settings are ``<section>.defaults`` deep-merged with ``<section>.<task>``; the tuned
values in ``outputs/tune/<task>/best_params.json`` go on top for fine-tuning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from socialmae.io import atomic_write_text, remove_temporaries
from socialmae.layout import BEST_PARAMS, FACES, FINETUNE, PRETRAIN, TUNE, VALIDATION
from socialmae.model import get_preset
from socialmae.params import ParamsError, deep_merge, from_mapping, load_params
from socialmae.tasks import TASKS, get_task
from socialmae.tracking import resolve_tracking_uri
from socialmae.train.engine import Report
from socialmae.train.finetune import (
    FinetuneParams,
    experiment_name,
    finetune,
    finetune_modes,
    params_for_mode,
    with_overrides,
)
from socialmae.train.pretrain import PretrainParams, pretrain

logger = logging.getLogger(__name__)

EFFECTIVE_PARAMS = "params.json"  # what finetune@task ran with: defaults + task block + tuned,
# and per mode with its by_mode changes


@dataclass(frozen=True)
class MlflowParams:
    """``mlflow`` in params.yaml."""

    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db


def tracking_uri(params: dict[str, Any]) -> str | None:
    return from_mapping(MlflowParams, params.get("mlflow"), "mlflow").tracking_uri


def accepted_clips(
    validation: Path = VALIDATION, datasets: tuple[str, ...] | None = None
) -> set[str]:
    """Clip ids the validation stage accepted (``accepted.csv``), of ``datasets`` if given."""
    path = validation / "accepted.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run the validate stage first")
    table = pd.read_csv(path, dtype=str)
    if datasets is not None:
        table = table[table["dataset"].isin(datasets)]
    return set(table["clip_id"])


def merged_section(params: dict[str, Any], section: str, task: str) -> dict[str, Any]:
    """``<section>.defaults`` deep-merged with ``<section>.<task>``."""
    if task not in TASKS:
        raise ParamsError(f"{section}.{task}", f"unknown task; choose one of {sorted(TASKS)}")
    block = params.get(section) or {}
    if not isinstance(block, dict):
        raise ParamsError(section, f"expected a mapping, got {block!r}")
    unknown = sorted(set(block) - {"defaults", *TASKS})
    if unknown:
        raise ParamsError(f"{section}.{unknown[0]}", f"expected defaults or a task {sorted(TASKS)}")
    return deep_merge(block.get("defaults") or {}, block.get(task) or {})


def finetune_params(params: dict[str, Any], task: str, tuned: Path | None) -> FinetuneParams:
    """The task's fine-tuning params, with the tuned values from ``tuned`` (if it exists)."""
    section = merged_section(params, "finetune", task)
    base = from_mapping(FinetuneParams, section, f"finetune.{task}")
    for mode in base.by_mode:  # a bad per-mode key stops here, before any work
        params_for_mode(base, mode)
    if tuned is None or not tuned.is_file():
        return base
    best = json.loads(tuned.read_text()).get("params", {})
    logger.info("%s: tuned values from %s: %s", task, tuned, best)
    try:
        return with_overrides(base, best)
    except ParamsError as exc:
        raise ParamsError(exc.key, f"{exc.reason} (a tuned value in {tuned})") from exc


def check_init(settings: FinetuneParams, task: str) -> None:
    """Stop before any work when ``finetune.<task>.init`` names nothing on disk."""
    if settings.init is not None and not Path(settings.init).exists():
        raise ParamsError(f"finetune.{task}.init", f"{settings.init}: no such file or directory")


def check_crop_size(params: dict[str, Any], image_size: int, model: str) -> None:
    """The face crops must be at least as large as the model's input (larger ones are resized
    down; smaller ones would be upsampled): checked before any work."""
    from socialmae.data.crop import CropParams

    crop = from_mapping(CropParams, params.get("crop"), "crop")
    if crop.image_size < image_size:
        raise ParamsError("crop.image_size", f"{crop.image_size} is smaller than the "
                          f"{image_size}-pixel input of {model}")  # fmt: skip


def stage_pretrain(
    params_path: str | os.PathLike[str],
    shards: Path = FACES,
    validation: Path = VALIDATION,
    out: Path = PRETRAIN,
) -> dict[str, Any]:
    """Self-supervised pretraining on the accepted clips (``pretrain`` in params.yaml)."""
    params = load_params(params_path)
    settings = from_mapping(PretrainParams, params.get("pretrain"), "pretrain")
    check_crop_size(
        params, get_preset(settings.preset).image_size, f"pretrain.preset {settings.preset}"
    )
    accepted = accepted_clips(validation, settings.datasets)
    return pretrain(settings, shards, out, accepted, tracking_uri(params))


def stage_finetune(
    params_path: str | os.PathLike[str],
    task: str,
    shards: Path = FACES,
    validation: Path = VALIDATION,
    out: Path | None = None,
    tuned: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``task`` in each of its modes (``finetune.defaults`` + ``finetune.<task>`` +
    tuned values) and compare the modes (see :func:`~socialmae.train.finetune.finetune_modes`)."""
    get_task(task)
    params = load_params(params_path)
    tuned = tuned if tuned is not None else TUNE / task / BEST_PARAMS
    settings = finetune_params(params, task, tuned)
    check_init(settings, task)
    out = out if out is not None else FINETUNE / task
    effective = {"params": asdict(settings),
                 **{f"params_{mode}": asdict(params_for_mode(settings, mode))
                    for mode in settings.modes}}  # fmt: skip
    atomic_write_text(out / EFFECTIVE_PARAMS, json.dumps(effective, indent=2, default=list) + "\n")
    return finetune_modes(
        settings, task, shards, out, accepted_clips(validation), tracking_uri(params)
    )


@dataclass
class _Study:
    """Everything a tuning worker needs for one task."""

    settings: Any  # socialmae.train.tune.TuneParams
    space: Any  # socialmae.train.tune.SearchSpace
    objective: Callable[[dict[str, Any], Report], float]
    enabled: bool
    metric: str
    uri: str | None


def _study(params_path, task: str, shards: Path, validation: Path, workdir: Path) -> _Study:
    """The task's study settings and its objective: one fine-tuning run per trial, in a
    scratch directory under ``workdir``, scored on validation (never on test)."""
    import shutil
    import tempfile

    from socialmae.train.metrics import primary_metric
    from socialmae.train.tune import parse_tune

    spec = get_task(task)
    params = load_params(params_path)
    section = merged_section(params, "tune", task)
    enabled = section.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise ParamsError(f"tune.{task}.enabled", f"expected true or false, got {enabled!r}")
    settings, space = parse_tune(section, f"tune.{task}")
    base = finetune_params(params, task, tuned=None)
    check_init(base, task)
    for name, dimension in space.dimensions:  # a misspelt key stops here, not after 2 trials
        sample = getattr(dimension, "low", None)
        sample = dimension.choices[0] if sample is None else sample
        try:
            with_overrides(base, {name: sample})
        except ParamsError as exc:
            unknown = exc.reason == "no such parameter"
            reason = "not a fine-tuning param" if unknown else exc.reason
            raise ParamsError(f"tune.{task}.space.{name}", reason) from exc
    uri = resolve_tracking_uri(tracking_uri(params))  # trials nest under the study's run
    metric = primary_metric(spec)

    def objective(overrides: dict[str, Any], report: Report) -> float:
        trial = with_overrides(base, overrides)
        workdir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="trial-", dir=workdir))
        try:
            result = finetune(
                trial, spec, shards, scratch, accepted_clips(validation), report=report,
                tracking_uri=uri, evaluate_test=False,
            )  # fmt: skip
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return float(result["val"][metric])

    return _Study(settings, space, objective, enabled, metric, uri)


def stage_tune(
    params_path: str | os.PathLike[str],
    task: str,
    shards: Path = FACES,
    validation: Path = VALIDATION,
    out: Path | None = None,
) -> dict[str, Any]:
    """Optuna search over ``tune.<task>.space`` (merged with ``tune.defaults``); each trial is a
    fine-tuning run scored on the validation split. Writes ``best_params.json`` (read by
    ``finetune@task``) into ``out`` and the study (sqlite storage by default, ``trials.csv``)
    into ``out/study/``, which a rerun continues."""
    from socialmae.train.tune import STUDY_DIR, run_study

    out = out if out is not None else TUNE / task
    study = _study(params_path, task, shards, validation, out)
    if not study.enabled:  # finetune@task then uses its params as they are
        from socialmae.train.tune import write_best_params

        (out / STUDY_DIR).mkdir(parents=True, exist_ok=True)  # the stage's output, kept as is
        payload = {"params": {}, "skipped": "tune.enabled is false"}
        write_best_params(out, payload)
        return payload
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out / STUDY_DIR)  # a killed run's half-written trials.csv
    result = run_study(
        study.objective, study.space, study.settings, study.settings.study_for(task), out,
        metric=f"val_{study.metric}", tracking_uri=study.uri, experiment=experiment_name(task),
    )  # fmt: skip
    return result.metrics()


def stage_tune_worker(
    params_path: str | os.PathLike[str],
    task: str,
    shards: Path = FACES,
    validation: Path = VALIDATION,
) -> dict[str, Any]:
    """An extra worker for ``task``'s study on another process or machine: the same study name
    in the shared storage (``tune.storage`` or ``$SOCIALMAE_OPTUNA_STORAGE``, which must not
    be the default per-run sqlite file), fresh sampler entropy; writes no files."""
    from dataclasses import replace

    from socialmae.train.tune import STORAGE_ENV, run_study

    study = _study(params_path, task, shards, validation, TUNE / f".{task}-worker")
    if study.settings.storage is None and not os.environ.get(STORAGE_ENV):
        raise ParamsError(
            f"tune.{task}.storage",
            f"a shared study needs a database: set tune.storage or ${STORAGE_ENV}",
        )
    result = run_study(
        study.objective, study.space, replace(study.settings, seed=None),
        study.settings.study_for(task), None, metric=f"val_{study.metric}",
        tracking_uri=study.uri, experiment=experiment_name(task),
    )  # fmt: skip
    return result.metrics()
