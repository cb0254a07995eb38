"""The s3:// mirror source against a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from components import storage
from components.config import DataConfig
from components.data.mirror import MANIFEST, mirror_from_s3
from components.data.prepare import dataset_fingerprint, prepare_dataset
from components.errors import DataError

BUCKET, PREFIX = "datasets", "mirror/cityscapes"


def _upload(root: Path) -> int:
    client = storage.s3_client()
    files = [p for name in ("leftImg8bit", "gtFine") for p in sorted((root / name).rglob("*")) if p.is_file()]
    for path in files:
        client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.relative_to(root).as_posix()}")
    return len(files)


@pytest.mark.slow
def test_mirror_syncs_down_skips_unchanged_and_refetches_changed(
    s3_endpoint: str, synthetic_root: Path, tmp_path: Path
) -> None:
    storage.s3_client().create_bucket(Bucket=BUCKET)
    uri = f"s3://{BUCKET}/{PREFIX}"
    count = _upload(synthetic_root)
    local = tmp_path / "local"

    first = mirror_from_s3(uri, local, progress=False)
    assert (first.downloaded, first.skipped) == (count, 0)
    for path in local.rglob("*.png"):
        assert path.read_bytes() == (synthetic_root / path.relative_to(local)).read_bytes()

    second = mirror_from_s3(uri, local, progress=False)
    assert (second.downloaded, second.skipped) == (0, count)

    # Same size, new content: only the ETag tells, and only that object is fetched again.
    changed = sorted(local.glob("gtFine/val/*/*_polygons.json"))[0]
    new_content = changed.read_bytes().replace(b'"label"', b'"LABEL"', 1)
    assert len(new_content) == changed.stat().st_size
    key = f"{PREFIX}/{changed.relative_to(local).as_posix()}"
    storage.s3_client().put_object(Bucket=BUCKET, Key=key, Body=new_content)
    third = mirror_from_s3(uri, local, progress=False)
    assert (third.downloaded, third.skipped) == (1, count - 1)
    assert changed.read_bytes() == new_content

    # Without the manifest, identical local files are recognised by their MD5 (single-part ETag).
    (local / MANIFEST).unlink()
    fourth = mirror_from_s3(uri, local, progress=False)
    assert (fourth.downloaded, fourth.skipped) == (0, count)
    assert not list(local.rglob("*.tmp"))

    # The s3 source of prepare_dataset: mirror, trainIds (already there), validation, fingerprint.
    storage.s3_client().put_object(
        Bucket=BUCKET, Key=key, Body=changed.read_bytes().replace(b"LABEL", b"label")
    )
    prepared = prepare_dataset(DataConfig(source="s3", uri=uri, root=str(tmp_path / "prepared")))
    assert prepared.fingerprint == dataset_fingerprint(synthetic_root)

    with pytest.raises(DataError, match="is empty"):
        mirror_from_s3(f"s3://{BUCKET}/nothing-here", tmp_path / "empty", progress=False)
