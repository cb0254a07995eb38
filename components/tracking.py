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
