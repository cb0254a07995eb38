"""The stack the end-to-end tests run against: a real Prefect server, a real S3 endpoint (moto) behind a real
MLflow server with proxied artifacts, and helpers to deploy the local variant with deploy/deploy.sh and run a
process worker. Test modules import the ``stack`` fixture:

    from tests.prefectstack import stack_fixture  # noqa: F401 (the "stack" fixture)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.mlflowserver import mlflow_server, stop_group
from tests.s3server import TEST_CREDENTIALS, free_port, moto_server, wait_for_http

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CITYSCAPES_PASSWORD_SENTINEL = "cityscapes-password-sentinel-5b1e"
SENTINELS = [CITYSCAPES_PASSWORD_SENTINEL, TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]]
MODEL_NAME = "e2e-cityscapes-deeplabv3"


@dataclass
class Stack:
    env: dict[str, str]
    api_url: str
    tracking_uri: str
    s3_endpoint: str
    bucket: str
    work: Path
    outputs: list[str]
    """stdout+stderr of every CLI command (scanned for secrets)."""

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            args, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        self.outputs.append(result.stdout + result.stderr)
        return result


def start_process(command: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
    """A background process in its own session (stop it with stop_group), output appended to log_path."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture(name="stack")
def stack_fixture(tmp_path: Path) -> Iterator[Stack]:
    prefect_port = free_port()
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    env = {
        **clean,
        **TEST_CREDENTIALS,
        "PATH": f"{BIN}{os.pathsep}{clean.get('PATH', '')}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "prefect-results"),
        "CITYSCAPES_USERNAME": "e2e-user",
        "CITYSCAPES_PASSWORD": CITYSCAPES_PASSWORD_SENTINEL,
        "PYTHONUNBUFFERED": "1",
    }
    # Both servers take a while to start on a busy machine: start Prefect's, then MLflow's, wait for both.
    server = start_process(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        env,
        tmp_path / "prefect-server.log",
        tmp_path,
    )
    try:
        with moto_server() as s3, mlflow_server(tmp_path / "mlflow", s3) as mlflow:
            env.update(MLFLOW_TRACKING_URI=mlflow.tracking_uri, AWS_ENDPOINT_URL_S3=s3)
            wait_for_http(f"{api_url}/health", timeout=180, process=server)
            yield Stack(env, api_url, mlflow.tracking_uri, s3, mlflow.bucket, tmp_path, [])
    finally:
        stop_group(server)


@contextmanager
def local_worker(stack: Stack) -> Iterator[Path]:
    """Deploy the local variant with deploy/deploy.sh and run a process worker (no run limit) on its pool
    while the block runs; yields the worker's log file."""
    deployed = stack.cli("bash", "deploy/deploy.sh", "local")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    with process_worker(stack, "worker") as log_path:
        yield log_path


@contextmanager
def process_worker(stack: Stack, name: str) -> Iterator[Path]:
    """One more process worker on the local pool (another "node"), named ``name``; yields its log file."""
    log_path = stack.work / f"{name}.log"
    command = [
        str(BIN / "prefect"),
        "worker",
        "start",
        "--pool",
        "local",
        "--type",
        "process",
        "--name",
        name,
    ]
    worker = start_process(command, stack.env, log_path, stack.work)
    try:
        yield log_path
    finally:
        stop_group(worker)


def tiny_overrides(work: Path, pin_output_dir: bool = True) -> list[str]:
    """A tiny config: 64x128 synthetic data in tmp, one epoch, everything written under ``work``.
    ``pin_output_dir=False`` leaves train.output_dir to the flow (a folder per flow run)."""
    overrides = [
        "orchestration.stage_deployments.prepare=prepare-data/cityscapes-local",
        "orchestration.retries=0",
        f"run_dir={work / 'run'}",
        f"data.root={work / 'data'}",
        "data.synthetic={train: 4, val: 2, height: 64, width: 128, cities: 1, seed: 0}",
        "data.num_workers=0",
        "data.trainid_workers=1",
        "augment.crop=[64, 128]",
        "train.epochs=1",
        "train.global_batch_size=2",
        "tracking.system_metrics=false",
        f"registry.model_name={MODEL_NAME}",
        "export.parity_sizes=[[64, 128], [32, 64]]",
        "export.parity_images=1",
        "evaluate.num_overlays=1",
    ]
    if pin_output_dir:
        overrides.append(f"train.output_dir={work / 'run' / 'train'}")
    return overrides


def client_calls(api_url: str, function: Any) -> Any:
    """``function(client)`` with a sync Prefect client of the server at ``api_url``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return function(client)


def runs_of(api_url: str) -> tuple[list[Any], dict[Any, Any]]:
    """All flow runs (oldest first) and a task-run-id -> task run map."""

    def read(client: Any) -> tuple[list[Any], dict[Any, Any]]:
        flow_runs = sorted(client.read_flow_runs(), key=lambda run: run.created)
        task_runs = client.read_task_runs()
        return flow_runs, {task.id: task for task in task_runs}

    return client_calls(api_url, read)


def flow_run_logs(api_url: str, flow_run_ids: list[Any]) -> list[str]:
    """The messages of these flow runs' Prefect logs, oldest first (as the UI shows them)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids))

    def read(client: Any) -> list[str]:
        messages: list[str] = []
        while page := client.read_logs(log_filter=log_filter, limit=200, offset=len(messages)):
            messages += [log.message for log in page]
        return messages

    return client_calls(api_url, read)


def log_tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
