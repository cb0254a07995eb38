"""End to end, as a user would run it: a real Prefect server and process worker, the local variant of
deploy/prefect.yaml deployed with deploy/deploy.sh, a real S3 endpoint (moto) behind a real MLflow server
with proxied artifacts, ``prefect deployment run finetune/cityscapes-local --watch``, then the deployed
data stage again (skipped: unchanged data). Sentinel secrets in every process's environment must not
show up in anything the runs produced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
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
ARTIFACT_KEYS = [
    "iou-baseline-vs-finetuned",
    "mlflow-pipeline-run",
    "mlflow-training-run",
    "registered-model-version",
    "finetune-summary",
]


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


def _start(command: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> subprocess.Popen:
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


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
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
    server = _start(
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


def _overrides(work: Path) -> list[str]:
    """A tiny config: 64x128 synthetic data in tmp, one epoch, everything written under ``work``."""
    return [
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
        f"train.output_dir={work / 'run' / 'train'}",
        "tracking.system_metrics=false",
        f"registry.model_name={MODEL_NAME}",
        "export.parity_sizes=[[64, 128], [32, 64]]",
        "export.parity_images=1",
        "evaluate.num_overlays=1",
    ]


def _client_calls(api_url: str, function: Any) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return function(client)


def _runs_of(api_url: str) -> tuple[list[Any], dict[Any, Any]]:
    """All flow runs (oldest first) and a task-run-id -> flow-run-id map."""

    def read(client: Any) -> tuple[list[Any], dict[Any, Any]]:
        flow_runs = sorted(client.read_flow_runs(), key=lambda run: run.created)
        task_runs = client.read_task_runs()
        return flow_runs, {task.id: task for task in task_runs}

    return _client_calls(api_url, read)


def _log_tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deployed_flow_end_to_end(stack: Stack) -> None:
    import boto3
    from mlflow import MlflowClient

    deployed = stack.cli("bash", "deploy/deploy.sh", "local")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    worker = _start(
        [str(BIN / "prefect"), "worker", "start", "--pool", "local", "--type", "process"],
        stack.env,
        stack.work / "worker.log",
        stack.work,
    )
    params = json.dumps({"recipe": "demo", "overrides": _overrides(stack.work)})
    try:
        run = stack.cli(
            "prefect", "deployment", "run", "finetune/cityscapes-local", "--params", params,
            "--watch", "--watch-interval", "2", "--watch-timeout", "420", timeout=450,
        )  # fmt: skip
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{_log_tail(stack.work / 'worker.log')}"
        # Again with unchanged data: the deployed data-preparation stage skips the work.
        rerun = stack.cli(
            "prefect", "deployment", "run", "prepare-data/cityscapes-local", "--params", params,
            "--watch", "--watch-interval", "1", "--watch-timeout", "120", timeout=150,
        )  # fmt: skip
        assert rerun.returncode == 0, (
            f"{rerun.stdout}\n{rerun.stderr}\n{_log_tail(stack.work / 'worker.log')}"
        )
    finally:
        stop_group(worker)

    flow_runs, task_runs = _runs_of(stack.api_url)
    (parent,) = [run for run in flow_runs if run.parent_task_run_id is None and run.name.startswith("demo-")]
    assert parent.state.name == "Completed"
    assert parent.name == "demo-mobilenet_v3_large"  # <recipe>-<backbone>

    # The data-preparation stage ran through its own deployment (a flow run of its own on the pool).
    first_prepare = next(run for run in flow_runs if run.name == f"{parent.name}-prepare")
    assert task_runs[first_prepare.parent_task_run_id].flow_run_id == parent.id
    (second_prepare,) = [
        run for run in flow_runs if run.created > parent.created and run.parent_task_run_id is None
    ]
    assert (
        first_prepare.deployment_id is not None
        and first_prepare.deployment_id == second_prepare.deployment_id
    )

    def prepare_task_state(prepare_run: Any) -> str:
        (state,) = [task.state.name for task in task_runs.values() if task.flow_run_id == prepare_run.id]
        return state

    assert prepare_task_state(first_prepare) == "Completed"
    assert prepare_task_state(second_prepare) == "Skipped"  # unchanged data: not prepared again
    assert second_prepare.state.name == "Completed"

    # MLflow: baseline and fine-tuned evaluations with metrics, a champion version, its ONNX in the bucket.
    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("cityscapes-deeplabv3")
    runs = client.search_runs([experiment.experiment_id])
    by_name: dict[str, list[Any]] = {}
    for mlflow_run in runs:
        by_name.setdefault(mlflow_run.info.run_name, []).append(mlflow_run)
    (pipeline_run,) = by_name[parent.name]  # the flow run's MLflow run: the stages' runs are its children
    for name in ("baseline-paper-baseline", "finetuned"):
        assert len(by_name.get(name, [])) == 1, sorted(by_name)
        for mlflow_run in by_name[name]:
            assert 0.0 <= mlflow_run.data.metrics["val_miou"] <= 1.0
            assert mlflow_run.data.tags["mlflow.parentRunId"] == pipeline_run.info.run_id
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.version == "1"
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    objects = s3.list_objects_v2(Bucket=stack.bucket)
    keys = [obj["Key"] for obj in objects.get("Contents", [])]
    assert any(key.endswith(".onnx") for key in keys), keys

    # Prefect artifacts of the flow run: the IoU table and the links.
    def read_artifacts(prefect_client: Any) -> list[Any]:
        return prefect_client.read_artifacts()

    artifacts = _client_calls(stack.api_url, read_artifacts)
    assert set(ARTIFACT_KEYS) <= {artifact.key for artifact in artifacts if artifact.flow_run_id == parent.id}
    table = next(a for a in artifacts if a.key == "iou-baseline-vs-finetuned" and a.flow_run_id == parent.id)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows[-1]["class"] == "mIoU" and len(rows) == 20

    # No secret anywhere: CLI output, server/worker logs, Prefect and MLflow databases (parameters,
    # logs, artifacts, params, tags), files under the run directory, objects in the bucket.
    haystacks: list[tuple[str, bytes]] = [
        (f"cli output {i}", out.encode()) for i, out in enumerate(stack.outputs)
    ]
    haystacks += [(str(path), path.read_bytes()) for path in stack.work.rglob("*") if path.is_file()]
    haystacks += [
        (f"s3://{stack.bucket}/{key}", s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read())
        for key in keys
    ]
    assert len(haystacks) > 20
    for where, content in haystacks:
        for sentinel in SENTINELS:
            assert sentinel.encode() not in content, f"secret leaked into {where}"
