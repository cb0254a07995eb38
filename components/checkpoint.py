"""Checkpoints that survive preemption: atomic writes, a SHA-256 sidecar, resume from the newest
complete one.

Layout under a checkpoint directory (local path or s3:// prefix)::

    epoch_0003.pt  epoch_0003.pt.sha256   # the last ``keep_last`` epochs
    best.pt        best.pt.sha256         # highest validation mIoU so far

A training checkpoint is ``components.trainer.TrainState.to_checkpoint()``: ``model`` (state_dict,
unwrapped from DDP), ``optimizer``, ``scheduler``, ``epoch`` (completed epochs), ``best_miou``,
``best_epoch``, ``config`` (``Config.model_dump(mode="json")``), ``metrics`` and ``mlflow_run_id``. No
grad scaler (bf16 autocast needs none) and no RNG state (every step reseeds, see ``components.trainer``).
It loads with ``torch.load(weights_only=True)``, so a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from typing import Any

import torch

from components import storage
from components.errors import CheckpointError, StorageError

logger = logging.getLogger(__name__)

BEST = "best.pt"
_EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.pt$")


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


def save_checkpoint(
    state: dict[str, Any], directory: str, *, is_best: bool = False, keep_last: int = 2
) -> str:
    """Write ``state`` as ``epoch_<N>.pt`` (and ``best.pt``), then prune older epochs. Returns its URI."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    names = [epoch_name(int(state["epoch"]))] + ([BEST] if is_best else [])
    for name in names:
        uri = storage.join(directory, name)
        # The sidecar goes last: a checkpoint without a matching sidecar is never trusted.
        storage.write_bytes(uri, payload)
        storage.write_bytes(uri + ".sha256", digest.encode())
    _prune(directory, keep_last)
    return storage.join(directory, names[0])


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint, verifying its checksum when a sidecar exists (our own checkpoints have one)."""
    try:
        payload = storage.read_bytes(uri)
    except StorageError as exc:
        raise CheckpointError(f"cannot read checkpoint {uri}: {exc}") from None
    sidecar = uri + ".sha256"
    if storage.exists(sidecar):
        expected = storage.read_bytes(sidecar).decode().strip()
        actual = hashlib.sha256(payload).hexdigest()
        if actual != expected:
            raise CheckpointError(
                f"checkpoint {uri} is corrupt or truncated: sha256 {actual[:12]}… "
                f"does not match its sidecar {expected[:12]}…"
            )
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle; all mean "unreadable"
        raise CheckpointError(f"checkpoint {uri} cannot be loaded: {exc}") from None


def load_latest_checkpoint(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The newest epoch checkpoint that verifies, skipping corrupt ones; None if there is none."""
    for name in reversed(_epoch_files(directory)):
        uri = storage.join(directory, name)
        try:
            return load_checkpoint(uri, map_location)
        except CheckpointError as exc:
            logger.warning("skipping %s", exc)
    return None


def _epoch_files(directory: str) -> list[str]:
    names = storage.list_names(directory)
    complete = [n for n in names if _EPOCH_FILE.match(n) and f"{n}.sha256" in names]
    return sorted(complete, key=lambda n: int(_EPOCH_FILE.match(n).group(1)))


def _prune(directory: str, keep_last: int) -> None:
    for name in _epoch_files(directory)[:-keep_last]:
        for stale in (name + ".sha256", name):
            storage.delete(storage.join(directory, stale))
