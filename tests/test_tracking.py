import json

import mlflow
import pytest

from components import storage, tracking
from components.config import load_config


def test_a_local_store_keeps_artifacts_beside_its_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would write ./mlruns here
    cfg = load_config("demo", [f"run_dir={tmp_path / 'run'}", "tracking.system_metrics=false"])
    with tracking.mlflow_run(cfg, "local"):
        mlflow.log_text("hello", "note.txt")
        artifact_uri = mlflow.get_artifact_uri()
    assert artifact_uri.startswith((tmp_path / "run" / "mlartifacts").as_uri())
    assert not (tmp_path / "mlruns").exists()
    run = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")[0]
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert run.data.tags["recipe"] == "demo" and run.data.tags["git_commit"]


@pytest.mark.slow
def test_direct_s3_mode_writes_artifacts_to_the_bucket(tmp_path, s3_endpoint, monkeypatch):
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    storage.s3_client().create_bucket(Bucket="direct")
    cfg = load_config(
        "demo",
        [
            f"run_dir={tmp_path}",
            "tracking.system_metrics=false",
            "tracking.artifact_location=s3://direct/mlflow",
        ],
    )
    with tracking.mlflow_run(cfg, "direct") as run:
        mlflow.log_text("hello", "note.txt")
    keys = [obj["Key"] for obj in storage.s3_client().list_objects_v2(Bucket="direct")["Contents"]]
    assert f"mlflow/{run.info.run_id}/artifacts/note.txt" in keys
    assert f"mlflow/{run.info.run_id}/artifacts/config.yaml" in keys


def test_pipeline_run_is_the_parent_of_stage_runs_that_record_the_dataset(tmp_path, synthetic_root):
    from components.data.prepare import dataset_fingerprint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"run_dir={tmp_path}", f"tracking.tracking_uri={uri}", "tracking.system_metrics=false"]
    cfg = load_config("demo", [*common, f"data.root={synthetic_root}"])
    parent_id = tracking.start_pipeline_run(cfg, "demo-pipeline", tags={"prefect_flow_run_id": "f-1"})
    stage_cfg = load_config(
        "demo", [*common, f"data.root={synthetic_root}", f"tracking.parent_run_id={parent_id}"]
    )
    with tracking.mlflow_run(stage_cfg, "stage") as child:
        tracking.log_dataset(stage_cfg, "evaluation")
    tracking.end_pipeline_run(cfg, parent_id, {"finetuned_val_miou": 0.25})

    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "demo-pipeline"
    assert parent.data.metrics == {"finetuned_val_miou": 0.25}
    assert parent.data.params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert parent.data.tags["prefect_flow_run_id"] == "f-1"
    child = client.get_run(child.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    (recorded,) = child.inputs.dataset_inputs
    fingerprint = dataset_fingerprint(synthetic_root)
    assert recorded.dataset.name == "cityscapes-synthetic" and recorded.dataset.digest == fingerprint[:32]
    assert json.loads(recorded.dataset.profile) == {"train_images": 8, "val_images": 4}
    assert str(synthetic_root.resolve()) in recorded.dataset.source
    assert {tag.key: tag.value for tag in recorded.tags} == {
        "fingerprint": fingerprint,
        "mlflow.data.context": "evaluation",
    }

    failed_id = tracking.start_pipeline_run(cfg, "demo-pipeline")
    tracking.end_pipeline_run(cfg, failed_id, failed=True)
    assert client.get_run(failed_id).info.status == "FAILED"


def test_resuming_a_run_the_store_lacks_logs_to_a_new_run(tmp_path, caplog):
    """A checkpoint whose MLflow run is in another store (a recreated server): a new run, not a crash."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        "demo", [f"run_dir={tmp_path}", f"tracking.tracking_uri={uri}", "tracking.system_metrics=false"]
    )
    with tracking.training_run(cfg, {}) as first:
        pass
    with tracking.training_run(cfg, {}, run_id=first.info.run_id) as continued:
        assert continued.info.run_id == first.info.run_id
    missing = "0" * 32
    with tracking.training_run(cfg, {}, run_id=missing) as fresh:
        assert fresh.info.run_id not in (missing, first.info.run_id)
    assert f"the checkpoint's MLflow run {missing} is not in {uri}" in caplog.text
    params = mlflow.MlflowClient(uri).get_run(fresh.info.run_id).data.params
    assert params["optimizer.lr"] == str(cfg.optimizer.lr)  # a new run records its config
