"""The manifest of a batch inference output: one JSON line per input (outputs, size, model name, version
and precision, provider, status).

While a run works, each shard appends its records as batches finish (:class:`ManifestWriter`): to the local
file ``manifest.<shard>.jsonl`` (append, then fsync), or, as S3 cannot append, as one small object per batch
under ``manifest.<shard>/``, so N records cost O(N) bytes (``python -m bench.manifest`` measures it).
:func:`merge_manifests` folds them into ``manifest.jsonl`` (one line per input, sorted) at the start and
at the end of a run; :func:`read_manifest` reads all of them, so an interrupted run resumes from whatever
was recorded."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components import storage
from components.errors import DataError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
READ_THREADS = 8
"""S3 objects read at once: a shard of 25,000 inputs leaves thousands of batch objects (botocore's
connection pool holds 10)."""
_SHARD_RECORDS = re.compile(r"manifest\.(\d{4,})(?:\.jsonl|/[^/]+\.jsonl)")


OK, FAILED = "ok", "failed"


@dataclass
class ModelId:
    name: str
    version: str
    """Registry version, or the first 12 hex digits of the file's sha256 for a plain ONNX file."""
    precision: str = "fp32"
    """Which ONNX variant ran (``--precision``): fp32, or the int8 file exported beside it."""


def model_fields(model: ModelId) -> dict[str, str]:
    return {"model_name": model.name, "model_version": model.version, "model_precision": model.precision}


def is_done(record: dict[str, Any] | None, model: ModelId) -> bool:
    if not record or record["status"] != OK:
        return False
    recorded = {key: record.get(key) for key in ("model_name", "model_version", "model_precision")}
    recorded["model_precision"] = recorded["model_precision"] or "fp32"  # manifests from before --precision
    return recorded == model_fields(model)


def shard_records_name(shard: int, s3: bool = False) -> str:
    """Where shard ``shard`` records its inputs, beside ``manifest.jsonl``: the local file
    ``manifest.0003.jsonl``, or (``s3``) the prefix ``manifest.0003/`` holding one object per batch."""
    return f"manifest.{shard:04d}/" if s3 else f"manifest.{shard:04d}.jsonl"


class ManifestWriter:
    """Appends one shard's records under ``output`` as batches finish: O(N) bytes for N records.

    Locally, each call appends its JSON lines to ``manifest.<shard>.jsonl`` in one write and fsyncs; a torn
    last line left by a killed writer is cut off before the first append (its input was not recorded and is
    redone). On S3 each call puts one object, ``manifest.<shard>/<token>.<n>.jsonl``: the token (start time
    in ns, then random hex) is unique per writer and sorts a rerun's objects after an earlier attempt's, so
    two attempts of one shard never overwrite each other and the later record wins."""

    def __init__(self, output: str, shard: int = 0) -> None:
        self.output = output
        self.uri = storage.join(output, shard_records_name(shard, storage.is_s3(output)))
        self.bytes_written = 0
        """Bytes of JSON lines written by :meth:`append` in total."""
        self._token = f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"
        self._calls = 0

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        data = "".join(_line(record) for record in records).encode()
        if storage.is_s3(self.output):
            storage.write_bytes(storage.join(self.uri, f"{self._token}.{self._calls:06d}.jsonl"), data)
        else:
            if self._calls == 0:
                _cut_torn_tail(Path(self.uri))
            storage.append_bytes(self.uri, data)
        self._calls += 1
        self.bytes_written += len(data)


def read_manifest(
    output: str, shards: Iterable[int] | None = None, merged: bool = True
) -> dict[str, dict[str, Any]]:
    """input -> record, from ``manifest.jsonl`` (unless not ``merged``: a shard of a flow run, whose flow
    already left out what it lists) and then the shards' records under ``output`` (all shards, or only
    ``shards``), in the order they were written: a later record for the same input wins."""
    names = _record_names(output, shards)
    return _read_records(output, names if merged else [name for name in names if name != MANIFEST])


def write_manifest(uri: str, records: dict[str, dict[str, Any]]) -> None:
    """One JSON line per input, sorted by input; written whole (atomically for local files)."""
    storage.write_bytes(uri, "".join(_line(records[key]) for key in sorted(records)).encode())


def merge_manifests(output: str) -> dict[str, dict[str, Any]]:
    """Fold every shard's records under ``output`` into ``manifest.jsonl`` (one line per input; atomic
    locally), then delete the shard files and objects that were read (never ones written since). Returns
    the merged records (input -> record), so a caller needs no second read of the manifest."""
    names = _record_names(output, None)
    records = _read_records(output, names)
    shard_names = [name for name in names if name != MANIFEST]
    if shard_names:  # nothing to fold in: write nothing (a refused run leaves no output folder)
        write_manifest(storage.join(output, MANIFEST), records)
    storage.delete_many([storage.join(output, name) for name in shard_names])
    return records


def status_counts(records: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Inputs per status (``ok``, ``failed``)."""
    return dict(Counter(record["status"] for record in records.values()))


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


def _record_names(output: str, shards: Iterable[int] | None) -> list[str]:
    """The files and objects under ``output`` that hold records, in write order: ``manifest.jsonl``, then
    shard by shard its file, then its objects (their names sort by writer start, then by batch)."""
    if shards is None:
        wanted = None
        names = storage.list_tree(output, "manifest.")
    else:
        wanted = set(shards)
        names = storage.list_tree(output, MANIFEST)
        for shard in sorted(wanted):  # a listing per shard: a resuming shard skips the others' objects
            names += storage.list_tree(output, f"manifest.{shard:04d}")
    found = []
    for name in names:
        match = _SHARD_RECORDS.fullmatch(name)
        if name == MANIFEST:
            found.append((-1, name))
        elif match and (wanted is None or int(match[1]) in wanted):
            found.append((int(match[1]), name))
    return [name for _, name in sorted(found)]


def _read_records(output: str, names: list[str]) -> dict[str, dict[str, Any]]:
    uris = [storage.join(output, name) for name in names]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        contents = list(pool.map(storage.read_bytes, uris))
    records: dict[str, dict[str, Any]] = {}
    for uri, data in zip(uris, contents, strict=True):
        for record in _parse(uri, data):
            records[record["input"]] = record
    return records


def _parse(uri: str, data: bytes) -> Iterator[dict[str, Any]]:
    """The records of one file. A line counts once its newline is written: an unterminated last line is
    what a writer killed mid-append leaves, skipped with a warning (its input is redone)."""
    *lines, tail = data.split(b"\n")
    if tail.strip():
        logger.warning(
            "%s: skipping its unterminated last line (%d bytes), left by a writer killed mid-append; "
            "that input will be redone",
            uri,
            len(tail),
        )
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{uri} line {number} is not JSON ({exc}); fix or delete that line") from None
        if not isinstance(record, dict) or not {"input", "status"} <= record.keys():
            raise DataError(f"{uri} line {number} is not a manifest record (needs 'input' and 'status')")
        yield record


def _cut_torn_tail(path: Path) -> None:
    """Cut an unterminated last line (a writer killed mid-append) so the next append starts a line."""
    if not path.is_file():
        return
    with path.open("rb+") as file:
        data = file.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            logger.warning("%s: cutting its unterminated last line (%d bytes)", path, len(data) - keep)
            file.truncate(keep)
