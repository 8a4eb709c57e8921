"""Hyper-parameter search for one fine-tuning task: Optuna studies shared through a database.

The objective is the fine-tuning run. ``objective(overrides, report) -> float`` receives the
sampled fine-tuning params (``{"optim.lr": 3.1e-4, "batch": 16}``, dotted keys as in
``finetune.with_overrides``), calls ``report(epoch, val_metric)`` after each epoch (``report``
raises ``optuna.TrialPruned`` when the pruner stops the trial: let it propagate) and returns the
final validation metric. With MLflow on, each trial is a nested run that is the active run while
the objective runs, so the fine-tuning loop's own logging lands in it.

Scale-out: every worker (:func:`run_study` in the ``tune@task`` stage, :func:`run_worker` in
other processes or on other machines) opens the same study by name in the same storage and runs
trials until the study holds ``tune.trials`` finished (complete or pruned) trials. A worker that
dies mid-trial stops sending heartbeats; after ``grace_s`` another worker marks that trial failed
and queues its parameters again (up to ``retries`` times). Storage: ``tune.storage``, else
``$SOCIALMAE_OPTUNA_STORAGE`` (keep passwords there, out of git), else
``sqlite:///<out_dir>/optuna.db``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import BaseTrial, FrozenTrial, Trial, TrialState

from socialmae.data.download import redact
from socialmae.io import atomic_write, atomic_write_text
from socialmae.params import ParamsError, from_mapping, load_yaml
from socialmae.train.engine import Report

log = logging.getLogger(__name__)

STORAGE_ENV = "SOCIALMAE_OPTUNA_STORAGE"
BEST_PARAMS = "best_params.json"
TRIALS_TABLE = "trials.csv"
STUDY_DIR = "study"  # under out_dir: the default sqlite storage and the trials table; kept
# across runs (DVC `persist`), so a killed stage continues its study
SPACE_ATTR = "socialmae.space"  # study user attr: the search space every worker must share
PARENT_ATTR = "socialmae.mlflow_parent_run"  # study user attr: the MLflow run of the study

Objective = Callable[[dict[str, Any], Report], float]

_DONE = (TrialState.COMPLETE, TrialState.PRUNED)
_COMMITTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


class TuneError(RuntimeError):
    """A study that cannot run or produced nothing usable (no credentials in the message)."""


def _check(checks: Mapping[str, tuple[bool, str]]) -> None:
    """Raise a ParamsError naming the first failed field (``from_mapping`` adds the section)."""
    for name, (ok, reason) in checks.items():
        if not ok:
            raise ParamsError(name, reason)


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class FloatRange:
    """A float from ``[low, high]``, sampled on a log scale when ``log``."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        _check(
            {
                "low": (math.isfinite(self.low), "must be finite"),
                "high": (math.isfinite(self.high), "must be finite"),
            }
        )
        _check({"low": (self.low < self.high, f"must be < high ({self.low} >= {self.high})")})
        _check({"low": (not self.log or self.low > 0, "must be > 0 with log: true")})


