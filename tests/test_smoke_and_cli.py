import json
import subprocess
import sys

import torch

from socialmae import load_checkpoint
from socialmae.model import SocialMAE, get_preset
from socialmae.smoke import LEVELS, pretrain_smoke, synthetic_clips

SMALL = dict(d=64, depth=2, dd=32, decoder_depth=1)


def test_generated_clips_share_their_latent_across_modalities():
    config = get_preset("tiny")
    audio, video, k = synthetic_clips(config, 6, torch.Generator().manual_seed(0))
    assert audio.shape == (6, 1024, 128) and video.shape == (6, 3, 8, 224, 224)
    band_energy = audio.mean(1).reshape(6, LEVELS, -1).mean(-1)  # [B, LEVELS]
    assert torch.equal(band_energy.argmax(1), k)
    row_energy = video.mean((1, 2, 4))  # [B, H]: the square adds about 0.4 to its rows
    top_rows = (row_energy > 0.2).float().argmax(1)  # first row of the square
    assert torch.equal(top_rows, k * (224 - 224 // 5) // (LEVELS - 1))


def test_smoke_pretraining_learns_and_writes_a_loadable_model(tmp_path):
    result = pretrain_smoke(tmp_path, steps=25, batch=4, seed=1)
    assert result.last_loss < 0.9 * result.first_loss
    assert (tmp_path / "reconstruction.png").stat().st_size > 10_000
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 25 and metrics["last_loss"] == result.last_loss
    assert isinstance(load_checkpoint(tmp_path / "model"), SocialMAE)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "socialmae.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_info_and_convert(tmp_path, official_file):
    path, _ = official_file(family="social-mae", kind="finetune", label_dim=3, **SMALL)
    converted = tmp_path / "converted"
    done = _cli("convert", str(path), str(converted), "--labels", "neutral,smile,laugh")
    assert done.returncode == 0, done.stderr
    info = _cli("info", str(converted))
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["architecture"] == "SocialMAEClassifier"
    assert described["labels"] == ["neutral", "smile", "laugh"]
    assert described["config"]["channel_order"] == "BGR"


def test_cli_errors_are_clear_and_non_zero(tmp_path, official_file):
    missing = _cli("info", str(tmp_path / "nothing.pth"))
    assert missing.returncode == 2 and "nothing.pth: no such file" in missing.stderr
    path, _ = official_file(**SMALL)
    bad_task = _cli("convert", str(path), str(tmp_path / "out"), "--task", "ranking")
    assert bad_task.returncode == 2 and "--task must be" in bad_task.stderr
    wrong = _cli("convert", str(path), str(tmp_path / "out"), "--labels", "a,b")
    assert wrong.returncode == 2 and "only applies to fine-tuned" in wrong.stderr
    assert _cli("demo", "--preset", "huge").returncode == 2
