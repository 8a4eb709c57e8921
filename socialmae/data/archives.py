"""Safe extraction of downloaded archives (``*.zip``, ``*.tar.*``): no member outside the
destination (absolute names, ``..``, links pointing out), no device files, and a cap on the
expanded size so a decompression bomb is refused before it fills the disk."""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from socialmae.data.errors import MediaError

CHUNK = 1 << 20  # bytes read at a time while extracting


def _member_path(name: str, archive: Path) -> PurePosixPath:
    """Validate an archive member name: relative, no ``..``; return it normalised."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise MediaError(archive, f"member {name!r} has an absolute path")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise MediaError(archive, f"member {name!r} escapes the target with '..'")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _inside(root: Path, target: str) -> bool:
    root_real = os.path.realpath(root)
    real = os.path.realpath(target)
    return real == root_real or real.startswith(root_real + os.sep)


def _check_link(archive: Path, name: str, member: PurePosixPath, link: str, hard: bool) -> None:
    """Refuse a link whose target leaves the extraction root (lexically)."""
    if link.startswith("/") or re.match(r"^[A-Za-z]:", link):
        raise MediaError(archive, f"member {name!r} links to absolute path {link!r}")
    base = PurePosixPath() if hard else member.parent
    resolved = os.path.normpath(os.path.join(str(base), link.replace("\\", "/")))
    if resolved == ".." or resolved.startswith("../"):
        raise MediaError(archive, f"member {name!r} links outside the target: {link!r}")


MAX_EXTRACT_RATIO = 100.0  # media barely compress; a much larger ratio is a decompression bomb


def safe_extract(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    max_ratio: float = MAX_EXTRACT_RATIO,
    max_bytes: int | None = None,
) -> list[Path]:
    """Extract a zip or tar(.gz/.bz2/.xz) archive under ``dest``; return the files written.

    Every member is checked before anything is written: absolute names, ``..`` components,
    links that point outside ``dest`` and device/FIFO members raise :class:`MediaError` naming
    the member. While extracting, nothing is written through a symlink that leaves ``dest``.
    The total extracted size is capped at ``max_ratio`` times the archive's size (and at
    ``max_bytes``), checked on the declared sizes first and on the bytes actually written.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise MediaError(archive, "archive not found")
    limit = max(archive.stat().st_size, 1) * max_ratio
    limit = min(limit, max_bytes) if max_bytes is not None else limit
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, dest, limit)
        if tarfile.is_tarfile(archive):
            return _extract_tar(archive, dest, limit)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise MediaError(archive, f"corrupt archive: {exc}") from None
    raise MediaError(archive, "not a zip or tar archive")


def _check_total(archive: Path, total: int, limit: float) -> None:
    if total > limit:
        size = archive.stat().st_size
        raise MediaError(
            archive,
            f"would extract {total:,} bytes from {size:,} (limit {limit:,.0f}: a decompression "
            "bomb?)",
        )


def _extract_zip(archive: Path, dest: Path, limit: float) -> list[Path]:
    written: list[Path] = []
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _check_total(archive, sum(info.file_size for info in infos), limit)
        total = 0
        plan = []
        for info in infos:
            member = _member_path(info.filename, archive)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode) if mode else 0
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                raise MediaError(archive, f"member {info.filename!r} is a device or special file")
            link = None
            if kind == stat.S_IFLNK:
                link = zf.read(info).decode("utf-8", "surrogateescape")
                _check_link(archive, info.filename, member, link, hard=False)
            plan.append((info, member, link))
        for info, member, link in plan:
            target = dest / member
            if not _inside(dest, str(target.parent)):
                raise MediaError(archive, f"member {info.filename!r} would be written via a link")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            if link is not None:
                if not _inside(dest, os.path.join(target.parent, link)):
                    raise MediaError(archive, f"member {info.filename!r} links outside the target")
                os.symlink(link, target)
            else:
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(CHUNK):  # the declared sizes may lie
                        total += len(chunk)
                        _check_total(archive, total, limit)
                        out.write(chunk)
            written.append(target)
    return written


def _extract_tar(archive: Path, dest: Path, limit: float) -> list[Path]:
    written: list[Path] = []
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        _check_total(archive, sum(m.size for m in members if m.isreg()), limit)  # exact in tar
        for m in members:
            member = _member_path(m.name, archive)
            if m.isdev() or not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
                raise MediaError(archive, f"member {m.name!r} is a device or special file")
            if m.issym() or m.islnk():
                _check_link(archive, m.name, member, m.linkname, hard=m.islnk())
        for m in members:
            target = dest / _member_path(m.name, archive)
            if not _inside(dest, str(target.parent)):
                raise MediaError(archive, f"member {m.name!r} would be written via a link")
            try:
                tf.extract(m, dest, filter="data")
            except tarfile.FilterError as exc:
                raise MediaError(archive, f"member {m.name!r} refused: {exc}") from None
            if not m.isdir():
                written.append(target)
    return written


# --------------------------------------------------------------------------- URL lists
