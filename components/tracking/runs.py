"""MLflow runs: experiments, runs, params/metrics, pipeline (parent) runs and dataset lineage. Only rank 0
calls in.

The tracking URI comes from the config, then ``MLFLOW_TRACKING_URI``, then a SQLite store in the
run directory (``mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db`` browses it).

One pipeline run (the ``finetune`` flow) is one parent run (:func:`start_pipeline_run`); every run started
with :func:`mlflow_run` under a config whose ``tracking.parent_run_id`` is set is its child (baseline
evaluation, training, fine-tuned evaluation), so pipeline runs compare side by side in the MLflow UI.

A process killed mid-run leaves its runs ``RUNNING``: :func:`close_run` ends them ``KILLED`` with the tag
``cityseg.closed_reason``; a run continued later (a retried pipeline, a resumed training job) is
:func:`reopen_run`-ed or continued by :func:`mlflow_run`, and keeps the reason as ``cityseg.interrupted``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from components.config import Config
from components.data.layout import IMAGE_SUFFIX
from components.data.prepare import dataset_fingerprint
from components.errors import MLFLOW_NOT_FOUND_CODES

logger = logging.getLogger(__name__)

FLOW_RUN_TAG = "prefect_flow_run_id"
"""Tag of a pipeline (parent) run: the id of the flow run it belongs to (a retry finds its run by it)."""
CLOSED_REASON_TAG = "cityseg.closed_reason"
"""Why a run left ``RUNNING`` by a killed process was closed (``KILLED``)."""
INTERRUPTED_TAG = "cityseg.interrupted"
"""On a run that was interrupted and then continued: its closing reason, or what continued it."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3's UI opens an experiment of kind ``custom_model_development`` on its runs, not on the GenAI
overview (the UI's own guess when the tag is missing)."""
EXPERIMENT_KIND = "custom_model_development"


def configure(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI."""
    # Without a git executable (the image has none) GitPython's import raises a 14-line "Bad git
    # executable" error that MLflow logs at every run start; "quiet" lets the import succeed (MLflow then
    # finds no repository, silently). The commit comes from $GIT_COMMIT instead (environment_tags).
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    uri = cfg.resolved_tracking_uri()
    user_setting = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; put the user's value back so that the next
    # Config in this process (or a child) resolves its own store, not this one.
    if user_setting is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_setting
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        _create_experiment(cfg.tracking.experiment, _artifact_location(cfg, uri))
    elif EXPERIMENT_KIND_TAG not in experiment.tags:  # created before the tag was set
        mlflow.MlflowClient().set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
        )
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
        mlflow.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except mlflow.exceptions.MlflowException:
        if mlflow.get_experiment_by_name(name) is None:  # not a lost race with another process
            raise


@contextmanager
def mlflow_run(
    cfg: Config, run_name: str, tags: Mapping[str, str] | None = None, run_id: str | None = None
) -> Iterator[Any]:
    """Start a run with the flattened config as params and the code/environment as tags.

    The run is a child of ``cfg.tracking.parent_run_id`` when that is set (a stage of a pipeline run).

    With ``run_id`` the existing run is continued instead (a resumed training job): its params and
    ``config.yaml`` were logged when it started and MLflow params cannot change, so only tags are set.
    """
    configure(cfg)
    if run_id is not None:
        _mark_continued(mlflow.MlflowClient(), run_id)
    all_tags = {**environment_tags(), "recipe": cfg.recipe, "backbone": cfg.model.backbone, **(tags or {})}
    with mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        parent_run_id=None if run_id else cfg.tracking.parent_run_id,  # a continued run keeps its parent
        tags=all_tags,
        log_system_metrics=cfg.tracking.system_metrics,
    ) as run:
        if run_id is None:
            mlflow.log_params(cfg.flat())
            mlflow.log_text(cfg.to_yaml(), "config.yaml")
        yield run


@contextmanager
def training_run(cfg: Config, tags: Mapping[str, str], run_id: str | None = None) -> Iterator[Any]:
    """The training job's run (a child of ``tracking.parent_run_id`` when set), continued when ``run_id``
    is given (a resumed job) and the tracking store has it; a new run records the dataset it trains on."""
    configure(cfg)
    if run_id is not None and not _run_exists(run_id):
        # The checkpoint came from another tracking store (a recreated server, a copied output_dir).
        logger.warning(
            "the checkpoint's MLflow run %s is not in %s: the resumed training logs to a new run",
            run_id,
            mlflow.get_tracking_uri(),
        )
        run_id = None
    with mlflow_run(cfg, f"train-{cfg.recipe}-{cfg.model.backbone}", tags, run_id=run_id) as run:
        if run_id is None:
            log_dataset(cfg, "training")
        yield run


def _run_exists(run_id: str) -> bool:
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in MLFLOW_NOT_FOUND_CODES:
            return False
        raise
    return True


def log_epoch(metrics: Mapping[str, Any], epoch: int) -> None:
    """An epoch's scalar metrics at step ``epoch`` (1-based); per-class dicts are left to the summary.

    An epoch the run already holds is not logged again: a process killed after logging an epoch but
    before its checkpoint landed redoes that epoch on resume (with the same result: training is
    deterministic), and a metric's history must hold each epoch once.
    """
    scalars = {k: float(v) for k, v in metrics.items() if not isinstance(v, Mapping)}
    if not scalars:
        return
    run_id = mlflow.active_run().info.run_id
    history = mlflow.MlflowClient().get_metric_history(run_id, next(iter(scalars)))
    if any(metric.step == epoch for metric in history):
        logger.info("epoch %d's metrics are already in MLflow run %s: not logged again", epoch, run_id)
        return
    mlflow.log_metrics(scalars, step=epoch)


def log_training_summary(summary: Mapping[str, Any]) -> None:
    """The final result (checkpoints, best mIoU, last metrics) as the run's ``metrics.json``."""
    mlflow.log_dict(dict(summary), "metrics.json")


def environment_tags() -> dict[str, str]:
    import torch  # here only: reading the registry (components.predict) must not load torch

    commit = git_commit()
    tags = {
        "git_commit": commit,
        MLFLOW_GIT_COMMIT: commit,  # the UI's "Git commit"; MLflow's own lookup needs git and a checkout
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


# --- pipeline (parent) runs, evaluation runs, dataset inputs ---------------------------------------


def start_pipeline_run(cfg: Config, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run (config as params, not made active); returns its id.

    Not made the active run: stages run in other processes or containers and start their child runs from
    the id alone (``tracking.parent_run_id=<id>``). End it with :func:`end_pipeline_run`.
    """
    configure(cfg)
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    all_tags = {**environment_tags(), "recipe": cfg.recipe, "backbone": cfg.model.backbone, **(tags or {})}
    if cfg.tracking.parent_run_id:  # itself one step of a larger run
        all_tags[MLFLOW_PARENT_RUN_ID] = cfg.tracking.parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    params = [Param(key, str(value)) for key, value in cfg.flat().items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start : start + 100])
    client.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return run_id


def end_pipeline_run(
    cfg: Config, run_id: str, metrics: Mapping[str, float] | None = None, *, failed: bool = False
) -> None:
    """Log the pipeline's summary metrics on its parent run and close it (FINISHED, or FAILED)."""
    configure(cfg)
    client = mlflow.MlflowClient()
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))


def find_pipeline_run(cfg: Config, flow_run_id: str) -> str | None:
    """The pipeline run an earlier attempt of flow run ``flow_run_id`` created (the newest if several)."""
    configure(cfg)
    experiment_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id],
        f"tags.{FLOW_RUN_TAG} = '{flow_run_id}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def running_pipeline_runs(cfg: Config) -> dict[str, str]:
    """Pipeline runs of the experiment that are ``RUNNING``: run id -> their flow run's id."""
    configure(cfg)
    experiment_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.{FLOW_RUN_TAG} != ''", max_results=1000
    )
    return {run.info.run_id: run.data.tags[FLOW_RUN_TAG] for run in runs}


