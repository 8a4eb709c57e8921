"""Atomic file writes: every stage output appears whole or not at all (and what a killed
write left half-done is found and removed by the next run)."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # mkstemp/mkdtemp: prefix, 8 random, suffix


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(target: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``target``, then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``target`` atomically."""
    return atomic_write(target, lambda tmp: tmp.write_text(text))


def atomic_write_csv(target: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (dicts with the same keys, in column order) as CSV atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(target, buffer.getvalue())


def atomic_directory(target: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a fresh directory next to ``target``, then swap it into place.

    An existing ``target`` is replaced; a crash leaves either the old or the new directory.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def remove_temporaries(directory: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Delete what killed atomic writes left in ``directory`` (``.<name>.<8 random>.tmp``
    files and directories of :func:`atomic_write` and :func:`atomic_directory`), with
    ``recursive`` in its subdirectories too (never in linked ones); returns them, sorted.

    For a stage that resumes in its own output directory: a SIGKILL skips the clean-up, and
    the leftovers would otherwise stay in the tracked output for good."""
    removed = []
    for folder, directories, files in os.walk(directory):  # nothing when it does not exist
        for name in directories + files:
            entry = Path(folder, name)
            if not _TEMPORARY.fullmatch(name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
            logger.info("removed %s, left half-written by a killed run", entry)
        directories[:] = [d for d in directories if recursive and not _TEMPORARY.fullmatch(d)]
    return sorted(removed)
