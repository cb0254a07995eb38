"""The pipeline's stages, each a Prefect flow of its own so it can run in its own container.

Every stage takes the typed config as ``recipe`` + ``overrides`` (validated before any work) plus
the URIs it works on, and returns a small JSON-able dict (URIs and numbers, never large objects).
Results are persisted so that a parent calling a stage through ``run_deployment`` can read them;
across containers that needs result storage both sides see (``PREFECT_LOCAL_STORAGE_PATH`` on a shared
volume, see infra/). The components' INFO logs (the torchrun output, evaluation and export summaries) go
to each stage's flow-run logs (``flows.logs``); the train stage also keeps two artifacts up to date, the
training's progress and its latest epoch's metrics (``TrainingProgress``).
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect import flow, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, State

from components.cluster import train_on_cluster
from components.config import Config, DataConfig, load_config
from components.data.prepare import mark_prepared, prepare_dataset, unchanged_preparation
from components.evaluate import evaluate
from components.export import export_onnx
from components.launch import launch_training
from components.registry import register_model
from components.train_contract import EpochProgress
from flows.credentials import cityscapes_credentials, export_aws_credentials
from flows.logs import show_project_logs

logger = logging.getLogger(__name__)


def stage_config(recipe: str, overrides: list[str] | None) -> Config:
    """Validate the config and make the AWS Secret blocks (if any) visible to boto3 and MLflow (and the
    components' logs to the flow run)."""
    show_project_logs()
    cfg = load_config(recipe, overrides or [])
    export_aws_credentials()
    return cfg


def _with_retries(cfg: Config, stage_task: Any) -> Any:
    return stage_task.with_options(
        retries=cfg.orchestration.retries, retry_delay_seconds=cfg.orchestration.retry_delay_seconds
    )


def _as_dict(result: Any) -> dict[str, Any]:
    return dataclasses.asdict(result)


# --- data preparation (CPU pool) ------------------------------------------------------------------


@task(name="prepare-dataset")
def prepare_dataset_task(data: DataConfig) -> dict[str, str] | State:
    """Fetch and prepare the dataset; a ``Skipped`` state when the prepared files are unchanged."""
    unchanged = unchanged_preparation(data)
    if unchanged is not None:
        return Completed(
            name="Skipped",
            message=f"dataset in {unchanged.root} unchanged (fingerprint {unchanged.fingerprint[:12]})",
            data=_as_dict(unchanged),
        )
    prepared = prepare_dataset(data, credentials=cityscapes_credentials())
    mark_prepared(data, prepared)
    return _as_dict(prepared)


@flow(name="prepare-data", persist_result=True)
def prepare_data(recipe: str, overrides: list[str] | None = None) -> dict[str, str]:
    """Download (or mirror from S3, or generate) the dataset and write trainId labels."""
    cfg = stage_config(recipe, overrides)
    # Through the state: calling a task that returned a (Skipped) state would hand back the state itself.
    return _with_retries(cfg, prepare_dataset_task)(cfg.data, return_state=True).result()


# --- evaluation (GPU pool) ------------------------------------------------------------------------


@task(name="evaluate")
def evaluate_task(
    cfg: Config, model_uri: str | None, out_dir: str, baseline: str | None, run_name: str
) -> dict[str, Any]:
    return evaluate(cfg, model_uri, out_dir, baseline=baseline, run_name=run_name)


@flow(name="evaluate", persist_result=True)
def evaluate_stage(
    recipe: str,
    overrides: list[str] | None,
    out_dir: str,
    model_uri: str | None = None,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Score a model URI (or a named baseline) on ``data.root``'s val split; returns metrics.json."""
    cfg = stage_config(recipe, overrides)
    run_name = f"baseline-{baseline}" if baseline else "finetuned"
    metrics = _with_retries(cfg, evaluate_task)(cfg, model_uri, out_dir, baseline, run_name)
    logger.info(
        "evaluation %s: val mIoU %.4f on %d images (%s protocol); reports in %s",
        run_name, metrics["miou"], metrics["num_images"], metrics["protocol"], out_dir,
    )  # fmt: skip
    return metrics


# --- training (GPU pool) --------------------------------------------------------------------------


def eta_text(seconds: float | None) -> str | None:
    return None if seconds is None else str(timedelta(seconds=round(seconds)))


def epoch_row(progress: EpochProgress) -> dict[str, Any]:
    """A finished epoch's record as a table row, rounded for reading; val mIoU in % (None: not validated)."""

    def rounded(value: float | None, digits: int, scale: float = 1.0) -> float | None:
        return None if value is None else round(scale * value, digits)

    return {
        "epoch": f"{progress.epoch}/{progress.epochs}",
        "train loss": rounded(progress.train_loss, 4),
        "lr": rounded(progress.lr, 6),
        "images/s": rounded(progress.images_per_second, 1),
        "val mIoU (%)": rounded(progress.val_miou, 2, scale=100),
        "ETA": eta_text(progress.eta_s),
    }


class TrainingProgress:
    """The train stage's ``on_epoch``: rank 0's progress records as this flow run's artifacts, a progress
    bar (``training-progress``: created at the first record, so a resumed run starts where it resumes) and
    the latest finished epoch's metrics (``training-epoch``: a new version per epoch, the UI shows the
    latest)."""

    def __init__(self) -> None:
        self.artifact_id: UUID | None = None

    def __call__(self, progress: EpochProgress) -> None:
        description = f"{flow_run.name}: epoch {progress.epoch}/{progress.epochs}"
        if progress.eta_s is not None:
            description += f", ETA {eta_text(progress.eta_s)}"
        percent = 100 * progress.epoch / progress.epochs
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                percent, key="training-progress", description=description
            )
        else:
            update_progress_artifact(self.artifact_id, percent, description=description)
        if progress.train_loss is not None:  # a finished epoch, not the start
            create_table_artifact([epoch_row(progress)], key="training-epoch", description=description)


@flow(name="train", persist_result=True)
def train_stage(recipe: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Fine-tune with torchrun, one process per visible GPU (Prefect stays outside the workers); with
    ``orchestration.multinode.enabled``, as a multi-node Kubernetes job that this flow run submits,
    follows (pod 0's log in its logs) and deletes when it ends or the flow run is cancelled.

    No automatic retries: a rerun with the same ``train.output_dir`` resumes from the last checkpoint.
    Progress: the epoch lines in the logs, the artifacts of ``TrainingProgress``.
    """
    cfg = stage_config(recipe, overrides)
    if not cfg.orchestration.multinode.enabled:
        return _as_dict(launch_training(cfg, on_epoch=TrainingProgress()))
    result = train_on_cluster(
        recipe,
        overrides or [],
        run_name=flow_run.name or cfg.recipe,
        flow_run_id=flow_run.id,
        root_flow_run_id=flow_run.root_flow_run_id,
        on_epoch=TrainingProgress(),
    )
    return _as_dict(result)


# --- export (GPU pool) ----------------------------------------------------------------------------


@task(name="export-onnx")
def export_task(cfg: Config, checkpoint_uri: str, out_path: str) -> dict[str, Any]:
    return _as_dict(export_onnx(checkpoint_uri, out_path, cfg.data.root, cfg, device=cfg.export.device))


@flow(name="export-onnx", persist_result=True)
def export_stage(
    recipe: str, overrides: list[str] | None, checkpoint_uri: str, out_path: str
) -> dict[str, Any]:
    """Export the checkpoint to ONNX (parity gate on ``data.root``'s val images; ExportError if it drifts)."""
    cfg = stage_config(recipe, overrides)
    return _with_retries(cfg, export_task)(cfg, checkpoint_uri, out_path)


# --- registration (CPU or GPU pool) ---------------------------------------------------------------


@task(name="register-model")
def register_task(cfg: Config, **kwargs: Any) -> dict[str, Any]:
    return _as_dict(register_model(cfg, **kwargs))


@flow(name="register-model", persist_result=True)
def register_stage(
    recipe: str,
    overrides: list[str] | None,
    train_run_id: str,
    checkpoint_uri: str,
    onnx_path: str,
    val_miou: float,
    baseline_miou: float,
    dataset_fingerprint: str,
) -> dict[str, Any]:
    """Register the model version in MLflow and promote it to ``champion`` if it beats the current one."""
    cfg = stage_config(recipe, overrides)
    return _with_retries(cfg, register_task)(
        cfg,
        train_run_id=train_run_id,
        checkpoint_uri=checkpoint_uri,
        onnx_path=onnx_path,
        val_miou=val_miou,
        baseline_miou=baseline_miou,
        dataset_fingerprint=dataset_fingerprint,
    )