@contextmanager
def pipeline_run(
    cfg: Config, flow_run_id: str, run_name: str, attempt: int, tags: Mapping[str, str] | None = None
) -> Iterator[tuple[str, dict[str, float]]]:
    """The parent run of flow run ``flow_run_id``: yields its id and a dict of summary metrics to fill,
    logged when the body ends (status FAILED if it raised).

    A retry of the flow run (``attempt`` > 1) continues the parent run of its earlier attempt, found by
    the tag ``prefect_flow_run_id``; a first attempt starts one named ``run_name``.
    """
    run_id = find_pipeline_run(cfg, flow_run_id)
    if run_id is None:
        run_id = start_pipeline_run(cfg, run_name, tags={FLOW_RUN_TAG: flow_run_id, **(tags or {})})
    else:
        logger.info("flow run %s retried: continuing MLflow run %s", flow_run_id, run_id)
        reopen_run(cfg, run_id, f"flow run {flow_run_id} retried (attempt {attempt})")
    metrics: dict[str, float] = {}
    try:
        yield run_id, metrics
    except BaseException:
        end_pipeline_run(cfg, run_id, failed=True)
        raise
    end_pipeline_run(cfg, run_id, metrics)


def reopen_run(cfg: Config, run_id: str, reason: str) -> None:
    """Continue a pipeline run (a retry of its flow run, ``reason`` says so): ``RUNNING`` again, tagged
    ``cityseg.interrupted`` (its closing reason if it was closed, else ``reason``). Its stage runs that the
    interrupted attempt left ``RUNNING`` are closed; a stage that resumes (training) reopens its own."""
    configure(cfg)
    client = mlflow.MlflowClient()
    _close_stage_runs(client, run_id, f"left RUNNING by an interrupted attempt; {reason}")
    _mark_continued(client, run_id, reason)
    client.update_run(run_id, RunStatus.to_string(RunStatus.RUNNING))


