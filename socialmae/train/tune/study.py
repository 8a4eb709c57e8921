"""Running a study: workers that share it through the storage until it holds its trials."""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from socialmae.data.download import redact
from socialmae.io import atomic_write, atomic_write_text
from socialmae.layout import BEST_PARAMS
from socialmae.train.engine import Report
from socialmae.train.tune.settings import TuneParams, TuneResult, load_tune
from socialmae.train.tune.space import SearchSpace, TuneError, suggest
from socialmae.train.tune.storage import STUDY_DIR, open_storage, open_study, resolve_storage
from socialmae.train.tune.tracking import StudyTracker

log = logging.getLogger(__name__)

TRIALS_TABLE = "trials.csv"

Objective = Callable[[dict[str, Any], Report], float]

_DONE = (TrialState.COMPLETE, TrialState.PRUNED)
_COMMITTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)

# --------------------------------------------------------------------------- running


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
        tracker: StudyTracker | None,
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
        best_path = write_best_params(out, payload)
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
    study = open_study(study_name, params, space, open_storage(url, params))
    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    tracker = StudyTracker.open(study, params, space, metric, tracking_uri, experiment)
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


def write_best_params(out: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``out/best_params.json``, the tuning result ``finetune@task`` reads."""
    return atomic_write_text(
        out / BEST_PARAMS, json.dumps(payload, indent=2, sort_keys=True) + "\n"
    )