@dataclass(frozen=True)
class IntRange:
    """An integer from ``low, low + step, ..., high`` (log scale when ``log``; step is then 1)."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self) -> None:
        _check(
            {
                "low": (self.low < self.high, f"must be < high ({self.low} >= {self.high})"),
                "step": (self.step >= 1, "must be >= 1"),
            }
        )
        _check(
            {
                "step": (not self.log or self.step == 1, "must be 1 with log: true"),
                "low": (not self.log or self.low >= 1, "must be >= 1 with log: true"),
                "high": (
                    (self.high - self.low) % self.step == 0,
                    f"high - low must be a multiple of step ({self.step})",
                ),
            }
        )


@dataclass(frozen=True)
class Choice:
    """One of ``choices``: numbers, strings, booleans or null."""

    choices: tuple[Any, ...]

    def __post_init__(self) -> None:
        shown = list(self.choices)
        _check({"choices": (len(shown) >= 1, "must not be empty")})
        allowed = all(isinstance(c, type(None) | bool | int | float | str) for c in shown)
        _check({"choices": (allowed, f"only numbers, strings, booleans or null, got {shown!r}")})
        distinct = len({(type(c), c) for c in shown}) == len(shown)
        _check({"choices": (distinct, f"duplicates in {shown!r}")})


Dimension = FloatRange | IntRange | Choice
_KINDS: dict[str, type[Dimension]] = {"float": FloatRange, "int": IntRange, "categorical": Choice}
_REQUIRED = {"float": ("low", "high"), "int": ("low", "high"), "categorical": ("choices",)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dimension(spec: Any, key: str) -> Dimension:
    """Parse one ``tune.space.<name>`` entry."""
    if not isinstance(spec, Mapping):
        raise ParamsError(
            key,
            "expected a mapping such as {low: 1.0e-5, high: 1.0e-3, log: true}, "
            f"{{low: 8, high: 64, step: 8}} or {{choices: [a, b]}}, got {spec!r}",
        )
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind is None:
        if "choices" in spec:
            kind = "categorical"
        else:
            kind = "int" if _is_int(spec.get("low")) and _is_int(spec.get("high")) else "float"
    if kind not in _KINDS:
        raise ParamsError(f"{key}.type", f"expected one of {list(_KINDS)}, got {kind!r}")
    for name in _REQUIRED[kind]:
        if name not in spec:
            raise ParamsError(f"{key}.{name}", f"missing (a {kind} range needs {_REQUIRED[kind]})")
    for name in ("low", "high"):
        value = spec.get(name)
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                continue
            raise ParamsError(
                f"{key}.{name}",
                f"expected a number, got {value!r} (YAML reads an exponent without a dot as "
                "text: write 1.0e-5, not 1e-5)",
            )
    return from_mapping(_KINDS[kind], spec, key)


_SPEC_KEYS = frozenset({"type", "low", "high", "step", "log", "choices"})


def _flatten_space(
    mapping: Mapping[Any, Any], key: str, prefix: str
) -> Iterator[tuple[str, Dimension]]:
    """``(dotted name, dimension)`` pairs; a mapping without any range key is a group."""
    for name, spec in mapping.items():
        dotted = f"{prefix}{name}"
        if isinstance(spec, Mapping) and spec and not _SPEC_KEYS & set(spec):
            yield from _flatten_space(spec, key, f"{dotted}.")
        else:
            yield dotted, _dimension(spec, f"{key}.{dotted}")


def _is_param_name(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


@dataclass(frozen=True)
class SearchSpace:
    """The fine-tuning params to tune (``tune.space``): name -> dimension, in file order.

    Each name is the (dotted) fine-tuning param it overrides: ``head_lr``, ``batch``,
    ``optim.lr``, ``augment.mixup``...
    """

    dimensions: tuple[tuple[str, Dimension], ...]

    def __post_init__(self) -> None:
        names = [name for name, _ in self.dimensions]
        _check(
            {
                "dimensions": (len(names) >= 1, "empty search space: name a param to tune"),
                **{name: (_is_param_name(name), "not a param name") for name in names},
            }
        )
        _check({"dimensions": (len(set(names)) == len(names), f"duplicate names in {names}")})

    @classmethod
    def parse(cls, mapping: Any, key: str = "tune.space") -> SearchSpace:
        """Parse ``{name: {low, high, log} | {low, high, step} | {choices}}``.

        Names may be dotted (``optim.lr``) or nested (``optim: {lr: {low, high}}``, which is
        what ``dvc exp run -S tune.space.optim.lr.high=...`` addresses); both mean ``optim.lr``.
        """
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, Mapping):
            raise ParamsError(key, f"expected a mapping of param name -> range, got {mapping!r}")
        dims = tuple(_flatten_space(mapping, key, ""))
        try:
            return cls(dims)
        except ParamsError as exc:
            where = key if exc.key == "dimensions" else f"{key}.{exc.key}"
            raise ParamsError(where, exc.reason) from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.dimensions)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """A JSON-ready copy, with the kind of each dimension spelled out."""
        out: dict[str, dict[str, Any]] = {}
        for name, dim in self.dimensions:
            if isinstance(dim, FloatRange):
                out[name] = {"type": "float", "low": dim.low, "high": dim.high, "log": dim.log}
            elif isinstance(dim, IntRange):
                out[name] = {
                    "type": "int",
                    "low": dim.low,
                    "high": dim.high,
                    "step": dim.step,
                    "log": dim.log,
                }
            else:
                out[name] = {"type": "categorical", "choices": list(dim.choices)}
        return out


def suggest(trial: BaseTrial, space: SearchSpace) -> dict[str, Any]:
    """Draw (or, for a retried trial, reuse) one value per dimension: the fine-tuning overrides."""
    overrides: dict[str, Any] = {}
    for name, dim in space.dimensions:
        if isinstance(dim, FloatRange):
            overrides[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
        elif isinstance(dim, IntRange):
            overrides[name] = trial.suggest_int(name, dim.low, dim.high, step=dim.step, log=dim.log)
        else:
            overrides[name] = trial.suggest_categorical(name, list(dim.choices))
    return overrides


# --------------------------------------------------------------------------- params


@dataclass(frozen=True)
class PrunerParams:
    """When to stop unpromising trials early (``tune.pruner``); a step is one ``report`` call."""

    kind: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = 5  # median: finished trials before any pruning
    warmup_steps: int = 1  # median: steps a trial always runs
    interval_steps: int = 1  # median: check every this many steps
    min_resource: int = 1  # hyperband: steps every trial gets
    max_resource: int | None = None  # hyperband: steps of a full trial; None: the first trial's
    reduction_factor: int = 3  # hyperband: about 1 in reduction_factor trials goes on per rung

    def __post_init__(self) -> None:
        _check(
            {
                "startup_trials": (self.startup_trials >= 0, "must be >= 0"),
                "warmup_steps": (self.warmup_steps >= 0, "must be >= 0"),
                "interval_steps": (self.interval_steps >= 1, "must be >= 1"),
                "min_resource": (self.min_resource >= 1, "must be >= 1"),
                "max_resource": (
                    self.max_resource is None or self.max_resource > self.min_resource,
                    "must be > min_resource (or null)",
                ),
                "reduction_factor": (self.reduction_factor >= 2, "must be >= 2"),
            }
        )

    def build(self) -> optuna.pruners.BasePruner:
        """The Optuna pruner."""
        if self.kind == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=self.startup_trials,
                n_warmup_steps=self.warmup_steps,
                interval_steps=self.interval_steps,
            )
        if self.kind == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=self.min_resource,
                max_resource=self.max_resource if self.max_resource is not None else "auto",
                reduction_factor=self.reduction_factor,
            )
        return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class TuneParams:
    """How a study runs (``tune`` in params.yaml, less ``tune.space``)."""

    trials: int = 20  # finished (complete + pruned) trials the study ends with
    timeout_s: float | None = None  # a worker starts no trial after this many seconds
    seed: int | None = 0  # TPE seed (extra workers get fresh entropy, see run_worker)
    random_trials: int = 10  # random trials before TPE models the space
    direction: Literal["maximize", "minimize"] = "maximize"
    pruner: PrunerParams = field(default_factory=PrunerParams)
    storage: str | None = None  # RDB URL; None: $SOCIALMAE_OPTUNA_STORAGE, else sqlite in out_dir
    study_name: str = "socialmae-{task}"  # {task} is replaced by the task name
    retries: int = 2  # re-runs of a trial whose worker died (needs heartbeat_s)
    heartbeat_s: int | None = 60  # trial heartbeat period; None: dead workers go unnoticed
    grace_s: int | None = None  # a trial is dead after this long without heartbeat (2 x)
    max_failures: int = 3  # a worker stops after this many trials in a row raised

    def __post_init__(self) -> None:
        try:
            self.study_name.format(task="task")
            template_ok = True
        except (KeyError, IndexError, ValueError):
            template_ok = False
        _check(
            {
                "trials": (self.trials >= 1, "must be >= 1"),
                "timeout_s": (self.timeout_s is None or self.timeout_s > 0, "must be > 0 or null"),
                "random_trials": (self.random_trials >= 0, "must be >= 0"),
                "study_name": (
                    template_ok and bool(self.study_name),
                    "a non-empty name whose only placeholder is {task}",
                ),
                "retries": (self.retries >= 0, "must be >= 0"),
                "heartbeat_s": (
                    self.heartbeat_s is None or self.heartbeat_s >= 1,
                    "must be >= 1 or null",
                ),
                "grace_s": (
                    self.grace_s is None
                    or (self.heartbeat_s is not None and self.grace_s > self.heartbeat_s),
                    "must be > heartbeat_s (and needs heartbeat_s), or null",
                ),
                "max_failures": (self.max_failures >= 1, "must be >= 1"),
            }
        )

    def study_for(self, task: str) -> str:
        """The study name of ``task``."""
        return self.study_name.format(task=task)


def parse_tune(section: Any, key: str = "tune") -> tuple[TuneParams, SearchSpace]:
    """Parse the ``tune`` section of params.yaml into its knobs and its search space."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ParamsError(key, f"expected a mapping, got {section!r}")
    rest = dict(section)
    space = SearchSpace.parse(rest.pop("space", None), f"{key}.space")
    return from_mapping(TuneParams, rest, key), space


