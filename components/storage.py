"""Local paths and ``s3://`` URIs behind one small API; every write is atomic (temp file + rename).

S3 settings come from the standard AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``) plus an endpoint for S3-compatible stores (the local stack's SeaweedFS, MinIO, ...)
(``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL``, first one set wins).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from components.errors import StorageError

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    if not is_s3(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; expected s3://bucket/prefix")
    return bucket, key


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(base, *parts))


def s3_endpoint_url() -> str | None:
    return next((os.environ[name] for name in ENDPOINT_VARIABLES if os.environ.get(name)), None)


def s3_client() -> Any:
    """A boto3 S3 client for the configured endpoint (credentials from the usual AWS chain); a new one
    whenever the endpoint or the keys in the environment change (rotation in a long-lived worker)."""
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    # The cache key holds a digest of the secret, never the secret itself.
    fingerprint = hashlib.sha256(secret.encode()).hexdigest()
    return _cached_client(s3_endpoint_url(), os.environ.get("AWS_ACCESS_KEY_ID"), fingerprint)


@cache
def _cached_client(endpoint_url: str | None, _access_key_id: str | None, _secret_digest: str) -> Any:
    import boto3

    # A fresh session: boto3's default one keeps the credentials it resolved first.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_call(f"upload to {uri}", s3_client().put_object, Bucket=bucket, Key=key, Body=data)
        return
    with atomic_path(uri) as tmp:
        tmp.write_bytes(data)


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        response = s3_call(f"download of {uri}", s3_client().get_object, Bucket=bucket, Key=key)
        return response["Body"].read()
    path = Path(uri)
    if not path.is_file():
        raise StorageError(f"{path} does not exist")
    return path.read_bytes()


def exists(uri: str | os.PathLike[str]) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        from botocore.exceptions import ClientError

        try:
            s3_client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot check {uri}: {exc}") from None
        return True
    return Path(uri).exists()


def list_names(prefix_uri: str | os.PathLike[str]) -> list[str]:
    """Names of the files directly under a local directory or an s3:// prefix (sorted)."""
    if is_s3(prefix_uri):
        bucket, key = split_s3(str(prefix_uri))
        key = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        names = []
        for page in s3_call(
            f"listing of {prefix_uri}",
            lambda: list(paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/")),
        ):
            names.extend(obj["Key"][len(key) :] for obj in page.get("Contents", []))
        return sorted(names)
    directory = Path(prefix_uri)
    return sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


def list_tree(prefix_uri: str | os.PathLike[str], start: str = "") -> list[str]:
    """Relative names (``/``-separated, sorted) of the files at any depth under a local directory or an
    s3:// prefix whose relative name starts with ``start``. ``start`` narrows the listing itself (the S3
    key prefix, the folders walked): listing ``manifest.`` beside millions of output PNGs stays cheap."""
    if is_s3(prefix_uri):
        bucket, key = split_s3(str(prefix_uri))
        key = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        pages = s3_call(
            f"listing of {prefix_uri}", lambda: list(paginator.paginate(Bucket=bucket, Prefix=key + start))
        )
        return sorted(obj["Key"][len(key) :] for page in pages for obj in page.get("Contents", []))
    root = Path(prefix_uri)
    names = []
    for folder, folders, files in os.walk(root):
        relative = Path(folder).relative_to(root).as_posix()
        relative = "" if relative == "." else relative + "/"
        # Walk only folders that can hold a match (a/ for start a/b, or any folder below start).
        folders[:] = [
            name
            for name in folders
            if (relative + name + "/").startswith(start) or start.startswith(relative + name + "/")
        ]
        names.extend(relative + name for name in files if (relative + name).startswith(start))
    return sorted(names)


def append_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Append ``data`` to a local file in one write, then fsync it (and, for a new file, its folder): after a
    crash the file holds every completed append, at most a torn tail of the last one. S3 objects cannot be
    appended to (write one object per append instead)."""
    if is_s3(path):
        raise StorageError(f"cannot append to {path}: S3 objects are written whole")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    created = not target.exists()
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # One write(2) with O_APPEND: two writers of one file never interleave within an append.
        written = os.write(fd, data)
        if written != len(data):
            raise StorageError(f"short write to {target}: {written} of {len(data)} bytes (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


DELETE_BATCH = 1000
"""The most keys one S3 DeleteObjects call takes."""


def delete_many(uris: list[str]) -> None:
    """Delete local files and S3 objects; S3 keys go in DeleteObjects calls of up to 1000 per bucket."""
    keys: dict[str, list[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            keys.setdefault(bucket, []).append(key)
        else:
            Path(uri).unlink(missing_ok=True)
    for bucket, names in keys.items():
        for first in range(0, len(names), DELETE_BATCH):
            chunk = names[first : first + DELETE_BATCH]
            response = s3_call(
                f"delete of {len(chunk)} objects in s3://{bucket}",
                s3_client().delete_objects,
                Bucket=bucket,
                Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True},
            )
            if response.get("Errors"):
                error = response["Errors"][0]
                raise StorageError(
                    f"S3 delete of {len(response['Errors'])} of {len(chunk)} objects in s3://{bucket} "
                    f"failed; first: {error.get('Key')}: {error.get('Code')} {error.get('Message')}"
                )


def delete(uri: str | os.PathLike[str]) -> None:
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_call(f"delete of {uri}", s3_client().delete_object, Bucket=bucket, Key=key)
    else:
        Path(uri).unlink(missing_ok=True)


def copy_to_local(uri: str | os.PathLike[str], local: str | os.PathLike[str]) -> Path:
    """Fetch a file (local or s3://) to a local path, atomically."""
    target = Path(local)
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        with atomic_path(target) as tmp:
            s3_call(f"download of {uri}", s3_client().download_file, bucket, key, str(tmp))
    elif Path(uri).resolve() != target.resolve():
        with atomic_path(target) as tmp:
            shutil.copyfile(uri, tmp)
    return target


def upload(local: str | os.PathLike[str], uri: str | os.PathLike[str]) -> str:
    """Put a local file at a local path or s3:// URI (atomically for local targets)."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        s3_call(f"upload to {uri}", s3_client().upload_file, str(local), bucket, key)
    else:
        copy_to_local(local, uri)
    return str(uri)


def s3_call(what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return function(*args, **kwargs)
    except (BotoCoreError, ClientError) as exc:
        endpoint = s3_endpoint_url() or "AWS default endpoint"
        raise StorageError(
            f"S3 {what} failed ({endpoint}): {exc}. Check the bucket, the endpoint "
            f"({'/'.join(ENDPOINT_VARIABLES)}) and the AWS credentials."
        ) from None
