"""VoxCeleb2 (Chung et al. 2018): unlabelled talking-face videos for pretraining.

Read from a local tree in the published layout ``dev/mp4/<speaker id>/<video id>/<n>.mp4``
(and ``test/mp4/...``); optionally fetched first from a URL list (the archives are handed out
on request, so credentials come from the environment, see :mod:`socialmae.data.download`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from socialmae.data.download import DownloadError, download, redact, safe_extract
from socialmae.data.errors import MediaError
from socialmae.data.manifest import ManifestRow, read_manifest, write_manifest
from socialmae.data.sources.splits import (
    LinkMode,
    assign_speaker_splits,
    place_media,
    report_missing,
)

log = logging.getLogger(__name__)

DATASET = "voxceleb2"
SUBSETS = ("dev", "test")
_PART = re.compile(r"^(?P<stem>.+)_part(?P<part>[a-z]{2})$")


def read_url_list(source: Sequence[str] | str | os.PathLike[str]) -> list[tuple[str, str | None]]:
    """``(url, sha256 or None)`` pairs from a list or a file of ``URL [SHA256]`` lines."""
    if isinstance(source, str | os.PathLike) and not str(source).startswith(("http:", "https:")):
        path = Path(source)
        if not path.is_file():
            raise MediaError(path, "URL list not found")
        lines = path.read_text(encoding="utf-8").splitlines()
    else:
        lines = [str(source)] if isinstance(source, str | os.PathLike) else list(source)
    pairs = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if fields:
            pairs.append((fields[0], fields[1].lower() if len(fields) > 1 else None))
    return pairs


def fetch_archives(
    urls: Sequence[str] | str | os.PathLike[str],
    archive_dir: Path,
    extract_to: Path,
    *,
    retries: int = 5,
    timeout: float = 30,
    backoff: float = 1.0,
    progress: bool = True,
) -> list[str]:
    """Download the archives, join ``*_partaa``, ``*_partab``, ... pieces, extract safely.

    Returns the (redacted) URLs that could not be fetched; an archive with a missing part is
    not extracted. A finished extraction leaves ``<archive>.extracted`` so reruns skip it.
    """
    archive_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Path]] = {}
    failed: list[str] = []
    broken: set[str] = set()
    for url, sha256 in read_url_list(urls):
        name = Path(urllib.parse.urlsplit(url).path).name
        if not name:
            raise MediaError(redact(url), "URL names no file")
        match = _PART.match(name)
        group = f"{match['stem']}.zip" if match else name
        if (archive_dir / f"{group}.extracted").exists():
            log.debug("voxceleb2: %s already extracted; not fetching %s", group, name)
            continue
        try:
            path = download(
                url,
                archive_dir / name,
                sha256=sha256,
                retries=retries,
                timeout=timeout,
                backoff=backoff,
                progress=progress,
            )
        except DownloadError as exc:
            log.error("voxceleb2: cannot fetch %s: %s", exc.path, exc.reason)
            failed.append(exc.path)
            broken.add(group)
            continue
        groups.setdefault(group, []).append(path)
    for group, paths in groups.items():
        if group in broken:
            log.error("voxceleb2: %s lacks parts; not extracted", group)
            continue
        archive = paths[0]
        if len(paths) > 1 or _PART.match(paths[0].name):
            archive = archive_dir / group
            tmp = archive.with_name(archive.name + ".tmp")
            with open(tmp, "wb") as out:
                for piece in sorted(paths, key=lambda p: p.name):
                    with open(piece, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            tmp.replace(archive)
        marker = archive_dir / f"{group}.extracted"
        files = safe_extract(archive, extract_to)
        marker.write_text(f"{len(files)}\n")
        log.info("voxceleb2: extracted %d files from %s", len(files), archive.name)
    return failed


def prepare_voxceleb2(
    root: Path | None,
    out_dir: Path,
    *,
    urls: Sequence[str] | str | os.PathLike[str] | None = None,
    archive_dir: Path | None = None,
    subsets: Sequence[str] = SUBSETS,
    limit: int | None = None,
    mode: LinkMode = "symlink",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    retries: int = 5,
    timeout: float = 30,
    backoff: float = 1.0,
    progress: bool = True,
) -> pd.DataFrame:
    """Index a VoxCeleb2 tree (unlabelled) and write its manifest under ``out_dir``.

    Args:
        root: the directory holding ``dev/mp4`` and/or ``test/mp4``; None means ``out_dir``.
        urls: optional archive URLs (list or file of ``URL [SHA256]`` lines) fetched into
            ``archive_dir`` (default ``out_dir/archives``) and extracted into ``root`` first.
        limit: keep the first ``limit`` clips (sorted by path), e.g. for a quick run.
        mode: how media outside ``out_dir`` is referenced (see ``place_media``).

    Speakers (VoxCeleb ids) are split with ``assign_speaker_splits``; ``extra["subset"]`` keeps
    the official dev/test membership. Unfetchable URLs land in ``frame.attrs["missing"]``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(root) if root is not None else out_dir
    missing: list[str] = []
    if urls is not None:
        missing = fetch_archives(
            urls,
            Path(archive_dir) if archive_dir is not None else out_dir / "archives",
            root,
            retries=retries,
            timeout=timeout,
            backoff=backoff,
            progress=progress,
        )
    if not root.is_dir():
        raise MediaError(root, "VoxCeleb2 directory not found")
    found: list[tuple[str, Path]] = []
    for subset in subsets:
        base = root / subset / "mp4"
        if not base.is_dir():
            log.info("voxceleb2: no %s", base)
            continue
        found += [(subset, p) for p in sorted(base.glob("*/*/*.mp4"))]
    if not found:
        wanted = ", ".join(f"{s}/mp4/<speaker>/<video>/<n>.mp4" for s in subsets)
        raise MediaError(root, f"no VoxCeleb2 clips (expected {wanted})")
    if limit is not None:
        found = found[:limit]
    splits = assign_speaker_splits([p.parent.parent.name for _, p in found], fractions, seed)
    rows: list[ManifestRow] = []
    seen: dict[str, Path] = {}
    for subset, path in found:
        speaker, video = path.parent.parent.name, path.parent.name
        clip_id = f"{speaker}/{video}/{path.stem}"
        if clip_id in seen:
            raise MediaError(path, f"clip {clip_id} also at {seen[clip_id]}")
        seen[clip_id] = path
        relative = f"{subset}/mp4/{speaker}/{video}/{path.name}"
        rows.append(
            ManifestRow(
                clip_id=clip_id,
                path=place_media(path, out_dir, relative, mode),
                dataset=DATASET,
                speaker=speaker,
                split=splits[speaker],
                extra={"subset": subset, "video": video},
            )
        )
    write_manifest(rows, out_dir)
    log.info("voxceleb2: %d clips of %d speakers in %s", len(rows), len(splits), out_dir)
    return report_missing(read_manifest(out_dir), missing, DATASET)
