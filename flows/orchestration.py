"""Prefect glue the flows share: running a stage (in-process, or through its deployment), flow runs of a
deployment under a concurrency limit (the sweep's points, the predict flow's shards), the flow run's MLflow
parent run, and the link to a registered version.

What these do in MLflow is in components/tracking; this module adds only what needs Prefect (the flow
run's id, name and attempt, other flow runs' states, artifacts, deployments).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from prefect import Flow
from prefect.artifacts import create_link_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse as Deployment
from prefect.concurrency.sync import concurrency as concurrency_slot
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run

from components import tracking
from components.config import Config, StageName
from components.errors import ConfigError

logger = logging.getLogger(__name__)

POLL_SECONDS = 2.0
"""How often a task waiting on a flow run of a deployment asks the API whether it has finished."""


class StageFailed(RuntimeError):
    """A stage deployment's flow run did not complete."""


def run_stage(cfg: Config, stage: StageName, stage_flow: Flow[..., Any], **parameters: Any) -> Any:
    """Run a stage through its deployment when one is configured, else in-process as a subflow."""
    run_name = f"{flow_run.name}-{stage}"
    deployment = cfg.orchestration.stage_deployments.get(stage)
    if deployment is None:
        return stage_flow.with_options(flow_run_name=run_name)(**parameters)
    logger.info("running stage %s on deployment %s", stage, deployment)
    stage_run = run_deployment(
        deployment, parameters=parameters, timeout=cfg.orchestration.stage_timeout_s, flow_run_name=run_name
    )
    if stage_run.state is None or not stage_run.state.is_completed():
        state = stage_run.state.name if stage_run.state else "unknown"
        raise StageFailed(
            f"stage {stage} (deployment {deployment}, flow run {stage_run.id}) ended {state}; "
            "see that flow run's logs"
        )
    return stage_run.state.result()


def read_deployment(name: str) -> Deployment:
    """The deployment ``flow/name``; a ConfigError that says how to deploy it when there is none."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigError(
                f"deployment {name} not found: deploy it first (deploy/deploy.sh <variant>)"
            ) from None


@contextmanager
def concurrency_limit(name: str, slots: int) -> Iterator[str]:
    """A Prefect global concurrency limit of ``slots`` for this flow run's children, deleted when the block
    ends (a retried flow run finds its own and resizes it)."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, slots)
    try:
        yield name
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(name)


def run_in_slot(
    limit: str, deployment: str, name: str, parameters: dict[str, Any], tags: list[str]
) -> FlowRun:
    """A flow run of ``deployment``, started once a slot of ``limit`` is free and waited for (the slot is
    held until it ends): at most the limit's slots of them run at once."""
    # A lost lease renewal (API blip) must not abandon a child run that may take hours.
    with concurrency_slot(limit, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        return run_deployment(
            deployment, parameters=parameters, flow_run_name=name, tags=tags, poll_interval=POLL_SECONDS
        )


@contextmanager
def pipeline_run(cfg: Config, tags: dict[str, str] | None = None) -> Iterator[tuple[str, dict[str, float]]]:
    """This flow run's MLflow parent run (:func:`components.tracking.pipeline_run`), named like the flow
    run and continued by its retries; the runs that flow runs which Prefect reports ended left ``RUNNING``
    (their process was killed) are closed first."""
    close_abandoned_runs(cfg)
    flow_run_id = str(flow_run.id)
    with tracking.pipeline_run(cfg, flow_run_id, flow_run.name or cfg.recipe, flow_run.run_count, tags) as (
        run_id,
        metrics,
    ):
        yield run_id, metrics


def close_abandoned_runs(cfg: Config) -> None:
    """Close the pipeline runs (and their stage runs) left ``RUNNING`` by flow runs that Prefect reports
    ended: a killed process never closed them. Runs of flow runs this Prefect server does not know are left
    alone (another server's, maybe alive); a retry of an ended flow run reopens its run."""
    running = tracking.running_pipeline_runs(cfg)
    with get_client(sync_client=True) as client:
        for run_id, other_id in running.items():
            try:
                other = client.read_flow_run(UUID(other_id))
            except (ObjectNotFound, ValueError):
                continue
            if other.state is not None and other.state.is_final():
                reason = (
                    f"flow run {other_id} ({other.name}) ended {other.state.name} with this run RUNNING "
                    f"(its process was killed); closed by flow run {flow_run.id}"
                )
                tracking.close_run(cfg, run_id, reason)


def link_registered_version(cfg: Config, registered: dict[str, Any]) -> None:
    """A Prefect link artifact to the registered model version's MLflow page."""
    name, version = registered["name"], registered["version"]
    create_link_artifact(
        tracking.model_version_url(cfg, name, version),
        link_text=f"{name} version {version}",
        key="registered-model-version",
    )
