"""MLflow model logging, registration and the promotion gate.

Modules: :mod:`.provenance` (tags, git revision, data hashes), :mod:`.pyfunc` (the logged
model and loading it), :mod:`.versions` (logging and registering), :mod:`.promotion` (the
gate) and :mod:`.locks` (one promotion of a model at a time).

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

from socialmae.registry.locks import PromotionBusyError
from socialmae.registry.promotion import (
    CHALLENGER,
    CHAMPION,
    Outcome,
    PromotionDecision,
    champion_uri,
    promote,
)
from socialmae.registry.provenance import dvc_data_hashes, git_revision
from socialmae.registry.pyfunc import SocialMAEPyfunc, load_champion, load_registered
from socialmae.registry.versions import DEFAULT_EXPERIMENT, RegisteredVersion, log_model
from socialmae.train.engine import test_set_fingerprint

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_EXPERIMENT",
    "Outcome",
    "PromotionBusyError",
    "PromotionDecision",
    "RegisteredVersion",
    "SocialMAEPyfunc",
    "champion_uri",
    "dvc_data_hashes",
    "git_revision",
    "load_champion",
    "load_registered",
    "log_model",
    "promote",
    "test_set_fingerprint",
]
