"""A real MLflow tracking server for tests: SQLite backend, artifacts proxied to an S3 bucket.

The server alone holds the S3 credentials (``--artifacts-destination s3://...`` with
``MLFLOW_S3_ENDPOINT_URL`` in its environment); clients talk HTTP only and need no S3 keys.

    with moto_server() as s3, mlflow_server(tmp_path, s3) as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.tracking_uri
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3server import TEST_CREDENTIALS, free_port, moto_server, wait_for_http


@dataclass
class MlflowServer:
    tracking_uri: str
    bucket: str
    artifacts_destination: str
    log_path: Path
    """The server's stdout+stderr (scan it for secrets)."""
    backend_store_uri: str
    port: int


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


@contextmanager
def mlflow_server(
    workdir: Path,
    s3_endpoint: str,
    bucket: str = "mlflow",
    port: int | None = None,
    timeout: float = 120.0,
) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` (1 worker) on 127.0.0.1; the bucket is created first. Reusing ``workdir``
    and ``port`` restarts the same server (same database, same artifacts)."""
    workdir.mkdir(parents=True, exist_ok=True)
    create_bucket(s3_endpoint, bucket)
    port = port or free_port()
    backend = f"sqlite:///{workdir / 'mlflow.db'}"
    destination = f"s3://{bucket}/mlartifacts"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))},
        **TEST_CREDENTIALS,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        # MLflow 3's job runner (GenAI jobs) starts ~8 extra processes; nothing here uses it.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log_path = workdir / f"server-{port}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", backend,
                "--artifacts-destination", destination,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,  # its own process group: the server spawns uvicorn workers
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", timeout=timeout, process=process)
        yield MlflowServer(url, bucket, destination, log_path, backend, port)
    finally:
        stop_group(process)


@contextmanager
def proxied_mlflow_server(directory: Path) -> Iterator[tuple[MlflowServer, str]]:
    """A moto S3 endpoint and an MLflow server proxying artifacts to it; yields (server, S3 endpoint).

    Clients get only the tracking URI: no AWS variables, so S3 is reachable through the server only.
    """
    with moto_server() as s3, mlflow_server(directory, s3) as srv, pytest.MonkeyPatch.context() as patch:
        for name in [*TEST_CREDENTIALS, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"]:
            patch.delenv(name, raising=False)
        patch.setenv("MLFLOW_TRACKING_URI", srv.tracking_uri)
        yield srv, s3


def stop_group(process: subprocess.Popen) -> None:
    """Terminate the server and the workers it spawned (its process group), then reap it."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
