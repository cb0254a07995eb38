"""The training contract: what a training job's launcher and its ranks agree on, and nothing else.

Rank 0 (``components.train``) writes a :class:`TrainResult` to ``<output_dir>/train_result.json`` and
prints :class:`EpochProgress` lines; whoever launched the job (``components.launch`` on one node, the
Kubernetes runner for several) reads both. Loading this module imports no torch, DDP, trainer, model or
MLflow: a launcher needs none of them to supervise a job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from components import storage
from components.errors import CitysegError, StorageError

logger = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"
PROGRESS_PREFIX = "cityseg-progress "
"""Rank 0's machine-readable progress lines: this prefix, then an ``EpochProgress`` as JSON."""
INTERRUPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a preempted job conventionally reports


class TrainingError(CitysegError):
    """Training did not complete; ``exit_code`` is the training process's (143 = preempted)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class CollectiveTimeout(TrainingError):
    """A rank waited longer than ``train.collective_timeout_s`` for the others: one of them hung or died."""


class TrainingInterrupted(TrainingError):
    """SIGTERM stopped training; the last complete epoch is checkpointed and a rerun resumes from it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, INTERRUPTED_EXIT_CODE)


@dataclass
class TrainResult:
    best_checkpoint: str
    last_checkpoint: str
    best_miou: float
    mlflow_run_id: str | None
    epochs_completed: int


@dataclass(frozen=True)
class EpochProgress:
    """Where training stands: ``epoch`` of ``epochs`` epochs done. Rank 0 logs one at the start (0, or the
    epoch a resume continues after: no metrics) and one after every epoch, as a line of its output that
    ``components.launch`` (and ``components.cluster`` for pod 0) hand to their caller's ``on_epoch``."""

    epoch: int
    epochs: int
    train_loss: float | None = None
    lr: float | None = None
    """At the epoch's end."""
    images_per_second: float | None = None
    val_miou: float | None = None
    """Only after an epoch that validated (``train.val_every``)."""
    eta_s: float | None = None
    """Time left at this process's mean epoch time (validation and checkpoints included)."""

    def to_line(self) -> str:
        return PROGRESS_PREFIX + json.dumps(asdict(self))

    @classmethod
    def from_line(cls, line: str) -> EpochProgress | None:
        """The record in a line of rank 0's output (after its log prefix), or None if it holds none."""
        _, prefix, payload = line.partition(PROGRESS_PREFIX)
        if not prefix:
            return None
        try:
            return cls(**json.loads(payload))
        except (TypeError, ValueError):  # a line that only looks like one (cut off, another version's)
            return None


def read_result(output_dir: str, where: str = "training") -> TrainResult:
    """The TrainResult rank 0 wrote to ``<output_dir>/train_result.json`` (a local path or ``s3://``)."""
    uri = storage.join(output_dir, RESULT_FILE)
    try:
        payload = json.loads(storage.read_bytes(uri))
    except (StorageError, ValueError) as exc:
        raise TrainingError(f"{where} completed but its result {uri} cannot be read: {exc}") from None
    return TrainResult(**payload)


def write_result(output_dir: str, result: TrainResult) -> None:
    """Rank 0's last act: the result file a launcher reads with :func:`read_result`."""
    payload = json.dumps(asdict(result), indent=2).encode()
    storage.write_bytes(storage.join(output_dir, RESULT_FILE), payload)


OnEpoch = Callable[[EpochProgress], None]
"""What a launcher hands each progress record to (the flow's Prefect artifacts)."""


def relay_progress(line: str, on_epoch: OnEpoch | None) -> bool:
    """True if ``line`` is a progress record (then it went to ``on_epoch``, and is not for the log)."""
    progress = EpochProgress.from_line(line)
    if progress is None:
        return False
    logger.debug("%s", line)
    if on_epoch is not None:
        try:
            on_epoch(progress)
        except Exception as exc:  # the caller's reporting (an API call) must not stop the relay of training
            logger.warning("reporting the progress after epoch %d failed: %s", progress.epoch, exc)
    return True
