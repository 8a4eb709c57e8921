"""The downstream tasks: their label sets, targets and metrics family (one home for all stages)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class TaskSpec:
    """What a dataset's labels mean."""

    name: str
    kind: TaskKind
    labels: tuple[str, ...]  # class names, or target names for regression

    @property
    def num_outputs(self) -> int:
        return len(self.labels)


# CREMA-D codes: ANG, DIS, FEA, HAP, NEU, SAD.
EMOTIONS = ("anger", "disgust", "fear", "happiness", "neutral", "sadness")
TRAITS = ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")

TASKS: dict[str, TaskSpec] = {
    "cremad": TaskSpec("cremad", "classification", EMOTIONS),
    "firstimpressions": TaskSpec("firstimpressions", "regression", TRAITS),
    "ndcme": TaskSpec("ndcme", "classification", ("neutral", "smile", "laughter")),
    "demo": TaskSpec("demo", "classification", EMOTIONS),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]
