"""One download helper for the whole project: resumable, retried, verified, atomic.

Credentials come from environment variables only and never appear in logs or errors:

* ``SOCIALMAE_HTTP_USER`` + ``SOCIALMAE_HTTP_PASSWORD``: HTTP basic auth;
* ``SOCIALMAE_HTTP_TOKEN``: ``Authorization: Bearer <token>`` (wins over basic auth);
* ``SOCIALMAE_HTTP_AUTH_HOSTS`` (optional, comma-separated host names): send credentials only to
  these hosts (default: every host asked). Credentials are never forwarded across redirects.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import Any

from socialmae.data.errors import MediaError

log = logging.getLogger(__name__)

USER_ENV = "SOCIALMAE_HTTP_USER"
PASSWORD_ENV = "SOCIALMAE_HTTP_PASSWORD"
TOKEN_ENV = "SOCIALMAE_HTTP_TOKEN"
AUTH_HOSTS_ENV = "SOCIALMAE_HTTP_AUTH_HOSTS"

CHUNK = 1 << 20
MAX_SLEEP = 60.0
RETRY_STATUS = frozenset({408, 425, 429})  # plus every 5xx except 501


class DownloadError(MediaError):
    """A download that failed for good; ``path`` is the (redacted) URL."""


class _RetryError(Exception):
    """A transient failure: try again after a pause."""


def redact(text: str) -> str:
    """``text`` with URL user info, secret query values and env credentials masked."""
    text = re.sub(r"(?<=://)[^/@\s]+@", "***@", text)
    text = re.sub(
        r"([?&][^=&\s]*(?:token|key|sig|signature|password|passwd|secret|auth)[^=&\s]*=)[^&\s]*",
        r"\1***",
        text,
        flags=re.I,
    )
    for name in (PASSWORD_ENV, TOKEN_ENV, USER_ENV):
        secret = os.environ.get(name)
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def _split_userinfo(url: str) -> tuple[str, str | None]:
    """Strip ``user:password@`` from ``url``; return (clean url, basic auth header or None)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