def close_run(cfg: Config, run_id: str, reason: str) -> None:
    """End a run that a killed process left ``RUNNING`` (``KILLED``, tag ``cityseg.closed_reason``), with
    its stage runs."""
    configure(cfg)
    client = mlflow.MlflowClient()
    _close_stage_runs(client, run_id, reason)
    _close(client, run_id, reason)


def _close_stage_runs(client: mlflow.MlflowClient, parent_run_id: str, reason: str) -> None:
    """Close the ``RUNNING`` children of a pipeline run, except those of other flow runs (a sweep's
    points): their own flow runs decide about them."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs(
        [experiment_id],
        f"attributes.status = 'RUNNING' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'",
        max_results=1000,
    )
    for child in children:
        if FLOW_RUN_TAG not in child.data.tags:
            _close(client, child.info.run_id, reason)


def _close(client: mlflow.MlflowClient, run_id: str, reason: str) -> None:
    logger.warning("closing MLflow run %s (KILLED): %s", run_id, reason)
    client.set_tag(run_id, CLOSED_REASON_TAG, reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def _mark_continued(client: mlflow.MlflowClient, run_id: str, reason: str | None = None) -> None:
    """A continued run records why it was interrupted: its closing reason, else ``reason``."""
    tags = client.get_run(run_id).data.tags
    interrupted = tags.get(CLOSED_REASON_TAG, reason)
    if interrupted is not None:
        client.set_tag(run_id, INTERRUPTED_TAG, interrupted)
    if CLOSED_REASON_TAG in tags:
        client.delete_tag(run_id, CLOSED_REASON_TAG)


def log_table_run(
    cfg: Config,
    run_id: str,
    artifact_file: str,
    rows: list[Mapping[str, Any]],
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Log ``rows`` as an MLflow table artifact (the UI shows it), plus params and tags, e.g. a sweep's
    ranking on its parent run."""
    configure(cfg)
    client = mlflow.MlflowClient()
    client.log_batch(
        run_id,
        params=[Param(key, str(value)) for key, value in (params or {}).items()],
        tags=[RunTag(key, value) for key, value in (tags or {}).items()],
    )
    if rows:
        columns = {key: [row.get(key) for row in rows] for key in rows[0]}
        client.log_table(run_id, data=columns, artifact_file=artifact_file)


