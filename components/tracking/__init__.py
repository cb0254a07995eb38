"""Every MLflow call of the project lives in this package; components compute and write files, these
modules log and read them. Only rank 0 calls in.

- ``runs``: experiments, runs, params/metrics, pipeline (parent) and stage runs, dataset lineage, UI links;
  re-exported here, so callers write ``from components import tracking; tracking.mlflow_run(...)``.
- ``registry_read``: resolving ``models:/`` URIs, loading a registered version, downloading its files.
- ``registry_write``: logging and registering a version, its aliases and the promotion gate.

The one other module that imports MLflow is ``components/serving.py``, the registered model's pyfunc
loader: it ships in the model's lean ``code/`` and must not import this package.
"""

from components.tracking.runs import (
    CLOSED_REASON_TAG,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    FLOW_RUN_TAG,
    INTERRUPTED_TAG,
    active_run_id,
    close_run,
    configure,
    dataset_input,
    end_pipeline_run,
    environment_tags,
    find_pipeline_run,
    git_commit,
    log_dataset,
    log_epoch,
    log_evaluation,
    log_table_run,
    log_training_summary,
    mlflow_run,
    model_version_url,
    pipeline_run,
    reopen_run,
    run_url,
    running_pipeline_runs,
    start_pipeline_run,
    training_run,
    ui_url,
)

__all__ = [
    "CLOSED_REASON_TAG",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "FLOW_RUN_TAG",
    "INTERRUPTED_TAG",
    "active_run_id",
    "close_run",
    "configure",
    "dataset_input",
    "end_pipeline_run",
    "environment_tags",
    "find_pipeline_run",
    "git_commit",
    "log_dataset",
    "log_epoch",
    "log_evaluation",
    "log_table_run",
    "log_training_summary",
    "mlflow_run",
    "model_version_url",
    "pipeline_run",
    "reopen_run",
    "run_url",
    "running_pipeline_runs",
    "start_pipeline_run",
    "training_run",
    "ui_url",
]
