"""NDC-ME: short clips labelled neutral, smile or laughter.

Read from a local directory of clips and a labels CSV with columns ``file`` (path relative to
the clip directory) and ``label`` (``neutral``, ``smile``, ``laughter``; ``laugh`` is accepted
for ``laughter``). An optional ``participant`` (or ``speaker``/``subject``) column names the
speaker; without it the speaker is parsed from the file name with ``speaker_pattern``: by
default the part before the first ``_`` or ``-`` (``P07_smile_003.mp4`` -> ``P07``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import pandas as pd

from socialmae.data.errors import MediaError
from socialmae.data.manifest import ManifestRow, read_manifest, write_manifest
from socialmae.data.sources.splits import (
    LinkMode,
    assign_speaker_splits,
    place_media,
    report_missing,
    require_dir,
)
from socialmae.tasks import get_task

log = logging.getLogger(__name__)

DATASET = "ndcme"
LABELS = get_task(DATASET).labels
ALIASES = {"laugh": "laughter"}
SPEAKER_PATTERN = r"^(?P<speaker>[^_-]+)[_-]"
FILE_COLUMNS = ("file", "filename", "path", "clip")
SPEAKER_COLUMNS = ("participant", "speaker", "subject")


def normalise_label(raw: object, where: str | Path) -> str:
    """A NDC-ME label in canonical form; MediaError for anything else."""
    label = str(raw).strip().lower() if raw is not None else ""
    label = ALIASES.get(label, label)
    if label not in LABELS:
        raise MediaError(where, f"unknown label {raw!r} (expected one of {list(LABELS)})")
    return label


def speaker_from_name(file_name: str, pattern: str = SPEAKER_PATTERN) -> str:
    """The speaker id in a file name (group ``speaker``, else group 1, of ``pattern``)."""
    match = re.search(pattern, PurePosixPath(file_name).name)
    if not match:
        raise MediaError(file_name, f"cannot tell the speaker from the name ({pattern!r})")
    return match.groupdict().get("speaker") or match.group(1)


def _column(frame: pd.DataFrame, options: Sequence[str]) -> str | None:
    lowered = {str(c).strip().lower(): c for c in frame.columns}
    return next((lowered[o] for o in options if o in lowered), None)


def prepare_ndcme(
    root: Path,
    out_dir: Path,
    *,
    labels_csv: Path | None = None,
    speaker_pattern: str = SPEAKER_PATTERN,
    mode: LinkMode = "symlink",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> pd.DataFrame:
    """Index NDC-ME clips with their labels and write the manifest under ``out_dir``.

    Args:
        root: the clip directory; ``file`` entries are relative to it.
        labels_csv: the labels table; default ``root/labels.csv``.
        speaker_pattern: regex for the speaker when the CSV has no participant column.
        mode: how media outside ``out_dir`` is referenced (see ``place_media``).

    Listed clips absent from ``root`` are logged and kept in ``frame.attrs["missing"]``.
    """
    root, out_dir = Path(root), Path(out_dir)
    require_dir(root, "NDC-ME clip")
    csv = Path(labels_csv) if labels_csv is not None else root / "labels.csv"
    if not csv.is_file():
        raise MediaError(csv, "labels CSV not found")
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    file_col, label_col = _column(table, FILE_COLUMNS), _column(table, ("label",))
    if file_col is None or label_col is None:
        raise MediaError(csv, f"needs columns file and label, has {list(table.columns)}")
    speaker_col = _column(table, SPEAKER_COLUMNS)

    entries: list[tuple[str, str, str]] = []  # file, label, speaker
    seen: set[str] = set()
    for i, record in enumerate(table.to_dict("records")):
        where = f"{csv}:{i + 2}"
        name = str(record[file_col]).strip().replace("\\", "/")
        parts = PurePosixPath(name).parts
        if not name or name.startswith("/") or ".." in parts:
            raise MediaError(where, f"bad file entry {name!r} (must be relative to {root})")
        if name in seen:
            raise MediaError(where, f"{name} listed twice")
        seen.add(name)
        label = normalise_label(record[label_col], where)
        speaker = str(record[speaker_col]).strip() if speaker_col else ""
        if not speaker:
            speaker = speaker_from_name(name, speaker_pattern)
        entries.append((name, label, speaker))

    missing = [name for name, _, _ in entries if not (root / name).is_file()]
    present = [e for e in entries if (root / e[0]).is_file()]
    splits = assign_speaker_splits([s for _, _, s in present], fractions, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        ManifestRow(
            clip_id=str(PurePosixPath(name).with_suffix("")),
            path=place_media(root / name, out_dir, name, mode),
            dataset=DATASET,
            speaker=speaker,
            split=splits[speaker],
            label=label,
        )
        for name, label, speaker in present
    ]
    write_manifest(rows, out_dir)
    log.info("ndcme: %d clips of %d speakers in %s", len(rows), len(splits), out_dir)
    return report_missing(read_manifest(out_dir), missing, DATASET)
