import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from components import storage, tracking
from components.config import load_config

ROOT = Path(__file__).resolve().parent.parent


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


def _sqlite_config(tmp_path, *overrides):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"run_dir={tmp_path}", f"tracking.tracking_uri={uri}", "tracking.system_metrics=false"]
    return load_config("demo", [*common, *overrides]), mlflow.MlflowClient(uri)


def _crashed_child(client, parent_id, name, tags=None):
    """A run a killed process left RUNNING under ``parent_id``."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    tags = {"mlflow.parentRunId": parent_id, **(tags or {})}
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def test_a_retry_reopens_its_pipeline_run_and_closes_what_the_killed_attempt_left_running(tmp_path):
    cfg, client = _sqlite_config(tmp_path)
    parent_id = tracking.start_pipeline_run(cfg, "demo-pipeline", tags={tracking.FLOW_RUN_TAG: "f-1"})
    baseline_id = _crashed_child(client, parent_id, "baseline")
    client.set_terminated(baseline_id)  # completed before the kill: left as it is
    train_id = _crashed_child(client, parent_id, "train")
    point_id = _crashed_child(
        client, parent_id, "point", {tracking.FLOW_RUN_TAG: "f-2"}
    )  # another flow run's

    assert tracking.find_pipeline_run(cfg, "f-1") == parent_id
    assert tracking.find_pipeline_run(cfg, "f-3") is None
    assert tracking.running_pipeline_runs(cfg) == {parent_id: "f-1", point_id: "f-2"}
    tracking.reopen_run(cfg, parent_id, "flow run f-1 retried (attempt 2)")

    parent = client.get_run(parent_id)
    assert parent.info.status == "RUNNING"
    assert parent.data.tags[tracking.INTERRUPTED_TAG] == "flow run f-1 retried (attempt 2)"
    assert client.get_run(baseline_id).info.status == "FINISHED"
    assert client.get_run(point_id).info.status == "RUNNING"
    stale = client.get_run(train_id)
    assert stale.info.status == "KILLED" and stale.info.end_time is not None
    reason = "left RUNNING by an interrupted attempt; flow run f-1 retried (attempt 2)"
    assert stale.data.tags[tracking.CLOSED_REASON_TAG] == reason

    # The resumed training job continues its run: finished, and it says it was interrupted.
    stage_cfg, _ = _sqlite_config(tmp_path, f"tracking.parent_run_id={parent_id}")
    with tracking.training_run(stage_cfg, {}, run_id=train_id):
        pass
    resumed = client.get_run(train_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags[tracking.INTERRUPTED_TAG] == reason
    assert tracking.CLOSED_REASON_TAG not in resumed.data.tags
    tracking.end_pipeline_run(cfg, parent_id)
    assert client.get_run(parent_id).info.status == "FINISHED"


def test_a_flow_runs_pipeline_run_is_continued_by_its_retry_and_failed_by_an_error(tmp_path):
    cfg, client = _sqlite_config(tmp_path)
    first_attempt = tracking.pipeline_run(cfg, "f-1", "demo-resnet50", 1, {"sweep": "true"})
    with pytest.raises(RuntimeError, match="stage failed"), first_attempt as (run_id, metrics):
        metrics["finetuned_val_miou"] = 0.5
        raise RuntimeError("stage failed")
    first = client.get_run(run_id)
    assert first.info.status == "FAILED" and first.info.run_name == "demo-resnet50"
    assert first.data.tags[tracking.FLOW_RUN_TAG] == "f-1" and first.data.tags["sweep"] == "true"
    assert not first.data.metrics, "a failed body logs no summary"

    with tracking.pipeline_run(cfg, "f-1", "ignored on a retry", 2) as (retried_id, metrics):
        assert client.get_run(retried_id).info.status == "RUNNING"
        metrics["finetuned_val_miou"] = 0.5
    assert retried_id == run_id
    retried = client.get_run(run_id)
    assert retried.info.status == "FINISHED" and retried.data.metrics == {"finetuned_val_miou": 0.5}
    assert retried.data.tags[tracking.INTERRUPTED_TAG] == "flow run f-1 retried (attempt 2)"


def test_closing_an_abandoned_pipeline_run_closes_its_stage_runs_with_the_reason(tmp_path):
    cfg, client = _sqlite_config(tmp_path)
    parent_id = tracking.start_pipeline_run(cfg, "demo-pipeline", tags={tracking.FLOW_RUN_TAG: "f-1"})
    stage_id = _crashed_child(client, parent_id, "baseline")
    tracking.close_run(cfg, parent_id, "flow run f-1 ended Crashed")
    for run_id in (parent_id, stage_id):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags[tracking.CLOSED_REASON_TAG] == "flow run f-1 ended Crashed"
    assert tracking.running_pipeline_runs(cfg) == {}


def test_an_epoch_is_logged_once_even_when_a_resumed_job_redoes_it(tmp_path):
    cfg, client = _sqlite_config(tmp_path)
    with tracking.training_run(cfg, {}) as run:
        tracking.log_epoch({"train_loss": 2.0, "per_class_iou": {"road": 0.5}}, 1)
    with tracking.training_run(cfg, {}, run_id=run.info.run_id):
        tracking.log_epoch({"train_loss": 2.0}, 1)  # killed before epoch 1's checkpoint landed
        tracking.log_epoch({"train_loss": 1.5}, 2)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted((metric.step, metric.value) for metric in history) == [(1, 2.0), (2, 1.5)]


def test_the_experiment_opens_on_its_runs(tmp_path):
    """MLflow 3's UI shows an experiment without ``mlflow.experimentKind`` as GenAI (overview, traces)."""
    cfg, client = _sqlite_config(tmp_path)
    tracking.configure(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    older = client.create_experiment("made-before", artifact_location=(tmp_path / "older").as_uri())
    tracking.configure(_sqlite_config(tmp_path, "tracking.experiment=made-before")[0])
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"


def test_no_git_warning_without_git_and_the_commit_comes_from_git_commit(tmp_path):
    """The image has no git executable: MLflow's run start must not print GitPython's error."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = (
        "from components import tracking\n"
        "from components.config import load_config\n"
        f"cfg = load_config('demo', ['run_dir={tmp_path}', 'tracking.tracking_uri={uri}', "
        "'tracking.system_metrics=false'])\n"
        "with tracking.mlflow_run(cfg, 'no-git') as run:\n"
        "    print(run.info.run_id)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "GIT_PYTHON"))}
    env.update(GIT_PYTHON_GIT_EXECUTABLE=str(tmp_path / "no-git"), GIT_COMMIT="0123abcd")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for noise in ("bad git executable", "failed to import git"):
        assert noise not in result.stderr.lower(), result.stderr
    run_id = result.stdout.split()[-1]
    tags = mlflow.MlflowClient(uri).get_run(run_id).data.tags
    assert tags["mlflow.source.git.commit"] == tags["git_commit"] == "0123abcd"


def test_ui_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.ui_url(load_config("demo", [f"run_dir={tmp_path}"])) == "http://127.0.0.1:5000"
    assert (
        tracking.ui_url(load_config("demo", ["tracking.tracking_uri=http://mlflow:5000/"]))
        == "http://mlflow:5000"
    )
    cfg = load_config("demo", ["orchestration.mlflow_ui_url=https://mlflow.example.org/"])
    assert tracking.ui_url(cfg) == "https://mlflow.example.org"
    assert tracking.model_version_url(cfg, "seg", "3") == "https://mlflow.example.org/#/models/seg/versions/3"
