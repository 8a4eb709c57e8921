"""``tune`` in params.yaml: the study's settings and its search space."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna

from socialmae.params import ParamsError, from_mapping, load_yaml
from socialmae.train.tune.space import SearchSpace, check_fields

log = logging.getLogger(__name__)

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
        check_fields(
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
        check_fields(
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
