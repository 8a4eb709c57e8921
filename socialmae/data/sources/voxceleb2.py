"""VoxCeleb2 (Chung et al. 2018): unlabelled talking-face videos for pretraining.

Read from a local tree in the published layout ``dev/mp4/<speaker id>/<video id>/<n>.mp4``
(and ``test/mp4/...``); optionally fetched first from a URL list (the archives are handed out
on request, so credentials come from the environment, see :mod:`socialmae.data.download`;
the archives are fetched, joined and extracted by :func:`socialmae.data.download.fetch_archives`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from socialmae.data.download import DEFAULT_AUTH, AuthEnv, fetch_archives
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
    auth_env: AuthEnv = DEFAULT_AUTH,
) -> pd.DataFrame:
    """Index a VoxCeleb2 tree (unlabelled) and write its manifest under ``out_dir``.

    Args:
        root: the directory holding ``dev/mp4`` and/or ``test/mp4``; None means ``out_dir``.
        urls: optional archive URLs (list or file of ``URL [SHA256]`` lines) fetched into
            ``archive_dir`` (default ``out_dir/archives``) and extracted into ``root`` first,
            with credentials from the environment variables ``auth_env`` names.
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
            auth_env=auth_env,
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
