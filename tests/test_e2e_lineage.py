"""A crashed and retried flow run is one MLflow lineage. On the stack of the deployment test (real Prefect
server and process worker, MLflow server on moto S3): run finetune/cityscapes-local, SIGKILL the flow run's
processes (the engine, torchrun and its rank, as a killed container would lose them) once training has
checkpointed an epoch, wait until Prefect marks the run Crashed, ``prefect flow-run retry <id>``, then check
MLflow: one parent run, FINISHED, holding baseline, training (resumed: each epoch logged once, those before
the kill not redone) and fine-tuned evaluation; no run RUNNING; one registered version."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest

from components import tracking
from tests.prefectstack import (
    MODEL_NAME,
    Stack,
    client_calls,
    local_worker,
    log_tail,
    stack_fixture,  # noqa: F401 (the "stack" fixture)
    tiny_overrides,
)

EPOCHS = 6


def flow_run_state(stack: Stack, flow_run_id: str) -> Any:
    return client_calls(stack.api_url, lambda client: client.read_flow_run(UUID(flow_run_id))).state


def worker_executed(stack: Stack, flow_run_id: str) -> bool:
    """Whether the worker has emitted its ``executed-flow-run`` event for the flow run."""
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    executed = EventFilter(
        event=EventNameFilter(name=["prefect.worker.executed-flow-run"]),
        related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
    )
    return bool(client_calls(stack.api_url, lambda client: client.read_events(executed, limit=1).events))


def wait_for(condition: Any, what: str, timeout: float, worker_log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log_tail(worker_log)}")


def kill_flow_run_processes(flow_run_id: str) -> list[int]:
    """SIGKILL the process that runs the flow run (``python -m prefect.engine``) and all its descendants
    at once; torchrun's ranks run in sessions of their own, so a process group would miss them."""
    (engine,) = [
        process
        for process in psutil.process_iter(["cmdline", "environ"])
        if (process.info["environ"] or {}).get("PREFECT__FLOW_RUN_ID") == flow_run_id
        and "prefect.engine" in (process.info["cmdline"] or [])
    ]
    victims = [engine, *engine.children(recursive=True)]
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    return [victim.pid for victim in victims]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_then_retried_flow_run_is_one_mlflow_lineage(stack: Stack) -> None:
    from mlflow import MlflowClient

    # A folder per flow run (not pinned): the retry resumes there. Enough epochs that the kill lands
    # in the middle of training.
    overrides = [*tiny_overrides(stack.work, pin_output_dir=False), f"train.epochs={EPOCHS}"]
    params = json.dumps({"recipe": "demo", "overrides": overrides})
    with local_worker(stack) as worker_log:
        started = stack.cli("prefect", "deployment", "run", "finetune/cityscapes-local", "--params", params)
        assert started.returncode == 0, started.stdout + started.stderr
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
        train_dir = stack.work / "run" / "flow-runs" / flow_run_id / "train"

        def checkpointed() -> bool:
            state = flow_run_state(stack, flow_run_id)
            assert state is None or not state.is_final(), f"ended {state.name} before the kill"
            return any(train_dir.glob("epoch_*.pt.sha256"))  # written last: a complete checkpoint

        wait_for(checkpointed, "training's first checkpoint", 420, worker_log)
        killed_at = time.time() * 1000
        assert len(kill_flow_run_processes(flow_run_id)) >= 3  # engine, torchrun, rank 0

        # The process worker reports the crash twice: its runner as the process dies, then the worker
        # when the submission ends (seconds later on a busy machine). A retry in between would be crashed
        # by the late report: retry once the worker is done with the flow run.
        wait_for(
            lambda: worker_executed(stack, flow_run_id), "the worker to finish the flow run", 120, worker_log
        )
        assert flow_run_state(stack, flow_run_id).is_crashed()
        retried = stack.cli("prefect", "flow-run", "retry", flow_run_id)
        assert retried.returncode == 0, retried.stdout + retried.stderr
        final = wait_for(
            lambda: (state := flow_run_state(stack, flow_run_id)) and state.is_final() and state,
            "the retried flow run to finish",
            420,
            worker_log,
        )
        assert final.is_completed(), f"{final.name}: {final.message}\n{log_tail(worker_log)}"

    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("cityscapes-deeplabv3")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get(tracking.FLOW_RUN_TAG) == flow_run_id]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.INTERRUPTED_TAG] == f"flow run {flow_run_id} retried (attempt 2)"
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_name = {run.info.run_name: run for run in children}
    assert sorted(by_name) == sorted(
        ["baseline-paper-baseline", "train-demo-mobilenet_v3_large", "finetuned"]
    )
    assert len(children) == 3
    assert [run.info.run_name for run in runs if run.info.status == "RUNNING"] == []
    assert not [run.info.run_name for run in runs if tracking.CLOSED_REASON_TAG in run.data.tags]

    # Training resumed in its run: every epoch logged once; those before the kill were not redone.
    training = by_name["train-demo-mobilenet_v3_large"]
    assert training.info.status == "FINISHED" and tracking.INTERRUPTED_TAG in training.data.tags
    for key in ("train_loss", "lr", "images_per_second"):
        steps = sorted(metric.step for metric in client.get_metric_history(training.info.run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), (key, steps)
    history = client.get_metric_history(training.info.run_id, "train_loss")
    before_kill = [metric.step for metric in history if metric.timestamp < killed_at]
    assert before_kill and sorted(before_kill) == list(range(1, len(before_kill) + 1))
    assert len(before_kill) < EPOCHS

    (version,) = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert version.run_id == training.info.run_id
