"""Provenance of a registered version: the tags it carries, the git revision and the md5
of the DVC data outputs it was trained on."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

DATA_PREFIXES = ("data/",)  # dvc.lock outs whose md5 identify the data

# Model-version tags.
TAG_TASK = "task"
TAG_GIT = "git_revision"
TAG_GIT_DIRTY = "git_dirty"
TAG_DVC = "dvc_data_md5"  # JSON {out path: md5}
TAG_METRIC_NAME = "metric_name"
TAG_METRIC_VALUE = "metric_value"
TAG_FINGERPRINT = "test_fingerprint"
TAG_WEIGHTS = "model_fingerprint"  # sha256 of the logged weights, config and preprocessing
TAG_DECISION = "promotion"  # JSON of the PromotionDecision
TAG_DECISION_OUTCOME = "promotion_outcome"  # promoted | kept | refused


def git_revision(repo_dir: str | os.PathLike[str] = ".") -> tuple[str | None, bool]:
    """``(HEAD commit, working tree has uncommitted changes)``; ``(None, False)`` outside git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=30,
                check=False,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return None, False
    return head, bool(git("status", "--porcelain", "--untracked-files=no"))


def dvc_data_hashes(
    lock_path: str | os.PathLike[str] = "dvc.lock", prefixes: tuple[str, ...] = DATA_PREFIXES
) -> dict[str, str]:
    """md5 of every DVC stage output under ``prefixes`` in ``dvc.lock`` (``{}`` if absent)."""
    path = Path(lock_path)
    if not path.is_file():
        return {}
    try:
        lock = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        logger.warning("%s is not valid YAML (%s); no data hashes recorded", path, exc)
        return {}
    hashes: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            out_path, md5 = str(out.get("path", "")), out.get("md5")
            if md5 and out_path.startswith(prefixes):
                hashes[out_path] = str(md5)
    return dict(sorted(hashes.items()))
