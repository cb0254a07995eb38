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
import json
import logging
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, State

from components.config import Config, DataConfig, load_config
from components.data.prepare import dataset_fingerprint, prepare_dataset, prepared_root
from components.errors import ConfigError
from components.evaluate import evaluate
from components.export import export_onnx
from components.k8sjob import run_labels, run_training_job
from components.launch import launch_training
from components.registry import register_model
from components.storage import atomic_path, is_s3, join
from components.train_contract import EpochProgress
from flows.credentials import cityscapes_credentials, export_aws_credentials
from flows.logs import show_project_logs

logger = logging.getLogger(__name__)

PREPARED_MARKER = ".cityseg-prepared.json"
"""Written into the dataset root after a successful preparation: the data config and the fingerprint."""


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


def _preparation_inputs(data: DataConfig) -> dict[str, Any]:
    """The part of the data config that decides what the prepared dataset contains."""
    inputs = data.model_dump(mode="json", include={"source", "uri", "root"})
    if data.source == "synthetic":
        inputs["synthetic"] = data.synthetic.model_dump(mode="json")
    return inputs


def unchanged_preparation(data: DataConfig) -> dict[str, str] | None:
    """The previous preparation's result if the config and the files on disk are still the same."""
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
    return {"root": str(root), "fingerprint": previous["fingerprint"]}


@task(name="prepare-dataset")
def prepare_dataset_task(data: DataConfig) -> dict[str, str] | State:
    """Fetch and prepare the dataset; a ``Skipped`` state when the prepared files are unchanged."""
    unchanged = unchanged_preparation(data)
    if unchanged is not None:
        return Completed(
            name="Skipped",
            message=f"dataset in {unchanged['root']} unchanged (fingerprint {unchanged['fingerprint'][:12]})",
            data=unchanged,
        )
    prepared = prepare_dataset(data, credentials=cityscapes_credentials())
    result = {"root": str(prepared.root), "fingerprint": prepared.fingerprint}
    marker = json.dumps({"inputs": _preparation_inputs(data), "fingerprint": prepared.fingerprint}, indent=2)
    with atomic_path(Path(prepared.root) / PREPARED_MARKER) as tmp:
        tmp.write_text(marker)
    return result


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


def multinode_overrides(cfg: Config, overrides: list[str]) -> list[str]:
    """``overrides`` for a multi-node job, whose nodes share no disk: a local ``train.output_dir`` under
    run_dir moves to the same place under ``orchestration.multinode.s3_run_dir``."""
    output_dir, s3_run_dir = cfg.train.output_dir, cfg.orchestration.multinode.s3_run_dir
    if is_s3(output_dir):
        return overrides
    run_dir = Path(cfg.run_dir).resolve()
    local = Path(output_dir).resolve()
    if s3_run_dir is None or not local.is_relative_to(run_dir):
        raise ConfigError(
            f"train.output_dir={output_dir!r} is local, but the nodes of a multi-node job share no disk: set "
            "orchestration.multinode.s3_run_dir=s3://bucket/runs (it stands in for run_dir) or "
            "train.output_dir=s3://bucket/prefix"
        )
    return [*overrides, f"train.output_dir={join(s3_run_dir, local.relative_to(run_dir).as_posix())}"]


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
    overrides = multinode_overrides(cfg, list(overrides or []))
    cfg = load_config(recipe, overrides)
    result = run_training_job(
        cfg,
        recipe=recipe,
        overrides=overrides,
        run_name=flow_run.name or cfg.recipe,
        labels=run_labels(flow_run.id, flow_run.name, flow_run.root_flow_run_id),
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
