"""The data stages end to end on a small generated demo set, through their entry points."""

import json

import pandas as pd
import pytest

from socialmae.params import ParamsError
from socialmae.pipeline import stage_crop_faces, stage_download, stage_validate


def test_download_crop_validate(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "data: {datasets: [demo]}\n"
        "download: {demo: {clips_per_label: 2, identities: 4, seconds: 2.0}}\n"
        "crop: {workers: 1, clips_per_shard: 8}\n"
    )
    raw, faces, checks = tmp_path / "raw", tmp_path / "faces", tmp_path / "validation"
    assert stage_download(params, raw)["demo"]["clips"] == 12
    crop = stage_crop_faces(params, raw, faces)
    assert crop["clips"] == 12 and crop["shards"] == 2
    metrics = stage_validate(params, raw, faces, checks)
    assert metrics["success"]["passed"]
    table = pd.read_parquet(faces / "clips.parquet")
    assert (table["status"] == "ok").all() and (table["detection_rate"] > 0.9).all()
    assert json.loads((faces / "crop_metrics.json").read_text())["ok"] == 12
    assert (checks / "data_docs").is_dir()


def test_unwired_dataset_is_refused_with_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data: {datasets: [demo, cremad]}\n")
    with pytest.raises(ParamsError, match=r"data\.datasets"):
        stage_download(params, tmp_path)
