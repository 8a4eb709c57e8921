"""Where a study lives: the Optuna storage URL, its connection and the study itself."""

from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import optuna

from socialmae.data.download import redact
from socialmae.train.tune.settings import TuneParams
from socialmae.train.tune.space import SearchSpace, TuneError

log = logging.getLogger(__name__)

STORAGE_ENV = "SOCIALMAE_OPTUNA_STORAGE"
STUDY_DIR = "study"  # under out_dir: the default sqlite storage and the trials table; kept
# across runs (DVC `persist`), so a killed stage continues its study
SPACE_ATTR = "socialmae.space"  # study user attr: the search space every worker must share

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


def open_study(
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
