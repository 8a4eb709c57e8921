"""MLflow for a study: a parent run per study, a nested run per trial."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from typing import Any

import optuna

from socialmae.data.download import redact
from socialmae.tracking import using_tracking_uri
from socialmae.train.tune.settings import TuneParams, TuneResult
from socialmae.train.tune.space import SearchSpace

log = logging.getLogger(__name__)

PARENT_ATTR = "socialmae.mlflow_parent_run"  # study user attr: the MLflow run of the study

# --------------------------------------------------------------------------- MLflow


class StudyTracker:
    """Nested MLflow runs: the study's run, and one child run per trial.

    The child is the active MLflow run while the objective runs, so whatever the fine-tuning
    loop logs (``socialmae.tracking.Tracker`` joins an active run) lands in its trial's run.
    """

    def __init__(
        self,
        parent: str,
        experiment_id: str,
        owned: bool,
        metric: str,
        uri_scope: contextlib.ExitStack | None,
    ) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient()  # bound to the tracking URI in force now
        self.parent = parent
        self.experiment_id = experiment_id
        self.owned = owned  # not the caller's run: this worker made it active and ends it
        self.metric = metric
        self.uri_scope = uri_scope  # the tracking URI set for the study; closed on close

    @classmethod
    def open(
        cls,
        study: optuna.Study,
        params: TuneParams,
        space: SearchSpace,
        metric: str,
        tracking_uri: str | None,
        experiment: str | None,
    ) -> StudyTracker | None:
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
            scope = contextlib.ExitStack()  # the study's URI until close(), then the caller's
            scope.enter_context(using_tracking_uri(tracking_uri))
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
            tracker = cls(run.info.run_id, experiment_id, True, metric, scope)
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
        if self.uri_scope is not None:
            self.uri_scope.close()

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
