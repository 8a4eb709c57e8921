"""Checks that catch a model that does not learn: labels stay with their clips through shuffled
multi-process loading, augmentation changes from epoch to epoch, and the demo recipe's
mini-batches fit a small labelled set in every mode."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO

from socialmae.data.dataset import ShardDataset
from socialmae.model import SocialMAEClassifier, get_preset
from socialmae.model.social_mae import MODES
from socialmae.params import load_yaml
from socialmae.tasks import get_task
from socialmae.train.engine import GlobalBatchSampler
from socialmae.train.evaluation import predict_dataset
from socialmae.train.finetune import finetune, with_overrides
from socialmae.train.stages import finetune_params


def _demo_recipe(**overrides):
    """The demo's fine-tuning params as params.yaml sets them (defaults + the demo block)."""
    params = finetune_params(load_yaml(REPO / "params.yaml"), "demo", None)
    return with_overrides(params, overrides)


def test_labels_stay_with_their_clips_under_shuffled_worker_loading(demo_shards):
    recipe = _demo_recipe()
    config = get_preset("tiny")
    dataset = ShardDataset(demo_shards, config, split="train", task=get_task("demo"), train=True,
                           sampling=recipe.sampling, augment=recipe.augment, seed=0)  # fmt: skip
    table = pd.read_parquet(demo_shards / "clips.parquet").set_index("clip_id")
    labels = get_task("demo").labels
    sampler = GlobalBatchSampler(len(dataset), 4, seed=0, with_epoch=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=2, persistent_workers=True
    )
    seen: dict[int, list[str]] = {}
    audio: dict[int, dict[str, torch.Tensor]] = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen[epoch], audio[epoch] = [], {}
        for batch in loader:
            for k, clip_id in enumerate(batch["clip_id"]):
                assert labels[int(batch["label"][k])] == table.loc[clip_id, "label"], clip_id
                assert dataset.table.iloc[int(batch["index"][k])]["clip_id"] == clip_id
                if batch["target"][k].max() == 1:  # not mixed with another clip
                    assert int(batch["target"][k].argmax()) == int(batch["label"][k])
                seen[epoch].append(clip_id)
                audio[epoch][clip_id] = batch["audio"][k]
    assert seen[0] != seen[1], "the order must change between epochs"
    assert sorted(seen[0]) == sorted(seen[1]) and len(set(seen[0])) == len(seen[0])
    # persistent workers never see set_epoch: the epoch must travel with the index
    common = set(audio[0]) & set(audio[1])
    assert common and any(not torch.equal(audio[0][c], audio[1][c]) for c in common)


@pytest.mark.parametrize(
    "mode",
    # the audio model learns fastest; the two with faces take 45-50 s each
    [m if m == "audio" else pytest.param(m, marks=pytest.mark.slow) for m in MODES],
)
def test_demo_recipe_minibatches_fit_the_training_set(demo_shards, tmp_path, monkeypatch, mode):
    """The demo's recipe (its augmentation, weight decay, learning rates) with mini-batches of 4
    from scratch memorises the 12 training clips (2 identities x 6 emotions) in every mode.
    The augmentation makes this take many steps (faces the most: 360-600 here; about 120 fit
    without it), but a recipe that cannot fit at all (labels detached from clips, a mask over
    the whole signal) stays near chance."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    epochs = 200 if mode == "video" else 120
    params = _demo_recipe(
        preset="demo", init=None, modes=[mode], batch=4, epochs=epochs, eval_every=epochs,
        patience=None, bootstrap_resamples=10, permutations=10, parallel_modes=1,
    )  # fmt: skip
    finetune(params, "demo", demo_shards, tmp_path / "out")
    model = SocialMAEClassifier.from_pretrained(tmp_path / "out" / "model")
    train = ShardDataset(demo_shards, model.config, split="train", task=get_task("demo"),
                         sampling=params.sampling)  # fmt: skip
    _, labels, logits = predict_dataset(model, train, mode, 4, torch.device("cpu"))
    accuracy = float(np.mean(logits.argmax(1) == labels))
    assert accuracy >= 0.95, f"{mode}: train accuracy {accuracy:.2f}"
