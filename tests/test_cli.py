import json
import subprocess
import sys

SMALL = dict(d=64, depth=2, dd=32, decoder_depth=1)


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
    bad_task = _cli("finetune", "huge")
    assert bad_task.returncode == 2 and "unknown task 'huge'" in bad_task.stderr
