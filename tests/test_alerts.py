"""Alerts on failed flow runs: deploy/alerts.py (run by deploy/deploy.sh) against a real Prefect server,
whose automation service POSTs to a webhook receiver in this test. (`make stack-test` checks the same
automation on the compose stack, after SIGKILLing a flow-run container.)"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from prefect.events.actions import SendNotification

from tests.mlflowserver import stop_group
from tests.prefectstack import BIN, ROOT, start_process
from tests.s3server import free_port, wait_for_http

# Webhook URLs carry tokens (Slack's do): this one must reach no notification.
WEBHOOK_TOKEN = "webhook-token-sentinel-7c2d"
FAILING_FLOWS = """
import sys
from prefect import flow

@flow(name=sys.argv[1], flow_run_name=sys.argv[2])
def failing() -> None:
    raise RuntimeError("boom")

failing(return_state=True)
"""


def test_automation_file_watches_the_pipeline_flows() -> None:
    spec = importlib.util.spec_from_file_location("alerts", ROOT / "deploy" / "alerts.py")
    alerts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alerts)
    block_id = uuid4()
    (automation,) = alerts.load_automations(block_id)
    (action,) = automation.actions
    assert isinstance(action, SendNotification) and action.block_document_id == block_id
    watched = set(automation.trigger.match_related.model_dump()["prefect.resource.name"])
    declared = {
        name
        for module in ("finetune", "sweep", "predict")
        for name in re.findall(r'@flow\(name="([\w-]+)"', (ROOT / "flows" / f"{module}.py").read_text())
    }
    # A predict-shard run that fails is retried by its predict run, which alerts if it still fails.
    assert watched == declared - {"predict-shard"} == {"finetune", "sweep", "predict"}


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict]]]:
    """A webhook receiver on 127.0.0.1: (its URL with a token, the JSON bodies POSTed to it)."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hooks/{WEBHOOK_TOKEN}", received
    finally:
        server.shutdown()


def test_failed_run_notifies_the_alert_block_once(tmp_path: Path, receiver: tuple[str, list[dict]]) -> None:
    url, received = receiver
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CITYSEG_"))}
    env = {
        **clean,
        "PATH": f"{BIN}{os.pathsep}{clean.get('PATH', '')}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server = start_process(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        tmp_path / "prefect-server.log",
        tmp_path,
    )

    def api(call: Callable[[Any], Any]) -> Any:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
            return call(c)

    def run(*args: str, **extra: str) -> str:
        result = subprocess.run(
            args, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=180, process=server)
        off = run(sys.executable, "deploy/alerts.py")
        assert "alerts on failed runs are OFF" in off and "CITYSEG_ALERT_WEBHOOK_URL" in off
        first = run(sys.executable, "deploy/alerts.py", CITYSEG_ALERT_WEBHOOK_URL=url)
        again = run(sys.executable, "deploy/alerts.py", CITYSEG_ALERT_WEBHOOK_URL=url)
        assert "created automation cityseg-flow-run-failed" in first
        assert "updated automation cityseg-flow-run-failed" in again
        assert WEBHOOK_TOKEN not in first + again

        automations = api(lambda c: c.read_automations())
        blocks = api(lambda c: c.read_block_documents(include_secrets=False))
        assert [a.name for a in automations] == ["cityseg-flow-run-failed"], "re-deploying duplicated it"
        assert WEBHOOK_TOKEN not in json.dumps([b.model_dump(mode="json") for b in blocks])

        # A failure of a flow the automation does not watch, then one of a watched flow.
        run(sys.executable, "-c", FAILING_FLOWS, "prepare-data", "unwatched-run")
        run(sys.executable, "-c", FAILING_FLOWS, "predict", "watched-run")
        deadline = time.monotonic() + 120
        while not received and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(5)  # a second (duplicate or unwatched) notification would come within seconds
        assert len(received) == 1, received
        text = received[0]["text"]
        (watched,) = [r for r in api(lambda c: c.read_flow_runs()) if r.name == "watched-run"]
        assert "flow run watched-run is Failed" in text
        assert f"http://127.0.0.1:{port}/runs/flow-run/{watched.id}" in text
        assert f"prefect flow-run retry {watched.id}" in text
        assert "boom" in text and WEBHOOK_TOKEN not in text
    finally:
        stop_group(server)
