"""The ``register@task`` stage: log the fine-tuned model of ``finetune@task`` to the MLflow
registry as ``socialmae-<task>`` and move its ``champion`` alias only through the promotion
gate (:func:`socialmae.registry.promote`). Registration is not training: it reads the
fine-tuning outputs and the test clips, and writes ``outputs/register/<task>/decision.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from socialmae.io import atomic_write_text
from socialmae.layout import BEST_PARAMS, FACES, FINETUNE, REGISTER, TUNE, VALIDATION
from socialmae.model.social_mae import MODES
from socialmae.params import ParamsError, from_mapping, load_params
from socialmae.tasks import get_task
from socialmae.train.finetune import experiment_name, mode_dir
from socialmae.train.stages import accepted_clips, finetune_params, tracking_uri

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterParams:
    """``register`` in params.yaml: which fine-tuned mode is registered, and the gate."""

    mode: str = "first"  # first (of finetune modes), best (on validation), or a mode name
    margin: float = 0.0  # the challenger must beat the champion's test metric by more than this
    device: str = "cpu"  # where a champion is re-scored when the test set changed

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.mode not in ("first", "best", *MODES):
            raise ValueError(f"mode must be first, best or one of {list(MODES)}, got {self.mode!r}")


def registered_mode(choice: str, table: dict[str, Any]) -> str:
    """The mode to register from ``finetune_modes``'s table: ``first``, ``best`` (highest
    validation primary metric) or a mode name that was fine-tuned."""
    modes = table["modes"]
    if choice == "first":
        return modes[0]
    if choice == "best":
        metric = table["primary_metric"]
        return max(modes, key=lambda m: table[m]["val"][metric])
    if choice not in modes:
        raise ParamsError("register.mode", f"{choice!r} was not fine-tuned (modes: {modes})")
    return choice


def stage_register(
    params_path: str | os.PathLike[str],
    task: str,
    finetuned: Path | None = None,
    tuned: Path | None = None,
    shards: Path = FACES,
    validation: Path = VALIDATION,
    out: Path | None = None,
) -> dict[str, Any]:
    """Log the ``register.mode`` model of ``finetune@task`` to MLflow as ``socialmae-<task>``
    (alias ``challenger``) and move ``champion`` only through the gate; the decision goes to
    ``decision.json``."""
    from socialmae.data.crop import CropParams
    from socialmae.data.dataset import ShardDataset
    from socialmae.registry import load_registered, log_model, promote
    from socialmae.train import metrics
    from socialmae.train.evaluation import predict_dataset

    spec = get_task(task)
    params = load_params(params_path)
    settings = from_mapping(RegisterParams, params.get("register"), "register")
    crop = from_mapping(CropParams, params.get("crop"), "crop")
    tuned_params = finetune_params(params, task, tuned or TUNE / task / BEST_PARAMS)
    finetuned = finetuned if finetuned is not None else FINETUNE / task
    out = out if out is not None else REGISTER / task
    table_path = finetuned / "metrics.json"
    if not table_path.is_file():
        raise FileNotFoundError(f"{table_path}: run finetune@{task} first")
    try:
        table = json.loads(table_path.read_text())
        mode = registered_mode(settings.mode, table)
        table[mode]["test"][table["primary_metric"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ParamsError(str(table_path), f"not a finetune@{task} metrics table ({exc!r}); "
                          f"run finetune@{task} again") from None  # fmt: skip
    if not (mode_dir(finetuned, mode) / "model").is_dir():
        raise FileNotFoundError(f"{mode_dir(finetuned, mode) / 'model'}: no model; run "
                                f"finetune@{task} again")  # fmt: skip
    metric = table["primary_metric"]
    value, test_set = float(table[mode]["test"][metric]), table["test_set"]
    logger.info("%s: registering the %s model (register.mode %s)", task, mode, settings.mode)
    uri = tracking_uri(params)

    def evaluate_champion(model_uri: str) -> float:
        """The champion's metric on today's test clips (the gate compares like with like)."""
        predictor = load_registered(model_uri, tracking_uri=uri, device=settings.device)
        model, device = predictor.model, predictor.device
        accepted = accepted_clips(validation)
        test = ShardDataset(shards, model.config, split="test", task=spec,
                            sampling=tuned_params.sampling, accepted=accepted)  # fmt: skip
        _, targets, outputs = predict_dataset(model, test, model.mode, tuned_params.batch, device)
        return float(metrics.scalar_metrics(metrics.evaluate(spec, targets, outputs))[metric])

    version = log_model(
        mode_dir(finetuned, mode) / "model", task, metric, value, test_set, tracking_uri=uri,
        experiment=experiment_name(task), crop=crop, sampling=tuned_params.sampling,
    )  # fmt: skip
    decision = promote(
        task, version.version, metric, value, test_set, settings.margin,
        evaluate_champion=evaluate_champion, tracking_uri=uri,
    )  # fmt: skip
    result = {**decision.to_dict(), "mode": mode, "registered_again": not version.reused}
    atomic_write_text(out / "decision.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
