"""``predict/cityscapes-local`` end to end: a real Prefect server and process worker (the stack fixture of
tests/test_e2e_deployment.py), a real MLflow server with artifacts in moto S3, inputs read from and masks +
manifest written to S3; then an interrupted run (its manifest cut back to two inputs and the other outputs
deleted) resumes. The model is registered directly with components.registry (a tiny exported model)
rather than by running the finetune deployment first, which takes minutes on CI."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.prefectstack import (
    Stack,
    client_calls,
    local_worker,
    log_tail,
    stack_fixture,  # noqa: F401 (the "stack" fixture)
)
from tests.s3server import TEST_CREDENTIALS
from tests.test_export import shared_export, tiny_config

NAME = "e2e-predict-deeplabv3"


def _s3(stack: Stack) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def _register(stack: Stack, tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> None:
    import mlflow

    from components.registry import register_model
    from components.tracking import mlflow_run

    checkpoint, exported = shared_export(tmp_path_factory, synthetic_root)
    with pytest.MonkeyPatch.context() as patch:
        for name in [*TEST_CREDENTIALS, "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"]:
            patch.delenv(name, raising=False)
        patch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
        cfg = tiny_config(
            "tracking.system_metrics=false", f"run_dir={stack.work}", f"registry.model_name={NAME}"
        )
        with mlflow_run(cfg, "train") as run:
            mlflow.log_metric("val_miou", 0.1)
        assert register_model(cfg, run.info.run_id, checkpoint, exported.onnx_path, 0.5, 0.4, "fp").promoted


def _manifest(s3: Any) -> list[dict[str, Any]]:
    body = s3.get_object(Bucket="predictions", Key="run/manifest.jsonl")["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_predict_deployment_writes_masks_and_manifest_to_s3_and_resumes(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path
) -> None:
    _register(stack, tmp_path_factory, synthetic_root)
    s3 = _s3(stack)
    for bucket in ("frames", "predictions"):
        s3.create_bucket(Bucket=bucket)
    frames = sorted((synthetic_root / "leftImg8bit").rglob("*.png"))[:6]
    for path in frames:
        s3.upload_file(str(path), "frames", f"in/{path.parent.name}/{path.name}")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(buffer, "JPEG")
    s3.put_object(Bucket="frames", Key="in/cut.jpg", Body=buffer.getvalue()[:300])  # truncated

    stack.env["CITYSEG_CACHE"] = str(stack.work / "model-cache")  # not the user's cache: fresh versions
    params = json.dumps({
        "inputs": "s3://frames/in", "output": "s3://predictions/run", "model": f"models:/{NAME}@champion",
        "shards": 2, "skip_bad": True,
    })  # fmt: skip

    def run_deployment() -> None:
        run = stack.cli(
            "prefect", "deployment", "run", "predict/cityscapes-local", "--params", params,
            "--watch", "--watch-interval", "2", "--watch-timeout", "300", timeout=330,
        )  # fmt: skip
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{log_tail(worker_log)}"

    with local_worker(stack) as worker_log:
        run_deployment()
        manifest = _manifest(s3)
        assert len(manifest) == 7
        assert [r["status"] for r in manifest].count("ok") == 6
        (bad,) = [r for r in manifest if r["status"] == "failed"]
        assert bad["input"] == "s3://frames/in/cut.jpg" and "truncated or corrupt JPEG" in bad["error"]
        assert {(r["model_name"], r["model_version"]) for r in manifest} == {(NAME, "1")}
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="predictions")["Contents"]}
        assert len([k for k in keys if k.startswith("run/trainIds/")]) == 6
        assert not [k for k in keys if k.startswith("run/manifest.") and k != "run/manifest.jsonl"]

        # Interrupted after two inputs: their lines remain, the other outputs are gone. A rerun resumes.
        kept = [r for r in manifest if r["status"] == "ok"][:2]
        body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        s3.put_object(Bucket="predictions", Key="run/manifest.jsonl", Body=body.encode())
        kept_outputs = {path for r in kept for path in r["outputs"].values()}
        for key in keys:
            output = key.startswith(("run/trainIds/", "run/labelIds/", "run/overlay/"))
            if output and f"s3://predictions/{key}" not in kept_outputs:
                s3.delete_object(Bucket="predictions", Key=key)
        run_deployment()
    assert len(_manifest(s3)) == 7
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="predictions")["Contents"]}
    assert len([k for k in keys if k.startswith("run/trainIds/")]) == 6

    artifacts = client_calls(stack.api_url, lambda client: client.read_artifacts())
    summaries = sorted((a for a in artifacts if a.key == "predict-summary"), key=lambda a: a.created)
    assert len(summaries) == 2
    assert "7 inputs: 6 segmented, 0 done before, 1 failed" in summaries[0].data
    assert "7 inputs: 4 segmented, 2 done before, 1 failed" in summaries[1].data
    assert "`s3://frames/in/cut.jpg`" in summaries[1].data
