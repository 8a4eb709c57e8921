"""One download helper for the whole project: resumable, retried, verified, atomic.

Credentials come from environment variables only and never appear in logs or errors:

* ``SOCIALMAE_HTTP_USER`` + ``SOCIALMAE_HTTP_PASSWORD``: HTTP basic auth;
* ``SOCIALMAE_HTTP_TOKEN``: ``Authorization: Bearer <token>`` (wins over basic auth);
* ``SOCIALMAE_HTTP_AUTH_HOSTS`` (optional, comma-separated host names): send credentials only to
  these hosts (default: every host asked). Credentials are never forwarded across redirects.

Those are the default variable *names*; an :class:`AuthEnv` names others (params.yaml can say
which variables to read, never what they hold).

Archives (``*.zip``, ``*.tar.*``, split ``*_partaa``/``*_partab`` pieces) are fetched from URL
lists and extracted safely (:mod:`socialmae.data.archives`) by :func:`fetch_archives`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.client import HTTPException
from pathlib import Path
from typing import Any

from socialmae.data.archives import safe_extract
from socialmae.data.errors import MediaError
from socialmae.io import atomic_write, atomic_write_text
from socialmae.params import ParamsError

log = logging.getLogger(__name__)

USER_ENV = "SOCIALMAE_HTTP_USER"
PASSWORD_ENV = "SOCIALMAE_HTTP_PASSWORD"
TOKEN_ENV = "SOCIALMAE_HTTP_TOKEN"
AUTH_HOSTS_ENV = "SOCIALMAE_HTTP_AUTH_HOSTS"

CHUNK = 1 << 20
MAX_SLEEP = 60.0
RETRY_STATUS = frozenset({408, 425, 429})  # plus every 5xx except 501
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PART = re.compile(r"^(?P<stem>.+)_part(?P<part>[a-z]{2})$")


@dataclass(frozen=True)
class AuthEnv:
    """Names of the environment variables that hold download credentials (never the values).

    ``token_env`` (Bearer) wins over ``user_env`` + ``password_env`` (basic auth);
    ``hosts_env`` optionally lists the only hosts (comma-separated) that get credentials.
    """

    user_env: str = USER_ENV
    password_env: str = PASSWORD_ENV
    token_env: str = TOKEN_ENV
    hosts_env: str = AUTH_HOSTS_ENV

    def __post_init__(self) -> None:
        for name in ("user_env", "password_env", "token_env", "hosts_env"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _ENV_NAME.match(value):
                raise ParamsError(
                    name, "expected the NAME of an environment variable (letters, digits, _)"
                )

    def secrets(self) -> list[str]:
        """The credential values currently set (to mask them in messages)."""
        names = {self.user_env, self.password_env, self.token_env}
        names |= {USER_ENV, PASSWORD_ENV, TOKEN_ENV}
        return [v for n in sorted(names) if (v := os.environ.get(n)) and len(v) >= 3]


DEFAULT_AUTH = AuthEnv()


class DownloadError(MediaError):
    """A download that failed for good; ``path`` is the (redacted) URL."""


class _RetryError(Exception):
    """A transient failure: try again after a pause."""


def redact(text: str, env: AuthEnv = DEFAULT_AUTH) -> str:
    """``text`` with URL user info, secret query values and env credentials masked."""
    text = re.sub(r"(?<=://)[^/@\s]+@", "***@", text)
    text = re.sub(
        r"([?&][^=&\s]*(?:token|key|sig|signature|password|passwd|secret|auth)[^=&\s]*=)[^&\s]*",
        r"\1***",
        text,
        flags=re.I,
    )
    for secret in env.secrets():
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


def auth_header(url: str, env: AuthEnv = DEFAULT_AUTH) -> str | None:
    """The ``Authorization`` value the environment (variables named by ``env``) gives for
    ``url``, or None."""
    hosts = os.environ.get(env.hosts_env, "").strip()
    if hosts:
        allowed = {h.strip().lower() for h in hosts.split(",") if h.strip()}
        if (urllib.parse.urlsplit(url).hostname or "").lower() not in allowed:
            return None
    token = os.environ.get(env.token_env)
    if token:
        return f"Bearer {token}"
    user = os.environ.get(env.user_env)
    if user:
        password = os.environ.get(env.password_env, "")
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
    env: AuthEnv = DEFAULT_AUTH,
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
            log.info("%s: range %d- not satisfiable, restarting", redact(url, env), offset)
            part.unlink(missing_ok=True)
            raise _RetryError("range not satisfiable") from None
        if exc.code in RETRY_STATUS or (exc.code >= 500 and exc.code != 501):
            raise _RetryError(f"HTTP {exc.code}") from None
        raise DownloadError(
            redact(url, env), f"HTTP {exc.code} {redact(str(exc.reason), env)}"
        ) from None
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                log.info(
                    "%s: server resumed at %s, not %d; restarting", redact(url, env), start, offset
                )
                part.unlink(missing_ok=True)
                raise _RetryError("unexpected Content-Range")
            mode = "ab"
            whole = total if total is not None else None
        else:
            if offset:
                log.info("%s: server ignored the Range request; restarting", redact(url, env))
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
    auth_env: AuthEnv = DEFAULT_AUTH,
) -> Path:
    """Fetch ``url`` to ``dest`` and return ``dest``.

    Streams to ``dest + '.part'``, resumes it with a Range request (restarting when the server
    ignores Range), retries connection errors, 5xx and short reads with exponential backoff
    (``backoff * 2**attempt`` seconds), checks ``size``/``sha256`` when given (a mismatch
    re-fetches once, then raises :class:`DownloadError`), then renames atomically. An existing
    ``dest`` that matches the given checksum/size (or any existing ``dest`` when neither is given)
    is kept as is; a ``.part`` file never counts as done. Credentials come from the environment
    variables ``auth_env`` names (or from ``user:password@`` in the URL).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    shown = redact(url, auth_env)
    if dest.is_file():
        ok, why = _matches(dest, sha256, size)
        if ok:
            log.debug("%s: already present", dest)
            return dest
        log.warning("%s exists but %s; fetching %s again", dest, why, shown)
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_url, url_auth = _split_userinfo(url)
    auth = url_auth or auth_header(clean_url, auth_env)
    sent = {"User-Agent": "socialmae-download/1"} | dict(headers or {})
    if any(k.lower() == "authorization" for k in sent):
        auth = None  # the caller's header wins; it is sent like any other header
    attempt = 0
    mismatches = 0
    with _progress_bar(progress, dest.name) as bar:
        while True:
            try:
                _fetch_once(clean_url, part, sent, auth, size, timeout, bar, auth_env)
            except _RetryError as exc:
                reason = str(exc)
            except (urllib.error.URLError, HTTPException, OSError) as exc:
                reason = redact(repr(getattr(exc, "reason", exc)), auth_env)
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


