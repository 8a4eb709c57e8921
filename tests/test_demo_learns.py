"""The main job learns: `dvc repro` with the project's own params.yaml (the demo `make demo` runs)
registers a champion whose test scores are above chance by a margin that a model with random
weights, scored the same way on the same clips, does not reach."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO, cli_env

from socialmae.data.dataset import ShardDataset
from socialmae.model import SocialMAEClassifier
from socialmae.params import load_yaml
from socialmae.tasks import get_task
from socialmae.train import metrics
from socialmae.train.evaluation import predict_dataset
from socialmae.train.stages import accepted_clips, finetune_params

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHANCE = 1 / 6
MARGIN = 2 * CHANCE  # "twice chance": F1 macro >= 0.33
TARGET = 0.6  # what the audiovisual champion of the demo must reach on unseen speakers


def _random_scores(root, mode: str, seeds: range) -> list[float]:
    """F1 macro on the demo's test clips of freshly initialised classifiers (the fine-tuned
    architecture and preprocessing, random weights)."""
    trained = SocialMAEClassifier.from_pretrained(
        root / "outputs/finetune/demo/modes" / mode / "model"
    )
    task = get_task("demo")
    params = finetune_params(load_yaml(root / "params.yaml"), "demo", None)
    test = ShardDataset(root / "data/interim/faces", trained.config, split="test", task=task,
                        sampling=params.sampling,
                        accepted=accepted_clips(root / "data/processed/validation"))  # fmt: skip
    scores = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = SocialMAEClassifier(trained.config, task.num_outputs, task.kind, task.labels, mode)
        _, targets, outputs = predict_dataset(model, test, mode, 8, torch.device("cpu"))
        scores.append(metrics.scalar_metrics(metrics.evaluate(task, targets, outputs))["f1_macro"])
    return scores


def test_the_demo_pipeline_learns_in_every_mode(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    shutil.copytree(REPO / "socialmae", root / "socialmae",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    env = cli_env(root)
    for command in (["dvc", "init", "--no-scm", "-q"], ["dvc", "repro"]):
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    table = json.loads((root / "outputs/finetune/demo/metrics.json").read_text())
    for mode in table["modes"]:
        score = table[mode]["test"]["f1_macro"]
        assert score >= MARGIN, f"{mode}: test F1 macro {score:.3f} < {MARGIN:.3f}"
        random = _random_scores(root, mode, range(5))
        assert max(random) < MARGIN, f"{mode}: random weights reach {max(random):.3f}"
        assert score > np.mean(random) + 0.15
    audiovisual = table["multimodal"]["test"]["f1_macro"]
    assert audiovisual >= TARGET, f"multimodal test F1 macro {audiovisual:.3f} < {TARGET}"
    decision = json.loads((root / "outputs/register/demo/decision.json").read_text())
    assert decision["promoted"] and decision["mode"] == "multimodal"
    assert decision["challenger_score"] == table["multimodal"]["test"]["f1_macro"]
