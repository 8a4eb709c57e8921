"""Processes die with the process that started them (kill -9 of `dvc repro` leaves nothing),
and what a killed atomic write leaves behind is removed by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_env

from socialmae.io import remove_temporaries

CHILD = (
    "import sys, time\n"
    "if sys.argv[1] == 'tied':\n"
    "    from socialmae.lifecycle import die_with_parent\n"
    "    die_with_parent()\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)
PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]],\n"
    "                         stdout=subprocess.PIPE, text=True)\n"
    "child.stdout.readline()\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(120)\n"
)

KILLED_WRITE = (
    "import os, signal, sys\n"
    "from pathlib import Path\n"
    "from socialmae.io import atomic_directory, atomic_write\n"
    "def write(tmp):\n"
    "    (tmp / 'part' if tmp.is_dir() else tmp).write_bytes(b'half of it')\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "kind, target = sys.argv[1], Path(sys.argv[2])\n"
    "(atomic_directory if kind == 'directory' else atomic_write)(target, write)\n"
)


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pid: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_child_dies_when_its_parent_is_killed(tied):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, "tied" if tied else "free"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    try:
        assert _wait_gone(child, 15 if tied else 2) == tied
    finally:
        if _running(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
@pytest.mark.integration
def test_a_dvc_stage_command_and_its_workers_die_with_dvc(tmp_path):
    """`socialmae download` as dvc runs it (DVC_STAGE set), with its generation workers: kill
    -9 the process that started it; neither the command nor its workers live on."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download"]["demo"].update(identities=24, workers=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**cli_env(tmp_path), "DVC_STAGE": "download"}
    launcher = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen(['socialmae', 'download'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    stage = int(parent.stdout.readline())
    clips = tmp_path / "data/raw/demo/clips"
    deadline = time.monotonic() + 120
    while not (clips.is_dir() and any(clips.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.2)  # the workers are generating
    workers = [int(p) for p in Path(f"/proc/{stage}/task/{stage}/children").read_text().split()]
    assert workers, "the stage runs its generation workers"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    try:
        assert _wait_gone(stage), "the stage command outlived dvc"
        assert all(_wait_gone(w) for w in workers), "a worker outlived its stage"
    finally:
        for pid in [stage, *workers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def _kill_while_writing(kind: str, target: Path) -> None:
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, kind, str(target)])
    assert killed.returncode == -signal.SIGKILL and not target.exists()


def test_what_killed_atomic_writes_leave_is_found_and_only_that_removed(tmp_path):
    """SIGKILL in the middle of atomic_write / atomic_directory leaves a half-written temporary
    (no clean-up runs); remove_temporaries finds exactly those, not the user's dot-files, and
    with ``recursive`` those in subdirectories, but never in a linked directory."""
    (tmp_path / "shard-00000.tar").write_bytes(b"whole")
    kept = [tmp_path / n for n in (".notes.tmp", ".step-00000001.old", "draft.a1b2c3d4.tmp")]
    for path in kept:
        path.write_text("not a leftover")
    _kill_while_writing("file", tmp_path / "shard-00001.tar")
    _kill_while_writing("directory", tmp_path / "step-00000002")
    _kill_while_writing("file", tmp_path / "clips" / "a.mp4")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-linked"
    _kill_while_writing("file", elsewhere / "b.mp4")
    (tmp_path / "linked").symlink_to(elsewhere)
    left = sorted(p for p in tmp_path.iterdir() if p.name.startswith(".") and p not in kept)
    assert [p.name.split(".")[1] for p in left] == ["shard-00001", "step-00000002"]
    assert remove_temporaries(tmp_path) == left
    assert sorted(p for p in tmp_path.iterdir() if p.is_file()) == sorted(
        [tmp_path / "shard-00000.tar", *kept]
    )
    nested = list((tmp_path / "clips").iterdir())
    assert len(nested) == 1 and remove_temporaries(tmp_path, recursive=True) == nested
    assert not list((tmp_path / "clips").iterdir()) and len(list(elsewhere.iterdir())) == 1
    assert remove_temporaries(tmp_path / "missing", recursive=True) == []
