"""The promotion gate: every new version becomes the ``challenger``; ``champion`` moves to it
only if there is none yet or it beats the champion on the same test set by a margin."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from socialmae.data.download import redact
from socialmae.registry.locks import promotion_lock
from socialmae.registry.provenance import (
    TAG_DECISION,
    TAG_DECISION_OUTCOME,
    TAG_FINGERPRINT,
    TAG_METRIC_NAME,
    TAG_METRIC_VALUE,
)
from socialmae.tracking import mlflow_client
from socialmae.tracking import task_name as model_name

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


def champion_uri(task: str) -> str:
    """``models:/socialmae-<task>@champion``."""
    return f"models:/{model_name(task)}@{CHAMPION}"


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
    client, uri = mlflow_client(tracking_uri)
    name, version = model_name(task), int(version)
    value = float(value)
    client.get_model_version(name, str(version))  # raises if it does not exist
    for key, tag in ((TAG_METRIC_NAME, metric_name), (TAG_METRIC_VALUE, repr(value)),
                     (TAG_FINGERPRINT, test_fingerprint)):  # fmt: skip
        client.set_model_version_tag(name, str(version), key, tag)
    with promotion_lock(client, uri, name):  # read the champion, decide and move it as one step
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
