"""``socialmae.data.download`` against a real HTTP server on 127.0.0.1 with scripted faults."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import math
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from socialmae.data.archives import safe_extract
from socialmae.data.download import AuthEnv, DownloadError, download
from socialmae.data.errors import MediaError
from socialmae.params import ParamsError


@dataclass
class FileServer:
    """Serves ``files`` (URL path -> bytes) with Range support and scripted faults.

    ``cut_after[path] = n``: the next response for ``path`` stops after ``n`` body bytes.
    ``corrupt_once``: paths whose next full response has flipped bytes.
    ``fail_times[path] = k``: the next ``k`` requests for ``path`` get a 503.
    ``ignore_range``: answer every request with the whole file (200).
    ``requests``: (path, Range header, Authorization header) per request, in order.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)
    corrupt_once: set[str] = field(default_factory=set)
    fail_times: dict[str, int] = field(default_factory=dict)
    ignore_range: bool = False
    requests: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str) -> int:
        return sum(1 for p, _, _ in self.requests if p == path)


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            state.requests.append(
                (path, self.headers.get("Range"), self.headers.get("Authorization"))
            )
            if state.fail_times.get(path, 0) > 0:
                state.fail_times[path] -= 1
                self.send_error(503, "try later")
                return
            if path not in state.files:
                self.send_error(404, "no such file")
                return
            body = state.files[path]
            start = 0
            wanted = self.headers.get("Range")
            if wanted and not state.ignore_range:
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
                if path in state.corrupt_once:
                    state.corrupt_once.discard(path)
                    body = bytes(b ^ 0xFF for b in body)
            payload = body[start:]
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if path in state.cut_after:
                payload = payload[: state.cut_after.pop(path)]
            self.wfile.write(payload)
            self.wfile.flush()

    return Handler


@contextmanager
def serve_files() -> Iterator[FileServer]:
    """A ThreadingHTTPServer on a random 127.0.0.1 port, running in a thread."""
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def server() -> Iterator[FileServer]:
    with serve_files() as state:
        yield state


