"""The ``finetune`` flow: prepare data -> baseline eval -> fine-tune -> eval -> ONNX export -> register.

Run it locally (temporary Prefect server, SQLite MLflow in the recipe's run_dir, synthetic data, CPU)::

    python -m flows.finetune --recipe demo [section.key=value ...]

Deployed (deploy/prefect.yaml) users run ``prefect deployment run finetune/cityscapes``. Stages listed in
``orchestration.stage_deployments`` run through ``run_deployment`` in their own containers/pools; the
others run in-process as subflows. Stages exchange URIs, never large objects.

Each flow run is one MLflow parent run (named like the flow run); the stages' MLflow runs (baseline
evaluation, training, fine-tuned evaluation) are its children: the flow hands them its id as the
override ``tracking.parent_run_id=<id>``, and the dataset as ``data.root=<prepared root>``. A retry of
the flow run (``prefect flow-run retry <id>``) continues the same parent run: Prefect reuses the stages
that completed (their results are persisted), training resumes from its last checkpoint in its MLflow
run, and runs a killed attempt left ``RUNNING`` are closed (:func:`flows.orchestration.pipeline_run`).

With ``register_model=False`` the flow stops after the export and returns the candidate (the register
stage's parameters) instead of registering it: the ``sweep`` flow (flows/sweep.py) registers only its best.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.settings import (
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from components import tracking
from components.cli import run_cli
from components.config import Config, load_config
from components.errors import ConfigError
from components.registry import registration_text
from components.storage import join
from flows.logs import show_project_logs
from flows.orchestration import link_registered_version, pipeline_run, run_stage
from flows.stages import evaluate_stage, export_stage, prepare_data, register_stage, train_stage

logger = logging.getLogger(__name__)


def flow_run_name() -> str:
    """The ``run_name`` parameter if given (a sweep's point: ``<sweep run>-p<i>``), else
    ``<recipe>-<backbone>``, e.g. ``strong-resnet50`` (the recipe name alone if the config is invalid)."""
    parameters = flow_run.parameters
    if parameters.get("run_name"):
        return str(parameters["run_name"])
    recipe = parameters.get("recipe", "strong")
    try:
        cfg = load_config(recipe, parameters.get("overrides") or [])
    except ConfigError:  # the flow body reports it; naming the run must not fail first
        return str(recipe)
    return f"{cfg.recipe}-{cfg.model.backbone}"


def iou_table(baseline: dict[str, Any], finetuned: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-class IoU rows (percent, 2 decimals; None where a class is absent) ending with the mIoU row."""

    def percent(value: float | None) -> float | None:
        return None if value is None or math.isnan(value) else round(100 * value, 2)

    rows = []
    for name, fine_iou in finetuned["per_class_iou"].items():
        base, fine = percent(baseline["per_class_iou"].get(name)), percent(fine_iou)
        delta = None if base is None or fine is None else round(fine - base, 2)
        rows.append({"class": name, "baseline": base, "finetuned": fine, "delta": delta})
    base, fine = percent(baseline["miou"]), percent(finetuned["miou"])
    rows.append({"class": "mIoU", "baseline": base, "finetuned": fine, "delta": round(fine - base, 2)})
    return rows


@task(name="publish-artifacts")
def publish_artifacts(
    cfg: Config,
    baseline: dict[str, Any],
    finetuned: dict[str, Any],
    trained: dict[str, Any],
    registered: dict[str, Any] | None,
) -> None:
    """The flow run's Prefect artifacts: IoU table, links to the MLflow runs and the model version (if one
    was registered)."""
    create_table_artifact(
        iou_table(baseline, finetuned),
        key="iou-baseline-vs-finetuned",
        description=f"Val IoU (%) of the {cfg.evaluate.baseline} baseline and the fine-tuned "
        f"{cfg.model.backbone} ({cfg.recipe} recipe)",
    )
    pipeline_run_id = cfg.tracking.parent_run_id
    create_link_artifact(
        tracking.run_url(cfg, pipeline_run_id),
        link_text=f"MLflow pipeline run {pipeline_run_id}",
        key="mlflow-pipeline-run",
    )
    run_id = trained["mlflow_run_id"]
    create_link_artifact(
        tracking.run_url(cfg, run_id),
        link_text=f"MLflow training run {run_id}",
        key="mlflow-training-run",
    )
    scores = f"val mIoU {100 * finetuned['miou']:.2f}% (baseline {100 * baseline['miou']:.2f}%)"
    if registered is None:
        create_markdown_artifact(f"Not registered (register_model=false): {scores}", key="finetune-summary")
        return
    link_registered_version(cfg, registered)
    create_markdown_artifact(f"{registration_text(registered)}: {scores}", key="finetune-summary")


@flow(name="finetune", flow_run_name=flow_run_name, persist_result=True)
def finetune(
    recipe: str = "strong",
    overrides: list[str] | None = None,
    register_model: bool = True,
    run_name: str | None = None,
) -> dict[str, Any]:
    """The whole pipeline for one config (a recipe name or YAML path plus ``section.key=value`` overrides).

    ``register_model=False`` skips the register stage: the result's ``candidate`` holds the register stage's
    parameters (for flows/sweep.py). ``run_name`` names the flow run (default ``<recipe>-<backbone>``).
    The result is persisted so that a parent running this flow through ``run_deployment`` can read it.
    """
    show_project_logs()
    overrides = list(overrides or [])
    cfg = load_config(recipe, overrides)  # invalid configs fail here, before any work
    with pipeline_run(cfg) as (pipeline_run_id, metrics):
        summary = _pipeline(
            cfg, recipe, [*overrides, f"tracking.parent_run_id={pipeline_run_id}"], register_model
        )
        metrics.update(
            baseline_val_miou=summary["baseline_miou"], finetuned_val_miou=summary["finetuned_miou"]
        )
    return {**summary, "mlflow_run_id": pipeline_run_id}


def _pipeline(cfg: Config, recipe: str, overrides: list[str], register: bool) -> dict[str, Any]:
    """Train and export, then register the candidate (if ``register``) and publish the artifacts."""
    outcome = _train_and_export(cfg, recipe, overrides)
    cfg = outcome.cfg
    registered = run_stage(cfg, "register", register_stage, **outcome.candidate) if register else None
    publish_artifacts.with_options(
        retries=cfg.orchestration.retries, retry_delay_seconds=cfg.orchestration.retry_delay_seconds
    )(cfg, outcome.baseline, outcome.finetuned, outcome.trained, registered)
    summary = {
        "tracking_uri": cfg.resolved_tracking_uri(),
        "baseline_miou": outcome.baseline["miou"],
        "finetuned_miou": outcome.finetuned["miou"],
        "onnx_path": outcome.onnx_path,
        "data_root": cfg.data.root,
        "run_dir": cfg.run_dir,
    }
    if registered is None:
        return {**summary, "candidate": outcome.candidate}
    return {
        **summary,
        "model_name": registered["name"],
        "version": registered["version"],
        "aliases": registered["aliases"],
        "promoted": registered["promoted"],
    }


@dataclass
class _Outcome:
    """What the stages up to the export produced; ``candidate`` = the register stage's parameters."""

    cfg: Config
    baseline: dict[str, Any]
    trained: dict[str, Any]
    finetuned: dict[str, Any]
    onnx_path: str
    candidate: dict[str, Any]


def _train_and_export(cfg: Config, recipe: str, overrides: list[str]) -> _Outcome:
    """The stages in order; ``overrides`` name the parent MLflow run, the prepared root is added here."""
    work_dir = join(cfg.run_dir, "flow-runs", str(flow_run.id))
    if not any(override.startswith("train.output_dir=") for override in overrides):
        # Each flow run trains in its own folder: a retry of this flow run resumes there, a new run trains
        # afresh (and registers a new version); train.output_dir=<dir> in the overrides pins a folder.
        overrides = [*overrides, f"train.output_dir={join(work_dir, 'train')}"]
    prepared = run_stage(cfg, "prepare", prepare_data, recipe=recipe, overrides=overrides)
    data_root = prepared["root"]
    config = {"recipe": recipe, "overrides": [*overrides, f"data.root={data_root}"]}
    cfg = load_config(recipe, config["overrides"])
    tracking.log_dataset(cfg, "pipeline", run_id=cfg.tracking.parent_run_id)

    baseline = run_stage(
        cfg,
        "evaluate",
        evaluate_stage,
        **config,
        out_dir=join(work_dir, "baseline"),
        baseline=cfg.evaluate.baseline,
    )
    trained = run_stage(cfg, "train", train_stage, **config)
    best = trained["best_checkpoint"]
    finetuned = run_stage(
        cfg, "evaluate", evaluate_stage, **config, out_dir=join(work_dir, "finetuned"), model_uri=best
    )
    onnx_path = join(work_dir, "model.onnx")
    run_stage(cfg, "export", export_stage, **config, checkpoint_uri=best, out_path=onnx_path)
    candidate = {
        **config,
        "train_run_id": trained["mlflow_run_id"],
        "checkpoint_uri": best,
        "onnx_path": onnx_path,
        "val_miou": finetuned["miou"],
        "baseline_miou": baseline["miou"],
        "dataset_fingerprint": prepared["fingerprint"],
    }
    return _Outcome(cfg, baseline, trained, finetuned, onnx_path, candidate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.finetune",
        description="Run the whole finetune flow locally "
        "(on a temporary Prefect server unless PREFECT_API_URL is set).",
    )
    parser.add_argument("--recipe", default="demo", help="recipe name (demo, paper, strong) or YAML path")
    parser.add_argument("overrides", nargs="*", help="config overrides such as train.epochs=2")
    args = parser.parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    load_config(args.recipe, args.overrides)  # a clear ConfigError before Prefect starts
    # Show the components' progress (e.g. the streamed torchrun output) without other libraries' INFO noise.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("components", "flows"):
        logging.getLogger(name).setLevel(logging.INFO)
    with temporary_settings(_temporary_server_settings()):
        summary = finetune(recipe=args.recipe, overrides=args.overrides)
    aliases = ", ".join(summary["aliases"]) or "none"
    tracking_uri = summary["tracking_uri"]
    print(
        f"\nRegistered {summary['model_name']} version {summary['version']} (aliases: {aliases}); "
        f"val mIoU {100 * summary['finetuned_miou']:.2f}% vs baseline {100 * summary['baseline_miou']:.2f}%."
    )
    print(f"Browse runs and models:  mlflow ui --backend-store-uri {tracking_uri}")
    print(
        f"Predict with the champion:  MLFLOW_TRACKING_URI={tracking_uri} python -m components.predict "
        f"--model models:/{summary['model_name']}@champion --input {summary['data_root']}/leftImg8bit/val "
        f"--output {summary['run_dir']}/predictions"
    )


def _temporary_server_settings() -> dict[Any, Any]:
    """Settings for the temporary Prefect server that the CLI starts when PREFECT_API_URL is unset.

    Its usage telemetry is off: without internet the heartbeat prints a traceback into a run where nothing
    failed. Its start-up may take 120 s instead of 20: a busy 2-core machine needs more than 20. Settings
    the user exported win.
    """
    wanted = {PREFECT_SERVER_ANALYTICS_ENABLED: False, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120}
    return {setting: value for setting, value in wanted.items() if setting.name not in os.environ}


if __name__ == "__main__":
    raise SystemExit(main())
