"""End to end, as a user would run it: a real Prefect server and process worker, the local variant of
deploy/prefect.yaml deployed with deploy/deploy.sh, a real S3 endpoint (moto) behind a real MLflow server
with proxied artifacts, ``prefect deployment run finetune/cityscapes-local --watch``, then the deployed
data stage again (skipped: unchanged data). What a user watching the run sees comes back from the
Prefect API: the training's epoch lines and the evaluation summaries in the stages' logs, the progress and
latest-epoch artifacts. Sentinel secrets in every process's environment must not show up in anything the
runs produced."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.prefectstack import (
    MODEL_NAME,
    SENTINELS,
    Stack,
    client_calls,
    flow_run_logs,
    local_worker,
    log_tail,
    runs_of,
    stack_fixture,  # noqa: F401 (the "stack" fixture)
    tiny_overrides,
)
from tests.s3server import TEST_CREDENTIALS

ARTIFACT_KEYS = [
    "iou-baseline-vs-finetuned",
    "mlflow-pipeline-run",
    "mlflow-training-run",
    "registered-model-version",
    "finetune-summary",
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deployed_flow_end_to_end(stack: Stack) -> None:
    import boto3
    from mlflow import MlflowClient

    # Two epochs: the progress artifact and the epoch table are updated after each.
    params = json.dumps({"recipe": "demo", "overrides": [*tiny_overrides(stack.work), "train.epochs=2"]})
    with local_worker(stack) as worker_log:
        run = stack.cli(
            "prefect", "deployment", "run", "finetune/cityscapes-local", "--params", params,
            "--watch", "--watch-interval", "2", "--watch-timeout", "420", timeout=450,
        )  # fmt: skip
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{log_tail(worker_log)}"
        # Again with unchanged data: the deployed data-preparation stage skips the work.
        rerun = stack.cli(
            "prefect", "deployment", "run", "prepare-data/cityscapes-local", "--params", params,
            "--watch", "--watch-interval", "1", "--watch-timeout", "120", timeout=150,
        )  # fmt: skip
        assert rerun.returncode == 0, f"{rerun.stdout}\n{rerun.stderr}\n{log_tail(worker_log)}"

    flow_runs, task_runs = runs_of(stack.api_url)
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

    artifacts = client_calls(stack.api_url, read_artifacts)
    assert set(ARTIFACT_KEYS) <= {artifact.key for artifact in artifacts if artifact.flow_run_id == parent.id}
    table = next(a for a in artifacts if a.key == "iou-baseline-vs-finetuned" and a.flow_run_id == parent.id)
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert rows[-1]["class"] == "mIoU" and len(rows) == 20

    # Watching it: the stages' INFO lines in their flow runs' logs (under a worker, not only from the CLI)
    # and the train stage's artifacts.
    def stage_runs(stage: str) -> list[Any]:
        return [run.id for run in flow_runs if run.name == f"{parent.name}-{stage}"]

    (train_run,) = stage_runs("train")
    train_log = "\n".join(flow_run_logs(stack.api_url, [train_run]))
    for line in ("epoch 1/2 step 2/2 loss", "epoch 2/2 step 2/2 loss", " img/s ETA ", "epoch 2/2: val mIoU"):
        assert line in train_log, train_log
    assert "cityseg-progress" not in train_log  # rank 0's records became the artifacts below
    evaluation_log = "\n".join(flow_run_logs(stack.api_url, stage_runs("evaluate")))
    for name in ("baseline-paper-baseline", "finetuned"):
        assert f"evaluation {name}: val mIoU" in evaluation_log, evaluation_log
    assert "exported " in "\n".join(flow_run_logs(stack.api_url, stage_runs("export")))
    (progress,) = [a for a in artifacts if a.key == "training-progress" and a.flow_run_id == train_run]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert progress.description.endswith("epoch 2/2, ETA 0:00:00")
    epochs = sorted(
        (a for a in artifacts if a.key == "training-epoch" and a.flow_run_id == train_run),
        key=lambda a: a.created,
    )
    assert [json.loads(a.data)[0]["epoch"] for a in epochs] == ["1/2", "2/2"]  # a version per epoch
    (last,) = json.loads(epochs[-1].data)
    assert last["train loss"] > 0 and last["images/s"] > 0 and 0 <= last["val mIoU (%)"] <= 100

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
