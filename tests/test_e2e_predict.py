"""Sharded batch inference end to end, as a team would run it: a real Prefect server with two process
workers on the local pool (two "nodes"), a real MLflow server with artifacts in moto S3, the model
registered by the real finetune deployment, inputs read from and masks + manifest written to S3.

``predict/cityscapes-local`` runs 4 shards of ``predict-shard/cityscapes-local`` at ``max_parallel=2``; one
shard's process is killed (SIGKILL) after it recorded its first batch. The flow starts that shard again,
which redoes only the inputs the killed process had not recorded; never more than 2 shards run at once;
the merged manifest has exactly one line per input and no shard records or work lists are left behind."""

from __future__ import annotations

import io
import json
import signal
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.prefectstack import (
    MODEL_NAME,
    Stack,
    client_calls,
    local_worker,
    log_tail,
    process_worker,
    stack_fixture,  # noqa: F401 (the "stack" fixture)
    tiny_overrides,
)
from tests.s3server import TEST_CREDENTIALS

FRAMES = 24
SHARDS = 4


def _s3(stack: Stack) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def _keys(s3: Any, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="predictions", Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _records(s3: Any, keys: list[str]) -> list[dict[str, Any]]:
    bodies = [s3.get_object(Bucket="predictions", Key=key)["Body"].read().decode() for key in keys]
    return [json.loads(line) for body in bodies for line in body.splitlines() if line]


def _upload_frames(s3: Any, synthetic_root: Path) -> list[str]:
    """FRAMES frames at 512x1024 (slow enough on a CPU for a shard to be caught mid-run) and a truncated
    JPEG, which skip_bad lists as failed."""
    sources = sorted((synthetic_root / "leftImg8bit").rglob("*.png"))
    names = []
    for index in range(FRAMES):
        rgb = cv2.resize(cv2.imread(str(sources[index % len(sources)])), (1024, 512))
        key = f"in/city/frame{index:03d}.png"
        s3.put_object(Bucket="frames", Key=key, Body=cv2.imencode(".png", rgb)[1].tobytes())
        names.append(f"s3://frames/{key}")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(buffer, "JPEG")
    s3.put_object(Bucket="frames", Key="in/cut.jpg", Body=buffer.getvalue()[:300])
    return names


def _shard_runs(stack: Stack, parent_id: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    tags = FlowRunFilterTags(all_=[f"predict:{parent_id}"])
    return client_calls(stack.api_url, lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter(tags=tags)))


def _kill_a_shard_mid_run(stack: Stack, s3: Any, parent_id: str, deadline: float) -> tuple[int, list[str]]:
    """SIGKILL the process of the first running shard that has recorded a batch; returns the shard and
    the inputs its killed process had recorded as segmented."""
    while time.monotonic() < deadline:
        for run in _shard_runs(stack, parent_id):
            shard = int(run.parameters["shard"])
            if run.state.name != "Running" or not _segmented(s3, shard):
                continue
            (process,) = [p for p in psutil.process_iter() if _runs_flow(p, str(run.id))]
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            return shard, _segmented(s3, shard)
        time.sleep(0.1)
    raise AssertionError("no shard was caught running with a recorded batch")


def _segmented(s3: Any, shard: int) -> list[str]:
    """The inputs shard ``shard`` has recorded as segmented so far."""
    records = _records(s3, _keys(s3, f"run/manifest.{shard:04d}/"))
    return [record["input"] for record in records if record["status"] == "ok"]


def _runs_flow(process: psutil.Process, flow_run_id: str) -> bool:
    try:
        return process.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id and "python" in process.name()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def _max_overlap(runs: list[Any]) -> int:
    events = sorted(
        [(run.start_time.timestamp(), 1) for run in runs] + [(run.end_time.timestamp(), -1) for run in runs]
    )
    running = peak = 0
    for _, change in events:  # an end sorts before a start at the same instant
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sharded_predict_on_two_workers_reruns_only_a_killed_shards_missing_inputs(
    stack: Stack, synthetic_root: Path
) -> None:
    s3 = _s3(stack)
    for bucket in ("frames", "predictions"):
        s3.create_bucket(Bucket=bucket)
    frames = _upload_frames(s3, synthetic_root)
    stack.env["CITYSEG_CACHE"] = str(stack.work / "model-cache")  # not the user's cache: fresh versions
    params = json.dumps({
        "inputs": "s3://frames/in", "output": "s3://predictions/run",
        "model": f"models:/{MODEL_NAME}@champion",
        "shards": SHARDS, "shard_deployment": "predict-shard/cityscapes-local", "max_parallel": 2,
        "batch_size": 1, "skip_bad": True, "retries": 1,
    })  # fmt: skip

    with local_worker(stack) as worker_log, process_worker(stack, "second-node") as second_log:
        finetune = json.dumps({"recipe": "demo", "overrides": tiny_overrides(stack.work)})
        trained = stack.cli(
            "prefect", "deployment", "run", "finetune/cityscapes-local", "--params", finetune,
            "--watch", "--watch-interval", "2", "--watch-timeout", "420", timeout=450,
        )  # fmt: skip
        assert trained.returncode == 0, f"{trained.stdout}\n{trained.stderr}\n{log_tail(worker_log)}"

        started = stack.cli("prefect", "deployment", "run", "predict/cityscapes-local", "--params", params)
        assert started.returncode == 0, started.stdout + started.stderr
        (parent_id,) = [w for w in started.stdout.split() if len(w) == 36 and w.count("-") == 4]
        killed_shard, recorded = _kill_a_shard_mid_run(stack, s3, parent_id, time.monotonic() + 300)
        parent = _wait_final(stack, parent_id, time.monotonic() + 400)
        assert parent.state.name == "Completed", (
            f"{parent.state}\n{log_tail(worker_log)}\n{log_tail(second_log)}"
        )

    # The merged manifest: exactly one line per input, all done with the champion; nothing else left.
    manifest = _records(s3, ["run/manifest.jsonl"])
    assert sorted(r["input"] for r in manifest) == sorted([*frames, "s3://frames/in/cut.jpg"])
    assert sum(r["status"] == "ok" for r in manifest) == FRAMES
    (bad,) = [r for r in manifest if r["status"] == "failed"]
    assert bad["input"] == "s3://frames/in/cut.jpg" and "truncated or corrupt JPEG" in bad["error"]
    assert {(r["model_name"], r["model_version"]) for r in manifest} == {(MODEL_NAME, "1")}
    assert all(
        len(r["input_sha256"]) == 64 and r["input_format"] == "PNG" for r in manifest if r["status"] == "ok"
    )
    assert len(_keys(s3, "run/trainIds/")) == FRAMES
    assert [
        k for k in _keys(s3, "run/") if not k.startswith(("run/trainIds/", "run/labelIds/", "run/overlay/"))
    ] == ["run/manifest.jsonl"]

    # Shards: 4 of them plus one rerun of the killed one, at most 2 at once, on both workers.
    runs = _shard_runs(stack, parent_id)
    assert sorted(run.state.name for run in runs) == ["Completed"] * SHARDS + ["Crashed"]
    assert _max_overlap(runs) <= 2
    for log in (worker_log, second_log):
        assert any(str(run.id) in log.read_text() for run in runs), f"{log.name} ran no shard"

    # The rerun redid only what the killed process had not recorded.
    table = _artifact(stack, "predict-shards", parent_id)
    rows = {row["shard"]: row for row in json.loads(table)}
    killed = rows[killed_shard]
    assert killed["attempts"] == 2 and killed["state"] == "Completed"
    assert 0 < len(recorded) < killed["inputs"] - killed["failed"]
    assert killed["resumed"] == len(recorded)
    assert killed["segmented"] == killed["inputs"] - len(recorded) - killed["failed"]
    assert sum(row["inputs"] for row in rows.values()) == FRAMES + 1
    assert float(_artifact(stack, "predict-progress", parent_id)) == 100.0
    summary = _artifact(stack, "predict-summary", parent_id)
    assert f"{FRAMES + 1} inputs: {FRAMES} segmented, 0 done before, 1 failed" in summary
    _print_throughput(runs, rows)


def _print_throughput(runs: list[Any], rows: dict[int, dict[str, Any]]) -> None:
    """What docs/batch-inference.md's throughput model takes from this run (``pytest -s`` shows it): per
    shard flow run, its wall time against the time it spent fetching, checking and segmenting."""
    for run in sorted(runs, key=lambda r: r.start_time):
        row = rows[int(run.parameters["shard"])]
        waited = (run.start_time - run.created).total_seconds()
        ran = (run.end_time - run.start_time).total_seconds()
        print(f"{run.name}: {run.state.name}; {waited:.1f} s from created to running, ran {ran:.1f} s; {row}")


def _wait_final(stack: Stack, flow_run_id: str, deadline: float) -> Any:
    from uuid import UUID

    while time.monotonic() < deadline:
        run = client_calls(stack.api_url, lambda c: c.read_flow_run(UUID(flow_run_id)))
        if run.state.is_final():
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish")


def _artifact(stack: Stack, key: str, flow_run_id: str) -> Any:
    artifacts = client_calls(stack.api_url, lambda c: c.read_artifacts())
    mine = [a for a in artifacts if a.key == key and str(a.flow_run_id) == flow_run_id]
    return max(mine, key=lambda a: a.updated).data