def load_tune(
    params_path: str | os.PathLike[str], key: str = "tune"
) -> tuple[TuneParams, SearchSpace]:
    """Read the ``tune`` section of a params file."""
    return parse_tune(load_yaml(params_path).get(key), key)


# --------------------------------------------------------------------------- storage


def _has_password(url: str) -> bool:
    try:
        if urllib.parse.urlsplit(url).password:
            return True
    except ValueError:
        pass
    return "password=" in url.lower()


def _hide(text: str, url: str) -> str:
    """``redact(text)``, also masking the password of ``url`` wherever it shows up alone."""
    text = redact(text)
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        password = None
    if password:
        for secret in sorted({password, urllib.parse.unquote(password)}, key=len, reverse=True):
            if len(secret) >= 3:
                text = text.replace(secret, "***")
    return text


def resolve_storage(explicit: str | None, out_dir: str | os.PathLike[str] | None) -> str:
    """The storage URL: ``explicit``, else ``$SOCIALMAE_OPTUNA_STORAGE``, else sqlite in
    ``out_dir/study/``."""
    if explicit:
        url, source = explicit, "tune.storage"
        if _has_password(url):
            log.warning(
                "tune.storage holds a password, which then sits in params.yaml and in git; "
                "put the URL in $%s instead",
                STORAGE_ENV,
            )
    elif os.environ.get(STORAGE_ENV):
        url, source = os.environ[STORAGE_ENV], f"${STORAGE_ENV}"
    elif out_dir is not None:
        study_dir = Path(out_dir) / STUDY_DIR
        study_dir.mkdir(parents=True, exist_ok=True)
        url, source = f"sqlite:///{(study_dir / 'optuna.db').resolve()}", "default"
    else:
        raise TuneError(f"no Optuna storage: set tune.storage or ${STORAGE_ENV}")
    log.info("Optuna storage (%s): %s", source, _hide(url, url))
    return url


