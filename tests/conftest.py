"""Shared fixtures: offline switches, small inputs, synthetic official checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

for key, value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(key, value)

sys.path.insert(0, str(Path(__file__).parent))

from official_format import official_shapes, synthetic_state_dict  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def official_file(tmp_path: Path):
    """Factory: write a synthetic official checkpoint and return (path, state dict)."""

    def write(seed: int = 0, prefix: str = "module.", **shape_args) -> tuple[Path, dict]:
        sd = synthetic_state_dict(official_shapes(**shape_args), seed=seed, prefix=prefix)
        path = tmp_path / f"official-{seed}-{len(sd)}.pth"
        torch.save(sd, path)
        return path, sd

    return write


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """A small generated demo set (12 clips, 6 emotions, 4 identities split 2/1/1), cropped
    into shards once per test session; treat it as read-only."""
    from socialmae.data.crop import CropParams, crop_faces
    from socialmae.data.manifest import read_manifest
    from socialmae.data.sources.demo import prepare_demo

    root = tmp_path_factory.mktemp("demo")
    prepare_demo(root / "raw", clips_per_label=2, identities=4, seconds=2.0, seed=0)
    crop_faces(read_manifest(root / "raw"), root / "faces", CropParams(workers=1))
    return root / "faces"
