"""An ``s3://bucket/prefix`` mirror of the extracted dataset, synced down with boto3.

A file is fetched only when it is missing locally or differs from the object: same size and ETag as
recorded at the last sync (``.s3-mirror.json`` beside the data, with the local mtime) means skip; a
file the manifest does not know is compared by its MD5 against a single-part ETag. Each download is
atomic (temporary name, then rename).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from components import storage
from components.data.download import file_md5
from components.errors import DataError, StorageError

logger = logging.getLogger(__name__)

MANIFEST = ".s3-mirror.json"
_THREADS = 8


@dataclass(frozen=True)
class MirrorResult:
    downloaded: int
    skipped: int


def mirror_from_s3(uri: str, root: str | Path, progress: bool = True) -> MirrorResult:
    """Sync every object under the ``s3://bucket/prefix`` ``uri`` into ``root`` (same relative paths)."""
    root = Path(root)
    bucket, prefix = storage.split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    objects = _list_objects(bucket, prefix, uri)
    if not objects:
        raise DataError(f"the S3 mirror {uri} is empty: upload the extracted leftImg8bit/ and gtFine/ there")

    manifest_path = root / MANIFEST
    manifest: dict[str, dict[str, Any]] = (
        json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    )
    todo = [obj for obj in objects if not _is_current(root, obj, manifest.get(obj["relative"]))]
    logger.info("S3 mirror %s: %d of %d objects to fetch into %s", uri, len(todo), len(objects), root)

    client = storage.s3_client()

    def fetch(obj: dict[str, Any]) -> None:
        target = root / obj["relative"]
        with storage.atomic_path(target) as tmp:
            storage.s3_call(
                f"download of s3://{bucket}/{obj['key']}", client.download_file, bucket, obj["key"], str(tmp)
            )

    with (
        tqdm(total=len(todo), desc="S3 mirror", unit="file", disable=not progress or not todo) as bar,
        ThreadPoolExecutor(_THREADS) as pool,
    ):
        for _ in pool.map(fetch, todo):
            bar.update()

    manifest = {obj["relative"]: _record(root, obj) for obj in objects}
    with storage.atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return MirrorResult(downloaded=len(todo), skipped=len(objects) - len(todo))


def _list_objects(bucket: str, prefix: str, uri: str) -> list[dict[str, Any]]:
    paginator = storage.s3_client().get_paginator("list_objects_v2")
    pages = storage.s3_call(
        f"listing of {uri}", lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix))
    )
    objects = []
    for page in pages:
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) :]
            if not relative or relative.endswith("/"):
                continue  # folder placeholders
            if Path(relative).is_absolute() or ".." in Path(relative).parts:
                raise StorageError(f"refusing S3 object {item['Key']!r}: its key would escape the data root")
            objects.append(
                {
                    "key": item["Key"],
                    "relative": relative,
                    "size": item["Size"],
                    "etag": item["ETag"].strip('"'),
                }
            )
    return objects


def _is_current(root: Path, obj: dict[str, Any], recorded: dict[str, Any] | None) -> bool:
    path = root / obj["relative"]
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != obj["size"]:
        return False
    if recorded is not None and recorded.get("mtime_ns") == stat.st_mtime_ns:
        return recorded.get("etag") == obj["etag"]
    return "-" not in obj["etag"] and file_md5(path) == obj["etag"]  # multipart ETags are not MD5s


def _record(root: Path, obj: dict[str, Any]) -> dict[str, Any]:
    return {"etag": obj["etag"], "size": obj["size"], "mtime_ns": (root / obj["relative"]).stat().st_mtime_ns}