def _blob(n: int = 200_000, seed: int = 0) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}-{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FAST = {"backoff": 0.0, "progress": False, "timeout": 5}


def test_plain_download_verified_and_atomic(server: FileServer, tmp_path: Path) -> None:
    data = _blob()
    server.files["/a.bin"] = data
    dest = tmp_path / "sub" / "a.bin"
    got = download(server.url("/a.bin"), dest, sha256=_sha(data), size=len(data), **FAST)
    assert got == dest and dest.read_bytes() == data
    assert not dest.with_name("a.bin.part").exists()
    # A present file with the right checksum is done: no new request.
    download(server.url("/a.bin"), dest, sha256=_sha(data), **FAST)
    assert server.count("/a.bin") == 1


def test_interrupted_transfer_resumes_with_range(server: FileServer, tmp_path: Path) -> None:
    data = _blob()
    server.files["/v.flv"] = data
    server.cut_after["/v.flv"] = 70_000
    dest = tmp_path / "v.flv"
    download(server.url("/v.flv"), dest, sha256=_sha(data), **FAST)
    assert dest.read_bytes() == data
    ranges = [r for p, r, _ in server.requests if p == "/v.flv"]
    assert ranges == [None, "bytes=70000-"]


def test_resume_without_checksum_still_completes(server: FileServer, tmp_path: Path) -> None:
    data = _blob(50_000, seed=3)
    server.files["/x"] = data
    server.cut_after["/x"] = 1_234
    dest = tmp_path / "x"
    download(server.url("/x"), dest, **FAST)
    assert dest.read_bytes() == data


def test_corrupt_bytes_detected_and_refetched(server: FileServer, tmp_path: Path) -> None:
    data = _blob()
    server.files["/c.bin"] = data
    server.corrupt_once.add("/c.bin")
    dest = tmp_path / "c.bin"
    download(server.url("/c.bin"), dest, sha256=_sha(data), **FAST)
    assert dest.read_bytes() == data
    assert server.count("/c.bin") == 2


def test_persistent_mismatch_fails_clearly(server: FileServer, tmp_path: Path) -> None:
    data = _blob(10_000)
    server.files["/m.bin"] = data
    dest = tmp_path / "m.bin"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        download(server.url("/m.bin"), dest, sha256=wrong, **FAST)
    message = str(info.value)
    assert server.url("/m.bin") in message and wrong in message and _sha(data) in message
    assert not dest.exists() and not dest.with_name("m.bin.part").exists()
    with pytest.raises(DownloadError, match="expected 9999 bytes, got 10000"):
        download(server.url("/m.bin"), dest, size=9_999, **FAST)


def test_503_is_retried_then_gives_up(server: FileServer, tmp_path: Path) -> None:
    data = _blob(5_000)
    server.files["/r.bin"] = data
    server.fail_times["/r.bin"] = 3
    download(server.url("/r.bin"), tmp_path / "r.bin", retries=5, **FAST)
    assert (tmp_path / "r.bin").read_bytes() == data
    assert server.count("/r.bin") == 4

    server.fail_times["/r.bin"] = 10
    with pytest.raises(DownloadError, match="gave up after 3 attempts"):
        download(server.url("/r.bin"), tmp_path / "r2.bin", retries=2, **FAST)


def test_404_fails_at_once(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("/nope"), tmp_path / "nope", retries=5, **FAST)
    assert server.count("/nope") == 1


def test_server_ignoring_range_restarts(server: FileServer, tmp_path: Path) -> None:
    data = _blob(30_000)
    server.files["/i.bin"] = data
    server.ignore_range = True
    dest = tmp_path / "i.bin"
    dest.with_name("i.bin.part").write_bytes(b"garbage" * 100)  # not even a prefix
    download(server.url("/i.bin"), dest, sha256=_sha(data), **FAST)
    assert dest.read_bytes() == data
    assert server.requests[0][1] == "bytes=700-"


def test_partial_file_never_counts_as_done(server: FileServer, tmp_path: Path) -> None:
    data = _blob(40_000)
    server.files["/p.bin"] = data
    dest = tmp_path / "p.bin"
    dest.with_name("p.bin.part").write_bytes(data[:10_000])
    assert not dest.exists()
    download(server.url("/p.bin"), dest, **FAST)
    assert dest.read_bytes() == data
    assert server.requests == [("/p.bin", "bytes=10000-", None)]
    # A complete-looking .part is still checked with the server, then verified.
    dest.unlink()
    dest.with_name("p.bin.part").write_bytes(data)
    download(server.url("/p.bin"), dest, sha256=_sha(data), **FAST)
    assert dest.read_bytes() == data and server.count("/p.bin") == 2


def test_existing_dest_with_wrong_checksum_is_replaced(server: FileServer, tmp_path: Path) -> None:
    data = _blob(8_000)
    server.files["/d.bin"] = data
    dest = tmp_path / "d.bin"
    dest.write_bytes(b"stale")
    download(server.url("/d.bin"), dest, sha256=_sha(data), **FAST)
    assert dest.read_bytes() == data


def test_credentials_from_env_are_sent_but_never_shown(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "hunter2-very-secret"
    monkeypatch.setenv("SOCIALMAE_HTTP_USER", "alice")
    monkeypatch.setenv("SOCIALMAE_HTTP_PASSWORD", secret)
    monkeypatch.delenv("SOCIALMAE_HTTP_TOKEN", raising=False)
    monkeypatch.delenv("SOCIALMAE_HTTP_AUTH_HOSTS", raising=False)
    server.files["/s.bin"] = b"private"
    download(server.url("/s.bin"), tmp_path / "s.bin", **FAST)
    sent = server.requests[-1][2]
    assert sent == "Basic " + base64.b64encode(f"alice:{secret}".encode()).decode()

    server.fail_times["/s2.bin"] = 5
    with pytest.raises(DownloadError) as info:
        download(server.url("/s2.bin?token=abc123xyz"), tmp_path / "s2.bin", retries=1, **FAST)
    with pytest.raises(DownloadError) as info404:
        download(f"http://bob:{secret}@127.0.0.1:{server.port}/none", tmp_path / "n", **FAST)
    assert server.requests[-1][2].startswith("Basic ")  # URL user info becomes basic auth
    shown = str(info.value) + str(info404.value) + caplog.text
    assert secret not in shown and "abc123xyz" not in shown
    assert base64.b64encode(f"alice:{secret}".encode()).decode() not in shown

    monkeypatch.setenv("SOCIALMAE_HTTP_TOKEN", "tok-456-secret")
    download(server.url("/s.bin"), tmp_path / "t.bin", **FAST)
    assert server.requests[-1][2] == "Bearer tok-456-secret"
    assert "tok-456-secret" not in caplog.text

    monkeypatch.setenv("SOCIALMAE_HTTP_AUTH_HOSTS", "example.org")
    download(server.url("/s.bin"), tmp_path / "u.bin", **FAST)
    assert server.requests[-1][2] is None


def test_credentials_from_env_variables_named_by_the_caller(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("SOCIALMAE_HTTP_USER", "SOCIALMAE_HTTP_TOKEN", "SOCIALMAE_HTTP_AUTH_HOSTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LAB_TOKEN", "lab-token-secret")
    monkeypatch.setenv("LAB_HOSTS", "127.0.0.1")
    env = AuthEnv(token_env="LAB_TOKEN", hosts_env="LAB_HOSTS")
    server.files["/x.bin"] = b"x"
    download(server.url("/x.bin"), tmp_path / "x.bin", auth_env=env, **FAST)
    assert server.requests[-1][2] == "Bearer lab-token-secret"
    download(server.url("/x.bin"), tmp_path / "y.bin", **FAST)  # the defaults are unset
    assert server.requests[-1][2] is None

    server.fail_times["/f.bin"] = 3
    with pytest.raises(DownloadError) as info:
        download(server.url("/f.bin?k=lab-token-secret"), tmp_path / "f", retries=0,
                 auth_env=env, **FAST)  # fmt: skip
    assert "lab-token-secret" not in str(info.value) + caplog.text

    monkeypatch.setenv("LAB_HOSTS", "example.org")
    download(server.url("/x.bin"), tmp_path / "z.bin", auth_env=env, **FAST)
    assert server.requests[-1][2] is None
    with pytest.raises(ParamsError) as bad:
        AuthEnv(token_env="hunter2 is my token")
    assert bad.value.key == "token_env" and "hunter2" not in str(bad.value)


def test_progress_bar_runs(server: FileServer, tmp_path: Path) -> None:
    server.files["/b.bin"] = _blob(3_000)
    download(server.url("/b.bin"), tmp_path / "b.bin", backoff=0.0, progress=True)
    assert (tmp_path / "b.bin").stat().st_size == 3_000


# --------------------------------------------------------------------------- archives


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


def test_good_archives_are_extracted(tmp_path: Path) -> None:
    tar = _tar(
        tmp_path / "ok.tar.gz",
        [
            (_info("dev/mp4/id001", tarfile.DIRTYPE), None),
            (_info("dev/mp4/id001/a.mp4"), b"video-a"),
            (_info("dev/mp4/id001/b.mp4"), b"video-b"),
            (_info("dev/latest.mp4", tarfile.SYMTYPE, "mp4/id001/a.mp4"), None),
        ],
    )
    out = tmp_path / "out"
    files = safe_extract(tar, out)
    assert (out / "dev/mp4/id001/b.mp4").read_bytes() == b"video-b"
    assert (out / "dev/latest.mp4").read_bytes() == b"video-a"
    assert sorted(p.relative_to(out).as_posix() for p in files) == [
        "dev/latest.mp4",
        "dev/mp4/id001/a.mp4",
        "dev/mp4/id001/b.mp4",
    ]
    zpath = tmp_path / "ok.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("annotations/annotation_training.pkl", b"pkl")
        zf.writestr("videos/x.mp4", b"mp4")
    zfiles = safe_extract(zpath, tmp_path / "zout")
    assert (tmp_path / "zout/videos/x.mp4").read_bytes() == b"mp4"
    assert len(zfiles) == 2


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_decompression_bombs_are_refused_before_writing(tmp_path: Path, kind: str) -> None:
    """A 200 KB archive of 200 MB of zeros: refused on its declared sizes, nothing written."""
    payload = bytes(200 * 2**20)
    if kind == "zip":
        bomb = tmp_path / "bomb.zip"
        with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("videos/zeros.mp4", payload)
    else:
        bomb = _tar(tmp_path / "bomb.tar.gz", [(_info("videos/zeros.mp4"), payload)])
    assert bomb.stat().st_size < 2**20
    with pytest.raises(MediaError, match="decompression bomb"):
        safe_extract(bomb, tmp_path / "out")
    assert not any((tmp_path / "out").rglob("*.mp4"))
    files = safe_extract(bomb, tmp_path / "out", max_ratio=math.inf)  # trusted: allowed
    assert files[0].stat().st_size == len(payload)


def test_a_zip_that_lies_about_its_sizes_is_stopped_while_extracting(tmp_path: Path) -> None:
    bomb = tmp_path / "liar.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.mp4", bytes(50 * 2**20))
    data = bytearray(bomb.read_bytes())
    # rewrite the declared uncompressed size (local header and central directory) to 10 bytes
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature) + offset
        data[at : at + 4] = (10).to_bytes(4, "little")
    bomb.write_bytes(bytes(data))
    with pytest.raises(MediaError):
        safe_extract(bomb, tmp_path / "out")


@pytest.mark.parametrize(
    ("member", "fragment"),
    [
        ((_info("../evil.txt"), b"x"), "'../evil.txt'"),
        ((_info("ok/../../evil.txt"), b"x"), "'ok/../../evil.txt'"),
        ((_info("/etc/evil.txt"), b"x"), "'/etc/evil.txt'"),
        ((_info("link", tarfile.SYMTYPE, "../../outside"), None), "'link'"),
        ((_info("abs", tarfile.SYMTYPE, "/etc/passwd"), None), "'abs'"),
        ((_info("hard", tarfile.LNKTYPE, "../secret"), None), "'hard'"),
        ((_info("tty", tarfile.CHRTYPE), None), "'tty'"),
        ((_info("fifo", tarfile.FIFOTYPE), None), "'fifo'"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path: Path, member, fragment: str) -> None:
    tar = _tar(tmp_path / "bad.tar.gz", [(_info("fine.txt"), b"fine"), member])
    out = tmp_path / "out"
    with pytest.raises(MediaError) as info:
        safe_extract(tar, out)
    assert fragment in str(info.value)
    assert not (out / "fine.txt").exists()  # nothing written before the whole check
    assert not (tmp_path / "evil.txt").exists()


def test_unsafe_zip_members_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../../evil.txt", b"x")
    with pytest.raises(MediaError, match=r"evil\.txt"):
        safe_extract(bad, tmp_path / "out")

    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("escape")
        info.external_attr = (0o120777 << 16) | 0x10
        zf.writestr(info, "../../../etc")
    with pytest.raises(MediaError, match="escape"):
        safe_extract(link, tmp_path / "out2")
    assert not os.path.lexists(tmp_path / "out2" / "escape")


def test_tar_link_chain_cannot_escape(tmp_path: Path) -> None:
    # "d/e/up" points two levels up (inside); "d/out" then goes through it one more level.
    tar = _tar(
        tmp_path / "chain.tar",
        [
            (_info("d/e/up", tarfile.SYMTYPE, "../.."), None),
            (_info("d/out", tarfile.SYMTYPE, "e/up/.."), None),
        ],
    )
    with pytest.raises(MediaError, match="d/out"):
        safe_extract(tar, tmp_path / "out")


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"nothing here")
    with pytest.raises(MediaError, match="not a zip or tar"):
        safe_extract(junk, tmp_path / "out")