def open_storage(url: str, params: TuneParams) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats and retries of dead workers' trials as ``params`` say."""
    if url.startswith("sqlite:"):
        # Concurrent workers on one sqlite file wait for the lock instead of failing at once.
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60.0}}
        path = url.partition(":///")[2]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    else:
        engine_kwargs = {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = None
        if params.heartbeat_s is not None and params.retries > 0:
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=params.retries)
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=params.heartbeat_s,
                    grace_period=params.grace_s,
                    heartbeat_stale_trial_callback=retry,
                )
            except Exception as exc:
                # Workers starting together on an empty database race to create its tables.
                if attempt == 2:
                    message = (
                        f"cannot open Optuna storage {_hide(url, url)}: {_hide(str(exc), url)}"
                    )
                    raise TuneError(message) from None
                time.sleep(0.2 + 0.5 * random.random())
    raise AssertionError("unreachable")


def _open_study(
    study_name: str, params: TuneParams, space: SearchSpace, storage: optuna.storages.BaseStorage
) -> optuna.Study:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=params.seed,
            n_startup_trials=params.random_trials,
            multivariate=True,
            constant_liar=True,  # concurrent workers do not all sample the same point
        )
    study = optuna.create_study(
        storage=storage,
        sampler=sampler,
        pruner=params.pruner.build(),
        study_name=study_name,
        direction=params.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != params.direction:
        raise TuneError(
            f"study {study_name!r} was created to {study.direction.name.lower()}, "
            f"not to {params.direction}; choose another study name"
        )
    spec = space.to_dict()
    recorded = study.user_attrs.get(SPACE_ATTR)
    if recorded is None:
        study.set_user_attr(SPACE_ATTR, spec)
    elif recorded != json.loads(json.dumps(spec)):
        raise TuneError(
            f"tune.space differs from the one study {study_name!r} was started with "
            f"({recorded}); use the same space on every worker or a new study name"
        )
    return study


# --------------------------------------------------------------------------- MLflow


class _Tracker:
    """Nested MLflow runs: the study's run, and one child run per trial.

    The child is the active MLflow run while the objective runs, so whatever the fine-tuning
    loop logs (``socialmae.tracking.Tracker`` joins an active run) lands in its trial's run.
    """

    def __init__(
        self, parent: str, experiment_id: str, owned: bool, metric: str, previous_uri: str | None
    ) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient()  # bound to the tracking URI in force now
        self.parent = parent
        self.experiment_id = experiment_id
        self.owned = owned  # not the caller's run: this worker made it active and ends it
        self.metric = metric
        self.previous_uri = previous_uri  # restored on close

    @classmethod
    def open(
        cls,
        study: optuna.Study,
        params: TuneParams,
        space: SearchSpace,
        metric: str,
        tracking_uri: str | None,
        experiment: str | None,
    ) -> _Tracker | None:
        """Track under the active MLflow run, or under the study's run at ``tracking_uri``."""
        active = None
        if "mlflow" in sys.modules:  # no run can be active before mlflow is imported
            import mlflow

            active = mlflow.active_run()
        if active is None and tracking_uri is None:
            return None
        import mlflow
        from mlflow.exceptions import MlflowException

        if active is not None:
            log.info("MLflow: trials nest under the active run %s", active.info.run_id)
            tracker = cls(active.info.run_id, active.info.experiment_id, False, metric, None)
            created = False
        else:
            previous = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(tracking_uri)
            client = mlflow.MlflowClient()
            parent = study.user_attrs.get(PARENT_ATTR)  # set by the study's first worker
            experiment_id = ""
            if parent is not None:
                try:
                    run = client.get_run(parent)
                    experiment_id = run.info.experiment_id
                    if run.info.lifecycle_stage != "active":
                        parent = None
                except MlflowException:  # another tracking store
                    parent = None
            created = parent is None
            if parent is None:
                experiment_id = _experiment_id(client, experiment or study.study_name)
                tags = {"optuna.study": study.study_name, "socialmae.stage": "tune"}
                run = mlflow.start_run(
                    experiment_id=experiment_id, run_name=study.study_name, tags=tags
                )
            else:
                run = mlflow.start_run(run_id=parent)
            log.info("MLflow %s: study run %s", redact(tracking_uri or ""), run.info.run_id)
            tracker = cls(run.info.run_id, experiment_id, True, metric, previous)
        if created or active is not None:
            study.set_user_attr(PARENT_ATTR, tracker.parent)
            # The caller's run may hold several studies: tags there, as tags may change.
            tracker._log_setup(study.study_name, params, space, as_params=created)
        return tracker

    def _log_setup(
        self, study_name: str, params: TuneParams, space: SearchSpace, as_params: bool
    ) -> None:
        from mlflow.entities import Param, RunTag

        values = {
            "tune.study": study_name,
            "tune.trials": params.trials,
            "tune.direction": params.direction,
            "tune.pruner": params.pruner.kind,
            "tune.random_trials": params.random_trials,
            "tune.seed": params.seed,
            "tune.space": json.dumps(space.to_dict(), sort_keys=True),
        }
        if as_params:
            self.client.log_batch(self.parent, params=[Param(k, str(v)) for k, v in values.items()])
        else:
            self.client.log_batch(self.parent, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def start_trial(
        self, study_name: str, number: int, overrides: dict[str, Any], worker: str, retry_of: Any
    ) -> str:
        """Start the trial's run, nested under the study's, and make it the active run."""
        import mlflow
        from mlflow.entities import Param

        tags = {"optuna.study": study_name, "optuna.trial": str(number), "socialmae.worker": worker}
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        run = mlflow.start_run(
            experiment_id=self.experiment_id,
            run_name=f"trial-{number}",
            nested=True,
            parent_run_id=self.parent,
            tags=tags,
        )
        params = [Param(k, str(v)) for k, v in overrides.items()]
        self.client.log_batch(run.info.run_id, params=params)
        return run.info.run_id

    def log_step(self, run_id: str, step: int, value: float) -> None:
        self.client.log_metric(run_id, self.metric, value, step=step)

    def end_trial(self, run_id: str, state: str, value: float | None = None) -> None:
        if value is not None:
            self.client.log_metric(run_id, "value", value)
        self.client.set_tag(run_id, "optuna.state", state)
        self._end(run_id, "FINISHED" if state in ("COMPLETE", "PRUNED") else "FAILED")

    def close(self, result: TuneResult | None) -> None:
        from mlflow.entities import Metric, RunTag

        if result is not None:
            now = int(time.time() * 1000)
            step = result.n_trials["complete"] + result.n_trials["pruned"]
            metrics = [Metric("best_value", result.best_value, now, step)]
            metrics += [Metric(f"n_{k}", v, now, step) for k, v in result.n_trials.items()]
            tags = [RunTag("best_trial", str(result.best_trial))]
            tags += [RunTag(f"best.{k}", str(v)) for k, v in result.best_params.items()]
            self.client.log_batch(self.parent, metrics=metrics, tags=tags)
        if self.owned:
            self._end(self.parent, "FINISHED" if result else "FAILED")
        if self.previous_uri is not None:
            import mlflow

            mlflow.set_tracking_uri(self.previous_uri)

    def _end(self, run_id: str, status: str) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status)
        else:  # the objective left another run active: leave that one alone
            self.client.set_terminated(run_id, status)


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:  # another worker created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class TuneResult:
    """Where a study stands when a worker leaves it, and what that worker wrote."""

    study_name: str
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    n_trials: dict[str, int]  # complete, pruned, fail, running, waiting, surplus
    ran: int  # trials this worker ran
    best_params_path: Path | None = None
    trials_path: Path | None = None
    mlflow_run_id: str | None = None

    def metrics(self) -> dict[str, Any]:
        """The small metrics dict of the stage."""
        counts = {f"n_{state}": n for state, n in self.n_trials.items()}
        return {"best_value": self.best_value, "best_trial": self.best_trial, **counts}


class _SurplusError(Exception):
    """A trial started when earlier trials already fill the study's target."""


def _state_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    counts = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "waiting": 0, "surplus": 0}
    for t in trials:
        name = "surplus" if t.user_attrs.get("surplus") else t.state.name.lower()
        counts[name] = counts.get(name, 0) + 1
    return counts


