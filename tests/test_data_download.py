"""The download path end to end against a local stand-in for cityscapes-dataset.com."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from components.data.download import PACKAGES, download_cityscapes, extract_zip
from components.errors import DownloadError
from tests.s3server import free_port

USERNAME, PASSWORD = "tester@example.org", "s3cr3t-Pa55-sentinel"


@dataclass
class Site:
    """What the fake site serves and what it saw."""

    packages: dict[str, bytes]
    md5_override: dict[str, str] = field(default_factory=dict)
    cut_once: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    url: str = ""

    def ids(self) -> dict[str, str]:
        return {name: str(index) for index, name in enumerate(sorted(self.packages), start=1)}

    def by_id(self, package_id: str) -> str:
        return {value: key for key, value in self.ids().items()}[package_id]


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep the test output quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            site.requests.append(("POST", self.path, None))
            form = parse_qs(body)
            if self.path == "/login" and form == {
                "username": [USERNAME],
                "password": [PASSWORD],
                "submit": ["Login"],
            }:
                self._send(302, headers={"Location": "/", "Set-Cookie": "session=ok; Path=/"})
            else:
                self._send(200, b"<html>login failed</html>")

        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query, keep_blank_values=True)
            site.requests.append(("GET", url.path, self.headers.get("Range")))
            if url.path == "/login":
                return self._send(200, b"<html>login form</html>")
            if "session=ok" not in (self.headers.get("Cookie") or ""):
                return self._send(403, b"not logged in")
            if url.path == "/downloads/" and "list" in query:
                listing = [
                    {
                        "name": name,
                        "packageID": package_id,
                        "size": f"{len(site.packages[name]) / 1024:.1f}KB",
                        "thirdparty": "0",
                    }
                    for name, package_id in site.ids().items()
                ]
                return self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"})
            name = site.by_id(query["packageID"][0])
            data = site.packages[name]
            if url.path == "/md5-sum/":
                md5 = site.md5_override.get(name, hashlib.md5(data).hexdigest())
                return self._send(200, f"{md5}  {name}\n".encode())
            if url.path == "/file-handling/":
                start = (
                    int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    if self.headers.get("Range")
                    else 0
                )
                if start >= len(data):
                    return self._send(416)
                status = 206 if start else 200
                headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
                if name in site.cut_once:  # announce everything, send half, hang up
                    site.cut_once.discard(name)
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data) - start))
                    self.end_headers()
                    self.wfile.write(data[start : start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return None
                return self._send(status, data[start:], headers)
            return self._send(404)

    return Handler


def _zip_of(root: Path, top: str, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as bundle:
        for path in sorted((root / top).rglob("*")):
            if path.is_file():
                bundle.write(path, path.relative_to(root).as_posix())
        for name, content in (extra or {}).items():
            bundle.writestr(name, content)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def packages(synthetic_root: Path) -> dict[str, bytes]:
    license_text = {"license.txt": b"synthetic test data"}
    return {
        "gtFine_trainvaltest.zip": _zip_of(synthetic_root, "gtFine", license_text),
        "leftImg8bit_trainvaltest.zip": _zip_of(synthetic_root, "leftImg8bit", license_text),
    }


@pytest.fixture
def site(packages: dict[str, bytes]) -> Iterator[Site]:
    state = Site(packages=dict(packages))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _all_bytes(root: Path) -> Iterator[tuple[Path, bytes]]:
    for path in root.rglob("*"):
        if path.is_file():
            yield path, path.read_bytes()


def test_download_resumes_verifies_extracts_and_then_skips(
    site: Site, synthetic_root: Path, tmp_path: Path, caplog, capsys
) -> None:
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "cityscapes"
    site.cut_once = {"leftImg8bit_trainvaltest.zip"}

    with pytest.raises(DownloadError, match="run again to resume"):
        download_cityscapes(root, (USERNAME, PASSWORD), base_url=site.url)
    partial = root / ".downloads" / "leftImg8bit_trainvaltest.zip"
    size = len(site.packages["leftImg8bit_trainvaltest.zip"])
    resumed_from = partial.stat().st_size
    assert 0 < resumed_from < size
    assert (root / "gtFine").is_dir() and not (root / "leftImg8bit").exists()

    site.requests.clear()
    assert download_cityscapes(root, (USERNAME, PASSWORD), base_url=site.url) == root
    file_requests = [rng for method, path, rng in site.requests if path == "/file-handling/"]
    assert file_requests == [f"bytes={resumed_from}-"], "the second call must resume with a Range request"
    for pattern in ("leftImg8bit/*/*/*.png", "gtFine/*/*/*"):
        source = {p.relative_to(synthetic_root): p.read_bytes() for p in synthetic_root.glob(pattern)}
        assert source and {p.relative_to(root): p.read_bytes() for p in root.glob(pattern)} == source
    assert not list((root / ".downloads").iterdir()), "verified archives are removed after extraction"

    site.requests.clear()
    download_cityscapes(root, (USERNAME, PASSWORD), base_url=site.url)
    assert site.requests == [], "a complete dataset must not touch the network"

    captured = capsys.readouterr()
    for text in (caplog.text, captured.out, captured.err):
        assert PASSWORD not in text
    for path, content in _all_bytes(tmp_path):
        assert PASSWORD.encode() not in content, path


def test_wrong_md5_is_rejected_and_nothing_extracted(site: Site, tmp_path: Path) -> None:
    site.md5_override["gtFine_trainvaltest.zip"] = "0" * 32
    with pytest.raises(DownloadError, match="MD5"):
        download_cityscapes(
            tmp_path, (USERNAME, PASSWORD), base_url=site.url, packages=["gtFine_trainvaltest.zip"]
        )
    assert not (tmp_path / "gtFine").exists()
    assert not (tmp_path / ".downloads" / "gtFine_trainvaltest.zip").exists()


def test_bad_credentials_are_a_clear_error(site: Site, tmp_path: Path, caplog, capsys) -> None:
    wrong = "wrong-" + PASSWORD
    with pytest.raises(DownloadError, match=r"login refused .*CITYSCAPES_USERNAME") as error:
        download_cityscapes(tmp_path, (USERNAME, wrong), base_url=site.url)
    assert wrong not in str(error.value) and wrong not in caplog.text + "".join(capsys.readouterr())
    assert [path for _, path, _ in site.requests] == ["/login", "/login"]


def test_missing_credentials_say_which_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    monkeypatch.delenv("CITYSCAPES_PASSWORD", raising=False)
    with pytest.raises(DownloadError, match="CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD"):
        download_cityscapes(tmp_path, base_url="http://127.0.0.1:9")


def test_credentials_from_environment(site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYSCAPES_USERNAME", USERNAME)
    monkeypatch.setenv("CITYSCAPES_PASSWORD", PASSWORD)
    download_cityscapes(tmp_path, base_url=site.url, packages=["gtFine_trainvaltest.zip"])
    assert (tmp_path / ".gtFine_trainvaltest.zip.extracted").is_file()
    assert len(list(tmp_path.glob("gtFine/*/*/*_polygons.json"))) == 12


def test_offline_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"cannot reach .*data\.source=local / s3"):
        download_cityscapes(tmp_path, (USERNAME, PASSWORD), base_url=f"http://127.0.0.1:{free_port()}")


def test_zip_member_escaping_the_target_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("gtFine/fine.txt", b"ok")
        bundle.writestr("../evil", b"gotcha")
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match=r"'\.\./evil'.*path traversal"):
        extract_zip(archive, root)
    assert not (tmp_path / "evil").exists()
    assert list(root.iterdir()) == [], "nothing may be extracted from a refused archive"


def test_default_packages_are_the_fine_annotations_and_images() -> None:
    assert PACKAGES == ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip")
