"""MLflow plumbing shared by training and evaluation. Only rank 0 calls into here.

The tracking URI comes from the config, then ``MLFLOW_TRACKING_URI``, then a SQLite store in the
run directory (``mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db`` browses it).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from components.config import Config


def configure(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI."""
    uri = cfg.resolved_tracking_uri()
    user_setting = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; put the user's value back so that the next
    # Config in this process (or a child) resolves its own store, not this one.
    if user_setting is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_setting
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        _create_experiment(cfg.tracking.experiment, _artifact_location(cfg, uri))
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


def _artifact_location(cfg: Config, tracking_uri: str) -> str | None:
    if cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    if tracking_uri.startswith("sqlite:///"):
        # MLflow's default would be ./mlruns in whatever directory the process started in.
        database = Path(tracking_uri[len("sqlite:///") :])
        database.parent.mkdir(parents=True, exist_ok=True)
        return (database.parent / "mlartifacts").resolve().as_uri()
    return None


def _create_experiment(name: str, artifact_location: str | None) -> None:
    try:
        mlflow.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:
        if mlflow.get_experiment_by_name(name) is None:  # not a lost race with another process
            raise


@contextmanager
def mlflow_run(
    cfg: Config, run_name: str, tags: Mapping[str, str] | None = None, run_id: str | None = None
) -> Iterator[Any]:
    """Start a run with the flattened config as params and the code/environment as tags.

    With ``run_id`` the existing run is continued instead (a resumed training job): its params and
    ``config.yaml`` were logged when it started and MLflow params cannot change, so only tags are set.
    """
    configure(cfg)
    all_tags = {**environment_tags(), "recipe": cfg.recipe, "backbone": cfg.model.backbone, **(tags or {})}
    with mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        tags=all_tags,
        log_system_metrics=cfg.tracking.system_metrics,
    ) as run:
        if run_id is None:
            mlflow.log_params(cfg.flat())
            mlflow.log_text(cfg.to_yaml(), "config.yaml")
        yield run


@contextmanager
def training_run(cfg: Config, tags: Mapping[str, str], run_id: str | None = None) -> Iterator[Any]:
    """The training job's run, continued when ``run_id`` is given (a resumed job).

    With ``tracking.parent_run_id`` set (a pipeline run), a new run is created as that run's child.
    """
    parent = getattr(cfg.tracking, "parent_run_id", None)
    if parent:
        tags = {**tags, MLFLOW_PARENT_RUN_ID: parent}
    with mlflow_run(cfg, f"train-{cfg.recipe}-{cfg.model.backbone}", tags, run_id=run_id) as run:
        yield run


def log_epoch(metrics: Mapping[str, Any], epoch: int) -> None:
    """An epoch's scalar metrics at step ``epoch`` (1-based); per-class dicts are left to the summary."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if not isinstance(v, Mapping)}, step=epoch)


def log_training_summary(summary: Mapping[str, Any]) -> None:
    """The final result (checkpoints, best mIoU, last metrics) as the run's ``metrics.json``."""
    mlflow.log_dict(dict(summary), "metrics.json")


def environment_tags() -> dict[str, str]:
    tags = {
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "python_version": platform.python_version(),
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        tags["gpu_names"] = ", ".join(sorted(names))
        tags["gpu_count"] = str(torch.cuda.device_count())
    return tags


@functools.cache
def git_commit() -> str:
    """The source commit: $GIT_COMMIT (baked into the image) or ``git rev-parse HEAD``."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() or "unknown"
