"""CREMA-D (Cao et al. 2014): 7,442 acted clips of 91 actors, six emotions.

Fetched file by file from the public GitHub LFS media of ``CheyneyComputerScience/CREMA-D``
(``VideoFlash/<name>.flv`` with sound, ``AudioWAV/<name>.wav``) into the same layout under
``out_dir``, or indexed from a local copy in that layout (a ``git lfs`` clone). Names follow
``ActorID_Sentence_Emotion_Level`` (``1001_DFA_ANG_XX``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from socialmae.data.download import DEFAULT_AUTH, AuthEnv, DownloadError, download, sha256_of
from socialmae.data.errors import MediaError
from socialmae.data.manifest import ManifestRow, read_manifest, write_manifest
from socialmae.data.sources.splits import (
    LinkMode,
    assign_speaker_splits,
    place_media,
    report_missing,
)
from socialmae.tasks import EMOTIONS

log = logging.getLogger(__name__)

DATASET = "cremad"
BASE_URL = "https://media.githubusercontent.com/media/CheyneyComputerScience/CREMA-D/master/"
NAMES_URL = (
    "https://raw.githubusercontent.com/CheyneyComputerScience/CREMA-D/master/SentenceFilenames.csv"
)
EMOTION_CODES = dict(zip(("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"), EMOTIONS, strict=True))
LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
ACTORS = range(1001, 1092)
MEDIA = {"video": ("VideoFlash", ".flv"), "audio": ("AudioWAV", ".wav")}
_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
_LFS_POINTER = b"version https://git-lfs"

Modality = Literal["video", "audio"]


@dataclass(frozen=True)
class CremadName:
    """A parsed CREMA-D file name."""

    name: str
    actor: str
    sentence: str
    emotion: str  # a TASKS["cremad"] label
    level: str  # LO, MD, HI or XX


def parse_name(name: str) -> CremadName:
    """Parse ``ActorID_Sentence_Emotion_Level``; a MediaError names anything malformed."""
    match = _NAME.match(name)
    if not match:
        raise MediaError(name, "not a CREMA-D name (ActorID_Sentence_Emotion_Level)")
    actor, sentence, emotion, level = match.groups()
    if int(actor) not in ACTORS:
        raise MediaError(name, f"actor {actor} outside 1001-1091")
    if sentence not in SENTENCES:
        raise MediaError(name, f"unknown sentence code {sentence!r}")
    if emotion not in EMOTION_CODES:
        raise MediaError(name, f"unknown emotion code {emotion!r} (use {sorted(EMOTION_CODES)})")
    if level not in LEVELS:
        raise MediaError(name, f"unknown intensity level {level!r} (use {sorted(LEVELS)})")
    return CremadName(name, actor, sentence, EMOTION_CODES[emotion], level)


def read_names(source: str | os.PathLike[str]) -> list[str]:
    """Clip names from a file: ``SentenceFilenames.csv`` (``Filename`` column) or one per line.

    Blank lines and ``#`` comments are skipped; extensions (``.flv``, ``.wav``) are dropped.
    """
    path = Path(source)
    if not path.is_file():
        raise MediaError(path, "names file not found")
    if path.suffix.lower() == ".csv":
        frame = pd.read_csv(path, dtype=str)
        column = next((c for c in frame.columns if c.strip().lower() == "filename"), None)
        if column is None:
            raise MediaError(path, f"no Filename column (columns: {list(frame.columns)})")
        raw = frame[column].dropna().tolist()
    else:
        raw = path.read_text(encoding="utf-8").splitlines()
    names = []
    for line in raw:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        stem = Path(line).name
        names.append(stem.rsplit(".", 1)[0] if stem.endswith((".flv", ".wav", ".mp3")) else stem)
    return names


def prepare_cremad(
    names: Sequence[str] | str | os.PathLike[str] | None,
    out_dir: Path,
    *,
    base_url: str = BASE_URL,
    names_url: str = NAMES_URL,
    limit: int | None = None,
    modalities: Sequence[Modality] = ("video", "audio"),
    checksums: Mapping[str, str] | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    workers: int = 4,
    retries: int = 5,
    timeout: float = 30,
    backoff: float = 1.0,
    progress: bool = True,
    mode: LinkMode = "symlink",
    auth_env: AuthEnv = DEFAULT_AUTH,
) -> pd.DataFrame:
    """Download (or index) CREMA-D under ``out_dir`` and write its manifest; return the frame.

    Args:
        names: clip names, a names file (see :func:`read_names`), or None for the official
            ``SentenceFilenames.csv``: fetched from ``names_url``, or for a local ``base_url``
            read from it (else the names of the files in its first modality folder).
        base_url: where ``VideoFlash/`` and ``AudioWAV/`` are: an http(s)/file URL (files are
            downloaded) or a local directory (files are referenced with ``mode``, see
            ``place_media``; nothing is fetched).
        limit: keep only the first ``limit`` names (after sorting), e.g. for a quick run.
        modalities: which files to fetch per clip; the manifest ``path`` is the first one,
            the others go to ``extra`` (``extra["audio"]`` is the WAV).
        checksums: optional SHA-256 per relative path (``AudioWAV/1001_DFA_ANG_XX.wav``).
        auth_env: which environment variables hold credentials for the URLs.

    Clips whose files the server (or the local copy) does not have, and Git LFS pointer files
    in place of the media, are logged and listed in ``frame.attrs["missing"]``; a malformed
    name raises MediaError.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not modalities or any(m not in MEDIA for m in modalities):
        raise ValueError(f"modalities: expected some of {sorted(MEDIA)}, got {modalities!r}")
    local = Path(base_url) if "://" not in base_url else None
    if local is not None and not local.is_dir():
        raise MediaError(local, "CREMA-D directory not found (expected a URL or a directory)")
    if names is None and local is not None:
        names = _local_names(local, modalities[0])
    elif names is None:
        names_file = download(
            names_url,
            out_dir / "SentenceFilenames.csv",
            retries=retries,
            timeout=timeout,
            backoff=backoff,
            progress=False,
            auth_env=auth_env,
        )
        names = read_names(names_file)
    elif isinstance(names, str | os.PathLike):
        names = read_names(names)
    parsed = [parse_name(n) for n in sorted(set(names))]
    if limit is not None:
        parsed = parsed[:limit]
    if not parsed:
        raise MediaError(out_dir, "no CREMA-D names to fetch")
    base = base_url if base_url.endswith("/") else base_url + "/"
    checksums = dict(checksums or {})

    def place(source: Path, relative: str) -> str:
        """Reference a local file from ``out_dir``; the manifest path, or why it is missing."""
        if not source.is_file():
            raise DownloadError(str(source), "not in the local copy")
        with open(source, "rb") as f:
            if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                raise DownloadError(str(source), "a Git LFS pointer, not the media (git lfs pull)")
        expected = checksums.get(relative)
        if expected is not None and sha256_of(source).lower() != expected.lower():
            raise DownloadError(str(source), f"sha256 differs from {expected.lower()}")
        return place_media(source, out_dir, relative, mode)

    def fetch(clip: CremadName) -> dict[str, str] | str:
        """Relative paths per modality, or the reason the clip is missing."""
        got = {}
        for modality in modalities:
            folder, suffix = MEDIA[modality]
            relative = f"{folder}/{clip.name}{suffix}"
            if local is not None:
                try:
                    got[modality] = place(local / relative, relative)
                except DownloadError as exc:
                    return f"{relative}: {exc.reason}"
                continue
            try:
                path = download(
                    base + relative,
                    out_dir / relative,
                    sha256=checksums.get(relative),
                    retries=retries,
                    timeout=timeout,
                    backoff=backoff,
                    progress=False,
                    auth_env=auth_env,
                )
            except DownloadError as exc:
                return f"{relative}: {exc.reason}"
            with open(path, "rb") as f:
                if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                    path.unlink()
                    return f"{relative}: server sent a Git LFS pointer, not the media"
            got[modality] = relative
        return got

    results = _run_all(fetch, parsed, workers, progress)
    missing: list[str] = []
    fetched: list[tuple[CremadName, dict[str, str]]] = []
    for clip, result in zip(parsed, results, strict=True):
        if isinstance(result, str):
            missing.append(clip.name)
            log.warning("cremad: %s missing (%s)", clip.name, result)
        else:
            fetched.append((clip, result))
    splits = assign_speaker_splits([c.actor for c, _ in fetched], fractions, seed)
    rows = []
    for clip, paths in fetched:
        extra: dict[str, str] = {"sentence": clip.sentence, "level": clip.level}
        extra |= {m: p for m, p in paths.items() if m != modalities[0]}
        rows.append(
            ManifestRow(
                clip_id=clip.name,
                path=paths[modalities[0]],
                dataset=DATASET,
                speaker=clip.actor,
                split=splits[clip.actor],
                label=clip.emotion,
                extra=extra,
            )
        )
    write_manifest(rows, out_dir)
    log.info("cremad: %d clips of %d actors in %s", len(rows), len(splits), out_dir)
    return report_missing(read_manifest(out_dir), missing, DATASET)


def _local_names(local: Path, modality: Modality) -> list[str]:
    """The clip names of a local copy: its ``SentenceFilenames.csv``, else its media files."""
    listed = local / "SentenceFilenames.csv"
    if listed.is_file():
        return read_names(listed)
    folder, suffix = MEDIA[modality]
    names = sorted(p.name.removesuffix(suffix) for p in (local / folder).glob(f"*{suffix}"))
    if not names:
        raise MediaError(local, f"no SentenceFilenames.csv and no {folder}/*{suffix}")
    return names


def _run_all(
    fetch: Callable[[CremadName], dict[str, str] | str],
    clips: list[CremadName],
    workers: int,
    progress: bool,
) -> list[dict[str, str] | str]:
    """``fetch`` every clip on ``workers`` threads, with one overall progress bar."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(fetch, clip) for clip in clips]
        if not progress:
            return [f.result() for f in futures]
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("CREMA-D", total=len(futures))
            results = []
            for future in futures:
                results.append(future.result())
                bar.advance(task)
            return results