def _load_objective(spec: str) -> Objective:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise TuneError(f"objective {spec!r}: expected 'package.module:function'")
    try:
        target: Any = importlib.import_module(module)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise TuneError(f"objective {spec!r}: {exc}") from exc
    if not callable(target):
        raise TuneError(f"objective {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


class _Worker:
    """One worker's loop over a shared study."""

    def __init__(
        self,
        study: optuna.Study,
        objective: Objective,
        space: SearchSpace,
        params: TuneParams,
        name: str,
        tracker: _Tracker | None,
        poll_s: float,
    ) -> None:
        self.study, self.objective, self.space, self.params = study, objective, space, params
        self.name, self.tracker, self.poll_s = name, tracker, poll_s
        self.number = -1  # of the trial this worker ran last
        self.error: BaseException | None = None  # that trial's exception

    def run(self) -> int:
        """Run trials until the study holds ``params.trials`` finished ones; return how many ran.

        A worker starts a trial only while finished + running trials are fewer than the target;
        otherwise it waits for the others' running trials (failing those whose heartbeat
        stopped, which queues them again) and leaves once the target is met.
        """
        params, study = self.params, self.study
        heartbeat = params.heartbeat_s is not None
        deadline = None if params.timeout_s is None else time.monotonic() + params.timeout_s
        ran = failures = 0
        waiting = False
        while deadline is None or time.monotonic() < deadline:
            if heartbeat:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            done = sum(1 for t in trials if t.state in _DONE)
            running = sum(1 for t in trials if t.state == TrialState.RUNNING)
            if done >= params.trials:
                return ran
            if done + running >= params.trials:
                if not heartbeat:  # a dead worker's trial would keep this one waiting forever
                    log.warning("worker %s leaves %d trials running elsewhere", self.name, running)
                    return ran
                if not waiting:
                    log.info("worker %s waits for %d running trials", self.name, running)
                    waiting = True
                time.sleep(self.poll_s)
                continue
            waiting = False
            study.optimize(self._trial, n_trials=1, catch=(Exception,), gc_after_trial=False)
            mine = next(t for t in study.get_trials(deepcopy=False) if t.number == self.number)
            if mine.user_attrs.get("surplus"):
                time.sleep(self.poll_s)
                continue
            ran += 1
            failures = 0 if mine.state in _DONE else failures + 1
            if failures >= params.max_failures:
                reason = redact(repr(self.error)) if self.error else "a non-finite value"
                raise TuneError(
                    f"worker {self.name}: {failures} trials in a row failed in study "
                    f"{study.study_name!r}; last error: {reason}"
                )
        log.warning("worker %s: timeout_s (%s) reached", self.name, params.timeout_s)
        return ran

    def _trial(self, trial: Trial) -> float:
        """The Optuna objective: claim a slot, draw the overrides, run and track the trial."""
        self.number, self.error = trial.number, None
        trials = self.study.get_trials(deepcopy=False)
        earlier = sum(1 for t in trials if t.number < trial.number and t.state in _COMMITTED)
        if earlier >= self.params.trials:  # another worker took the last slot at the same time
            trial.set_user_attr("surplus", True)
            raise _SurplusError(
                f"{earlier} earlier trials already make the target of {self.params.trials}; "
                f"trial {trial.number} is released unrun"
            )
        retry_of = next(t for t in trials if t.number == trial.number).system_attrs.get(
            "failed_trial"
        )
        trial.set_user_attr("worker", self.name)
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of)
            log.info("trial %d reruns trial %d, whose worker died", trial.number, retry_of)
        try:
            overrides = suggest(trial, self.space)
            run_id = None
            if self.tracker is not None:
                run_id = self.tracker.start_trial(
                    self.study.study_name, trial.number, overrides, self.name, retry_of
                )

            def report(step: int, value: float) -> None:
                value = float(value)
                trial.report(value, step)
                if self.tracker is not None and run_id is not None:
                    self.tracker.log_step(run_id, step, value)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step} (value {value:.4g})")

            state, value = "FAIL", None
            try:
                value = float(self.objective(overrides, report))
                state = "COMPLETE" if math.isfinite(value) else "FAIL"
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            finally:
                if self.tracker is not None and run_id is not None:
                    self.tracker.end_trial(run_id, state, value)
            return value
        except optuna.TrialPruned:
            raise
        except BaseException as exc:
            self.error = exc
            raise