def ui_url(cfg: Config) -> str:
    """The MLflow UI's address: ``orchestration.mlflow_ui_url``, else the tracking server's, else the
    local ``mlflow ui`` default."""
    if cfg.orchestration.mlflow_ui_url:
        return cfg.orchestration.mlflow_ui_url.rstrip("/")
    uri = cfg.resolved_tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(cfg: Config, run_id: str) -> str:
    """The MLflow UI page of a run."""
    experiment_id = mlflow.MlflowClient(cfg.resolved_tracking_uri()).get_run(run_id).info.experiment_id
    return f"{ui_url(cfg)}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(cfg: Config, name: str, version: str) -> str:
    """The MLflow UI page of a registered model version."""
    return f"{ui_url(cfg)}/#/models/{name}/versions/{version}"


def active_run_id() -> str | None:
    """The id of this process's active run (None outside one)."""
    active = mlflow.active_run()
    return active.info.run_id if active else None


def log_evaluation(
    cfg: Config,
    metrics: Mapping[str, float],
    reports: Path,
    run_name: str,
    tags: Mapping[str, str],
) -> str:
    """Log an evaluation's metrics, report files and dataset; returns the run id.

    Inside an active run (e.g. the trainer's) everything goes into it, files under ``evaluation/``;
    otherwise a run of its own is started (a child of ``tracking.parent_run_id`` when set).
    """
    active = mlflow.active_run()
    if active is not None:
        mlflow.log_metrics(dict(metrics))
        mlflow.log_artifacts(str(reports), "evaluation")
        return active.info.run_id
    with mlflow_run(cfg, run_name, tags={"stage": "evaluation", **tags}) as run:
        mlflow.log_metrics(dict(metrics))
        mlflow.log_artifacts(str(reports))
        log_dataset(cfg, "evaluation")
        return run.info.run_id


class _SplitDataset(MetaDataset):
    """A dataset known by name, fingerprint and source, with its split sizes as the profile."""

    def __init__(self, source: Any, name: str, digest: str, splits: Mapping[str, int]) -> None:
        self._splits = dict(splits)
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, int]:
        return {f"{split}_images": count for split, count in self._splits.items()}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}  # MetaDataset leaves it out


def dataset_input(cfg: Config, fingerprint: str) -> MetaDataset:
    """The prepared dataset in ``cfg.data.root`` as an MLflow dataset.

    Name ``cityscapes`` (``cityscapes-synthetic`` for generated data); digest = the first 32 hex digits
    of ``fingerprint`` (MLflow stores at most 36 characters); source = ``data.uri`` where the data came
    from one, else the root; profile = images per split.
    """
    root = Path(cfg.data.root)
    splits = {
        split.name: sum(1 for _ in split.glob(f"*/*{IMAGE_SUFFIX}"))
        for split in sorted((root / "leftImg8bit").glob("*"))
        if split.is_dir()
    }
    with warnings.catch_warnings():  # a local path matches MLflow's local source twice; either is right
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(cfg.data.uri or str(root.resolve()))
    name = "cityscapes-synthetic" if cfg.data.source == "synthetic" else "cityscapes"
    return _SplitDataset(source, name, fingerprint[:32], splits)


def log_dataset(cfg: Config, context: str, run_id: str | None = None) -> None:
    """Record ``cfg.data.root``'s dataset as an input of ``run_id`` or the active run (the UI's Datasets).

    ``context`` says what the run did with it (``training``, ``evaluation``, ``pipeline``); the full
    :func:`~components.data.prepare.dataset_fingerprint` is an input tag beside the shortened digest.
    """
    fingerprint = dataset_fingerprint(cfg.data.root)
    tags = [InputTag("fingerprint", fingerprint), InputTag(MLFLOW_DATASET_CONTEXT, context)]
    dataset = DatasetInput(dataset_input(cfg, fingerprint)._to_mlflow_entity(), tags=tags)
    if run_id is None:  # the run mlflow_run(cfg, ...) started
        run_id = mlflow.active_run().info.run_id
    mlflow.MlflowClient(cfg.resolved_tracking_uri()).log_inputs(run_id, datasets=[dataset])
