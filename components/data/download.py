"""Cityscapes from cityscapes-dataset.com, with cityscapesscripts' own downloader functions.

cityscapesscripts' ``login()`` would store the password in a plain ``credentials.json``, so the login
POST is done here, from credentials passed in (a Prefect Secret) or ``CITYSCAPES_USERNAME`` /
``CITYSCAPES_PASSWORD``; they are never logged or written. The logged-in session then drives
``get_available_packages`` / ``download_packages`` (resumable, MD5-verified, tqdm progress). Each
verified zip is extracted into a temporary folder beside the dataset, checked for members that would
escape it, and renamed into place; a marker file per package makes a second run a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import requests
from cityscapesscripts.download import downloader

from components.errors import DownloadError

logger = logging.getLogger(__name__)

CITYSCAPES_URL = "https://www.cityscapes-dataset.com"
PACKAGES = ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip")
USERNAME_VARIABLE, PASSWORD_VARIABLE = "CITYSCAPES_USERNAME", "CITYSCAPES_PASSWORD"
DOWNLOAD_DIR = ".downloads"
_TIMEOUT = 60


class _SiteSession(requests.Session):
    """A session that sends cityscapesscripts' hard-coded site URLs to ``base_url`` (a mirror, a test)."""

    def __init__(self, base_url: str) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        url = str(url)
        if url.startswith(CITYSCAPES_URL):
            url = self.base_url + url[len(CITYSCAPES_URL) :]
        kwargs.setdefault("timeout", _TIMEOUT)
        return super().request(method, url, *args, **kwargs)


def credentials_from_env() -> tuple[str, str] | None:
    username, password = os.environ.get(USERNAME_VARIABLE), os.environ.get(PASSWORD_VARIABLE)
    return (username, password) if username and password else None


def download_cityscapes(
    root: str | Path,
    credentials: tuple[str, str] | None = None,
    *,
    base_url: str = CITYSCAPES_URL,
    packages: Sequence[str] = PACKAGES,
) -> Path:
    """Download and extract ``packages`` into ``root`` (leftImg8bit/, gtFine/); returns ``root``.

    Idempotent: packages already extracted are skipped without contacting the site; an interrupted
    download resumes from the partial zip in ``root/.downloads``.
    """
    root = Path(root)
    missing = [name for name in packages if not _marker(root, name).is_file()]
    if not missing:
        logger.info("Cityscapes packages %s already extracted in %s", list(packages), root)
        return root
    credentials = credentials or credentials_from_env()
    if credentials is None:
        raise DownloadError(
            f"downloading Cityscapes needs an account: set {USERNAME_VARIABLE} and {PASSWORD_VARIABLE} "
            "(register at https://www.cityscapes-dataset.com/register/), or use data.source=local / s3"
        )
    downloads = root / DOWNLOAD_DIR
    downloads.mkdir(parents=True, exist_ok=True)
    with _site_errors(base_url), login(credentials, base_url) as session:
        for name in missing:
            archive = downloads / name
            _fetch(session, name, archive)
            extract_zip(archive, root)
            _marker(root, name).write_text(json.dumps({"package": name}))
            archive.unlink()
    return root


@contextlib.contextmanager
def login(credentials: tuple[str, str], base_url: str = CITYSCAPES_URL) -> Iterator[requests.Session]:
    """A session logged in as cityscapesscripts' ``login()`` does, without storing the credentials."""
    username, password = credentials
    with _SiteSession(base_url) as session:
        response = session.get(f"{CITYSCAPES_URL}/login", allow_redirects=False)
        response.raise_for_status()
        response = session.post(
            f"{CITYSCAPES_URL}/login",
            data={"username": username, "password": password, "submit": "Login"},
            allow_redirects=False,
        )
        response.raise_for_status()
        if response.status_code != 302:  # the site redirects after a successful login
            raise DownloadError(
                f"Cityscapes login refused for user {username!r}: check {USERNAME_VARIABLE} / "
                f"{PASSWORD_VARIABLE} (or the Prefect Secret holding them)"
            )
        yield session


def _fetch(session: requests.Session, name: str, archive: Path) -> None:
    """Download (or resume) one package and verify its MD5 with cityscapesscripts' downloader."""
    if archive.is_file() and file_md5(archive) == _expected_md5(session, name):
        logger.info("%s already downloaded and verified", archive)
        return
    logger.info("downloading Cityscapes package %s to %s%s", name, archive, " (resuming)" * archive.is_file())
    try:
        with _log_stdout():
            downloader.download_packages(
                session=session, package_names=[name], destination_path=str(archive.parent), resume=True
            )
    except requests.HTTPError as exc:
        if exc.response is not None and exc.response.status_code == 416:  # local file is not a prefix
            archive.unlink(missing_ok=True)
            raise DownloadError(
                f"{name}: the partial download does not match the server's; deleted, run again"
            ) from None
        raise  # reported by _site_errors
    except requests.RequestException:
        raise  # network trouble: reported by _site_errors; the partial file stays for resuming
    except Exception as exc:  # cityscapesscripts raises bare Exceptions (MD5, unknown package)
        if "MD5" in str(exc):
            archive.unlink(missing_ok=True)
            raise DownloadError(
                f"{name}: MD5 checksum mismatch after download; the file was deleted, run again"
            ) from None
        raise DownloadError(f"{name}: {exc}") from None


def _expected_md5(session: requests.Session, name: str) -> str:
    package_ids = {p["name"]: p["packageID"] for p in downloader.get_available_packages(session=session)}
    if name not in package_ids:
        raise DownloadError(f"package {name} is not available to this Cityscapes account")
    response = session.get(f"{CITYSCAPES_URL}/md5-sum/?packageID={package_ids[name]}", allow_redirects=False)
    response.raise_for_status()
    return response.text.split()[0]


def extract_zip(archive: Path, root: Path) -> None:
    """Unzip into a temporary folder beside ``root``'s contents, then rename each top-level entry in."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
            try:
                for member in members:
                    target = (staging / member.filename).resolve()
                    if not target.is_relative_to(staging.resolve()):
                        raise DownloadError(
                            f"{archive}: member {member.filename!r} would be written outside {root} "
                            "(path traversal); the archive is refused, delete it"
                        )
                bundle.extractall(staging)
                for entry in sorted(staging.iterdir()):
                    _replace(entry, root / entry.name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as exc:
        archive.unlink(missing_ok=True)
        raise DownloadError(f"{archive} is not a valid zip ({exc}); it was deleted, run again") from None


def _replace(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, merging into an existing directory one entry at a time."""
    if source.is_dir() and target.is_dir():
        for child in sorted(source.iterdir()):
            _replace(child, target / child.name)
        return
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(source, target)


def _marker(root: Path, package: str) -> Path:
    return root / f".{package}.extracted"


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _site_errors(base_url: str) -> Iterator[None]:
    try:
        yield
    except requests.ConnectionError:
        raise DownloadError(
            f"cannot reach {base_url}: check the network or use data.source=local / s3 "
            "(a partial download resumes on the next run)"
        ) from None
    except requests.RequestException as exc:
        raise DownloadError(
            f"download from {base_url} failed ({type(exc).__name__}: {exc}); run again to resume"
        ) from None


@contextlib.contextmanager
def _log_stdout() -> Iterator[None]:
    """cityscapesscripts print()s its progress messages; route them to the log instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            logger.info("cityscapesscripts: %s", line)
