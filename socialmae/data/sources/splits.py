"""Speaker-independent seeded splits, and small helpers every source shares."""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import pandas as pd

from socialmae.data.errors import MediaError
from socialmae.data.manifest import SPLITS
from socialmae.io import atomic_write

log = logging.getLogger(__name__)

LinkMode = Literal["symlink", "copy", "relative"]
# When there are fewer speakers than splits, fill splits in this order.
_FILL_ORDER = ("train", "test", "val")


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """``(train, val, test)`` shares as floats; ValueError unless 3 values >= 0 (train > 0)
    that sum to 1."""
    if len(fractions) != 3:
        raise ValueError(f"fractions: expected 3 values (train, val, test), got {fractions!r}")
    values = tuple(float(f) for f in fractions)
    if any(f < 0 for f in values) or values[0] <= 0:
        raise ValueError(f"fractions: need train > 0 and val, test >= 0, got {fractions!r}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions: must sum to 1, got {fractions!r} (sum {sum(values)})")
    return values  # type: ignore[return-value]


def split_counts(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, int]:
    """How many of ``n`` speakers go to each split (largest remainder, no empty split at n>=3).

    A split with fraction 0 stays empty; with fewer speakers than non-empty splits they fill
    train, then test, then val.
    """
    values = check_fractions(fractions)
    wanted = [s for s, f in zip(SPLITS, values, strict=True) if f > 0]
    if n < len(wanted):
        order = [s for s in _FILL_ORDER if s in wanted]
        return {s: int(s in order[:n]) for s in SPLITS}
    exact = {s: n * f for s, f in zip(SPLITS, values, strict=True)}
    counts = {s: math.floor(v) for s, v in exact.items()}
    for s in sorted(SPLITS, key=lambda s: (counts[s] - exact[s], SPLITS.index(s))):
        if sum(counts.values()) >= n:
            break
        counts[s] += 1
    for s in wanted:  # every requested split gets at least one speaker
        if counts[s] == 0:
            donor = max(SPLITS, key=lambda d: counts[d])
            counts[donor] -= 1
            counts[s] += 1
    return counts


def assign_speaker_splits(
    speakers: Iterable[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    strata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Map each distinct speaker to ``train``/``val``/``test``.

    Deterministic for a seed (the input order does not matter), no speaker in two splits, and
    every split with a positive fraction is non-empty when there are at least 3 speakers.
    With ``strata`` (speaker -> group, e.g. voice type) the groups are interleaved so that
    each split, smallest first, holds speakers of as many groups as its size allows.
    """
    unique = sorted(set(speakers))
    counts = split_counts(len(unique), fractions)
    rng = random.Random(seed)
    if strata is None:
        order = list(unique)
        rng.shuffle(order)
        fill = list(SPLITS)
    else:
        groups: dict[str, list[str]] = {}
        for speaker in unique:
            groups.setdefault(strata[speaker], []).append(speaker)
        pools = [groups[g] for g in sorted(groups)]
        for pool in pools:
            rng.shuffle(pool)
        order = [p[i] for i in range(max(map(len, pools))) for p in pools if i < len(p)]
        fill = sorted(SPLITS, key=lambda s: (counts[s], SPLITS.index(s)))
    result: dict[str, str] = {}
    start = 0
    for split in fill:
        for speaker in order[start : start + counts[split]]:
            result[speaker] = split
        start += counts[split]
    return {s: result[s] for s in unique}


def place_media(source: Path, out_dir: Path, relative: str, mode: LinkMode = "symlink") -> str:
    """Make ``source`` reachable from ``out_dir`` and return its manifest path.

    ``symlink``: a link at ``out_dir/relative`` (absolute target); ``copy``: a copy there;
    ``relative``: no new file, the path from ``out_dir`` to ``source``. A ``source`` already
    under ``out_dir`` is referenced in place whatever the mode.
    """
    source = source.absolute()
    out_abs = out_dir.absolute()
    if source.is_relative_to(out_abs):
        return source.relative_to(out_abs).as_posix()
    if mode == "relative":
        return Path(os.path.relpath(source, out_abs)).as_posix()
    target = out_abs / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        if target.is_symlink() or target.exists():
            if target.is_symlink() and os.readlink(target) == str(source):
                return relative
            target.unlink()
        os.symlink(source, target)
    elif mode == "copy":
        if not (target.is_file() and target.stat().st_size == source.stat().st_size):
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    else:
        raise ValueError(f"mode: expected symlink, copy or relative, got {mode!r}")
    return Path(relative).as_posix()


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a MediaError saying which ``what`` is missing."""
    if not path.is_dir():
        raise MediaError(path, f"{what} directory not found")
    return path


def report_missing(frame: pd.DataFrame, missing: list[str], dataset: str) -> pd.DataFrame:
    """Log listed-but-absent files and attach them as ``frame.attrs['missing']``."""
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        log.warning("%s: %d listed files are absent: %s", dataset, len(missing), shown)
    frame.attrs["missing"] = list(missing)
    return frame


def check_disjoint(frame: pd.DataFrame) -> list[str]:
    """Speakers that occur in more than one split (empty when the split is speaker-independent)."""
    per_speaker = frame.groupby("speaker")["split"].nunique()
    return sorted(per_speaker[per_speaker > 1].index)