def _write_trials(study: optuna.Study, path: Path) -> Path:
    frame = study.trials_dataframe(
        attrs=("number", "state", "value", "duration", "params", "user_attrs")
    )
    if "duration" in frame:
        frame["duration_s"] = frame.pop("duration").dt.total_seconds()
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def _finish(
    study: optuna.Study, params: TuneParams, metric: str, out: Path | None, ran: int
) -> TuneResult:
    trials = study.get_trials(deepcopy=False)
    counts = _state_counts(trials)
    trials_path = _write_trials(study, out / STUDY_DIR / TRIALS_TABLE) if out is not None else None
    if counts["complete"] == 0:
        raise TuneError(f"study {study.study_name!r} has no complete trial ({counts})")
    best = study.best_trial
    assert best.value is not None
    finished = counts["complete"] + counts["pruned"]
    if finished < params.trials:
        log.warning(
            "study %r has %d of %d trials finished", study.study_name, finished, params.trials
        )
    best_path = None
    if out is not None:
        payload = {
            "study": study.study_name,
            "direction": params.direction,
            "metric": metric,
            "best_value": best.value,
            "best_trial": best.number,
            "params": best.params,
            "n_trials": counts,
        }
        best_path = atomic_write_text(
            out / BEST_PARAMS, json.dumps(payload, indent=2, sort_keys=True) + "\n"
        )
    log.info(
        "study %r: best %s %.6g at trial %d with %s (%s)",
        study.study_name,
        metric,
        best.value,
        best.number,
        best.params,
        counts,
    )
    return TuneResult(
        study_name=study.study_name,
        best_value=float(best.value),
        best_params=dict(best.params),
        best_trial=best.number,
        n_trials=counts,
        ran=ran,
        best_params_path=best_path,
        trials_path=trials_path,
    )


