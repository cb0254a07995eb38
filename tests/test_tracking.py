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
