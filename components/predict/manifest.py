"""The manifest of a batch inference output: one JSON line per input (outputs, size, model name, version
and precision, provider, status). A sharded run (flows/predict.py) has each shard write
``manifest.<shard>.jsonl`` (:func:`shard_manifest_name`) and folds them into ``manifest.jsonl`` at the end
(:func:`merge_manifests`); :func:`read_manifest` reads both, so an interrupted run resumes either way."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from components import storage

MANIFEST = "manifest.jsonl"


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


def shard_manifest_name(shard: int) -> str:
    """Where shard ``shard`` of a sharded run records its inputs, beside ``manifest.jsonl``
    (``manifest.0003.jsonl``); :func:`merge_manifests` folds them in."""
    return f"manifest.{shard:04d}.jsonl"


def _is_shard_manifest(name: str) -> bool:
    return name.startswith("manifest.") and name.endswith(".jsonl") and name != MANIFEST


def read_manifest(output: str) -> dict[str, dict[str, Any]]:
    """input -> record, from ``manifest.jsonl`` and then the shards' manifests under ``output`` (a later
    line for the same input wins: a shard's record is newer than the merged one)."""
    names = [n for n in storage.list_names(output) if n == MANIFEST or _is_shard_manifest(n)]
    names.sort(key=lambda n: (n != MANIFEST, n))
    records: dict[str, dict[str, Any]] = {}
    for name in names:
        for line in storage.read_bytes(storage.join(output, name)).decode().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["input"]] = record
    return records


def write_manifest(uri: str, records: dict[str, dict[str, Any]]) -> None:
    """One JSON line per input, sorted by input; written whole (atomically for local files)."""
    text = "".join(json.dumps(records[key], sort_keys=True) + "\n" for key in sorted(records))
    storage.write_bytes(uri, text.encode())


def merge_manifests(output: str) -> dict[str, int]:
    """Fold the shards' manifests under ``output`` into ``manifest.jsonl`` (one line per input), delete
    them, and count the inputs per status (``ok``, ``failed``)."""
    records = read_manifest(output)
    write_manifest(storage.join(output, MANIFEST), records)
    for name in storage.list_names(output):
        if _is_shard_manifest(name):
            storage.delete(storage.join(output, name))
    counts: dict[str, int] = {}
    for record in records.values():
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return counts