def run_study(
    objective: Objective,
    space: SearchSpace,
    params: TuneParams,
    study_name: str,
    out_dir: str | os.PathLike[str] | None,
    *,
    metric: str = "val_metric",
    tracking_uri: str | None = None,
    experiment: str | None = None,
    worker: str | None = None,
    poll_s: float = 5.0,
) -> TuneResult:
    """Create or join ``study_name`` and run trials until it holds ``params.trials`` finished ones.

    Args:
        objective: ``objective(overrides, report) -> float``, the fine-tuning run; ``report(step,
            value)`` after each epoch forwards ``metric`` to the pruner (and may raise
            ``optuna.TrialPruned``).
        space: the fine-tuning params to tune.
        params: the study's knobs.
        study_name: shared by every worker of the study (``params.study_for(task)``).
        out_dir: where ``best_params.json`` goes, and ``study/`` with ``trials.csv`` (and the
            default sqlite storage); None writes nothing.
        metric: the name of the reported value (MLflow metric of each trial run).
        tracking_uri: MLflow tracking URI; trials become nested runs under the study's run
            (kept in the study, so later workers share it). Under an active MLflow run (the
            stage's own) trials nest under that run instead, and this is ignored.
        experiment: MLflow experiment of the study's run (default: the study name).
        worker: this worker's name in trial attributes (default: ``host:pid``).
        poll_s: pause between looks at the study while other workers run its last trials.
    """
    out = Path(out_dir) if out_dir is not None else None
    url = resolve_storage(params.storage, out)
    study = _open_study(study_name, params, space, open_storage(url, params))
    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    tracker = _Tracker.open(study, params, space, metric, tracking_uri, experiment)
    log.info(
        "worker %s joins study %r (target %d finished trials)", worker, study_name, params.trials
    )
    result: TuneResult | None = None
    try:
        ran = _Worker(study, objective, space, params, worker, tracker, poll_s).run()
        result = _finish(study, params, metric, out, ran)
    finally:
        if tracker is not None:
            tracker.close(result)
    return result if tracker is None else replace(result, mlflow_run_id=tracker.parent)


def run_worker(
    objective: Objective | str,
    study_name: str,
    params_path: str | os.PathLike[str] = "params.yaml",
    *,
    storage: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    worker: str | None = None,
    seed: int | None = None,
    metric: str = "val_metric",
    poll_s: float = 5.0,
) -> TuneResult:
    """Join ``study_name`` as one more worker, e.g. on another machine (scale-out).

    ``objective`` is a callable or an import path ``"package.module:function"``. Knobs and search
    space come from the ``tune`` section of ``params_path`` (the space must match the study's);
    ``storage`` overrides ``tune.storage`` (else ``$SOCIALMAE_OPTUNA_STORAGE``). ``seed`` defaults
    to fresh entropy so that workers do not draw each other's random trials.
    """
    fn = _load_objective(objective) if isinstance(objective, str) else objective
    params, space = load_tune(params_path)
    params = replace(params, seed=seed, storage=storage or params.storage)
    return run_study(
        fn,
        space,
        params,
        study_name,
        out_dir,
        metric=metric,
        tracking_uri=tracking_uri,
        worker=worker,
        poll_s=poll_s,
    )
