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
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
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


class BackgroundSaver:
    """Writes checkpoints on a background thread while training goes on: serialising, hashing and writing
    took ~0.7 s of every ~6 s demo epoch on 2 cores, and a ResNet-50 checkpoint to S3 takes seconds.

    ``save`` snapshots the state (the next step updates the live tensors in place) and returns the URI it
    will have. At most one write is in flight: ``save`` first waits for the previous one, and leaving the
    ``with`` block (normally or by an exception, e.g. a SIGTERM stop) waits for the last. A failed write
    raises from the next ``save`` or from the block's exit."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._pending: Future[str] | None = None

    def save(self, state: dict[str, Any], directory: str, *, is_best: bool = False) -> str:
        self.wait()
        self._pending = self._pool.submit(save_checkpoint, _snapshot(state), directory, is_best=is_best)
        return storage.join(directory, epoch_name(int(state["epoch"])))

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> BackgroundSaver:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.wait()
        except Exception as write_error:
            if exc_type is None:
                raise
            logger.error("the last checkpoint write failed too: %s", write_error)  # keep the first error
        finally:
            self._pool.shutdown()


def _snapshot(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are detached CPU copies."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _snapshot(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(item) for item in value)
    return value


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
