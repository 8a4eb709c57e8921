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
    """A small generated demo set (24 clips: 4 identities split 2/1/1, each saying one sentence
    in the 6 emotions), cropped into shards once per test session; treat it as read-only."""
    from socialmae.data.crop import CropParams
    from socialmae.data.crop_stage import crop_faces
    from socialmae.data.manifest import read_manifest
    from socialmae.data.sources.demo import prepare_demo

    root = tmp_path_factory.mktemp("demo")
    prepare_demo(root / "raw", identities=4, sentences=1, seconds=2.0, seed=0)
    crop_faces(read_manifest(root / "raw"), root / "faces", CropParams(workers=1))
    return root / "faces"


REPO = Path(__file__).resolve().parents[1]

# The demo pipeline made smaller for the test suite (same stages, same code, fewer clips/steps).
SMALL_PIPELINE = {
    "download": {"demo": {"identities": 4, "sentences": 1, "seconds": 2.0, "workers": 1}},
    "crop": {"workers": 1},
    "pretrain": {"epochs": 3, "batch": 4, "workers": 0, "checkpoint_every": 3},
    "finetune": {
        "defaults": {"bootstrap_resamples": 200, "permutations": 500},
        "demo": {"epochs": 3, "eval_every": 1, "patience": None, "parallel_modes": 1},
    },
    "tune": {
        "defaults": {"trials": 2, "random_trials": 2, "heartbeat_s": None},
        "demo": {"enabled": True},
    },
}


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def cli_env(root: Path) -> dict[str, str]:
    """Environment for running `socialmae`/`dvc` in ``root``: this venv first on PATH, MLflow in
    ``root``."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
    }


@pytest.fixture(scope="session")
def demo_pipeline(tmp_path_factory) -> Path:
    """The whole `dvc repro` pipeline run once, in a copy of the project with SMALL_PIPELINE
    params, without git; returns the project root holding data/, outputs/ and mlflow.db."""
    import shutil
    import subprocess

    import yaml

    root = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "socialmae", root / "socialmae",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(_merge(params, SMALL_PIPELINE)))
    env = cli_env(root)
    for command in (["dvc", "init", "--no-scm", "-q"],
                    ["dvc", "config", "core.analytics", "false"], ["dvc", "repro"]):  # fmt: skip
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return root


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory) -> Path:
    """A tiny 6-emotion classifier (seeded random weights) saved with save_pretrained."""
    from socialmae.model import SocialMAEClassifier
    from socialmae.tasks import EMOTIONS

    torch.manual_seed(0)
    model = SocialMAEClassifier.from_preset("tiny", num_outputs=6, labels=EMOTIONS)
    directory = tmp_path_factory.mktemp("models") / "emotion-classifier"
    model.save_pretrained(directory)
    return directory