def auth_header(url: str) -> str | None:
    """The ``Authorization`` value the environment gives for ``url``, or None."""
    hosts = os.environ.get(AUTH_HOSTS_ENV, "").strip()
    if hosts:
        allowed = {h.strip().lower() for h in hosts.split(",") if h.strip()}
        if (urllib.parse.urlsplit(url).hostname or "").lower() not in allowed:
            return None
    token = os.environ.get(TOKEN_ENV)
    if token:
        return f"Bearer {token}"
    user = os.environ.get(USER_ENV)
    if user:
        password = os.environ.get(PASSWORD_ENV, "")
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return None


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _matches(path: Path, sha256: str | None, size: int | None) -> tuple[bool, str]:
    """Whether ``path`` has the expected size and checksum, and what differs if not."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return False, f"expected {size} bytes, got {actual_size}"
    if sha256 is not None:
        actual = sha256_of(path)
        if actual.lower() != sha256.lower():
            return False, f"expected sha256 {sha256.lower()}, got {actual}"
    return True, ""


@contextmanager
def _progress_bar(enabled: bool, name: str) -> Iterator[Any]:
    """A rich progress bar (or a no-op stand-in) with ``start(total)`` / ``advance(n)``."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        yield bar, bar.add_task(name, total=None)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes a-b/total`` -> (a, total); ``bytes */total`` -> (None, total)."""
    if not value:
        return None, None
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _fetch_once(
    url: str,
    part: Path,
    headers: Mapping[str, str],
    auth: str | None,
    size: int | None,
    timeout: float,
    bar: Any,
) -> None:
    """Append the rest of ``url`` to ``part`` (Range from its size); raise _RetryError if cut."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset >= size:
        if offset == size:
            return  # already complete, verification decides
        part.unlink()
        offset = 0
    request = urllib.request.Request(url, headers=dict(headers))
    if auth:
        request.add_unredirected_header("Authorization", auth)  # never follows a redirect
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            _, total = _content_range(exc.headers.get("Content-Range"))
            if total is not None and total == offset:
                return  # the partial file already holds everything
            log.info("%s: range %d- not satisfiable, restarting", redact(url), offset)
            part.unlink(missing_ok=True)
            raise _RetryError("range not satisfiable") from None
        if exc.code in RETRY_STATUS or (exc.code >= 500 and exc.code != 501):
            raise _RetryError(f"HTTP {exc.code}") from None
        raise DownloadError(redact(url), f"HTTP {exc.code} {redact(str(exc.reason))}") from None
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                log.info("%s: server resumed at %s, not %d; restarting", redact(url), start, offset)
                part.unlink(missing_ok=True)
                raise _RetryError("unexpected Content-Range")
            mode = "ab"
            whole = total if total is not None else None
        else:
            if offset:
                log.info("%s: server ignored the Range request; restarting", redact(url))
            mode, offset = "wb", 0
            whole = expected
        if bar is not None:
            progress, task = bar
            progress.update(task, total=whole or size, completed=offset)
        received = 0
        with open(part, mode) as out:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (HTTPException, OSError) as exc:
                    done = offset + received
                    raise _RetryError(f"read failed after {done} bytes: {exc!r}") from None
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar[0].advance(bar[1], len(chunk))
        if expected is not None and received < expected:
            raise _RetryError(f"connection closed after {received} of {expected} bytes")


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    size: int | None = None,
    headers: Mapping[str, str] | None = None,
    retries: int = 5,
    timeout: float = 30,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Fetch ``url`` to ``dest`` and return ``dest``.

    Streams to ``dest + '.part'``, resumes it with a Range request (restarting when the server
    ignores Range), retries connection errors, 5xx and short reads with exponential backoff
    (``backoff * 2**attempt`` seconds), checks ``size``/``sha256`` when given (a mismatch
    re-fetches once, then raises :class:`DownloadError`), then renames atomically. An existing
    ``dest`` that matches the given checksum/size (or any existing ``dest`` when neither is given)
    is kept as is; a ``.part`` file never counts as done.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    shown = redact(url)
    if dest.is_file():
        ok, why = _matches(dest, sha256, size)
        if ok:
            log.debug("%s: already present", dest)
            return dest
        log.warning("%s exists but %s; fetching %s again", dest, why, shown)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_url, url_auth = _split_userinfo(url)
    auth = url_auth or auth_header(clean_url)
    sent = {"User-Agent": "socialmae-download/1"} | dict(headers or {})
    if any(k.lower() == "authorization" for k in sent):
        auth = None  # the caller's header wins; it is sent like any other header
    attempt = 0
    mismatches = 0
    with _progress_bar(progress, dest.name) as bar:
        while True:
            try:
                _fetch_once(clean_url, part, sent, auth, size, timeout, bar)
            except _RetryError as exc:
                reason = str(exc)
            except (urllib.error.URLError, HTTPException, OSError) as exc:
                reason = redact(repr(getattr(exc, "reason", exc)))
            else:
                ok, why = _matches(part, sha256, size)
                if ok:
                    os.replace(part, dest)
                    log.info("downloaded %s -> %s", shown, dest)
                    return dest
                part.unlink(missing_ok=True)
                mismatches += 1
                if mismatches >= 2:
                    raise DownloadError(shown, f"verification failed twice: {why}")
                log.warning("%s: %s; fetching again", shown, why)
                continue
            if attempt >= retries:
                raise DownloadError(shown, f"gave up after {attempt + 1} attempts: {reason}")
            pause = min(MAX_SLEEP, backoff * 2**attempt)
            attempt += 1
            log.warning("%s: %s; retry %d/%d in %.1fs", shown, reason, attempt, retries, pause)
            time.sleep(pause)


# --------------------------------------------------------------------------- archives


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


def safe_extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[Path]:
    """Extract a zip or tar(.gz/.bz2/.xz) archive under ``dest``; return the files written.

    Every member is checked before anything is written: absolute names, ``..`` components,
    links that point outside ``dest`` and device/FIFO members raise :class:`MediaError` naming
    the member. While extracting, nothing is written through a symlink that leaves ``dest``.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise MediaError(archive, "archive not found")
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, dest)
    if tarfile.is_tarfile(archive):
        return _extract_tar(archive, dest)
    raise MediaError(archive, "not a zip or tar archive")


def _extract_zip(archive: Path, dest: Path) -> list[Path]:
    written: list[Path] = []
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
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
                    shutil.copyfileobj(src, out, CHUNK)
            written.append(target)
    return written


def _extract_tar(archive: Path, dest: Path) -> list[Path]:
    written: list[Path] = []
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
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