def read_url_list(source: Sequence[str] | str | os.PathLike[str]) -> list[tuple[str, str | None]]:
    """``(url, sha256 or None)`` pairs from a list, one URL, or a file of ``URL [SHA256]`` lines.

    Blank lines and ``#`` comments are skipped.
    """
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
    auth_env: AuthEnv = DEFAULT_AUTH,
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
            raise MediaError(redact(url, auth_env), "URL names no file")
        match = _PART.match(name)
        group = f"{match['stem']}.zip" if match else name
        if (archive_dir / f"{group}.extracted").exists():
            log.debug("%s already extracted; not fetching %s", group, name)
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
                auth_env=auth_env,
            )
        except DownloadError as exc:
            log.error("cannot fetch %s: %s", exc.path, exc.reason)
            failed.append(exc.path)
            broken.add(group)
            continue
        groups.setdefault(group, []).append(path)
    for group, paths in groups.items():
        if group in broken:
            log.error("%s lacks parts; not extracted", group)
            continue
        archive = paths[0]
        if len(paths) > 1 or _PART.match(paths[0].name):
            archive = archive_dir / group
            atomic_write(archive, partial(_join, sorted(paths, key=lambda p: p.name)))
        files = safe_extract(archive, extract_to)
        atomic_write_text(archive_dir / f"{group}.extracted", f"{len(files)}\n")
        log.info("extracted %d files from %s", len(files), archive.name)
    return failed


def _join(pieces: Sequence[Path], target: Path) -> None:
    """Concatenate ``pieces`` (in order) into ``target``."""
    with open(target, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
