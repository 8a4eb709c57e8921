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

Modules: ``space`` (dimensions, :class:`SearchSpace`), ``settings`` (``tune`` in params.yaml),
``storage`` (the RDB storage and the study), ``tracking`` (MLflow runs), ``study`` (workers).
"""

from socialmae.train.tune.settings import (
    PrunerParams,
    TuneParams,
    TuneResult,
    load_tune,
    parse_tune,
)
from socialmae.train.tune.space import (
    Choice,
    FloatRange,
    IntRange,
    SearchSpace,
    TuneError,
    suggest,
)
from socialmae.train.tune.storage import (
    STORAGE_ENV,
    STUDY_DIR,
    open_storage,
    resolve_storage,
)
from socialmae.train.tune.study import (
    TRIALS_TABLE,
    Objective,
    run_study,
    run_worker,
    write_best_params,
)

__all__ = [
    "STORAGE_ENV",
    "STUDY_DIR",
    "TRIALS_TABLE",
    "Choice",
    "FloatRange",
    "IntRange",
    "Objective",
    "PrunerParams",
    "SearchSpace",
    "TuneError",
    "TuneParams",
    "TuneResult",
    "load_tune",
    "open_storage",
    "parse_tune",
    "resolve_storage",
    "run_study",
    "run_worker",
    "suggest",
    "write_best_params",
]
