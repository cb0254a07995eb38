"""One call from a DataConfig to a validated dataset root with trainId labels, and its fingerprint.

Sources: ``synthetic`` (generated into data.root, regenerated only when its settings change),
``download`` (cityscapes-dataset.com into data.root), ``local`` (data.uri used in place) and ``s3``
(the data.uri mirror synced into data.root). Concurrent preparations of one root serialise on an
exclusive ``flock`` of ``<root>/.prepare.lock``. A preparation that :func:`mark_prepared` recorded is
found :func:`unchanged_preparation` while neither the data config nor the files changed (the data stage
then skips the work).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from components import storage
from components.config import DataConfig, SyntheticConfig
from components.data.download import download_cityscapes
from components.data.layout import IMAGE_SUFFIX, LABEL_SUFFIX, split_pairs
from components.data.mirror import mirror_from_s3
from components.data.synth import generate_synthetic_cityscapes
from components.data.trainids import create_trainid_labels
from components.errors import DataError

logger = logging.getLogger(__name__)

LOCK_FILE = ".prepare.lock"
SYNTHETIC_MARKER = ".synthetic.json"
PREPARED_MARKER = ".cityseg-prepared.json"
"""Written into the dataset root after a successful preparation: the data config and the fingerprint."""
SPLITS = ("train", "val")
DATA_DIRS = ("leftImg8bit", "gtFine")


@dataclass(frozen=True)
class PreparedDataset:
    root: str
    fingerprint: str


def prepare_dataset(data: DataConfig, credentials: tuple[str, str] | None = None) -> PreparedDataset:
    """Fetch or generate the dataset ``data`` describes, write trainIds, validate train and val."""
    root = prepared_root(data)
    if data.source == "local" and not root.is_dir():
        raise DataError(f"data.uri {root} does not exist: point it at the extracted Cityscapes folder")
    with _locked(root):
        if data.source == "synthetic":
            _synthesize(data.synthetic, root)
        elif data.source == "download":
            download_cityscapes(root, credentials)
        elif data.source == "s3":
            result = mirror_from_s3(str(data.uri), root)
            logger.info("S3 mirror: %d fetched, %d already present", result.downloaded, result.skipped)
        create_trainid_labels(root, workers=data.trainid_workers)
        for split in SPLITS:
            split_pairs(root, split)
        fingerprint = dataset_fingerprint(root)
    logger.info("dataset ready at %s (fingerprint %s)", root, fingerprint)
    return PreparedDataset(root=str(root), fingerprint=fingerprint)


def prepared_root(data: DataConfig) -> Path:
    """Where the prepared dataset lives: a local source is prepared in place, the others in data.root."""
    return Path(data.uri if data.source == "local" else data.root).resolve()


def dataset_fingerprint(root: str | Path) -> str:
    """sha256 of the relative names and sizes of every image and trainId label (cheap, stable)."""
    root = Path(root)
    files = [*root.glob(f"leftImg8bit/*/*/*{IMAGE_SUFFIX}"), *root.glob(f"gtFine/*/*/*{LABEL_SUFFIX}")]
    digest = hashlib.sha256()
    for relative, size in sorted((path.relative_to(root).as_posix(), path.stat().st_size) for path in files):
        digest.update(f"{relative}\t{size}\n".encode())
    return digest.hexdigest()


def mark_prepared(data: DataConfig, prepared: PreparedDataset) -> None:
    """Record that ``prepared`` came from ``data`` (the marker :func:`unchanged_preparation` reads)."""
    marker = {"inputs": _preparation_inputs(data), "fingerprint": prepared.fingerprint}
    with storage.atomic_path(Path(prepared.root) / PREPARED_MARKER) as tmp:
        tmp.write_text(json.dumps(marker, indent=2))


def unchanged_preparation(data: DataConfig) -> PreparedDataset | None:
    """The recorded preparation if the config and the files on disk are still the same, else None."""
    root = prepared_root(data)
    marker = root / PREPARED_MARKER
    if not marker.is_file():
        return None
    try:
        previous = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if previous.get("inputs") != _preparation_inputs(data):
        return None
    if dataset_fingerprint(root) != previous.get("fingerprint"):
        return None
    return PreparedDataset(root=str(root), fingerprint=previous["fingerprint"])


def _preparation_inputs(data: DataConfig) -> dict[str, object]:
    """The part of the data config that decides what the prepared dataset contains."""
    inputs = data.model_dump(mode="json", include={"source", "uri", "root"})
    if data.source == "synthetic":
        inputs["synthetic"] = data.synthetic.model_dump(mode="json")
    return inputs


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / LOCK_FILE, "a")  # noqa: SIM115 - held for the whole block
    except OSError as exc:
        raise DataError(
            f"cannot write to the dataset folder {root} ({exc.strerror}): trainId labels and the lock file "
            "go there; make it writable or copy the dataset"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _synthesize(settings: SyntheticConfig, root: Path) -> None:
    """Generate into a staging folder, then swap it in; the marker says which settings made the data."""
    marker = root / SYNTHETIC_MARKER
    wanted = settings.model_dump(mode="json")
    recorded = json.loads(marker.read_text()) if marker.is_file() else None
    if recorded == {"settings": wanted, "complete": True}:
        logger.info("synthetic dataset in %s is up to date", root)
        return
    if recorded is None and any((root / name).exists() for name in DATA_DIRS):
        raise DataError(
            f"{root} already holds a dataset that was not generated here (no {SYNTHETIC_MARKER}); "
            "refusing to overwrite it: choose another data.root for the synthetic data"
        )
    _write_marker(marker, {"settings": wanted, "complete": False})
    staging = Path(tempfile.mkdtemp(prefix=".synth-", dir=root))
    try:
        generate_synthetic_cityscapes(staging, **wanted)
        for name in DATA_DIRS:
            shutil.rmtree(root / name, ignore_errors=True)
            (staging / name).rename(root / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _write_marker(marker, {"settings": wanted, "complete": True})


def _write_marker(marker: Path, content: dict) -> None:
    with storage.atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(content, sort_keys=True))
